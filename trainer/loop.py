"""The training loop, written only in engine verbs, identical for every parallel strategy.

``train(cfg)`` builds what it is not given (task, engine, tracker, data loaders), resumes from
the latest whole checkpoint, trains ``train.steps`` optimizer steps with gradient accumulation,
logs / evaluates periodically, checkpoints when :mod:`trainer.checkpointing.manager` decides, then
evaluates on the test split, exports plain weights (``<out_dir>/weights.pt``) and writes
``<out_dir>/metrics.json`` atomically.

Test hook (documented, for fault-tolerance tests only): with ``GEOPRIME_TEST_KILL_AT_STEP=k``
the process whose rank is ``GEOPRIME_TEST_KILL_RANK`` (default 0) SIGKILLs itself right after
step ``k`` on its first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), to exercise elastic restarts. A
checkpoint still being written in the background is first let become whole (the checkpoints of steps
up to ``k`` are whole, as synchronous saves left them) unless ``GEOPRIME_TEST_KILL_MID_SAVE=1``: then
the kill lands while it is in flight.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from data_shards.atomic import atomic_write_text
from data_shards.collate import require_uniform
from trainer.checkpointing.checkpoint import Checkpointer
from trainer.checkpointing.interrupts import Preempted, StopSignals
from trainer.checkpointing.manager import CheckpointManager
from trainer.checkpointing.resume_check import check_resume_config
from trainer.checkpointing.run_lock import OutDirLock
from trainer.checkpointing.run_state import Progress, RankBuffers, RNGState
from trainer.checkpointing.selection import BestCheckpoint
from trainer.config import RunConfig, TrainConfig, check_known_keys
from trainer.distributed import dist_env, rank_seed, seed_everything, setup_logging, teardown_logging
from trainer.engine import Engine
from trainer.errors import ConfigError
from trainer.evaluation import evaluate
from trainer.preflight import RunPlan, preflight
from trainer.tasks import build_task
from trainer.tasks.base import TrainTask
from trainer.tasks.loaders import BatchLoader, LoaderFactory, shard_loader_factory
from trainer.tracking.progress import Phase, StartupTimes, counted
from trainer.tracking.tracker import RunTracker
from trainer.tracking.train_log import TrainLog

log = logging.getLogger("geoprime.loop")

__all__ = ["train", "evaluate"]

def _config_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else str(cfg)


class Batches:
    """Endless batches from a resumable loader, crossing epochs; times the wait for data."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self._it: Optional[Iterator] = None
        self.wait_s = 0.0

    def next(self) -> dict:
        t0 = time.perf_counter()
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                self.wait_s += time.perf_counter() - t0
                return require_uniform(batch)  # one frame size per training batch
            except StopIteration:
                self._it = None  # the loader moved on to the next epoch
        raise RuntimeError("the training loader yielded no batch in a whole epoch")


def _maybe_kill(step: int, rank: int, ckpt: Checkpointer) -> None:
    """The documented fault-injection test hook (see the module docstring)."""
    at = os.environ.get("GEOPRIME_TEST_KILL_AT_STEP")
    if not at or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return
    if step == int(at) and rank == int(os.environ.get("GEOPRIME_TEST_KILL_RANK", "0")):
        if os.environ.get("GEOPRIME_TEST_KILL_MID_SAVE") != "1":
            ckpt.wait()  # no collective: this rank's own writer thread
        log.warning("test hook: killing rank %d at step %d%s", rank, step,
                    " with a checkpoint in flight" if ckpt.in_flight else "")
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Run:
    """What one training run is made of, built by :func:`train` and used by :func:`_run`."""

    cfg: RunConfig
    engine: Engine
    task: TrainTask
    tracker: Optional[RunTracker] = None
    make_loader: Optional[LoaderFactory] = None
    train_loader: Optional[BatchLoader] = None
    plan: RunPlan = field(default_factory=lambda: RunPlan(None, None))
    ckpt: Optional[Checkpointer] = None
    progress: Optional[Progress] = None
    per_rank: dict[str, Any] = field(default_factory=dict)
    best: Optional[BestCheckpoint] = None
    """The best-on-validation model (``train.select_metric``), None when not selecting."""
    test_loader: Optional[BatchLoader] = None

    def shared_state(self) -> dict[str, Any]:
        """The Stateful objects rank 0 saves in each checkpoint, by name."""
        return {"progress": self.progress, **({"best": self.best} if self.best is not None else {})}

    def prune_best(self) -> None:
        """A checkpoint became whole: it names the best step, so older best candidates can go."""
        if self.best is not None and self.engine.is_logging_rank:
            self.best.prune()


def train(cfg: RunConfig, *, task: Optional[TrainTask] = None, tracker: Optional[RunTracker] = None,
          loaders: Optional[LoaderFactory] = None, engine: Optional[Engine] = None) -> dict[str, Any]:
    """Train as ``cfg`` (a resolved :class:`trainer.config.RunConfig`) says; returns the final metrics.

    Anything not given is built: ``task`` from ``cfg.task``, ``engine`` from the torchrun
    environment, ``tracker`` via ``trainer.tracking.create_tracker``, ``loaders`` over the
    shards in ``cfg.data``. This is where the config tree is split: each component gets the slices
    it reads. Things built here are closed here (the tracker with FAILED on error,
    KILLED on a signal).
    """
    out_dir = Path(cfg.out_dir)
    env = engine.env if engine is not None else dist_env()
    setup_logging(env, str(out_dir / "logs"))
    own_engine, own_tracker = engine is None, tracker is None
    lock: Optional[OutDirLock] = None
    determinism = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    run: Optional[_Run] = None
    times = StartupTimes()
    try:
        if isinstance(cfg, DictConfig):
            check_known_keys(cfg)
        task = task if task is not None else build_task(cfg)
        # everything the run will read, checked before step 1 and before any process group starts
        plan = preflight(cfg, task) if loaders is None else RunPlan(cfg.data.val_split, cfg.data.test_split)
        times.mark("preflight")
        if env.rank == 0:  # one job per run folder: a second one is refused, naming this one
            lock = OutDirLock(out_dir).acquire()
        engine = engine or Engine(cfg.parallel, cfg.optim, cfg.schedule, int(cfg.train.steps),
                                  micro_batch_size=int(cfg.train.batch_size), env=env)
        times.mark("process group")
        run = _Run(cfg, engine, task, plan=plan)
        _start(run, loaders, tracker, times)
        with StopSignals() as signals:
            result = _run(run, signals)
    except Preempted as e:  # every rank agreed and the checkpoint is whole: an orderly stop
        log.warning("%s", e)
        _close(run, own_tracker, own_engine, "KILLED")
        raise
    except BaseException as e:
        # into this rank's log file before it is closed: "see <out_dir>/logs" must find the error
        # (file only: the entry point prints it on the terminal, once)
        log.error("run failed: %s: %s", type(e).__name__, e, exc_info=not isinstance(e, ConfigError),
                  extra={"file_only": True})
        if run is not None and run.ckpt is not None:
            run.ckpt.abandon()  # a checkpoint being written in the background may still become whole
        if own_engine and engine is not None:
            engine.abandon_group()  # a failed rank cannot rely on its peers reaching a barrier
        _close(run, own_tracker, False, "FAILED")
        raise
    finally:  # leave the process as found: other code in it (tests) must not inherit our settings
        if lock is not None:
            lock.release()
        torch.use_deterministic_algorithms(determinism[0])
        torch.utils.deterministic.fill_uninitialized_memory = determinism[1]
        teardown_logging()
    _close(run, own_tracker, own_engine, "FINISHED")
    return result


def _start(run: _Run, loaders: Optional[LoaderFactory], tracker: Optional[RunTracker], times: StartupTimes) -> None:
    """Set-up, resume and tracking, each timed; the logging rank reports the run's fixed costs."""
    _set_up(run, loaders)
    times.mark("model, optimizer, loader")
    resumed = _resume(run)
    times.mark("resume")
    run.tracker = tracker or _create_tracker(run.cfg, run.engine, run.progress.run_id)
    _start_tracking(run, resumed)
    times.mark("tracking")
    if run.engine.is_logging_rank:
        log.info("start-up: %s; out_dir %s", times.line(), run.cfg.out_dir)


def _close(run: Optional[_Run], own_tracker: bool, own_engine: bool, status: str) -> None:
    if run is None:
        return
    if own_tracker and run.tracker is not None:
        run.tracker.close(status)
    if own_engine:
        run.engine.close()


def _set_up(run: _Run, loaders: Optional[LoaderFactory]) -> None:
    """Determinism, seeded model on every rank, engine set-up, the training loader, the checkpointer
    and the run's Stateful pieces."""
    cfg, engine, task = run.cfg, run.engine, run.task
    if engine.is_logging_rank:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        # filling every torch.empty with NaN adds nothing to determinism and makes DeepSpeed's
        # large flat buffers ~100x slower on CPU
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
    seed_everything(int(cfg.seed))  # identical initial weights on every rank (FSDP2 / ZeRO-3 need it)
    engine.setup(task.build_model(), task.parameter_groups)
    engine.train(True)
    task.on_train_mode(engine.parts)
    seed_everything(rank_seed(int(cfg.seed), engine.rank))
    run.make_loader = loaders or shard_loader_factory(
        cfg.data, task, engine, batch_size=int(cfg.train.batch_size), seed=int(cfg.seed))
    run.train_loader = run.make_loader(cfg.data.train_split, True)
    run.ckpt = Checkpointer(Path(cfg.out_dir) / "checkpoints", engine, keep_last=int(cfg.train.keep_last))
    run.progress = Progress(run.train_loader, _config_yaml(cfg), int(cfg.train.batch_size), engine.world_size)
    run.per_rank = {"rng": RNGState(), "data": run.train_loader, "buffers": RankBuffers(engine), **task.stateful()}
    if getattr(cfg.train, "select_metric", None):
        run.best = _best_checkpoint(cfg.train, Path(cfg.out_dir), run.plan)


def _resume(run: _Run) -> bool:
    """Restore the latest whole checkpoint (``train.resume``), if any; returns whether one was."""
    cfg, engine, tc = run.cfg, run.engine, run.cfg.train
    resume_from = run.ckpt.resolve(str(tc.resume))
    if resume_from is None:
        if str(tc.resume) == "auto" and engine.is_logging_rank:
            restarts = engine.env.restart_count
            log.log(logging.WARNING if restarts else logging.INFO, "no whole checkpoint in %s: starting at step 1%s",
                    run.ckpt.root, f" (elastic restart {restarts})" if restarts else "")
        return False

    def same_experiment(train_state: dict) -> None:
        saved = train_state.get("progress", {})
        if int(train_state["step"]) > int(tc.steps):
            raise ConfigError(
                f"train.steps={int(tc.steps)} is below the checkpoint's step {int(train_state['step'])} "
                f"({resume_from}): a run cannot be shortened after it trained further. Use "
                f"train.steps>={int(train_state['step'])}, or a new out_dir for a shorter run")
        if isinstance(cfg, DictConfig) and saved.get("config"):
            check_resume_config(saved["config"], cfg, str(resume_from), explicit=str(tc.resume) != "auto")

    same_world = run.ckpt.load(resume_from, run.shared_state(), run.per_rank, validate=same_experiment)
    if run.best is not None and engine.is_logging_rank:
        run.best.prune()  # weights of steps after this checkpoint belong to a run that was not kept
    if not same_world:
        saved = run.progress.saved
        data = run.progress.reposition()
        log.warning("world size changed %d -> %d: resuming epoch %d after %d samples of its order (the same "
                    "global order: exactly the samples not yet consumed)", saved["world_size"], engine.world_size,
                    int(data["epoch"]), int(data.get("samples", 0)))
        seed_everything(rank_seed(int(cfg.seed) + run.progress.step, engine.rank))
    return True


def _create_tracker(cfg: RunConfig, engine: Engine, run_id: Optional[str]) -> RunTracker:
    from trainer.tracking import create_tracker, default_run_name

    name = default_run_name(getattr(cfg.task, "name", None) or "run", str(cfg.parallel.strategy), int(cfg.seed))
    return create_tracker(cfg.tracking, str(cfg.out_dir), default_name=name, data=cfg.data,
                          is_logging_rank=engine.is_logging_rank, run_id=run_id)


def _start_tracking(run: _Run, resumed: bool) -> None:
    """Agree on the run id; the logging rank writes config.yaml and, for a new run, logs it."""
    engine = run.engine
    run.progress.run_id = engine.broadcast_object(getattr(run.tracker, "run_id", None))
    if engine.is_logging_rank:
        yaml_text = _config_yaml(run.cfg)
        atomic_write_text(Path(run.cfg.out_dir) / "config.yaml", yaml_text)
        if not resumed:
            run.tracker.log_config(yaml_text)
            run.tracker.log_params({f"engine.{k}": v for k, v in engine.describe().items()})
            if run.task.provenance():
                run.tracker.set_tags(run.task.provenance())


@contextlib.contextmanager
def _first_step(engine: Engine, step: int, batches: Batches) -> Iterator[None]:
    """The first step of a process: data start-up and compilation (where enabled), once; its time
    split into waiting for data and computing."""
    wait0, what = batches.wait_s, f"step {step + 1}, the first of this process"
    with Phase(what, enabled=engine.is_logging_rank, report_end=False,
               detail="opens the shards, starts the loader workers, compiles what is compiled (the CPU depth "
                      "loss, parallel.compile): one-off, minutes on a loaded CPU") as phase:
        yield
    if engine.is_logging_rank:
        wait = batches.wait_s - wait0
        log.info("%s: %.1f s (waiting for data %.1f s: shards opened, loader workers started; computing %.1f s: "
                 "compilation where enabled, first-call set-up)", what, phase.seconds, wait, phase.seconds - wait)


def _run(run: _Run, signals: StopSignals) -> dict[str, Any]:
    """The step loop proper (see :func:`train`), then :func:`_finish`."""
    from tqdm import tqdm

    cfg, engine, task, tc = run.cfg, run.engine, run.task, run.cfg.train
    total, step = int(tc.steps), run.progress.step
    batches = Batches(run.train_loader)
    last_step = getattr(run.tracker, "last_step", None)  # optional in the tracker interface
    train_log = TrainLog(engine, run.tracker, total=total, log_every=int(tc.log_every),
                         samples_per_step=int(tc.batch_size) * engine.world_size * engine.grad_accum,
                         sys_every_s=float(getattr(cfg.tracking, "system_metrics_every", 0.0) or 0.0),
                         logged_until=last_step() if last_step and step and engine.is_logging_rank else 0)
    checkpoints = CheckpointManager(tc, run.ckpt, engine, signals, progress=run.progress, state=run.shared_state,
                                    per_rank=run.per_rank, on_whole=run.prune_best)
    val_loader = None
    bar = None  # made after the first step: its rate and ETA leave the first step's one-off costs out
    while step < total:
        with _first_step(engine, step, batches) if bar is None else contextlib.nullcontext():
            for micro in range(engine.grad_accum):
                batch = engine.to_device(batches.next())
                with engine.accumulate(micro):
                    loss, terms = engine.forward(task.training_step, batch)
                    engine.backward(loss)
                train_log.add(loss, terms, engine.grad_accum)
            task.before_optimizer_step(engine.parts)
            train_log.end_step(engine.step(want_norm=train_log.logs_at(step + 1)))
        step += 1
        if bar is None:
            train_log.restart_clock()
            bar = tqdm(total=total, initial=step, disable=not (engine.is_logging_rank and tc.progress),
                       desc="train", dynamic_ncols=True, unit="step")
        else:
            bar.update(1)
        train_log.maybe_flush(step, run.train_loader, batches.wait_s)
        if int(tc.eval_every) and step % int(tc.eval_every) == 0 and step < total and run.plan.val_split:
            val_loader = val_loader or run.make_loader(run.plan.val_split, False)
            val = evaluate(engine, task, _eval_progress(engine, val_loader, "validation", int(tc.eval_max_batches)),
                           int(tc.eval_max_batches))
            train_log.send({f"val/{k}": v for k, v in val.items()}, step)
            _select(run, step, val)
        checkpoints.maybe_save(step)  # raises Preempted once a stop signal's checkpoint is whole
        _maybe_kill(step, engine.rank, run.ckpt)
    if bar is not None:
        bar.close()
    checkpoints.finish()
    return _finish(run, train_log.latest, val_loader)


def _eval_progress(engine: Engine, loader: BatchLoader, what: str, max_batches: int) -> Iterable[dict[str, Any]]:
    """``loader``'s batches with progress lines on the logging rank (evaluation can take minutes)."""
    total = int(getattr(loader, "batches_per_epoch", 0) or 0)
    return counted(loader, what, total=min(total, max_batches) if max_batches else total,
                   enabled=engine.is_logging_rank)


def _best_checkpoint(tc: TrainConfig, out_dir: Path, plan: RunPlan) -> BestCheckpoint:
    """The selection state for ``train.select_metric``; it needs a validation split."""
    metric = str(tc.select_metric)
    if not plan.val_split:
        raise ConfigError(f"train.select_metric={metric!r} selects on validation, but this run has no "
                          f"validation split ({plan.skipped.get('val') or 'data.val_split is empty'})")
    if plan.val_split == plan.test_split:
        log.warning("train.select_metric=%s selects on split %r, which is also the test split: the best "
                    "checkpoint's test metrics (test_best/*) are optimistic; the final model's are not",
                    metric, plan.val_split)
    try:
        return BestCheckpoint(metric, str(getattr(tc, "select_mode", "auto")), out_dir / "best")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _test_loader(run: _Run) -> BatchLoader:
    run.test_loader = run.test_loader or run.make_loader(run.plan.test_split, False)
    return run.test_loader


def _select(run: _Run, step: int, val: dict[str, float], final: bool = False) -> None:
    """Offer a validation result to the selection; an improvement exports the model and (before
    the last step: the final test pass covers it) evaluates it on the test split. Collective."""
    best, engine = run.best, run.engine
    if best is None or not best.offer(step, val):
        return
    engine.export_weights(best.weights_path())
    if run.plan.test_split == run.plan.val_split and not int(run.cfg.train.eval_max_batches):
        best.test = dict(val)  # the same split, evaluated whole: no second pass
    elif run.plan.test_split and not final:
        best.test = evaluate(engine, run.task, _eval_progress(engine, _test_loader(run), "test evaluation of the best "
                                                                 "checkpoint so far", 0), 0)
    if engine.is_logging_rank:
        if not run.ckpt.in_flight:  # the checkpoint being written names its best step: pruned once it is whole
            best.prune()
        run.tracker.log_metrics({"best/step": float(step), f"best/val_{best.metric}": float(best.value)}, step=step)


def _finish(run: _Run, train_logs: dict[str, float], val_loader: Optional[BatchLoader]) -> dict[str, Any]:
    """Export, final val / test evaluation (selection included), ``metrics.json``; checkpoints
    dropped if asked. The weights are written first: an evaluation failure never loses them."""
    cfg, engine, task, tracker, tc = run.cfg, run.engine, run.task, run.tracker, run.cfg.train
    total, out_dir = int(tc.steps), Path(cfg.out_dir)
    weights = engine.export_weights(out_dir / "weights.pt") if tc.export else None
    # the pictures come from the test split, or from val when there is none (pre-trainings)
    qual = out_dir / "qualitative"
    val_metrics: dict[str, float] = {}
    if run.plan.val_split:
        val_loader = val_loader or run.make_loader(run.plan.val_split, False)
        val_metrics = evaluate(engine, task, _eval_progress(engine, val_loader, "final validation",
                                                            int(tc.eval_max_batches)), int(tc.eval_max_batches),
                               visualize_to=None if run.plan.test_split else qual,
                               num_batches=int(getattr(val_loader, "batches_per_epoch", 0) or 0))
        tracker.log_metrics({f"val/{k}": v for k, v in val_metrics.items()}, step=total)
        _select(run, total, val_metrics, final=True)
    test_metrics: dict[str, float] = {}
    if run.plan.test_split:
        test_loader = _eval_progress(engine, _test_loader(run), "test evaluation", 0)
        test_metrics = evaluate(engine, task, test_loader, 0, visualize_to=qual,
                                num_batches=int(getattr(_test_loader(run), "batches_per_epoch", 0) or 0))
        tracker.log_metrics({f"test/{k}": v for k, v in test_metrics.items()}, step=total)
    if engine.is_logging_rank and qual.is_dir() and any(qual.iterdir()):
        tracker.log_artifact(str(qual), "qualitative")
    result = {"step": total, "run_id": run.progress.run_id, "train": train_logs, "val": val_metrics,
              "test": test_metrics, "world_size": engine.world_size, "strategy": engine.strategy,
              "weights": str(weights) if weights else None, "skipped": run.plan.skipped}
    if run.best is not None:
        result["best"] = _report_best(run, total, test_metrics)
    if engine.is_logging_rank:
        atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2, sort_keys=True))
        tracker.log_artifact(str(out_dir / "metrics.json"))
        tracker.log_artifact(str(out_dir / "config.yaml"))
    engine.barrier()
    if not tc.keep_checkpoints and engine.is_logging_rank:
        shutil.rmtree(run.ckpt.root, ignore_errors=True)  # the run is whole: weights and metrics are written
        log.info("deleted %s (train.keep_checkpoints=false)", run.ckpt.root)
    return result


def _report_best(run: _Run, total: int, test_metrics: dict[str, float]) -> dict[str, Any]:
    """The best checkpoint beside the final model: its test metrics as ``test_best/*`` (the final
    model's stay ``test/*``, which the study's table reads), its step and metric as tags."""
    best = run.best
    if best.step == total:
        best.test = dict(test_metrics)
    if run.engine.is_logging_rank:
        best.saved_step = best.step
        best.prune()
        run.tracker.log_metrics({f"test_best/{k}": v for k, v in best.test.items()}, step=total)
        run.tracker.set_tags({"selection.metric": f"{best.mode} val/{best.metric}",
                              "selection.best_step": str(best.step),
                              "selection.table_uses": "final (test/*); best-on-validation: test_best/*"})
    return best.summary()
