"""Atomic, verifiable directory checkpoints holding everything stateful, and auto-resume.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/          one whole checkpoint
      dcp/ | deepspeed/     model + optimizer (torch.distributed.checkpoint, or DeepSpeed's own)
      engine_state.pt       scheduler + grad scaler (DCP strategies; DeepSpeed keeps its own)
      train_state.pt        rank 0: step, epoch, tracker run id, resolved config, world size...
      rank_00000.pt ...     per rank: RNG states, data-loader position
      COMPLETE.json         written last: every file with its size and sha256 (trainer/checkpoint_marker.py)
    latest                  text file naming the newest whole checkpoint
    .step_00000200.partial  a checkpoint being written (never taken for a whole one)
    .stopping.json          a stop signal's save in progress (trainer/stop_record.py)

A checkpoint is whole only if ``COMPLETE.json`` exists and every file it lists has the listed
size and sha256; anything else is skipped on resume with a warning naming it. All ranks must
see the same ``out_dir`` (a shared file system on multi-node runs).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from data_shards.atomic import atomic_save, atomic_write_text
from trainer import stop_record
from trainer.checkpoint_marker import MARKER, CheckpointError, checkpoint_bytes, verify, write_marker
from trainer.disk_space import free_bytes, is_out_of_space, no_space_message, space_shortfall

log = logging.getLogger("geoprime.checkpoint")

__all__ = ["MARKER", "CheckpointError", "Checkpointer", "find_latest_whole", "list_checkpoints", "rank_file",
           "step_dir_name", "verify", "write_marker"]

TRAIN_STATE = "train_state.pt"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")
#: test hook (documented in docs/engine.md): seconds a stop's save sleeps before its marker, so that a
#: test can kill it half written the way a too-short grace does
SLOW_STOP_SAVE_ENV = "GEOPRIME_TEST_STOP_SAVE_DELAY_S"


def step_dir_name(step: int) -> str:
    """``step_00000100`` for step 100."""
    return f"step_{int(step):08d}"


def rank_file(rank: int) -> str:
    """Name of the per-rank state file."""
    return f"rank_{int(rank):05d}.pt"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


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

    A save runs in phases, each timed into :attr:`last_save`: check the free space, *write* every
    piece into ``.step_X.partial`` (all ranks), *seal* it (rank 0: the marker's sizes and hashes),
    *commit* (rename, ``latest``) and *prune* old checkpoints (skipped when stopping on a signal:
    the next save does it).
    """

    def __init__(self, root: str | Path, engine: Any, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last}: keep at least one checkpoint")
        self.root = Path(root)
        self.engine = engine
        self.keep_last = int(keep_last)
        self.last_save: dict[str, float] = {}
        """Seconds per phase of the last save (write, seal, commit, prune, total) and its bytes."""

    def save(self, step: int, shared: Mapping[str, Any], per_rank: Mapping[str, Any], *,
             stopping: bool = False) -> Path:
        """Write checkpoint ``step`` atomically: the engine's state, each ``shared`` Stateful's
        ``state_dict()`` (rank 0's, in ``train_state.pt``) and each ``per_rank`` one's (every
        rank's, in its rank file), by name. ``stopping``: the save of a stop signal (no pruning).
        Collective; returns the final directory. A full disk is a :class:`CheckpointError` saying
        how much was needed and is free; the previous checkpoints stay whole."""
        eng = self.engine
        final = self.root / step_dir_name(step)
        partial = self.root / f".{final.name}.partial"
        t0 = time.perf_counter()
        self._prepare(partial)
        t_write = time.perf_counter()
        try:
            self._write(partial, step, shared, per_rank)
            if stopping and os.environ.get(SLOW_STOP_SAVE_ENV):
                time.sleep(float(os.environ[SLOW_STOP_SAVE_ENV]))
            eng.barrier()
            t_seal = time.perf_counter()
            size = write_marker(partial, step, eng.world_size) if eng.is_logging_rank else 0
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if is_out_of_space(e):
                shutil.rmtree(partial, ignore_errors=True)
                raise CheckpointError(f"{no_space_message(self.root, self._needed_bytes(), free_bytes(self.root))} "
                                      f"(checkpoint {final.name} not written; the previous ones are kept)") from e
            raise
        t_commit = time.perf_counter()
        if eng.is_logging_rank:
            if final.exists():  # a damaged leftover of the same step
                shutil.rmtree(final)
            os.rename(partial, final)
            atomic_write_text(self.root / LATEST, final.name + "\n", fsync=True)
        t_prune = time.perf_counter()
        if eng.is_logging_rank and not stopping:
            self._prune(keep=final)
        eng.barrier()
        t_end = time.perf_counter()
        self.last_save = {"check_s": t_write - t0, "write_s": t_seal - t_write, "seal_s": t_commit - t_seal,
                          "commit_s": t_prune - t_commit, "prune_s": t_end - t_prune, "total_s": t_end - t0,
                          "bytes": float(size)}
        if eng.is_logging_rank:
            log.info("checkpoint saved: %s (%.1f s, %.0f MiB)", final, t_end - t0, size / 2**20)
        return final

    def _prepare(self, partial: Path) -> None:
        """Rank 0 makes an empty ``partial`` folder once it knows the save fits on the disk; every
        rank raises the same :class:`CheckpointError` when it does not (collective)."""
        eng = self.engine
        problem: Optional[str] = None
        if eng.is_logging_rank:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
            problem = space_shortfall(self.root, self._needed_bytes())
            if problem is None:
                partial.mkdir()
        problem = eng.broadcast_object(problem)
        if problem:
            raise CheckpointError(f"{problem} (checkpoint {partial.name[1:-len('.partial')]} not written; "
                                  f"the previous ones are kept)")

    def _write(self, partial: Path, step: int, shared: Mapping[str, Any], per_rank: Mapping[str, Any]) -> None:
        """Every piece of the checkpoint into ``partial`` (collective; the engine writes its own)."""
        eng = self.engine
        _atomic_torch_save({name: obj.state_dict() for name, obj in per_rank.items()}, partial / rank_file(eng.rank))
        eng.save_state(partial)
        if eng.is_logging_rank:
            train_state = {name: obj.state_dict() for name, obj in shared.items()}
            _atomic_torch_save({**train_state, "step": int(step), "world_size": eng.world_size}, partial / TRAIN_STATE)

    def _needed_bytes(self) -> int:
        """What the next checkpoint will take: the newest one's size when there is one (same run,
        same size), else the model's and optimizer's tensors as this rank sees them (an estimate)."""
        newest = next(iter(list_checkpoints(self.root)), None)
        size = checkpoint_bytes(newest) if newest is not None else 0
        return size or _state_bytes(self.engine)

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
                stopped = stop_record.report(self.root, found, int(found.name.split("_")[1]) if found else None)
                if stopped:
                    log.warning("%s", stopped)
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


def _state_bytes(engine: Any) -> int:
    """An estimate of a checkpoint's size: the model's parameters and buffers plus the optimizer's
    tensor state (twice the parameters, as Adam's, where the optimizer shows none). Global sizes: a
    sharded tensor counts whole, as the checkpoint holds it (ZeRO-3's ``ds_numel``)."""
    model, optimizer = getattr(engine, "model", None), getattr(engine, "optimizer", None)
    if model is None:
        return 0
    params = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    states = getattr(optimizer, "state", None)
    optim = sum(v.numel() * v.element_size() for state in (states.values() if isinstance(states, Mapping) else [])
                for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return int(params + buffers + (optim or 2 * params))
