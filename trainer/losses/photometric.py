"""Reference photometric reprojection loss (Monodepth2): SSIM + L1, per-pixel minimum, auto-masking.

This is the plain-PyTorch reference that the fused Triton kernels (``trainer/kernels``) are
checked against, so the semantics below are exact and deterministic: ties in the per-pixel
minimum go to the lowest candidate index (identity errors come first), and no random noise
is added to break ties (Monodepth2 adds 1e-5 noise; we do not, so kernels can reproduce it).
Images are float in [0, 1], shape (B, C, H, W).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def _check_pair(x: Tensor, y: Tensor, what: str) -> None:
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"{what}: expected two (B, C, H, W) tensors of the same shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def ssim_dissimilarity(x: Tensor, y: Tensor) -> Tensor:
    """(B,C,H,W) clamp((1 - SSIM) / 2, 0, 1) with 3x3 mean windows (avg_pool 3x3 stride 1) on
    reflection-padded (pad 1) inputs, C1 = 0.01**2, C2 = 0.03**2 (Monodepth2's SSIM)."""
    _check_pair(x, y, "ssim_dissimilarity")
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    y = F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x = F.avg_pool2d(x, 3, 1)
    mu_y = F.avg_pool2d(y, 3, 1)
    sigma_x = F.avg_pool2d(x * x, 3, 1) - mu_x * mu_x
    sigma_y = F.avg_pool2d(y * y, 3, 1) - mu_y * mu_y
    sigma_xy = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * sigma_xy + SSIM_C2)
    den = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (sigma_x + sigma_y + SSIM_C2)
    return torch.clamp((1 - num / den) / 2, 0, 1)


def photometric_error(pred: Tensor, target: Tensor, ssim_weight: float = 0.85) -> Tensor:
    """(B,1,H,W): ssim_weight * ssim_dissimilarity(pred, target).mean(1, keepdim=True)
    + (1 - ssim_weight) * |pred - target|.mean(1, keepdim=True)."""
    _check_pair(pred, target, "photometric_error")
    l1 = (pred - target).abs().mean(1, keepdim=True)
    if ssim_weight == 0:
        return l1
    ssim = ssim_dissimilarity(pred, target).mean(1, keepdim=True)
    return ssim_weight * ssim + (1 - ssim_weight) * l1


def min_reprojection(target: Tensor, warped: Sequence[Tensor], identity: Sequence[Tensor] | None,
                     ssim_weight: float = 0.85) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel minimum over [identity errors..., warped errors...] (identity FIRST; ties go to
    the lowest index, no random tie-break noise, so fused kernels can reproduce the choice).

    ``warped``: source frames warped into the target view; ``identity``: the unwarped source
    frames (same order), or None to disable auto-masking.
    Returns (min_error (B,1,H,W), argmin (B,1,H,W) int64, automask (B,1,H,W) bool = a warped
    source won).
    """
    if len(warped) == 0:
        raise ValueError("min_reprojection: need at least one warped source frame")
    identity = list(identity) if identity is not None else []
    candidates = [photometric_error(s, target, ssim_weight) for s in identity]
    candidates += [photometric_error(w, target, ssim_weight) for w in warped]
    best = candidates[0]
    index = torch.zeros_like(best, dtype=torch.int64)
    for i, err in enumerate(candidates[1:], start=1):
        better = err < best  # strict: an equal later candidate never wins
        best = torch.where(better, err, best)
        index = torch.where(better, torch.full_like(index, i), index)
    automask = index >= len(identity)
    return best, index, automask


def reprojection_loss(target: Tensor, warped: Sequence[Tensor], identity: Sequence[Tensor] | None,
                      ssim_weight: float = 0.85) -> Tensor:
    """Scalar: mean over all pixels of min_reprojection's min_error (Monodepth2's convention)."""
    return min_reprojection(target, warped, identity, ssim_weight)[0].mean()
