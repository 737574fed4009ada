"""Optimizer construction from :class:`trainer.config.OptimConfig`, shared by every strategy.

DeepSpeed receives the optimizer built here as an object, so all strategies optimise identically.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

OPTIMIZERS = ("adamw", "adam", "sgd")


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation that makes a dense, non-contiguous ``t`` contiguous (e.g. (0, 2, 3, 1) for a
    channels_last weight), or None when ``t`` is contiguous or not dense."""
    if t.is_contiguous() or t.dim() < 2:
        return None
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))
    return order if t.permute(order).is_contiguous() else None


class ContiguousViews:
    """Mixin for torch's fused Adam / AdamW: the kernel gets contiguous views of channels_last tensors.

    The CPU kernel walks the raw memory of a parameter, its gradient and both moments element by
    element (all four share one layout), but first copies every non-contiguous gradient, a copy it
    does not use: for the channels_last convolution weights that copy cost as much as the update.
    A permuted view of a channels_last tensor is contiguous and shares its memory, so the update is
    the same, bit for bit, without the copy. State and ``state_dict`` are torch's Adam's."""

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                          state_steps)
        lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if group["amsgrad"] else [])
        for i, p in enumerate(params):
            order = memory_order(p)
            views = [lst[i].permute(order) for lst in lists] if order else []
            if views and all(v.is_contiguous() for v in views):
                for lst, v in zip(lists, views):
                    lst[i] = v
        return has_complex


class FusedAdam(ContiguousViews, torch.optim.Adam):
    """torch's fused Adam, without the gradient copies of channels_last weights (:class:`ContiguousViews`)."""


class FusedAdamW(ContiguousViews, torch.optim.AdamW):
    """torch's fused AdamW, without the gradient copies of channels_last weights (:class:`ContiguousViews`)."""


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
    Adam(W) fused (:class:`FusedAdam` / :class:`FusedAdamW`) when ``cfg.fused``, ``allow_fused``
    (DeepSpeed: no) and :func:`fusable`."""
    name = str(cfg.name).lower()
    groups = list(param_groups)
    if not groups:
        raise ValueError("optimizer: no trainable parameters (task.parameter_groups returned nothing)")
    fused = allow_fused and getattr(cfg, "fused", False) and fusable(groups)
    if name in ("adam", "adamw"):
        adam = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        if fused:
            return (FusedAdamW if name == "adamw" else FusedAdam)(groups, **adam, fused=True)
        return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, **adam)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r}: expected one of {', '.join(OPTIMIZERS)}")
