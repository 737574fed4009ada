"""The contract between a training objective (a *task*) and the loop / engine.

A task owns model construction, per-sample transforms, the loss and the metrics. It
knows nothing of DDP / FSDP / DeepSpeed: the engine wraps whatever ``build_model``
returns, and the loop calls only the methods below. ``Metric`` (what :meth:`Task.new_metric`
returns) lives in :mod:`trainer.metrics.base` and is re-exported here.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.metrics.base import Metric  # noqa: F401 - re-exported: the task contract names it


class Task(abc.ABC):
    """A training objective: model + transforms + loss + metrics.

    ``cfg`` is the task's own config dataclass (see each task module), ``run_cfg`` the whole
    resolved run config (for model / data settings).
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

    def train_frame_size(self) -> Any:
        """(height, width) every training sample has after ``train_transform`` whatever its frame
        size (a fixed crop), or None when the frames keep their size (then they must share one)."""
        crop = getattr(self.cfg, "crop", None)
        return tuple(crop) if crop is not None and len(crop) == 2 and all(crop) else None

    def stream_keys(self, train: bool) -> tuple[str, ...]:
        """The sample keys a training (``train``) or evaluation stream must read."""
        return self.required_keys if train or not self.eval_keys else self.eval_keys

    def __init__(self, cfg: Any, run_cfg: Any) -> None:
        self.cfg = cfg
        self.run_cfg = run_cfg

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
