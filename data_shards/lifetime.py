"""Process lifetime on Linux: a child that dies with its parent, a parent that adopts orphans.

Used down the whole process tree of a run (``launch run`` -> torchrun -> ranks -> loader workers), so
that no part of it outlives the part that started it, however that one died (SIGKILL included). It
lives in ``data_shards`` because ``launch``, ``trainer`` and the loader all need it and may import
``data_shards`` but not the other way round. Elsewhere (no ``prctl``) the calls return False.
"""
from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when the thread that forked it ends
    (``PR_SET_PDEATHSIG``; cleared by the kernel in this process's own children)."""
    return _prctl(_PR_SET_PDEATHSIG, int(sig))


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (``PR_SET_CHILD_SUBREAPER``),
    so that it can still find and end them."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)
