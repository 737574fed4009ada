"""Atomic, verifiable directory checkpoints holding everything stateful, and auto-resume.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/          one whole checkpoint
      dcp/ | deepspeed/     model + optimizer (torch.distributed.checkpoint, or DeepSpeed's own)
      engine_state.pt       scheduler + grad scaler (DCP strategies; DeepSpeed keeps its own)
      train_state.pt        rank 0: step, epoch, tracker run id, resolved config, world size...
      rank_00000.pt ...     per rank: RNG states, data-loader position
      COMPLETE.json         written last: every file with its size and sha256
    latest                  text file naming the newest whole checkpoint
    .step_00000200.partial  a checkpoint being written (never taken for a whole one)

A checkpoint is whole only if ``COMPLETE.json`` exists and every file it lists has the listed
size and sha256; anything else is skipped on resume with a warning naming it. All ranks must
see the same ``out_dir`` (a shared file system on multi-node runs).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from data_shards.atomic import atomic_save, atomic_write_text

log = logging.getLogger("geoprime.checkpoint")

MARKER = "COMPLETE.json"
TRAIN_STATE = "train_state.pt"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or damaged (the message names it and what is wrong)."""


def step_dir_name(step: int) -> str:
    """``step_00000100`` for step 100."""
    return f"step_{int(step):08d}"


def rank_file(rank: int) -> str:
    """Name of the per-rank state file."""
    return f"rank_{int(rank):05d}.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text, fsync=True)


def write_marker(ckpt: Path, step: int, world_size: int) -> None:
    """List every file of ``ckpt`` with size and sha256 in ``COMPLETE.json`` (written last)."""
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MARKER:
            files[p.relative_to(ckpt).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    _atomic_write_text(ckpt / MARKER, json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))


def verify(ckpt: str | Path) -> dict[str, Any]:
    """The marker of a whole checkpoint; raises :class:`CheckpointError` naming what is wrong."""
    ckpt = Path(ckpt)
    marker = ckpt / MARKER
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is partial: no {MARKER} (the save did not finish)")
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable {MARKER} ({e})") from None
    for rel, meta in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is damaged: file {rel} is missing")
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: file {rel} has {p.stat().st_size} bytes, "
                                  f"expected {meta['size']}")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: file {rel} fails its sha256 check")
    return info


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root``, newest step first (whole or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_latest_whole(root: str | Path) -> Optional[Path]:
    """The newest whole checkpoint under ``root`` by step; damaged / partial ones are skipped with
    a warning. (``latest`` is for people and tools: a crash between the rename and the pointer
    update leaves it one behind, so it is not trusted here.)"""
    for ckpt in list_checkpoints(root):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


class Checkpointer:
    """Saves and restores a run through an :class:`~trainer.engine.Engine` (collective calls),
    with the run's other ``Stateful`` objects taken by name (``trainer/run_state.py``): shared
    ones (rank 0's) and per-rank ones. Their state dicts hold tensors / numbers / strings / lists.
    """

    def __init__(self, root: str | Path, engine: Any, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last}: keep at least one checkpoint")
        self.root = Path(root)
        self.engine = engine
        self.keep_last = int(keep_last)

    def save(self, step: int, shared: Mapping[str, Any], per_rank: Mapping[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically: the engine's state, each ``shared`` Stateful's
        ``state_dict()`` (rank 0's, in ``train_state.pt``) and each ``per_rank`` one's (every
        rank's, in its rank file), by name. Collective; returns the final directory."""
        eng = self.engine
        final = self.root / step_dir_name(step)
        partial = self.root / f".{final.name}.partial"
        if eng.is_logging_rank:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir()
        eng.barrier()
        _atomic_torch_save({name: obj.state_dict() for name, obj in per_rank.items()}, partial / rank_file(eng.rank))
        eng.save_state(partial)
        if eng.is_logging_rank:
            train_state = {name: obj.state_dict() for name, obj in shared.items()}
            _atomic_torch_save({**train_state, "step": int(step), "world_size": eng.world_size}, partial / TRAIN_STATE)
        eng.barrier()
        if eng.is_logging_rank:
            write_marker(partial, step, eng.world_size)
            if final.exists():  # a damaged leftover of the same step
                shutil.rmtree(final)
            os.rename(partial, final)
            _atomic_write_text(self.root / LATEST, final.name + "\n")
            self._prune(keep=final)
            log.info("checkpoint saved: %s", final)
        eng.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        """Delete all but the newest ``keep_last`` checkpoints, and leftover partial ones."""
        for p in self.root.glob(".step_*.partial"):
            shutil.rmtree(p, ignore_errors=True)
        for old in list_checkpoints(self.root)[self.keep_last:]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from for ``train.resume`` (auto | never | <path>), agreed by all
        ranks (rank 0 decides: verification reads every file once)."""
        path: Optional[str] = None
        err: Optional[str] = None
        if self.engine.is_logging_rank:
            if resume == "never":
                path = None
            elif resume == "auto":
                found = find_latest_whole(self.root)
                path = str(found) if found else None
            else:
                try:
                    verify(resume)
                    path = str(resume)
                except CheckpointError as e:
                    err = f"train.resume={resume!r}: {e}"
        path, err = self.engine.broadcast_object((path, err))
        if err:
            raise CheckpointError(err)
        return Path(path) if path else None

    def load(self, ckpt: str | Path, shared: Mapping[str, Any], per_rank: Mapping[str, Any],
             validate: Optional[Callable[[dict[str, Any]], None]] = None) -> bool:
        """Restore the engine's state and each named Stateful from ``ckpt``; returns whether the
        per-rank ones were restored (False when the checkpoint was written by another world
        size: the caller then re-derives RNG and data position).

        ``validate(train_state)`` runs before anything is loaded (or converted) and may raise to
        refuse the checkpoint.
        """
        ckpt = Path(ckpt)
        eng = self.engine
        train_state = torch.load(ckpt / TRAIN_STATE, map_location="cpu", weights_only=True)
        if validate is not None:
            validate(train_state)
        saved_world = int(train_state["world_size"])
        eng.load_state(ckpt, saved_world_size=saved_world)
        _restore(shared, train_state, ckpt / TRAIN_STATE)
        same_world = saved_world == eng.world_size
        if same_world:
            path = ckpt / rank_file(eng.rank)
            _restore(per_rank, torch.load(path, map_location="cpu", weights_only=True), path)
        eng.barrier()
        log.info("resumed from %s (step %d)", ckpt, int(train_state["step"]))
        return same_world


def _restore(objects: Mapping[str, Any], state: dict[str, Any], path: Path) -> None:
    missing = [name for name in objects if name not in state]
    if missing:
        raise CheckpointError(f"{path}: no saved state for {missing} (written by an older geoprime?); "
                              "resume it with that version or start a new out_dir")
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
