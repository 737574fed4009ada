"""Atomic, verifiable directory checkpoints holding everything stateful, and auto-resume.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/          one whole checkpoint
      dcp/ | deepspeed/     model + optimizer (torch.distributed.checkpoint, or DeepSpeed's own)
      engine_state.pt       scheduler + grad scaler (DCP strategies; DeepSpeed keeps its own)
      train_state.pt        rank 0: step, epoch, tracker run id, resolved config, world size...
      rank_00000.pt ...     per rank: RNG states, data-loader position
      COMPLETE.json         written last: every file with its size and sha256 (checkpoint_marker.py)
    latest                  text file naming the newest whole checkpoint
    .step_00000200.partial  a checkpoint being written (never taken for a whole one)
    .stopping.json          a stop signal's save in progress (trainer/checkpointing/stop_record.py)

A checkpoint is whole only if ``COMPLETE.json`` exists and every file it lists has the listed
size and sha256; anything else is skipped on resume with a warning naming it. All ranks must
see the same ``out_dir`` (a shared file system on multi-node runs). A periodic save may be made
in the background: staged (copied into CPU memory) on the training thread, then written, sealed,
committed and pruned on another, one save at a time (see :class:`Checkpointer`).
"""
from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from data_shards.atomic import atomic_write_text
from trainer.checkpointing import slow_storage, stop_record
from trainer.checkpointing.checkpoint_marker import MARKER, CheckpointError, checkpoint_bytes, verify, write_marker
from trainer.checkpointing.disk_space import free_bytes, is_out_of_space, no_space_message, space_shortfall

log = logging.getLogger("geoprime.checkpoint")

__all__ = ["MARKER", "CheckpointError", "Checkpointer", "find_latest_whole", "list_checkpoints", "rank_file",
           "step_dir_name", "verify", "write_marker"]

TRAIN_STATE = "train_state.pt"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")
#: test hook (documented in docs/engine.md): seconds a stop's save sleeps before its marker, so that a
#: test can kill it half written the way a too-short grace does
SLOW_STOP_SAVE_ENV = "GEOPRIME_TEST_STOP_SAVE_DELAY_S"
#: test hook (documented in docs/engine.md): rank 0 SIGKILLs itself right after committing this step
KILL_AFTER_COMMIT_ENV = "GEOPRIME_TEST_KILL_AFTER_COMMIT_STEP"
#: seconds a failing run gives the checkpoint in flight to become whole before it exits
DRAIN_S = 120.0


def step_dir_name(step: int) -> str:
    """``step_00000100`` for step 100."""
    return f"step_{int(step):08d}"


def rank_file(rank: int) -> str:
    """Name of the per-rank state file."""
    return f"rank_{int(rank):05d}.pt"


def _maybe_kill_after_commit(step: int) -> None:
    """The documented fault-injection hook :data:`KILL_AFTER_COMMIT_ENV` (first attempt only)."""
    at = os.environ.get(KILL_AFTER_COMMIT_ENV)
    if at and int(at) == step and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        log.warning("test hook: killing rank 0 right after committing step %d", step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Save:
    """One checkpoint being made: its step and folders, its writes, the collectives it uses, its timings."""

    step: int
    final: Path
    stopping: bool
    writes: list[Callable[[], None]] = field(default_factory=list)
    group: Any = None
    times: dict[str, float] = field(default_factory=dict)

    @property
    def partial(self) -> Path:
        return self.final.with_name(f".{self.final.name}.partial")


class _Background:
    """``fn()`` on a daemon thread, its result or exception kept for :meth:`result`. A daemon: a process
    that exits never waits for a save that cannot finish (what it leaves is a partial folder)."""

    def __init__(self, fn: Callable[[], Any], what: str) -> None:
        self._fn, self._finished = fn, threading.Event()
        self._value: Any = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=f"geoprime {what}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to the caller of result()
            self._error = e
        finally:
            self._finished.set()
            self = None  # type: ignore[assignment]  # (the error's traceback holds this frame: no cycle)

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: Optional[float] = None) -> Any:
        """The value ``fn`` returned, or its exception raised (once); :class:`TimeoutError` after ``timeout`` s."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"{self._thread.name} still running after {timeout} s")
        if self._error is not None:  # raised once, and then named by nothing here (no reference cycle
            error, self._error = self._error, None  # through the frames of its traceback)
            try:
                raise error
            finally:
                error = self = None  # type: ignore[assignment]
        return self._value


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
    with the run's other ``Stateful`` objects taken by name (``trainer/checkpointing/run_state.py``): shared
    ones (rank 0's) and per-rank ones. Their state dicts hold tensors / numbers / strings / lists.

    A save runs in phases, each timed into :attr:`last_save`: check the free space, *write* every
    piece into ``.step_X.partial`` (all ranks), *seal* it (rank 0: the marker's sizes and hashes),
    *commit* (rename, ``latest``) and *prune* old checkpoints (skipped when stopping on a signal:
    the next save does it). A save in the *background* first *stages* everything (copies it into
    CPU memory: a snapshot of this step) and returns; write, seal, commit and prune then run on a
    thread while training goes on, and :meth:`poll` reports the save once every rank is done. One
    save at a time: a save first waits for the one in flight, so at most one partial folder exists.
    """

    def __init__(self, root: str | Path, engine: Any, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last}: keep at least one checkpoint")
        self.root = Path(root)
        self.engine = engine
        self.keep_last = int(keep_last)
        self.last_save: dict[str, float] = {}
        """Seconds per phase of the last save (write, seal, commit, prune, total; for a background
        save also stage, its parts as ``stage_<part>`` from the engine, and stall: how long the caller
        was held) and its bytes."""
        self._in_flight: Optional[_Background] = None

    @property
    def in_flight(self) -> bool:
        """Whether a background save is being made (not yet reported by :meth:`poll`)."""
        return self._in_flight is not None

    def save(self, step: int, shared: Mapping[str, Any], per_rank: Mapping[str, Any], *,
             stopping: bool = False, background: bool = False) -> Path:
        """Write checkpoint ``step`` atomically: the engine's state, each ``shared`` Stateful's
        ``state_dict()`` (rank 0's, in ``train_state.pt``) and each ``per_rank`` one's (every
        rank's, in its rank file), by name. ``stopping``: the save of a stop signal (no pruning).
        ``background``: return once the state is staged, the rest on a thread (see the class).
        Collective; returns the final directory (whole when this returns, unless ``background``). A
        full disk is a :class:`CheckpointError` saying how much was needed and is free (from
        :meth:`poll` for a background save); the previous checkpoints stay whole."""
        t0 = time.perf_counter()
        self.wait()
        job = _Save(int(step), self.root / step_dir_name(step), stopping)
        t_check = time.perf_counter()
        self._prepare(job.partial)
        t_stage = time.perf_counter()
        job.times.update(check_s=t_stage - t_check, wait_s=t_check - t0)
        if not background:
            job.group, job.writes = self.engine.group, self._writes(job, shared, per_rank, staged=False)
            self._complete(job)
            self.last_save = job.times
            return job.final
        job.group, job.writes = self.engine.background_group(), self._writes(job, shared, per_rank, staged=True)
        job.times.update(stage_s=time.perf_counter() - t_stage, stall_s=time.perf_counter() - t0)
        job.times.update({f"stage_{k}": v for k, v in getattr(self.engine, "stage_times", {}).items()})
        self._in_flight = _Background(lambda: self._complete(job), f"checkpoint {job.final.name}")
        if self.engine.is_logging_rank:
            log.info("checkpoint %s staged in %.2f s (the loop was held %.2f s): writing it in the background",
                     job.final.name, job.times["stage_s"], job.times["stall_s"])
        return job.final

    def poll(self, wait: bool = False) -> Optional[dict[str, float]]:
        """The timings of the background save once every rank has finished it (None while it is being
        written, and when there is none); its failure is raised here, on every rank. ``wait``: block
        until it is done. Collective while a save is in flight: every rank calls it at the same points."""
        job = self._in_flight
        if job is None:
            return None
        if not wait:
            busy = torch.tensor([0.0 if job.done() else 1.0])
            if float(self.engine.all_reduce_sum(busy)[0]) > 0:
                return None
        self._in_flight = None
        self.last_save = job.result()
        return self.last_save

    def wait(self) -> Optional[dict[str, float]]:
        """Finish the save in flight, if any: :meth:`poll` with ``wait``."""
        return self.poll(wait=True)

    def abandon(self, timeout_s: float = DRAIN_S) -> None:
        """After a failure elsewhere in the run: give the save in flight up to ``timeout_s`` to become
        whole (worth the wait), never raising; not finished, it stays a partial folder no resume takes."""
        job, self._in_flight = self._in_flight, None
        if job is None:
            return
        log.warning("waiting up to %.0f s for the checkpoint being written in the background", timeout_s)
        try:
            job.result(timeout_s)
        except TimeoutError:
            log.warning("the checkpoint being written did not finish in %.0f s: left partial; a resume takes "
                        "the previous one", timeout_s)
        except BaseException as e:  # the run is failing already: say it, raise the first failure
            log.warning("the checkpoint being written failed too: %s: %s", type(e).__name__, e)

    def _writes(self, job: "_Save", shared: Mapping[str, Any], per_rank: Mapping[str, Any],
                staged: bool) -> list[Callable[[], None]]:
        """The writes of ``job``, the engine's (collective) first; ``staged``: of copies taken now."""
        eng, partial = self.engine, job.partial
        rank_state: Any = {name: obj.state_dict() for name, obj in per_rank.items()}
        train_state: Any = None
        if eng.is_logging_rank:
            train_state = {**{name: obj.state_dict() for name, obj in shared.items()},
                           "step": job.step, "world_size": eng.world_size}
        if staged:
            engine_write = eng.stage_state(partial)
            rank_state, train_state = copy.deepcopy(rank_state), copy.deepcopy(train_state)
        else:
            def engine_write() -> None:
                eng.save_state(partial)
        writes = [engine_write, lambda: slow_storage.torch_save(rank_state, partial / rank_file(eng.rank))]
        if train_state is not None:
            writes.append(lambda: slow_storage.torch_save(train_state, partial / TRAIN_STATE))
        return writes

    def _complete(self, job: "_Save") -> dict[str, float]:
        """Write, seal, commit and prune ``job``, collectively over ``job.group`` (on the training
        thread, or on the background one); every rank ends with the same outcome. Returns the timings."""
        eng, group, times = self.engine, job.group, job.times
        t_write = time.perf_counter()
        try:
            for write in job.writes:
                write()
            if job.stopping and os.environ.get(SLOW_STOP_SAVE_ENV):
                time.sleep(float(os.environ[SLOW_STOP_SAVE_ENV]))
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            self._failed(job, group.all_gather_object((is_out_of_space(e), f"{type(e).__name__}: {e}")), mine=True)
        said = group.all_gather_object(None)
        if any(said):
            self._failed(job, said, mine=False)
        t_seal = time.perf_counter()
        outcome: Any = None
        if eng.is_logging_rank:
            try:
                outcome = self._seal_and_commit(job)
            except BaseException as e:
                self._failed(job, [group.broadcast_object((is_out_of_space(e), f"{type(e).__name__}: {e}"))], mine=True)
        outcome = group.broadcast_object(outcome)
        if isinstance(outcome, tuple):
            self._failed(job, [outcome], mine=False)
        times.update(write_s=t_seal - t_write, seal_s=outcome["seal_s"], commit_s=outcome["commit_s"],
                     prune_s=outcome["prune_s"], bytes=float(outcome["bytes"]))
        times["total_s"] = sum(times.get(k, 0.0) for k in ("check_s", "stage_s", "write_s", "seal_s", "commit_s",
                                                            "prune_s"))
        times.setdefault("stall_s", times["wait_s"] + times["total_s"])
        if eng.is_logging_rank:
            held = f"; the loop was held {times['stall_s']:.2f} s" if "stage_s" in times else ""
            log.info("checkpoint saved: %s (%.1f s, %.0f MiB%s)", job.final, times["total_s"],
                     times["bytes"] / 2**20, held)
        return times

    def _seal_and_commit(self, job: "_Save") -> dict[str, float]:
        """Rank 0: the marker, the rename and ``latest``, then pruning (not when stopping)."""
        t0 = time.perf_counter()
        size = write_marker(job.partial, job.step, self.engine.world_size)
        t1 = time.perf_counter()
        if job.final.exists():  # a damaged leftover of the same step
            shutil.rmtree(job.final)
        os.rename(job.partial, job.final)
        atomic_write_text(self.root / LATEST, job.final.name + "\n", fsync=True)
        _maybe_kill_after_commit(job.step)
        t2 = time.perf_counter()
        if not job.stopping:
            self._prune(keep=job.final)
        return {"seal_s": t1 - t0, "commit_s": t2 - t1, "prune_s": time.perf_counter() - t2, "bytes": size}

    def _failed(self, job: "_Save", said: list[Any], mine: bool) -> None:
        """Raise the save's failure on every rank (``said``: what each rank reported, None where all was
        well): a full disk (on any rank) as one line saying what was needed and is free, its partial
        folder removed; else, on a rank that failed (``mine``: called while handling its exception), that
        exception; on the others, one naming the rank that failed."""
        name = job.final.name
        if any(s and s[0] for s in said):
            if self.engine.is_logging_rank:
                shutil.rmtree(job.partial, ignore_errors=True)
            raise CheckpointError(f"{no_space_message(self.root, self._needed_bytes(), free_bytes(self.root))} "
                                  f"(checkpoint {name} not written; the previous ones are kept)")
        if mine:
            raise  # the exception being handled (no local names it: no reference cycle through this frame)
        rank, what = next((r, s[1]) for r, s in enumerate(said) if s)
        raise CheckpointError(f"checkpoint {name} not written: rank {rank} failed ({what}); the previous ones "
                              "are kept")

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
