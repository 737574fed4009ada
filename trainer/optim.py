"""Optimizer construction from :class:`trainer.config.OptimConfig`, shared by every strategy.

DeepSpeed receives the optimizer built here as an object, so all strategies optimise identically.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

OPTIMIZERS = ("adamw", "adam", "sgd")


def build_optimizer(param_groups: Iterable[dict[str, Any]] | Iterable[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over ``param_groups`` with the peak lr, decay, betas / momentum of ``cfg``."""
    name = str(cfg.name).lower()
    groups = list(param_groups)
    if not groups:
        raise ValueError("optimizer: no trainable parameters (task.parameter_groups returned nothing)")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r}: expected one of {', '.join(OPTIMIZERS)}")
