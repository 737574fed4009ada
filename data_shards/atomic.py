"""Write a file so that a reader sees the old file or the whole new one, never half of it.

Every writer of the project that replaces a file (manifests, shard progress records, checkpoint
pieces and markers, exported weights, metrics, configs, figures, study stamps, manifests for
Kubernetes) goes through this module: the content goes to a hidden temporary file in the
same folder (``.<name>.tmp-<pid>-<random>``: same file system, so the rename is atomic; the
``.*.tmp-*`` pattern is what ``data_shards.writer`` sweeps up after a crash), is optionally
fsync'd, and is renamed over the target. On any error the temporary file is removed and the
target is left as it was.

The variants take bytes, text, a JSON-able object, a callable that writes to a binary file
object (``lambda f: fig.savefig(f, format="png")``, ``lambda f: image.save(f, format="PNG")``)
or, :func:`atomic_save`, a callable that writes to a file name (``lambda tmp: torch.save(obj, tmp)``).
It lives in ``data_shards`` because ``trainer`` and ``launch`` may import ``data_shards`` but not
the other way round.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Create (exclusively, with the usual permissions) a hidden temporary file beside ``path``."""
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


@contextlib.contextmanager
def _replacing(path: str | os.PathLike, mkdir: bool) -> Iterator[tuple[int, Path]]:
    """Yield (open descriptor, temporary path) beside ``path``; rename it to ``path`` when the body
    returns, remove it when the body raises. The body owns (closes) the descriptor."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, fsync: bool = False,
                 mkdir: bool = False) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it when ``fsync``, then rename
    it to ``path``; returns ``path``. ``mkdir`` creates the parent folder first."""
    with _replacing(path, mkdir) as (fd, _):
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    return Path(path)


def atomic_save(path: str | os.PathLike, save: Callable[[Path], Any], *, fsync: bool = False,
                mkdir: bool = False) -> Path:
    """Like :func:`atomic_write` for savers that want a file name: ``save(temporary path)`` writes the
    file itself (``lambda tmp: torch.save(obj, tmp)``: torch's own file writer, as with a plain save)."""
    with _replacing(path, mkdir) as (fd, tmp):
        os.close(fd)
        save(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False, mkdir: bool = False) -> Path:
    """``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), fsync=fsync, mkdir=mkdir)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False, mkdir: bool = False,
                      encoding: str = "utf-8") -> Path:
    """``text`` to ``path`` atomically, encoded with ``encoding`` (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync, mkdir=mkdir)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = False, mkdir: bool = False,
                      trailing_newline: bool = False, **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, **dumps_kwargs)`` (plus a newline when ``trailing_newline``) to ``path`` atomically."""
    text = json.dumps(obj, **dumps_kwargs) + ("\n" if trailing_newline else "")
    return atomic_write_text(path, text, fsync=fsync, mkdir=mkdir)
