"""Free space for a checkpoint: checked before a save whose size is known, and named when a save fails.

A full disk reads ``no space left on <path>: N MiB needed, M free`` (torch's own error for it names
no path and no sizes: ``[enforce fail at inline_container.cc:672] unexpected pos ...``).
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

#: torch's zip writer reports a short write (a full disk) without errno, in this wording
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


def free_bytes(path: str | Path) -> int:
    """Bytes free to this user on the file system holding ``path`` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def mib(n: int) -> str:
    """``n`` bytes in MiB for people (KiB below one MiB, where whole MiB would read 0)."""
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def no_space_message(path: str | Path, needed: int, free: int) -> str:
    return f"no space left on {path}: {mib(needed)} needed, {mib(free)} free"


def space_shortfall(path: str | Path, needed: int) -> Optional[str]:
    """The one-line message when the file system of ``path`` has fewer than ``needed`` bytes free."""
    free = free_bytes(path)
    return no_space_message(path, needed, free) if needed > free else None


def is_out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from, or one a DCP ``CheckpointException`` collected
    from a rank) is a full disk or quota."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_SHORT_WRITE):
            return True
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint: rank -> (exception, stack)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()
                     if isinstance(f[0] if isinstance(f, tuple) else f, BaseException)]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return False
