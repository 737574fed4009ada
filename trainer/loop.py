"""The training loop, written only in engine verbs, identical for every parallel strategy.

``train(cfg)`` builds what it is not given (task, engine, tracker, data loaders), resumes from
the latest whole checkpoint, trains ``train.steps`` optimizer steps with gradient accumulation,
logs / evaluates / checkpoints periodically, then evaluates on the test split, exports plain
weights (``<out_dir>/weights.pt``) and writes ``<out_dir>/metrics.json`` atomically.

Test hook (documented, for fault-tolerance tests only): with ``GEOPRIME_TEST_KILL_AT_STEP=k``
the process whose rank is ``GEOPRIME_TEST_KILL_RANK`` (default 0) SIGKILLs itself right after
step ``k`` on its first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), to exercise elastic restarts.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from data_shards.atomic import atomic_write_text
from trainer.checkpoint import Checkpointer, step_dir_name
from trainer.config import check_known_keys
from trainer.distributed import dist_env, rank_seed, seed_everything, setup_logging, teardown_logging
from trainer.engine import Engine
from trainer.errors import ConfigError
from trainer.evaluation import evaluate
from trainer.interrupts import Preempted, StepControl, StopSignals
from trainer.preflight import RunPlan, preflight
from trainer.resume_check import check_resume_config
from trainer.run_lock import OutDirLock
from trainer.run_state import Progress, RankBuffers, RNGState
from trainer.train_log import TrainLog

log = logging.getLogger("geoprime.loop")

__all__ = ["train", "evaluate", "shard_loader_factory"]

#: ``make_loader(split, train) -> loader`` with ``__iter__``, ``batches_per_epoch``, ``epoch``,
#: ``state_dict()`` / ``load_state_dict()`` (a ``data_shards.loader.ResumableLoader``).
LoaderFactory = Callable[[str, bool], Any]


def shard_loader_factory(cfg: Any, task: Any, engine: Engine) -> LoaderFactory:
    """Loaders over ``data_shards`` streams: training shuffled with ``data.tail_policy``;
    evaluation in order with ``tail="pad"`` so every sample counts exactly once."""
    from data_shards.loader import build_loader
    from data_shards.stream import ShardStream

    d = cfg.data

    def make(split: str, train: bool):
        if train:
            transform = task.train_transform
        else:
            def transform(sample: dict, generator: torch.Generator) -> dict:
                return task.eval_transform(sample)
        stream = ShardStream(d.root, split, rank=engine.rank, world_size=engine.world_size, seed=int(cfg.seed),
                             shuffle=train, shuffle_buffer=d.shuffle_buffer,
                             tail=d.tail_policy if train else "pad", resampled=bool(d.resampled) and train,
                             on_corrupt=d.on_corrupt, keys=task.stream_keys(train),
                             subset=d.subset if train else 0, subset_seed=d.subset_seed, transform=transform)
        return build_loader(stream, int(cfg.train.batch_size), num_workers=int(d.num_workers), drop_last=train)

    return make


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _config_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else str(cfg)


class _Batches:
    """Endless batches from a resumable loader, crossing epochs; times the wait for data."""

    def __init__(self, loader: Any) -> None:
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
                return batch
            except StopIteration:
                self._it = None  # the loader moved on to the next epoch
        raise RuntimeError("the training loader yielded no batch in a whole epoch")


def _maybe_kill(step: int, rank: int) -> None:
    """The documented fault-injection test hook (see the module docstring)."""
    at = os.environ.get("GEOPRIME_TEST_KILL_AT_STEP")
    if not at or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return
    if step == int(at) and rank == int(os.environ.get("GEOPRIME_TEST_KILL_RANK", "0")):
        log.warning("test hook: killing rank %d at step %d", rank, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _build_task(cfg: Any) -> Any:
    """The task of ``cfg.task``; its config validation errors are :class:`ConfigError`s."""
    from trainer.tasks import build_task

    try:
        return build_task(cfg.task, cfg)
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"task={cfg.task.get('name')}: {e}") from e


@dataclass
class _Run:
    """What one training run is made of, built by :func:`train` and used by :func:`_run`."""

    cfg: Any
    engine: Engine
    task: Any
    tracker: Any = None
    make_loader: Optional[LoaderFactory] = None
    train_loader: Any = None
    plan: RunPlan = field(default_factory=lambda: RunPlan(None, None))
    ckpt: Optional[Checkpointer] = None
    progress: Optional[Progress] = None
    per_rank: dict[str, Any] = field(default_factory=dict)

    def save(self, step: int, stopping: bool = False) -> Path:
        self.progress.step = step
        return self.ckpt.save(step, {"progress": self.progress}, self.per_rank, stopping=stopping)


def train(cfg: Any, *, task: Any = None, tracker: Any = None, loaders: Optional[LoaderFactory] = None,
          engine: Optional[Engine] = None) -> dict[str, Any]:
    """Train as ``cfg`` (a resolved :class:`trainer.config.RunConfig`) says; returns the final metrics.

    Anything not given is built: ``task`` from ``cfg.task``, ``engine`` from the torchrun
    environment, ``tracker`` via ``trainer.tracking.create_tracker``, ``loaders`` over the
    shards in ``cfg.data``. Things built here are closed here (the tracker with FAILED on error,
    KILLED on a signal).
    """
    out_dir = Path(cfg.out_dir)
    env = engine.env if engine is not None else dist_env()
    setup_logging(env, str(out_dir / "logs"))
    own_engine, own_tracker = engine is None, tracker is None
    lock: Optional[OutDirLock] = None
    determinism = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    run: Optional[_Run] = None
    try:
        if isinstance(cfg, DictConfig):
            check_known_keys(cfg)
        task = task if task is not None else _build_task(cfg)
        # everything the run will read, checked before step 1 and before any process group starts
        plan = preflight(cfg, task) if loaders is None else RunPlan(cfg.data.val_split, cfg.data.test_split)
        if env.rank == 0:  # one job per run folder: a second one is refused, naming this one
            lock = OutDirLock(out_dir).acquire()
        engine = engine or Engine(cfg.parallel, cfg.optim, cfg.schedule, int(cfg.train.steps),
                                  micro_batch_size=int(cfg.train.batch_size), env=env)
        run = _Run(cfg, engine, task, plan=plan)
        _set_up(run, loaders)
        resumed = _resume(run)
        run.tracker = tracker or _create_tracker(cfg, engine, run.progress.run_id)
        _start_tracking(run, resumed)
        with StopSignals() as signals:
            result = _run(run, StepControl(engine, signals, float(cfg.train.ckpt_every_minutes), run.ckpt.root))
    except Preempted as e:  # every rank agreed and the checkpoint is whole: an orderly stop
        log.warning("%s", e)
        _close(run, own_tracker, own_engine, "KILLED")
        raise
    except BaseException as e:
        # into this rank's log file before it is closed: "see <out_dir>/logs" must find the error
        log.error("run failed: %s: %s", type(e).__name__, e, exc_info=not isinstance(e, ConfigError))
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
    run.make_loader = loaders or shard_loader_factory(cfg, task, engine)
    run.train_loader = run.make_loader(cfg.data.train_split, True)
    run.ckpt = Checkpointer(Path(cfg.out_dir) / "checkpoints", engine, keep_last=int(cfg.train.keep_last))
    run.progress = Progress(run.train_loader, _config_yaml(cfg), int(cfg.train.batch_size), engine.world_size)
    run.per_rank = {"rng": RNGState(), "data": run.train_loader, "buffers": RankBuffers(engine)}


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

    same_world = run.ckpt.load(resume_from, {"progress": run.progress}, run.per_rank, validate=same_experiment)
    if not same_world:
        saved = run.progress.saved
        batch = run.progress.reposition()
        log.warning("world size changed %d -> %d: resuming epoch %d at batch %d (the sample order within "
                    "this epoch is not the original run's)", saved["world_size"], engine.world_size,
                    saved["epoch"], batch)
        seed_everything(rank_seed(int(cfg.seed) + run.progress.step, engine.rank))
    return True


def _create_tracker(cfg: Any, engine: Engine, run_id: Optional[str]) -> Any:
    from trainer.tracking import create_tracker

    return create_tracker(cfg, is_logging_rank=engine.is_logging_rank, run_id=run_id)


def _start_tracking(run: _Run, resumed: bool) -> None:
    """Agree on the run id; the logging rank writes config.yaml and, for a new run, logs it."""
    engine = run.engine
    run.progress.run_id = engine.broadcast_object(getattr(run.tracker, "run_id", None))
    if engine.is_logging_rank:
        yaml_text = _config_yaml(run.cfg)
        _atomic_write_text(Path(run.cfg.out_dir) / "config.yaml", yaml_text)
        if not resumed:
            run.tracker.log_config(yaml_text)
            run.tracker.log_params({f"engine.{k}": v for k, v in engine.describe().items()})


def _run(run: _Run, control: StepControl) -> dict[str, Any]:
    """The step loop proper (see :func:`train`), then :func:`_finish`."""
    from tqdm import tqdm

    cfg, engine, task, tc = run.cfg, run.engine, run.task, run.cfg.train
    total, step = int(tc.steps), run.progress.step
    batches = _Batches(run.train_loader)
    last_step = getattr(run.tracker, "last_step", None)  # optional in the tracker interface
    train_log = TrainLog(engine, run.tracker, total=total, log_every=int(tc.log_every),
                         samples_per_step=int(tc.batch_size) * engine.world_size * engine.grad_accum,
                         sys_every_s=float(getattr(cfg.tracking, "system_metrics_every", 0.0) or 0.0),
                         logged_until=last_step() if last_step and step and engine.is_logging_rank else 0)
    val_loader = None
    last_saved = step if step else -1
    bar = tqdm(total=total, initial=step, disable=not (engine.is_logging_rank and tc.progress),
               desc="train", dynamic_ncols=True, unit="step")
    while step < total:
        for micro in range(engine.grad_accum):
            batch = engine.to_device(batches.next())
            with engine.accumulate(micro):
                loss, terms = engine.forward(task.training_step, batch)
                engine.backward(loss)
            train_log.add(loss, terms, engine.grad_accum)
        train_log.end_step(engine.step())
        step += 1
        bar.update(1)
        train_log.maybe_flush(step, run.train_loader, batches.wait_s)
        if int(tc.eval_every) and step % int(tc.eval_every) == 0 and step < total and run.plan.val_split:
            val_loader = val_loader or run.make_loader(run.plan.val_split, False)
            val = evaluate(engine, task, val_loader, int(tc.eval_max_batches))
            train_log.send({f"val/{k}": v for k, v in val.items()}, step)
        stop, due = control.poll(step)
        if stop or (step < total and (due or (int(tc.ckpt_every) and step % int(tc.ckpt_every) == 0))):
            run.save(step, stopping=stop)
            last_saved = step
            control.saved(run.ckpt.last_save.get("total_s"), stopping=stop)
        if stop:
            raise Preempted(control.signum, step, str(run.ckpt.root / step_dir_name(step)))
        _maybe_kill(step, engine.rank)
    bar.close()
    if last_saved != total:
        run.save(total)
    return _finish(run, train_log.latest, val_loader)


def _finish(run: _Run, train_logs: dict[str, float], val_loader: Any) -> dict[str, Any]:
    """Final val / test evaluation, export, ``metrics.json``; checkpoints dropped if asked."""
    cfg, engine, task, tracker, tc = run.cfg, run.engine, run.task, run.tracker, run.cfg.train
    total, out_dir = int(tc.steps), Path(cfg.out_dir)
    # the pictures come from the test split, or from val when there is none (pre-trainings)
    qual = out_dir / "qualitative"
    val_metrics: dict[str, float] = {}
    if run.plan.val_split:
        val_loader = val_loader or run.make_loader(run.plan.val_split, False)
        val_metrics = evaluate(engine, task, val_loader, int(tc.eval_max_batches),
                               visualize_to=None if run.plan.test_split else qual)
        tracker.log_metrics({f"val/{k}": v for k, v in val_metrics.items()}, step=total)
    test_metrics: dict[str, float] = {}
    if run.plan.test_split:
        test_metrics = evaluate(engine, task, run.make_loader(run.plan.test_split, False), 0, visualize_to=qual)
        tracker.log_metrics({f"test/{k}": v for k, v in test_metrics.items()}, step=total)
    if engine.is_logging_rank and qual.is_dir() and any(qual.iterdir()):
        tracker.log_artifact(str(qual), "qualitative")
    weights = engine.export_weights(out_dir / "weights.pt") if tc.export else None
    result = {"step": total, "run_id": run.progress.run_id, "train": train_logs, "val": val_metrics,
              "test": test_metrics, "world_size": engine.world_size, "strategy": engine.strategy,
              "weights": str(weights) if weights else None, "skipped": run.plan.skipped}
    if engine.is_logging_rank:
        _atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2, sort_keys=True))
        tracker.log_artifact(str(out_dir / "metrics.json"))
        tracker.log_artifact(str(out_dir / "config.yaml"))
    engine.barrier()
    if not tc.keep_checkpoints and engine.is_logging_rank:
        shutil.rmtree(run.ckpt.root, ignore_errors=True)  # the run is whole: weights and metrics are written
        log.info("deleted %s (train.keep_checkpoints=false)", run.ckpt.root)
    return result
