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
from typing import Any, Iterable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class ModelConfig:
    encoder: str = "resnet18"
    """Encoder architecture: resnet18 | resnet34 | resnet50."""
    init: str = "random"
    """Encoder initialisation: random | imagenet (torchvision weights from a local file)."""
    imagenet_weights: Optional[str] = None
    """Local path of torchvision ImageNet weights; None -> look in the torch hub cache, offline."""
    input_norm: str = "imagenet"
    """Encoder input normalisation: imagenet (torchvision's statistics) | monodepth2 ((x - 0.45) / 0.225, what
    Monodepth2's weights expect). Fine-tuning must use its pre-training's."""


@dataclass
class DataConfig:
    name: str = "synthetic"
    """Data set name, as written in the shards' manifest.json ``source`` field."""
    root: str = "data/synthetic"
    """Folder or URL prefix (http(s)://, s3://) holding ``<split>/manifest.json`` and shards."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "val"
    """Split used for validation during training."""
    test_split: str = "test"
    """Split used for the final evaluation."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    lanes: int = 960
    """Runs of neighbouring samples interleaved in each epoch's order (docs/data.md): a batch mixes that
    many shard pieces (drives); part of the order, so a mid-epoch resume needs the same value."""
    tail_policy: str = "drop"
    """Training samples left when an epoch's last step cannot be full: drop (< world x batch per epoch) |
    pad (one more full step, filled with the epoch's first samples marked invalid)."""
    resampled: bool = False
    """Infinite resampled streaming instead of exactly-once epochs (for very large data)."""
    on_corrupt: str = "raise"
    """Corrupt shard/sample: raise (naming shard and member) | skip (count and report)."""
    subset: int = 0
    """If > 0, train on a deterministic seeded subset of this many samples (N-shot)."""
    subset_seed: int = 0
    """Seed choosing the N-shot subset."""


@dataclass
class ParallelConfig:
    strategy: str = "single"
    """single | ddp | fsdp | deepspeed."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (1, 2, 3) when strategy=deepspeed."""
    offload: bool = False
    """DeepSpeed: offload optimizer state (and parameters in stage 3) to CPU."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (autocast, fp32 weights; fp16 uses loss scaling). bf16 also runs on a CPU,
    fast where it has AMX / AVX512-BF16 (2.4x Monodepth2's fp32 step on a 2-core Xeon, docs/depth.md)."""
    channels_last: Optional[bool] = None
    """Convert the model and image batches to channels_last memory format. None (auto): on for
    single and DDP (the CPU depth step 7-9 % faster, benchmarks/profile_depth_step.py; the layout
    GPU convolutions prefer), off for FSDP2 and DeepSpeed (not measured there)."""
    compile: bool = False
    """Wrap the model with torch.compile."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo."""
    find_unused_parameters: bool = False
    """DDP: tolerate parameters that get no gradient in a step (slower; only if a task needs it)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | adam | sgd."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD, Adam) weight decay."""
    momentum: float = 0.9
    """SGD momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam(W) betas."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value (0 = off)."""
    fused: bool = True
    """Adam(W) as torch's fused kernel (one pass over all parameters: 4x faster than the per-tensor
    loop on the CPU) where every parameter is a plain CPU / CUDA float tensor; FSDP2's sharded
    parameters and DeepSpeed keep the foreach / per-tensor implementation."""


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """constant | cosine | poly | step."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to the peak lr."""
    min_lr_ratio: float = 0.0
    """cosine: final lr as a fraction of the peak; poly: lower bound of the lr, as a fraction of the peak."""
    poly_power: float = 0.9
    """poly: lr = peak * (1 - t/T) ** power."""
    step_size: int = 1000
    """step: decay every this many steps."""
    gamma: float = 0.1
    """step: multiply the lr by this at each decay."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for."""
    batch_size: int = 8
    """Per-rank micro-batch size (global batch = batch_size * world_size * grad_accum)."""
    eval_every: int = 0
    """Validate every this many steps (0 = only at the end)."""
    eval_max_batches: int = 0
    """Cap on validation batches per rank (0 = the whole split, exactly once)."""
    select_metric: Optional[str] = None
    """Validation metric that picks the best-on-validation checkpoint (e.g. miou, abs_rel): exported as
    best/weights_<step>.pt and scored on test as test_best/*; None = report the final model only."""
    select_mode: str = "auto"
    """max | min | auto (min for error metrics: abs_rel, rmse, epe ...; max otherwise)."""
    log_every: int = 10
    """Log training metrics every this many steps."""
    ckpt_every: int = 0
    """Also checkpoint every this many steps (0 = off)."""
    ckpt_every_minutes: float = 30.0
    """Checkpoint when this much wall-clock time passed since the last one (0 = off); always at the
    end and on SIGTERM / SIGINT / SIGHUP."""
    ckpt_async: bool = True
    """Write periodic checkpoints in the background: the loop is held only while the state is copied
    into CPU memory (a snapshot; host memory for one more copy of the model and optimizer state per
    rank); false: the loop waits for the whole save. The stop signal's and the last save always wait."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted)."""
    keep_checkpoints: bool = True
    """Keep the checkpoints of a finished run (false: delete them once weights and metrics are
    written, e.g. for study grids; such a run can no longer be extended)."""
    resume: str = "auto"
    """auto (latest whole checkpoint in out_dir, if any) | never | <checkpoint path>."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms and fixed seeds everywhere (exact resume on CPU)."""
    export: bool = True
    """Write plain model weights (``weights.pt``) at the end, for fine-tuning."""
    progress: bool = True
    """Progress bar on the logging rank."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow from the logging rank."""
    uri: Optional[str] = None
    """Tracking URI; None -> $MLFLOW_TRACKING_URI, else sqlite under ``<out_root>/mlflow``."""
    experiment: str = "geoprime"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name (default: task + strategy + seed)."""
    parent_run_id: Optional[str] = None
    """Nest this run under a parent (set by the study launcher)."""
    system_metrics_every: float = 10.0
    """Seconds between CPU / memory / GPU (NVML) samples; 0 = off."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags on the run (the study sets grid coordinates here)."""
    color: Optional[str] = None
    """The run's colour in MLflow's UI, ``#rrggbb`` (tag ``mlflow.runColor``; the study gives each
    pre-training row one); None = MLflow's own."""
    close_retry_s: float = 60.0
    """Seconds the end of a run keeps retrying an unreachable MLflow before leaving records spooled
    (then sent at the next start in this out_dir, by ``launch study``, or by ``python -m trainer.tracking replay``)."""


@dataclass
class RunConfig:
    task: Any = MISSING
    """The task's own config (task group: depth | flow | classification | segmentation)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    """Global seed; each rank derives its own from it."""
    out_dir: str = "outputs/run"
    """Run folder: checkpoints, exported weights, qualitative PNGs, resolved config."""


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called by the entry points)."""
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
