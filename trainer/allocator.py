"""Keep the memory a training step frees for the next step (glibc malloc settings), instead of
giving it back to the operating system and faulting it in again.

Each step allocates and frees the same large buffers (activations, gradients, the warped and
padded candidates of the photometric loss). glibc serves blocks above its mmap threshold (128 KiB,
rising to at most 32 MiB as such blocks are freed) with fresh mappings, and returns the top of its
heap to the system once more than twice that threshold is free there. The next step then touches
new pages, and the kernel zeroes every one on its first touch: a page fault per 4 KiB, paid by
the step (docs/depth.md, "Step overhead"). :func:`keep_freed_memory` serves every block from the
heap (no mmap: at 192x640 the warped candidates alone are 49 MiB, above glibc's largest mmap
threshold) and keeps up to ~2 GiB of free heap top mapped, so freed blocks are reused: the
process's resident memory stays near its peak, as a caching allocator's does.

Torch-free (ctypes only). Anything but glibc (macOS, musl), and a process whose user chose glibc's
settings through its ``MALLOC_*_`` environment variables, is left as it is.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("geoprime.allocator")

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""``mallopt`` parameter numbers (glibc's malloc.h)."""

TRIM_THRESHOLD = 2 ** 31 - 1
"""Free memory at the heap's top kept mapped (``mallopt`` takes an int: ~2 GiB, its largest value)."""

USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
"""glibc's own environment variables: when any is set, the user's settings stay."""


def keep_freed_memory(env: dict[str, str] | None = None) -> bool:
    """No mmap'd blocks and a high trim threshold for a training process (see module doc); True when set.
    ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    chosen = [name for name in USER_SETTINGS if env.get(name)]
    if chosen:
        log.info("malloc: left as set by %s", ", ".join(chosen))
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (and these mallopt numbers)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.info("malloc: every block from the heap, freed memory kept for reuse (%s)", "set" if ok else "refused")
    return ok
