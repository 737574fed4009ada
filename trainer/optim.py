"""Optimizer construction from :class:`trainer.config.OptimConfig`, shared by every strategy.

DeepSpeed receives the optimizer built here as an object, so all strategies optimise identically.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

OPTIMIZERS = ("adamw", "adam", "sgd")


def fusable(groups: list) -> bool:
    """Whether torch's fused Adam kernel takes these parameters: plain (not DTensor) float tensors,
    all on the CPU or all on one CUDA device type."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(params) and all(type(p.data) is torch.Tensor and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params) \
        and len({p.device.type for p in params}) == 1


def build_optimizer(param_groups: Iterable[dict[str, Any]] | Iterable[torch.nn.Parameter], cfg: Any,
                    allow_fused: bool = True) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over ``param_groups`` with the peak lr, decay, betas / momentum of ``cfg``;
    Adam(W) fused when ``cfg.fused``, ``allow_fused`` (DeepSpeed: no) and :func:`fusable`."""
    name = str(cfg.name).lower()
    groups = list(param_groups)
    if not groups:
        raise ValueError("optimizer: no trainable parameters (task.parameter_groups returned nothing)")
    fused = {"fused": True} if allow_fused and getattr(cfg, "fused", False) and fusable(groups) else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r}: expected one of {', '.join(OPTIMIZERS)}")
