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
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint import Checkpointer, step_dir_name
from trainer.resume_check import check_resume_config
from trainer.config import check_known_keys
from trainer.errors import ConfigError
from trainer.interrupts import Preempted, StopSignals
from trainer.preflight import RunPlan, preflight
from trainer.run_lock import OutDirLock
from trainer.distributed import (dist_env, rank_seed, rng_state, seed_everything, set_rng_state, setup_logging,
                                 teardown_logging)
from trainer.engine import Engine

log = logging.getLogger("geoprime.loop")

#: ``make_loader(split, train) -> loader`` with ``__iter__``, ``batches_per_epoch``, ``epoch``,
#: ``state_dict()`` / ``load_state_dict()`` (a ``data_shards.stream.ResumableLoader``).
LoaderFactory = Callable[[str, bool], Any]


def shard_loader_factory(cfg: Any, task: Any, engine: Engine) -> LoaderFactory:
    """Loaders over ``data_shards`` streams: training shuffled with ``data.tail_policy``;
    evaluation in order with ``tail="pad"`` so every sample counts exactly once."""
    from data_shards.stream import ShardStream, build_loader

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
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


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


def evaluate(engine: Engine, task: Any, loader: Any, max_batches: int = 0,
             visualize_to: Optional[Path] = None) -> dict[str, float]:
    """Evaluate on every rank's part of a split; the Metric state is summed over ranks, so
    every sample counts once. With ``visualize_to``, the logging rank writes the task's
    qualitative PNGs for its first batch (from the outputs already computed: the model may be
    sharded, so ``visualize`` must not run it). Leaves the model in train mode."""
    engine.train(False)
    metric = task.new_metric()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = engine.to_device(batch)
            outputs = engine.forward(task.eval_step, batch)
            metric.update(batch, outputs)
            if i == 0 and visualize_to is not None and engine.is_logging_rank:
                visualize_to.mkdir(parents=True, exist_ok=True)
                task.visualize(engine.parts, batch, outputs, visualize_to)
    state = engine.all_reduce_sum(metric.state().to(torch.float64))
    engine.train(True)
    task.on_train_mode(engine.parts)
    return {k: float(v) for k, v in metric.compute(state).items()}


def _maybe_kill(step: int, rank: int) -> None:
    """The documented fault-injection test hook (see the module docstring)."""
    at = os.environ.get("GEOPRIME_TEST_KILL_AT_STEP")
    if not at or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return
    if step == int(at) and rank == int(os.environ.get("GEOPRIME_TEST_KILL_RANK", "0")):
        log.warning("test hook: killing rank %d at step %d", rank, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _system_metrics(engine: Engine) -> dict[str, float]:
    """Each node's local-rank-0 system metrics, gathered and named ``system/node_<N>/...`` (MLflow's UI charts
    metrics under ``system/`` in a run's System metrics tab)."""
    from trainer.tracking import node_metrics, sample_system_metrics

    mine = (engine.env.node_rank, sample_system_metrics()) if engine.env.is_local_leader else None
    out: dict[str, float] = {}
    for item in engine.all_gather_object(mine):
        if item is not None:
            node, metrics = item
            out.update(node_metrics(node, metrics))
    return out


def train(cfg: Any, *, task: Any = None, tracker: Any = None, loaders: Optional[LoaderFactory] = None,
          engine: Optional[Engine] = None) -> dict[str, Any]:
    """Train as ``cfg`` (a resolved :class:`trainer.config.RunConfig`) says; returns the final metrics.

    Anything not given is built: ``task`` from ``cfg.task``, ``engine`` from the torchrun
    environment, ``tracker`` via ``trainer.tracking.create_tracker``, ``loaders`` over the
    shards in ``cfg.data``. Things built here are closed here (the tracker with FAILED on error).
    """
    tc = cfg.train
    out_dir = Path(cfg.out_dir)
    env = engine.env if engine is not None else dist_env()
    setup_logging(env, str(out_dir / "logs"))
    own_engine, own_tracker = engine is None, tracker is None
    lock: Optional[OutDirLock] = None
    determinism = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    try:
        if isinstance(cfg, DictConfig):
            check_known_keys(cfg)
        if task is None:
            task = _build_task(cfg)
        # everything the run will read, checked before step 1 and before any process group starts
        plan = preflight(cfg, task) if loaders is None else RunPlan(cfg.data.val_split, cfg.data.test_split)
        if env.rank == 0:  # one job per run folder: a second one is refused, naming this one
            lock = OutDirLock(out_dir).acquire()
        if engine is None:
            engine = Engine(cfg.parallel, cfg.optim, cfg.schedule, int(tc.steps),
                            micro_batch_size=int(tc.batch_size), env=env)
        if engine.is_logging_rank:
            out_dir.mkdir(parents=True, exist_ok=True)
        if tc.deterministic:
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
        make_loader = loaders or shard_loader_factory(cfg, task, engine)
        train_loader = make_loader(cfg.data.train_split, True)

        ckpt = Checkpointer(out_dir / "checkpoints", engine, keep_last=int(tc.keep_last))
        start_step, run_id = 0, None
        resume_from = ckpt.resolve(str(tc.resume))
        if resume_from is None and str(tc.resume) == "auto" and engine.is_logging_rank:
            level = logging.WARNING if env.restart_count else logging.INFO
            log.log(level, "no whole checkpoint in %s: starting at step 1%s", ckpt.root,
                    f" (elastic restart {env.restart_count})" if env.restart_count else "")
        if resume_from is not None:
            def same_experiment(tstate: dict) -> None:
                if int(tstate["step"]) > int(tc.steps):
                    raise ConfigError(
                        f"train.steps={int(tc.steps)} is below the checkpoint's step {int(tstate['step'])} "
                        f"({resume_from}): a run cannot be shortened after it trained further. Use "
                        f"train.steps>={int(tstate['step'])}, or a new out_dir for a shorter run")
                if isinstance(cfg, DictConfig) and tstate.get("config"):
                    check_resume_config(tstate["config"], cfg, str(resume_from), explicit=str(tc.resume) != "auto")

            tstate, rstate = ckpt.load(resume_from, validate=same_experiment)
            start_step, run_id = int(tstate["step"]), tstate.get("run_id")
            if rstate is not None:
                if "buffers" in rstate:
                    engine.load_rank_buffers(rstate["buffers"])
                train_loader.load_state_dict(rstate["data"])
                set_rng_state(rstate["rng"])
            else:
                _reposition(train_loader, tstate, engine, cfg)
                seed_everything(rank_seed(int(cfg.seed) + start_step, engine.rank))
        if tracker is None:
            from trainer.tracking import create_tracker
            tracker = create_tracker(cfg, is_logging_rank=engine.is_logging_rank, run_id=run_id)
        run_id = engine.broadcast_object(getattr(tracker, "run_id", None))
        if engine.is_logging_rank:
            yaml_text = _config_yaml(cfg)
            _atomic_write_text(out_dir / "config.yaml", yaml_text)
            if resume_from is None:
                tracker.log_config(yaml_text)
                tracker.log_params({f"engine.{k}": v for k, v in engine.describe().items()})
        with StopSignals() as signals:
            result = _run(cfg, engine, task, tracker, train_loader, make_loader, ckpt, start_step, run_id, plan,
                          _StepControl(engine, signals, float(tc.ckpt_every_minutes)))
    except Preempted as e:  # every rank agreed and the checkpoint is whole: an orderly stop
        log.warning("%s", e)
        if own_tracker and tracker is not None:
            tracker.close("KILLED")
        if own_engine:
            engine.close()
        raise
    except BaseException as e:
        # into this rank's log file before it is closed: "see <out_dir>/logs" must find the error
        log.error("run failed: %s: %s", type(e).__name__, e, exc_info=not isinstance(e, ConfigError))
        if own_tracker and tracker is not None:
            tracker.close("FAILED")
        if own_engine and engine is not None:
            engine.abandon_group()  # a failed rank cannot rely on its peers reaching a barrier
        raise
    finally:  # leave the process as found: other code in it (tests) must not inherit our settings
        if lock is not None:
            lock.release()
        torch.use_deterministic_algorithms(determinism[0])
        torch.utils.deterministic.fill_uninitialized_memory = determinism[1]
        teardown_logging()
    if own_tracker:
        tracker.close("FINISHED")
    if own_engine:
        engine.close()
    return result


class _StepControl:
    """Decisions every rank must take together after a step: stop on a signal (any rank got it),
    checkpoint on the wall clock (rank 0's clock decides). One all-reduce of two numbers."""

    def __init__(self, engine: Engine, signals: StopSignals, every_minutes: float) -> None:
        self.engine, self.signals = engine, signals
        self.every_s = max(0.0, float(every_minutes)) * 60.0
        self.last = time.monotonic()

    @property
    def signum(self) -> int:
        return int(self.signals.received or signal.SIGTERM)

    def poll(self) -> tuple[bool, bool]:
        """(stop now, checkpoint due)."""
        due = self.engine.is_logging_rank and self.every_s > 0 and time.monotonic() - self.last >= self.every_s
        vec = torch.tensor([float(self.signals.received is not None), float(due)], dtype=torch.float64)
        vec = self.engine.all_reduce_sum(vec)
        return bool(vec[0] > 0), bool(vec[1] > 0)

    def saved(self) -> None:
        self.last = time.monotonic()


def _build_task(cfg: Any) -> Any:
    """The task of ``cfg.task``; its config validation errors are :class:`ConfigError`s."""
    from trainer.tasks import build_task

    try:
        return build_task(cfg.task, cfg)
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"task={cfg.task.get('name')}: {e}") from e


def _reposition(loader: Any, tstate: dict, engine: Engine, cfg: Any) -> None:
    """Data position after a world-size change: keep the epoch, skip as many batches as cover the
    samples already consumed (the order inside that epoch differs from the original run's)."""
    data = tstate.get("data")
    if not data:
        return
    consumed = int(data["batches"]) * int(tstate["batch_size"]) * int(tstate["world_size"])
    per_batch = int(cfg.train.batch_size) * engine.world_size
    batches = min(loader.batches_per_epoch, consumed // per_batch)
    log.warning("world size changed %d -> %d: resuming epoch %d at batch %d (the sample order within "
                "this epoch is not the original run's)", tstate["world_size"], engine.world_size,
                data["epoch"], batches)
    loader.load_state_dict({"epoch": int(data["epoch"]), "batches": batches})


def _run(cfg: Any, engine: Engine, task: Any, tracker: Any, train_loader: Any, make_loader: LoaderFactory,
         ckpt: Checkpointer, start_step: int, run_id: Optional[str], plan: RunPlan,
         control: "_StepControl") -> dict[str, Any]:
    """The step loop proper (see :func:`train`)."""
    from tqdm import tqdm

    tc = cfg.train
    total = int(tc.steps)
    out_dir = Path(cfg.out_dir)
    batches = _Batches(train_loader)
    samples_per_step = int(tc.batch_size) * engine.world_size * engine.grad_accum
    sys_every = float(getattr(cfg.tracking, "system_metrics_every", 0.0) or 0.0)
    last_sys = 0.0
    val_loader = None
    val_metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    n_logged, window_start, wait_start = 0, time.perf_counter(), batches.wait_s
    last_saved = start_step if start_step else -1
    train_logs: dict[str, float] = {}
    bar = tqdm(total=total, initial=start_step, disable=not (engine.is_logging_rank and tc.progress),
               desc="train", dynamic_ncols=True, unit="step")

    def save(step: int) -> None:
        rank_state = {"rng": rng_state(), "data": train_loader.state_dict(), "buffers": engine.rank_buffers()}
        train_state = {"run_id": run_id, "config": _config_yaml(cfg), "data": train_loader.state_dict(),
                       "batch_size": int(tc.batch_size), "epoch": int(train_loader.state_dict()["epoch"])}
        ckpt.save(step, train_state, rank_state)

    # a resumed run re-does the steps between its checkpoint and the interruption: log each step once
    last_step = getattr(tracker, "last_step", None)  # optional in the tracker interface
    logged_until = last_step() if last_step and start_step and engine.is_logging_rank else 0

    def log_once(metrics: dict[str, float], at: int) -> None:
        if at > logged_until:
            tracker.log_metrics(metrics, step=at)

    step = start_step
    while step < total:
        for micro in range(engine.grad_accum):
            batch = engine.to_device(batches.next())
            with engine.accumulate(micro):
                loss, terms = engine.forward(task.training_step, batch)
                engine.backward(loss)
            for k, v in {"loss": loss, **terms}.items():  # tensors: no device sync per micro-step
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().float() / engine.grad_accum
        grad_norm = engine.step()
        step += 1
        n_logged += 1
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
        bar.update(1)

        if step % max(1, int(tc.log_every)) == 0 or step == total:
            keys = sorted(sums)
            now = time.perf_counter()
            due_sys = engine.is_logging_rank and sys_every > 0 and now - last_sys >= sys_every
            corrupt = float(getattr(train_loader, "corrupt_count", 0))
            vec = torch.tensor([float(sums[k]) / n_logged for k in keys] + [corrupt, float(due_sys)],
                               dtype=torch.float64)
            vec = engine.all_reduce_sum(vec)
            train_logs = {f"train/{k}": float(vec[i]) / engine.world_size for i, k in enumerate(keys)}
            # samples skipped as corrupt (data.on_corrupt=skip), all ranks, since this process started
            train_logs["train/corrupt_skipped"] = float(vec[-2])
            elapsed = max(now - window_start, 1e-9)
            train_logs.update({"train/lr": engine.lr, "train/samples_per_s": n_logged * samples_per_step / elapsed,
                               "train/data_wait_s": (batches.wait_s - wait_start) / n_logged,
                               "train/epoch": float(train_loader.epoch)})
            metrics = dict(train_logs)
            if vec[-1] > 0:
                metrics.update(_system_metrics(engine))
                last_sys = now
            log_once(metrics, step)
            bar.set_postfix(loss=f"{train_logs['train/loss']:.4f}",
                            sps=f"{train_logs['train/samples_per_s']:.1f}")
            log.info("step %d/%d loss %.5f lr %.3g %.1f samples/s", step, total, train_logs["train/loss"],
                     engine.lr, train_logs["train/samples_per_s"])
            sums, n_logged, window_start, wait_start = {}, 0, time.perf_counter(), batches.wait_s

        if int(tc.eval_every) and step % int(tc.eval_every) == 0 and step < total and plan.val_split:
            val_loader = val_loader or make_loader(plan.val_split, False)
            val_metrics = evaluate(engine, task, val_loader, int(tc.eval_max_batches))
            log_once({f"val/{k}": v for k, v in val_metrics.items()}, step)

        stop, due = control.poll()
        if stop or (step < total and (due or (int(tc.ckpt_every) and step % int(tc.ckpt_every) == 0))):
            save(step)
            last_saved = step
            control.saved()
        if stop:
            raise Preempted(control.signum, step, str(ckpt.root / step_dir_name(step)))
        _maybe_kill(step, engine.rank)
    bar.close()

    if last_saved != total:
        save(total)
    if plan.val_split:
        val_loader = val_loader or make_loader(plan.val_split, False)
        val_metrics = evaluate(engine, task, val_loader, int(tc.eval_max_batches))
        tracker.log_metrics({f"val/{k}": v for k, v in val_metrics.items()}, step=total)
    test_metrics: dict[str, float] = {}
    if plan.test_split:
        qual = out_dir / "qualitative"
        test_metrics = evaluate(engine, task, make_loader(plan.test_split, False), 0, visualize_to=qual)
        tracker.log_metrics({f"test/{k}": v for k, v in test_metrics.items()}, step=total)
        if engine.is_logging_rank and qual.is_dir() and any(qual.iterdir()):
            tracker.log_artifact(str(qual), "qualitative")
    weights = None
    if tc.export:
        weights = engine.export_weights(out_dir / "weights.pt")
    result = {"step": total, "run_id": run_id, "train": train_logs, "val": val_metrics, "test": test_metrics,
              "world_size": engine.world_size, "strategy": engine.strategy,
              "weights": str(weights) if weights else None, "skipped": plan.skipped}
    if engine.is_logging_rank:
        _atomic_write_json(out_dir / "metrics.json", result)
        tracker.log_artifact(str(out_dir / "metrics.json"))
        tracker.log_artifact(str(out_dir / "config.yaml"))
    engine.barrier()
    if not tc.keep_checkpoints and engine.is_logging_rank:
        shutil.rmtree(ckpt.root, ignore_errors=True)  # the run is whole: weights and metrics are written
        log.info("deleted %s (train.keep_checkpoints=false)", ckpt.root)
    return result
