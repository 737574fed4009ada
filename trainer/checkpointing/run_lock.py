"""One job per run folder: an exclusive lock on ``<out_dir>/.geoprime.lock``, naming its holder.

Two jobs writing the same ``out_dir`` would overwrite each other's checkpoints and weights. The
training process of rank 0 holds an ``fcntl`` lock for the whole run; the file records who holds
it (host, pid, start time, command), so a refused job can name the holder. The kernel releases
the lock when the holder dies (kill -9 included), so a lock left by a dead job is stale by
construction: the next job takes it and says whose it was. (On network file systems without
working ``flock`` the record still names the last holder; there the scheduler must keep jobs
apart.)
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from trainer.errors import ConfigError

log = logging.getLogger("geoprime.lock")

LOCK_NAME = ".geoprime.lock"


class OutDirBusy(ConfigError):
    """Another live job holds the run folder's lock."""


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {started} ({holder.get('command', '?')})"


def read_holder(out_dir: str | Path) -> dict[str, Any]:
    """The last holder's record (``{}`` when none or unreadable)."""
    try:
        return json.loads((Path(out_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def is_locked(out_dir: str | Path) -> Optional[str]:
    """A description of the live holder if another process holds the lock, else None (no side effect)."""
    path = Path(out_dir) / LOCK_NAME
    if not path.is_file():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(read_holder(out_dir))
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


class OutDirLock:
    """Hold the lock of ``out_dir`` (context manager); :class:`OutDirBusy` names a live holder."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self._file: Any = None

    def acquire(self) -> "OutDirLock":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.out_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OutDirBusy(f"out_dir={str(self.out_dir)!r} is in use by {_describe(read_holder(self.out_dir))}; "
                             "wait for that job, stop it, or use another out_dir") from None
        previous = read_holder(self.out_dir)
        if previous:
            log.info("out_dir lock: the previous holder (%s) is gone; taking it over", _describe(previous))
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "command": " ".join(sys.argv)[:300]}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
