"""Check everything a run will need before step 1 and before any process group starts.

A multi-hour run must not die after training on something it could have checked at the start:
the engine settings (strategy, precision, backend, ZeRO stage) for the job's world size, the
whole model with its initialisation files, optimizer and lr schedule (built on the meta device:
no memory, no compute), every split it will read (manifest readable, not empty, the keys the task
reads there, enough samples for every rank's first batch, the loader's settings), the checkpoint
it was told to resume, and a writable ``out_dir``. Each problem is a :class:`PreflightError`
naming the config key, split, file or key. :func:`check_job` runs all of it from the command
line's overrides, before torchrun starts (``python -m launch run``). An evaluation split that
lacks only ground truth the task does not train on (self-supervised depth on KITTI raw converted
without LiDAR: no ``depth``) is skipped with one clear line instead, and the run reports it in
``metrics.json`` under ``skipped``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from trainer.config import (DataConfig, ModelConfig, OptimConfig, ParallelConfig, RunConfig, ScheduleConfig,
                            TaskConfig)
from trainer.errors import ConfigError

log = logging.getLogger("geoprime.preflight")


class PreflightError(ConfigError):
    """Something the run needs is missing or wrong; the message names it."""


class PreflightTask(Protocol):
    """What the checks read of a task (a :class:`trainer.tasks.base.Task`): the keys its streams read,
    the frames it trains on, its model and parameter groups (built on the meta device) and its
    transforms (the loader check). Torch objects are ``Any`` here: this module imports no torch until
    a check runs (``check_job`` answers a config typo first)."""

    same_size_keys: tuple[str, ...]
    min_train_side: int
    min_side_reason: str

    def stream_keys(self, train: bool) -> tuple[str, ...]: ...

    def train_frame_size(self) -> Optional[tuple[int, ...]]: ...

    def build_model(self) -> Any: ...

    def parameter_groups(self, model: Any) -> list[dict[str, Any]]: ...

    def train_transform(self, sample: dict[str, Any], generator: Any) -> dict[str, Any]: ...

    def eval_transform(self, sample: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class RunPlan:
    """What preflight found: the evaluation splits that will run, and those skipped (and why)."""

    val_split: Optional[str]
    test_split: Optional[str]
    skipped: dict[str, str] = field(default_factory=dict)
    """``{"val": reason}`` for evaluation splits that are not evaluated."""


def _world_size(given: Optional[int] = None) -> int:
    return max(1, int(given or os.environ.get("WORLD_SIZE", "1") or 1))


def _is_logging_rank() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def check_out_dir(out_dir: str) -> None:
    """``out_dir`` exists or can be made, and a file can be written in it."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".preflight.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"out_dir={out_dir!r} is not writable ({e.strerror or e})") from None


def check_files(model: ModelConfig, task: TaskConfig, resume: str) -> None:
    """Initialisation and resume files named by the config exist (read later, after set-up): the
    encoder's, the task's ``weights`` where its config has them, ``train.resume``'s."""
    if str(model.init) == "imagenet":
        from trainer.models.encoders import imagenet_weights_file

        weights = Path(model.imagenet_weights) if model.imagenet_weights else imagenet_weights_file(model.encoder)
        if not weights.is_file():
            raise PreflightError(f"model.init=imagenet: no weights file at {weights} (no download at run time: "
                                 "place the torchvision file there or pass model.imagenet_weights=<file>)")
    task_weights = getattr(task, "weights", None)
    if task_weights:
        check_init_weights(str(task_weights), model, getattr(task, "init", None))
    resume = str(resume)
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise PreflightError(f"train.resume={resume!r}: no such checkpoint folder")


def check_init_weights(path: str, model: ModelConfig, init: Optional[str]) -> None:
    """``task.weights`` is a file or a Monodepth2 release folder, and a release meets the encoder
    input normalisation its weights expect (``model.input_norm=monodepth2``)."""
    from trainer.models import monodepth2
    from trainer.models.pretrained import is_weights_source

    if not is_weights_source(path):
        raise PreflightError(f"task.weights={path!r}: no such file, nor a Monodepth2 weights folder "
                             f"(encoder.pth + depth.pth) (task.init={init})")
    norm = str(getattr(model, "input_norm", "imagenet"))
    release = monodepth2.is_release(path) or (Path(path).name == "encoder.pth" and monodepth2.is_release(Path(path).parent))
    if release and norm != monodepth2.NORM:
        raise PreflightError(f"task.weights={path!r} is a Monodepth2 release: its encoders normalise inputs as "
                             f"(x - 0.45) / 0.225; set model.input_norm=monodepth2 (it is {norm})")


def _manifest(root: str, split: str, role: str) -> Any:
    from data_shards.locate import is_split_folder, missing_split
    from data_shards.manifest import ManifestError
    from data_shards.openers import is_remote, join
    from data_shards.stream import load_manifest

    try:
        return load_manifest(root, split)
    except ManifestError as e:
        if not is_remote(root) and not is_split_folder(join(root, split)):  # say what is there instead
            raise PreflightError(f"data.root={root!r}, data.{role}_split={split!r}: {missing_split(root, split)}") \
                from None
        raise PreflightError(f"data.{role}_split={split!r}: {e}") from None


def _missing_keys(manifest: Any, keys: tuple[str, ...], split: str, root: str) -> list[str]:
    from data_shards.stream import resolve_keys

    missing = []
    for k in keys:
        try:
            resolve_keys(manifest, [k], split, root)
        except KeyError:
            missing.append(k)
    return missing


def _split_error(role: str, split: str, root: str, missing: list[str], manifest: Any) -> PreflightError:
    return PreflightError(f"data.{role}_split={split!r} ({root}): key(s) {missing} that the task reads are not "
                          f"in every sample (the manifest's keys: {sorted(manifest.keys)})")


def check_train_split(data: DataConfig, task: PreflightTask, batch_size: int,
                      world_size: Optional[int] = None) -> None:
    """The training split has the task's keys and at least one full step for every rank."""
    from data_shards.deal import epoch_steps

    d = data
    manifest = _manifest(str(d.root), str(d.train_split), "train")
    missing = _missing_keys(manifest, task.stream_keys(True), str(d.train_split), str(d.root))
    if missing:
        raise _split_error("train", str(d.train_split), str(d.root), missing, manifest)
    total = min(int(d.subset), manifest.num_samples) if int(d.subset) else manifest.num_samples
    if total == 0:
        raise PreflightError(f"data.train_split={d.train_split!r} ({d.root}): the split is empty")
    world, batch = _world_size(world_size), int(batch_size)
    if int(d.lanes) < 1:
        raise PreflightError(f"data.lanes={d.lanes}: must be >= 1 (runs interleaved per epoch; default 960)")
    try:
        steps = epoch_steps(total, 0, world, batch, True, str(d.tail_policy)).count
    except ValueError as e:
        raise PreflightError(f"data.tail_policy={d.tail_policy!r}: {e}") from None
    if steps == 0:
        raise PreflightError(
            f"data.train_split={d.train_split!r} ({d.root}): {total} samples give each of {world} ranks "
            f"{total // world} (data.tail_policy={d.tail_policy}), fewer than train.batch_size={batch}: no full step "
            f"(data.tail_policy=pad pads one)")


def check_eval_split(data: DataConfig, task: PreflightTask, role: str) -> tuple[Optional[str], Optional[str]]:
    """(split to evaluate or None, reason it is skipped or None) for ``data.<role>_split``."""
    d = data
    split = getattr(d, f"{role}_split", None)
    if not split:
        return None, None
    manifest = _manifest(str(d.root), str(split), role)
    if manifest.num_samples == 0:
        raise PreflightError(f"data.{role}_split={split!r} ({d.root}): the split is empty")
    keys = task.stream_keys(False)
    missing = _missing_keys(manifest, keys, str(split), str(d.root))
    if not missing:
        return str(split), None
    trained_on = set(task.stream_keys(True))
    if any(k in trained_on for k in missing):
        raise _split_error(role, str(split), str(d.root), missing, manifest)
    reason = (f"data.{role}_split={split!r} has no {missing} (ground truth the task evaluates with but does "
              f"not train on): not evaluated")
    return None, reason


def check_engine(parallel: ParallelConfig, optim: OptimConfig, batch_size: int,
                 world_size: Optional[int] = None) -> None:
    """The engine runs these settings with ``world_size`` ranks (see ``check_settings``)."""
    from trainer.distributed import DistEnv, dist_env
    from trainer.engine.facade import check_settings

    env = dist_env() if world_size is None else DistEnv(world_size=_world_size(world_size))
    try:
        check_settings(parallel, optim, int(batch_size), env)
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_model(task: PreflightTask, optim: OptimConfig, schedule: ScheduleConfig, *, steps: int,
                task_name: str) -> None:
    """The task's whole model, initialised from its files (read and matched key by key), its
    optimizer and lr schedule, built on the meta device (shapes only: no memory, no arithmetic)."""
    import warnings

    import torch

    from trainer.errors import PretrainedMismatchError
    from trainer.optim import build_optimizer
    from trainer.schedules import build_scheduler

    def named(where: str, e: Exception) -> PreflightError:
        text, key = str(e), where.split("=")[0].split(" ")[0]
        return PreflightError(text if text.startswith(key) else f"{where}: {text}")

    mistakes = (ValueError, KeyError, TypeError, OSError, PretrainedMismatchError)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            # loading an init file into meta parameters is the point (keys and shapes are matched);
            # torch warns once per tensor that the copy is a no-op
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            model = task.build_model()
    except mistakes as e:
        raise named(f"task={task_name}", e) from None
    o = optim
    try:
        optimizer = build_optimizer(task.parameter_groups(model), o)
    except mistakes as e:
        where = f"optim (name={o.name}, lr={o.lr}, betas={list(o.betas)}, weight_decay={o.weight_decay})"
        raise named(where, e) from None
    try:
        build_scheduler(optimizer, schedule, int(steps))
    except mistakes as e:
        raise named("schedule", e) from None


def check_loader(data: DataConfig, task: PreflightTask, *, batch_size: int, seed: int,
                 world_size: Optional[int] = None) -> None:
    """The training loader can be built with the data settings (tail policy, corrupt-sample policy,
    subset, workers) for rank 0 of ``world_size``; builds it without reading a sample."""
    from types import SimpleNamespace

    from trainer.tasks.loaders import shard_loader_factory

    place = SimpleNamespace(rank=0, world_size=_world_size(world_size))
    try:
        shard_loader_factory(data, task, place, batch_size=int(batch_size), seed=int(seed))(str(data.train_split), True)
    except (ValueError, KeyError) as e:
        raise PreflightError(f"data ({data.root}, split {data.train_split!r}): {e}") from None


def check_job(overrides: list[str], world_size: int) -> RunConfig:
    """What a job would fail on before step 1, checked once before torchrun starts it: the config
    (unknown keys, options), the whole job (:func:`preflight`) and whether its ``out_dir`` is in use.
    Returns the config; raises :class:`~trainer.errors.ConfigError` naming the problem."""
    from trainer.compose import load_run_config
    from trainer.checkpointing.run_lock import is_locked

    cfg, _ = load_run_config(overrides)  # before anything heavy is imported: a typo is answered at once
    from trainer.tasks import build_task

    holder = is_locked(cfg.out_dir)
    if holder:
        raise ConfigError(f"out_dir={cfg.out_dir!r} is in use by {holder}; wait for that job, stop it, "
                          "or give this one another out_dir=...")
    preflight(cfg, build_task(cfg), world_size=world_size)
    return cfg


#: Samples probed per split for their frame sizes, spread evenly over it (first of each part).
PROBES = 8


def probe_sizes(root: str, split: str, keys: tuple[str, ...], probes: int = PROBES,
                on_corrupt: str = "raise") -> list[tuple[str, dict]]:
    """``[(sample key, {key: (height, width)})]`` of up to ``probes`` samples spread evenly over the
    split (the first sample of each of ``probes`` equal parts, in manifest order), for the
    image-like keys among ``keys``. A corrupt probed sample is skipped under ``on_corrupt="skip"``
    and a one-line error otherwise."""
    from itertools import islice

    from data_shards.stream import Plan, ShardStream, StreamConfig, load_manifest

    n = min(probes, load_manifest(root, split).num_samples)
    # one lane per part, not shuffled: the order's first round is the first sample of each part
    stream = ShardStream(StreamConfig(root, split, shuffle=False, lanes=n, keys=keys, on_corrupt="skip"))
    found = []
    for step in islice(stream.iter_steps(Plan(1, False, 1), 0, 1), n):
        for _, sample in step:
            if not isinstance(sample, dict):  # a corrupt sample's marker (Corrupt)
                if on_corrupt == "skip":
                    continue
                raise PreflightError(f"split {split!r}: {sample.reason} (data.on_corrupt=skip would skip such samples)")
            found.append((str(sample["__key__"]), {k: tuple(v.shape[-2:]) for k, v in sample.items()
                                                   if k in keys and k != "K" and getattr(v, "dim", lambda: 0)() >= 2}))
    return found


def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def check_train_frames(data: DataConfig, task: PreflightTask, task_name: str) -> None:
    """The training split's probed frames share one size (a batch stacks them; unless the task crops
    to a fixed size) and are not smaller than the task can train on (``task.min_train_side``)."""
    d = data
    where = f"data.train_split={d.train_split!r} ({d.root})"
    seen: dict[tuple[int, int], str] = {}
    for key, sizes in probe_sizes(str(d.root), str(d.train_split), task.stream_keys(True),
                                  on_corrupt=str(d.on_corrupt)):
        for size in sizes.values():
            seen.setdefault(size, key)
    smallest = min(seen, key=min, default=None)
    need = int(task.min_train_side)
    if smallest is not None and min(smallest) < need:
        raise PreflightError(f"{where}: frames of {_hw(smallest)} (sample {seen[smallest]}) are below the smallest "
                             f"size task={task_name} trains on, {need}x{need} ({task.min_side_reason})")
    if len(seen) > 1 and task.train_frame_size() is None:
        (a, ka), (b, kb) = list(seen.items())[:2]
        raise PreflightError(f"{where}: frames of different sizes ({_hw(a)} in sample {ka}, {_hw(b)} in sample {kb}) "
                             "cannot share a training batch: convert the split with --resize H W (or set a crop)")


def check_eval_frames(data: DataConfig, task: PreflightTask, role: str, split: str, task_name: str) -> None:
    """In the probed samples of an evaluation split, the keys the task compares pixel by pixel
    (``task.same_size_keys``, e.g. rgb and seg) have one size; other sizes may vary (evaluation
    cuts mixed-size batches into same-size parts)."""
    same = tuple(task.same_size_keys)
    if len(same) < 2:
        return
    for key, sizes in probe_sizes(str(data.root), split, task.stream_keys(False), on_corrupt=str(data.on_corrupt)):
        got = {k: sizes[k] for k in same if k in sizes}
        if len(set(got.values())) > 1:
            raise PreflightError(f"data.{role}_split={split!r} ({data.root}): sample {key} has "
                                 f"{', '.join(f'{k} {_hw(v)}' for k, v in got.items())}: task={task_name} "
                                 "needs them the same size")


def check_frame_sizes(data: DataConfig, task: PreflightTask, plan: RunPlan, task_name: str) -> None:
    """Frame sizes of every split the run reads, from a few probed samples each (see above)."""
    check_train_frames(data, task, task_name)
    for role in ("val", "test"):
        split = getattr(plan, f"{role}_split")
        if split:
            check_eval_frames(data, task, role, split, task_name)


def preflight(cfg: RunConfig, task: PreflightTask, world_size: Optional[int] = None) -> RunPlan:
    """Run every check (see the module docstring) for ``world_size`` ranks (default: $WORLD_SIZE);
    returns the evaluation plan. The one function here that reads the whole run config: each check
    gets the slices it reads."""
    batch_size, task_name = int(cfg.train.batch_size), str(cfg.task.name)
    check_out_dir(str(cfg.out_dir))
    check_files(cfg.model, cfg.task, str(cfg.train.resume))
    check_engine(cfg.parallel, cfg.optim, batch_size, world_size)
    check_model(task, cfg.optim, cfg.schedule, steps=int(cfg.train.steps), task_name=task_name)
    check_train_split(cfg.data, task, batch_size, world_size)
    check_loader(cfg.data, task, batch_size=batch_size, seed=int(cfg.seed), world_size=world_size)
    plan = RunPlan(None, None)
    for role in ("val", "test"):
        split, reason = check_eval_split(cfg.data, task, role)
        setattr(plan, f"{role}_split", split)
        if reason:
            plan.skipped[role] = reason
            if _is_logging_rank():
                log.warning("%s", reason)
    check_frame_sizes(cfg.data, task, plan, task_name)
    return plan
