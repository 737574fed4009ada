"""Supervised depth losses on the valid pixels of a sparse or dense ground truth (LiDAR, sensor).

Ground-truth depth is metres with 0 = invalid (the schema's convention); ``valid`` masks
select the pixels to use. With no valid pixel in the batch the loss is 0 (with a graph, so
every rank still runs backward).
"""
from __future__ import annotations

import torch
from torch import Tensor


def valid_depth_mask(gt: Tensor, min_depth: float = 0.0, max_depth: float = float("inf")) -> Tensor:
    """Bool mask of finite ground-truth depths in (min_depth, max_depth)."""
    return torch.isfinite(gt) & (gt > min_depth) & (gt < max_depth)


def masked_l1(pred: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """Mean |pred - gt| over valid pixels (metres)."""
    if pred.shape != gt.shape or gt.shape != valid.shape:
        raise ValueError(f"masked_l1: shapes differ: pred {tuple(pred.shape)}, gt {tuple(gt.shape)}, "
                         f"valid {tuple(valid.shape)}")
    n = valid.sum()
    if n == 0:
        return pred.sum() * 0.0
    return (pred - gt).abs()[valid].sum() / n


def scale_invariant_log(pred: Tensor, gt: Tensor, valid: Tensor, variance_focus: float = 0.85) -> Tensor:
    """Scale-invariant log loss (Eigen et al. 2014; BTS's variance focus):
    sqrt(mean(g^2) - variance_focus * mean(g)^2), g = log pred - log gt over valid pixels.
    ``variance_focus`` = 1 makes it fully scale invariant, 0 an L2 loss in log space."""
    if pred.shape != gt.shape or gt.shape != valid.shape:
        raise ValueError(f"scale_invariant_log: shapes differ: pred {tuple(pred.shape)}, "
                         f"gt {tuple(gt.shape)}, valid {tuple(valid.shape)}")
    if not 0.0 <= variance_focus <= 1.0:
        raise ValueError(f"scale_invariant_log: variance_focus={variance_focus} must be in [0, 1]")
    if valid.sum() == 0:
        return pred.sum() * 0.0
    g = pred[valid].clamp(min=1e-6).log() - gt[valid].log()
    value = (g * g).mean() - variance_focus * g.mean() ** 2
    return value.clamp(min=1e-12).sqrt()
