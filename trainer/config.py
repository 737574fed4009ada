"""Structured run configuration: typed dataclasses that Hydra validates before anything runs.

Every field has a one-line docstring-comment and is used by the code (no ignored options).
Config groups (``configs/<group>/<option>.yaml``) fill these in: ``task``, ``model``,
``data``, ``parallel``, ``tracking``, ``experiment``. Each task's own config dataclass lives
beside the task (``trainer/tasks/<name>.py``) and is registered here under ``task/<name>_schema``.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

from omegaconf import MISSING, DictConfig, OmegaConf

RESUMABLE = "resumable"
"""Field metadata key: may a resumed run change this field (see :func:`setting`)?"""


def setting(default: Any = dataclasses.MISSING, *, resumable: bool, factory: Optional[Callable[[], Any]] = None) -> Any:
    """A config field that declares whether a resumed run may change it: true for what only affects how
    the run is executed or observed, false for what defines the experiment (``train.resume=auto``
    refuses those changes: :mod:`trainer.checkpointing.resume_check`). Sections declare field by field."""
    if factory is not None:
        return field(default_factory=factory, metadata={RESUMABLE: resumable})
    return field(default=default, metadata={RESUMABLE: resumable})


@dataclass
class ModelConfig:
    encoder: str = setting("resnet18", resumable=False)
    """Encoder architecture: resnet18 | resnet34 | resnet50."""
    init: str = setting("random", resumable=False)
    """Encoder initialisation: random | imagenet (torchvision weights from a local file)."""
    imagenet_weights: Optional[str] = setting(None, resumable=False)
    """Local path of torchvision ImageNet weights; None -> look in the torch hub cache, offline."""
    input_norm: str = setting("imagenet", resumable=False)
    """Encoder input normalisation: imagenet (torchvision's statistics) | monodepth2 ((x - 0.45) / 0.225, what
    Monodepth2's weights expect). Fine-tuning must use its pre-training's."""


@dataclass
class DataConfig:
    name: str = setting("synthetic", resumable=False)
    """Data set name, as written in the shards' manifest.json ``source`` field."""
    root: str = setting("data/synthetic", resumable=True)
    """Folder or URL prefix (http(s)://, s3://) holding ``<split>/manifest.json`` and shards."""
    train_split: str = setting("train", resumable=False)
    """Split used for training."""
    val_split: str = setting("val", resumable=False)
    """Split used for validation during training."""
    test_split: str = setting("test", resumable=False)
    """Split used for the final evaluation."""
    num_workers: int = setting(0, resumable=True)
    """DataLoader worker processes per rank (0 = load in the training process)."""
    lanes: int = setting(960, resumable=False)
    """Runs of neighbouring samples interleaved in each epoch's order (docs/data.md): a batch mixes that
    many shard pieces (drives); part of the order, so a mid-epoch resume needs the same value."""
    tail_policy: str = setting("drop", resumable=False)
    """Training samples left when an epoch's last step cannot be full: drop (< world x batch per epoch) |
    pad (one more full step, filled with the epoch's first samples marked invalid)."""
    resampled: bool = setting(False, resumable=False)
    """Infinite resampled streaming instead of exactly-once epochs (for very large data)."""
    on_corrupt: str = setting("raise", resumable=True)
    """Corrupt shard/sample: raise (naming shard and member) | skip (count and report)."""
    subset: int = setting(0, resumable=False)
    """If > 0, train on a deterministic seeded subset of this many samples (N-shot)."""
    subset_seed: int = setting(0, resumable=False)
    """Seed choosing the N-shot subset."""


@dataclass
class ParallelConfig:
    strategy: str = setting("single", resumable=True)
    """single | ddp | fsdp | deepspeed."""
    zero_stage: int = setting(0, resumable=True)
    """DeepSpeed ZeRO stage (1, 2, 3) when strategy=deepspeed."""
    offload: bool = setting(False, resumable=True)
    """DeepSpeed: offload optimizer state (and parameters in stage 3) to CPU."""
    precision: str = setting("fp32", resumable=True)
    """fp32 | bf16 | fp16 (autocast, fp32 weights; fp16 uses loss scaling). bf16 also runs on a CPU,
    fast where it has AMX / AVX512-BF16 (2.4x Monodepth2's fp32 step on a 2-core Xeon, docs/depth.md)."""
    channels_last: Optional[bool] = setting(None, resumable=True)
    """Convert the model and image batches to channels_last memory format. None (auto): on for
    single and DDP (the CPU depth step 7-9 % faster, benchmarks/profile_depth_step.py; the layout
    GPU convolutions prefer), off for FSDP2 and DeepSpeed (not measured there)."""
    compile: bool = setting(False, resumable=True)
    """Wrap the model with torch.compile."""
    backend: str = setting("auto", resumable=True)
    """Process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo."""
    find_unused_parameters: bool = setting(False, resumable=True)
    """DDP: tolerate parameters that get no gradient in a step (slower; only if a task needs it)."""


@dataclass
class OptimConfig:
    name: str = setting("adamw", resumable=False)
    """adamw | adam | sgd."""
    lr: float = setting(1e-4, resumable=False)
    """Peak learning rate."""
    weight_decay: float = setting(0.0, resumable=False)
    """Decoupled (AdamW) or L2 (SGD, Adam) weight decay."""
    momentum: float = setting(0.9, resumable=False)
    """SGD momentum."""
    betas: tuple[float, float] = setting((0.9, 0.999), resumable=False)
    """Adam(W) betas."""
    grad_accum: int = setting(1, resumable=False)
    """Micro-batches accumulated per optimizer step."""
    clip_grad_norm: float = setting(0.0, resumable=False)
    """Clip the global gradient norm to this value (0 = off)."""
    fused: bool = setting(True, resumable=False)
    """Adam(W) as torch's fused kernel (one pass over all parameters instead of a loop over tensors;
    measured in docs/depth.md, "Step overhead") where every parameter is a plain CPU / CUDA float tensor; FSDP2's sharded
    parameters and DeepSpeed keep the foreach / per-tensor implementation."""


@dataclass
class ScheduleConfig:
    name: str = setting("cosine", resumable=False)
    """constant | cosine | poly | step."""
    warmup_steps: int = setting(0, resumable=False)
    """Linear warm-up steps from 0 to the peak lr."""
    min_lr_ratio: float = setting(0.0, resumable=False)
    """cosine: final lr as a fraction of the peak; poly: lower bound of the lr, as a fraction of the peak."""
    poly_power: float = setting(0.9, resumable=False)
    """poly: lr = peak * (1 - t/T) ** power."""
    step_size: int = setting(1000, resumable=False)
    """step: decay every this many steps."""
    gamma: float = setting(0.1, resumable=False)
    """step: multiply the lr by this at each decay."""


@dataclass
class TrainConfig:
    steps: int = setting(1000, resumable=True)
    """Optimizer steps to train for."""
    batch_size: int = setting(8, resumable=True)
    """Per-rank micro-batch size (global batch = batch_size * world_size * grad_accum)."""
    eval_every: int = setting(0, resumable=True)
    """Validate every this many steps (0 = only at the end)."""
    eval_max_batches: int = setting(0, resumable=True)
    """Cap on validation batches per rank (0 = the whole split, exactly once)."""
    select_metric: Optional[str] = setting(None, resumable=False)
    """Validation metric that picks the best-on-validation checkpoint (e.g. miou, abs_rel): exported as
    best/weights_<step>.pt and scored on test as test_best/*; None = report the final model only."""
    select_mode: str = setting("auto", resumable=False)
    """max | min | auto (min for error metrics: abs_rel, rmse, epe ...; max otherwise)."""
    log_every: int = setting(10, resumable=True)
    """Log training metrics every this many steps."""
    ckpt_every: int = setting(0, resumable=True)
    """Also checkpoint every this many steps (0 = off)."""
    ckpt_every_minutes: float = setting(30.0, resumable=True)
    """Checkpoint when this much wall-clock time passed since the last one (0 = off); always at the
    end and on SIGTERM / SIGINT / SIGHUP."""
    ckpt_async: bool = setting(True, resumable=True)
    """Write periodic checkpoints in the background: the loop is held only while the state is copied
    into CPU memory (a snapshot; host memory for one more copy of the model and optimizer state per
    rank); false: the loop waits for the whole save. The stop signal's and the last save always wait."""
    keep_last: int = setting(2, resumable=True)
    """Checkpoints kept on disk (older ones are deleted)."""
    keep_checkpoints: bool = setting(True, resumable=True)
    """Keep the checkpoints of a finished run (false: delete them once weights and metrics are
    written, e.g. for study grids; such a run can no longer be extended)."""
    resume: str = setting("auto", resumable=True)
    """auto (latest whole checkpoint in out_dir, if any) | never | <checkpoint path>."""
    deterministic: bool = setting(False, resumable=True)
    """torch.use_deterministic_algorithms and fixed seeds everywhere (exact resume on CPU)."""
    export: bool = setting(True, resumable=True)
    """Write plain model weights (``weights.pt``) at the end, for fine-tuning."""
    progress: bool = setting(True, resumable=True)
    """Progress bar on the logging rank."""


@dataclass
class TrackingConfig:
    enabled: bool = setting(True, resumable=True)
    """Log to MLflow from the logging rank."""
    uri: Optional[str] = setting(None, resumable=True)
    """Tracking URI; None -> $MLFLOW_TRACKING_URI, else sqlite under ``<out_root>/mlflow``."""
    experiment: str = setting("geoprime", resumable=True)
    """MLflow experiment name."""
    run_name: Optional[str] = setting(None, resumable=True)
    """MLflow run name (default: task + strategy + seed)."""
    parent_run_id: Optional[str] = setting(None, resumable=True)
    """Nest this run under a parent (set by the study launcher)."""
    system_metrics_every: float = setting(10.0, resumable=True)
    """Seconds between CPU / memory / GPU (NVML) samples; 0 = off."""
    tags: dict[str, str] = setting(factory=dict, resumable=True)
    """Extra tags on the run (the study sets grid coordinates here)."""
    color: Optional[str] = setting(None, resumable=True)
    """The run's colour in MLflow's UI, ``#rrggbb`` (tag ``mlflow.runColor``; the study gives each
    pre-training row one); None = MLflow's own."""
    close_retry_s: float = setting(60.0, resumable=True)
    """Seconds the end of a run keeps retrying an unreachable MLflow before leaving records spooled
    (then sent at the next start in this out_dir, by ``launch study``, or by ``python -m trainer.tracking replay``)."""


class TaskConfig(Protocol):
    """What every task's own config (``trainer/tasks/<name>_config.py``, the ``task`` group) has: the
    name that selects the task. The rest is the task's own (a component reads it with ``getattr``
    where only some tasks have a field, e.g. ``weights``)."""

    name: str


@dataclass
class RunConfig:
    task: Any = setting(MISSING, resumable=False)
    """The task's own config (task group: depth | flow | classification | segmentation)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = setting(0, resumable=False)
    """Global seed; each rank derives its own from it."""
    out_dir: str = setting("outputs/run", resumable=True)
    """Run folder: checkpoints, exported weights, qualitative PNGs, resolved config."""


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called by the entry points; the slices above are
    imported without Hydra by the components that take them)."""
    from hydra.core.config_store import ConfigStore

    from trainer.tasks import TASK_CONFIGS

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)
    for name, cfg_cls in TASK_CONFIGS().items():
        cs.store(group="task", name=f"{name}_schema", node=cfg_cls)


def close_match(name: str, options: Iterable[str]) -> Optional[str]:
    """The option most like ``name`` (a likely typo of it), or None when none is close."""
    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


def _schema_fields(cfg: DictConfig) -> Optional[list[str]]:
    schema = OmegaConf.get_type(cfg)
    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[tuple[str, Optional[str]]]:
    """``(dotted key, likely intended key or None)`` for each key of ``cfg`` that no schema dataclass
    declares. Hydra lets ``+key=value`` add keys even to structured configs, so a typo
    (``+train.stepz=5``) would otherwise be ignored silently."""
    found: list[tuple[str, Optional[str]]] = []
    fields = _schema_fields(cfg)
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if fields is not None and key not in fields:
            match = close_match(str(key), fields)
            found.append((dotted, f"{prefix}{match}" if match else None))
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            found += unknown_keys(node, dotted + ".")
    return found


def unknown_key_message(key: str, suggestion: Optional[str], known: Iterable[str] = ()) -> str:
    """``unknown key train.step; did you mean train.steps?`` (or the keys that exist there)."""
    if suggestion:
        return f"unknown key {key}; did you mean {suggestion}?"
    known = sorted(known)
    where = key.rpartition(".")[0] or "the run config"
    listed = f" ({where} has: {', '.join(known)})" if known and len(known) <= 30 else ""
    return f"unknown key {key}{listed}; `python -m trainer --cfg job` prints every key"


def check_known_keys(cfg: DictConfig) -> None:
    """Raise :class:`~trainer.errors.ConfigError` naming every key the schemas do not know, with the
    likely intended key (see :func:`unknown_keys`)."""
    bad = unknown_keys(cfg)
    if bad:
        from trainer.errors import ConfigError

        raise ConfigError("; ".join(unknown_key_message(k, s) for k, s in bad))
