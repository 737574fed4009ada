"""The contract between a training objective (a *task*) and the loop / engine.

A task owns model construction, per-sample transforms, the loss and the metrics. It
knows nothing of DDP / FSDP / DeepSpeed: the engine wraps whatever ``build_model``
returns, and the loop calls only the methods below. ``Metric`` (what :meth:`Task.new_metric`
returns) lives in :mod:`trainer.metrics.base` and is re-exported here. :class:`TrainTask` is the
seam as the loop types it (any object with these methods will do, e.g. a test's stand-in).
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import nn

from trainer.config import ModelConfig, ParallelConfig, TaskConfig
from trainer.metrics.base import Metric  # noqa: F401 - re-exported: the task contract names it
from trainer.tasks.loaders import SampleTask


class TrainTask(SampleTask, Protocol):
    """What the loop and the evaluation call on a task: :class:`Task` below, or a stand-in."""

    def build_model(self) -> nn.ModuleDict: ...

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]: ...

    def on_train_mode(self, model: nn.Module) -> None: ...

    def training_step(self, model: nn.Module,
                      batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def before_optimizer_step(self, model: nn.Module) -> None: ...

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> Any: ...

    def new_metric(self) -> Metric: ...

    def visualize(self, model: nn.Module, batch: dict[str, Any], outputs: Any, out_dir: Path) -> list[Path]: ...

    def stateful(self) -> dict[str, Any]: ...

    def provenance(self) -> dict[str, str]: ...


class Task(abc.ABC):
    """A training objective: model + transforms + loss + metrics.

    ``cfg`` is the task's own config dataclass (see each task module); of the rest of the run config a
    task reads only ``model`` (the encoder), ``seed`` (named in the weights' provenance) and
    ``parallel`` (a task refusing a strategy; None: a single process, fp32).
    """

    #: sample keys (schema names without extension, e.g. "rgb", "rgb_prev", "depth", "seg")
    #: that the task reads for training; the stream fails early, naming the split, if one is missing.
    required_keys: tuple[str, ...] = ()
    #: keys read for evaluation when they differ from training's (e.g. self-supervised depth trains
    #: on video frames alone and evaluates on rgb + ground-truth depth); () = required_keys
    eval_keys: tuple[str, ...] = ()
    #: keys an evaluation compares pixel by pixel, so each sample must have them at one size
    #: (preflight checks; e.g. segmentation's rgb and seg); () = none
    same_size_keys: tuple[str, ...] = ()
    #: smallest frame side the task trains on (preflight refuses smaller frames), and why
    min_train_side: int = 1
    min_side_reason: str = ""

    def train_frame_size(self) -> Optional[tuple[int, ...]]:
        """(height, width) every training sample has after ``train_transform`` whatever its frame
        size (a fixed crop), or None when the frames keep their size (then they must share one)."""
        crop = getattr(self.cfg, "crop", None)
        return tuple(crop) if crop is not None and len(crop) == 2 and all(crop) else None

    def stream_keys(self, train: bool) -> tuple[str, ...]:
        """The sample keys a training (``train``) or evaluation stream must read."""
        return self.required_keys if train or not self.eval_keys else self.eval_keys

    def __init__(self, cfg: TaskConfig, model: ModelConfig, *, seed: int = 0,
                 parallel: Optional[ParallelConfig] = None) -> None:
        self.cfg = cfg
        self.model_cfg = model
        self.seed = int(seed)
        self.parallel = parallel

    @abc.abstractmethod
    def build_model(self) -> nn.ModuleDict:
        """The plain model; each top-level entry is a part the engine may shard on its own."""

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups; frozen parameters must not appear. Default: all trainable."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def train_transform(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Per-sample augmentation, run in a loader worker. Must draw randomness only from
        ``generator`` (seeded from run seed, epoch and sample key) so that resume is exact."""
        return sample

    def eval_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Deterministic per-sample preprocessing for evaluation."""
        return sample

    @abc.abstractmethod
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (scalar, graph attached) and detached scalar tensors to log (loss terms...)."""

    @abc.abstractmethod
    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        """Forward pass for evaluation (called under ``torch.no_grad`` and eval mode)."""

    @abc.abstractmethod
    def new_metric(self) -> Metric:
        """A fresh accumulator for one evaluation pass."""

    def visualize(self, model: nn.Module, batch: dict[str, Any], outputs: Any, out_dir: Path) -> list[Path]:
        """Write qualitative PNGs for a few samples of ``batch``; returns the files written."""
        return []

    def on_train_mode(self, model: nn.Module) -> None:
        """Called after ``model.train()``: e.g. to keep a frozen encoder's BatchNorm in eval mode."""

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Called after a step's backward pass(es), before the optimizer step (gradients in place)."""

    def stateful(self) -> dict[str, Any]:
        """Task state to checkpoint per rank, by name (``state_dict()`` / ``load_state_dict()``)."""
        return {}

    def provenance(self) -> dict[str, str]:
        """Run tags saying where the initial weights came from (file, digest, run), for tracking."""
        return {}
