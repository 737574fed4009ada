"""A checkpoint's completion marker: what makes a checkpoint folder *whole*.

``COMPLETE.json`` is written last and lists every file of the folder with its size and sha256. A
file larger than :data:`PIECE_BYTES` is hashed in pieces (``sha256_pieces``: one digest per piece),
so that writing and checking the marker run on several cores (hashlib releases the GIL): the one
model + optimizer file of a single process is otherwise one long sequential pass, paid on every
save, the preemption save included. Markers with a whole-file ``sha256`` are read as before.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from data_shards.atomic import atomic_write_text

MARKER = "COMPLETE.json"
#: files above this size are hashed as independent pieces of this size
PIECE_BYTES = 64 << 20
_READ_BYTES = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or damaged (the message names it and what is wrong)."""


def _hash_range(path: Path, start: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(_READ_BYTES, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def digests(files: list[Path], whole: list[bool] | None = None) -> list[dict[str, Any]]:
    """``{"size", "sha256"}``, or ``{"size", "sha256_pieces"}`` for a file above :data:`PIECE_BYTES`,
    for each file, hashed in parallel threads. ``whole[i]`` forces one digest of the whole file
    (markers written before pieces existed)."""
    sizes = [p.stat().st_size for p in files]
    pieces = [size > PIECE_BYTES and not (whole and whole[i]) for i, size in enumerate(sizes)]
    jobs: list[tuple[int, int, int]] = []  # (file index, start, length)
    for i, size in enumerate(sizes):
        jobs += [(i, s, min(PIECE_BYTES, size - s)) for s in range(0, size, PIECE_BYTES)] if pieces[i] else [(i, 0, size)]
    with ThreadPoolExecutor(_threads()) as pool:
        hashed = list(pool.map(lambda job: _hash_range(files[job[0]], job[1], job[2]), jobs))
    out: list[dict[str, Any]] = [{"size": size} for size in sizes]
    for (i, _, _), digest in zip(jobs, hashed):
        if pieces[i]:
            out[i].setdefault("sha256_pieces", []).append(digest)
        else:
            out[i]["sha256"] = digest
    return out


def write_marker(ckpt: Path, step: int, world_size: int) -> int:
    """List every file of ``ckpt`` with size and sha256 in ``COMPLETE.json`` (written last, fsync'd);
    returns the checkpoint's size in bytes."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MARKER)
    listed = {p.relative_to(ckpt).as_posix(): d for p, d in zip(files, digests(files))}
    atomic_write_text(ckpt / MARKER, json.dumps({"step": step, "world_size": world_size, "files": listed,
                                                 "piece_bytes": PIECE_BYTES}, indent=1), fsync=True)
    return sum(d["size"] for d in listed.values())


def read_marker(ckpt: str | Path) -> dict[str, Any]:
    """The marker of ``ckpt`` as written, unchecked; raises :class:`CheckpointError` if unreadable."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    marker = ckpt / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is partial: no {MARKER} (the save did not finish)")
    try:
        info = json.loads(marker.read_text())
        if not isinstance(info["files"], dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable {MARKER} ({e})") from None
    return info


def verify(ckpt: str | Path) -> dict[str, Any]:
    """The marker of a whole checkpoint; raises :class:`CheckpointError` naming what is wrong."""
    ckpt = Path(ckpt)
    info = read_marker(ckpt)
    files = info["files"]
    for rel, meta in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is damaged: file {rel} is missing")
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: file {rel} has {p.stat().st_size} bytes, "
                                  f"expected {meta['size']}")
    if int(info.get("piece_bytes", PIECE_BYTES)) != PIECE_BYTES:
        raise CheckpointError(f"checkpoint {ckpt}: {MARKER} hashes {info['piece_bytes']}-byte pieces, "
                              f"this version {PIECE_BYTES}")
    names = list(files)
    whole = ["sha256_pieces" not in files[rel] for rel in names]
    for rel, got in zip(names, digests([ckpt / rel for rel in names], whole)):
        want = files[rel]
        if got.get("sha256") != want.get("sha256") or got.get("sha256_pieces") != want.get("sha256_pieces"):
            raise CheckpointError(f"checkpoint {ckpt} is damaged: file {rel} fails its sha256 check")
    return info


def checkpoint_bytes(ckpt: str | Path) -> int:
    """Total size of a whole checkpoint's files, from its marker (0 when it has none)."""
    try:
        return sum(int(m["size"]) for m in read_marker(ckpt)["files"].values())
    except (CheckpointError, KeyError, TypeError, ValueError):
        return 0
