"""Checkpoint file writes, with an optional stand-in for slow storage (a network volume).

Every file a checkpoint writes goes through :func:`torch_save` or :func:`dcp_writer`. With the test /
benchmark hook ``GEOPRIME_TEST_WRITE_MB_S=<MB/s>`` set, each write call is held for ``bytes / rate``
seconds after it returns (a sleep, which releases the GIL as blocking I/O does), so a save takes as
long as it would on storage of that speed: how the tests catch a save in flight and how
``benchmarks/bench_ckpt_stall.py`` shows the stall on a ~100 MB/s volume. Reads are not held.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from data_shards.atomic import atomic_write

#: test / benchmark hook: checkpoint writes go at most this many MB/s (10^6 bytes)
WRITE_RATE_ENV = "GEOPRIME_TEST_WRITE_MB_S"


def write_rate() -> Optional[float]:
    """Bytes per second the hook allows, None when it is off."""
    value = os.environ.get(WRITE_RATE_ENV)
    if not value:
        return None
    rate = float(value) * 1e6
    if rate <= 0:
        raise ValueError(f"{WRITE_RATE_ENV}={value!r}: expected a positive number of MB/s")
    return rate


class _Held:
    """A writable file whose ``write`` takes as long as it would at ``rate`` bytes/s."""

    def __init__(self, f: Any, rate: float) -> None:
        self._f, self._rate = f, rate

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        time.sleep(memoryview(data).nbytes / self._rate)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_Held":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.__exit__(*exc)


def held(f: Any) -> Any:
    """``f`` itself, or ``f`` held to the hook's rate when it is on."""
    rate = write_rate()
    return _Held(f, rate) if rate else f


def torch_save(obj: Any, path: Path, *, zipfile: bool = True) -> None:
    """``torch.save`` to ``path`` atomically (temporary name, fsync, rename), at the hook's rate;
    ``zipfile=False``: torch's legacy format (DeepSpeed's choice when so configured). Through a Python
    file object, closed as soon as a write fails (a full disk gets its space back at once, not when the
    exception is collected)."""
    atomic_write(path, lambda f: torch.save(obj, held(f), _use_new_zipfile_serialization=zipfile), fsync=True)


class _HeldFileSystem:
    """DCP's local file system with every stream it creates for writing held to the hook's rate."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with self._fs.create_stream(path, mode) as stream:
            yield held(stream) if ("w" in mode or "a" in mode) else stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)


def dcp_writer(path: Path) -> Any:
    """A ``torch.distributed.checkpoint`` writer for the folder ``path`` (fsync'd files), at the hook's rate."""
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(path))
    if write_rate():
        writer.fs = _HeldFileSystem(writer.fs)
    return writer
