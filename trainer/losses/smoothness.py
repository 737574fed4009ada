"""Edge-aware disparity smoothness (Monodepth2's ``get_smooth_loss``) on mean-normalised disparity.

Disparity gradients are down-weighted where the image has strong gradients (object edges):
``mean(|d_x disp| * exp(-mean_c |d_x img|)) + mean(|d_y disp| * exp(-mean_c |d_y img|))``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize_disp(disp: Tensor, eps: float = 1e-7) -> Tensor:
    """Divide each image's disparity by its mean (removes the scale, so the term cannot be
    minimised by shrinking disparity)."""
    return disp / (disp.mean(dim=(2, 3), keepdim=True) + eps)


def edge_aware_smoothness(disp: Tensor, image: Tensor) -> Tensor:
    """Scalar smoothness of ``disp`` (B, 1, H, W) weighted by the edges of ``image`` (B, C, H, W),
    both at the same resolution. Normalise ``disp`` first with :func:`normalize_disp`."""
    if disp.shape[-2:] != image.shape[-2:] or disp.shape[0] != image.shape[0]:
        raise ValueError(f"edge_aware_smoothness: disp {tuple(disp.shape)} and image "
                         f"{tuple(image.shape)} must share batch and H, W")
    grad_disp_x = (disp[:, :, :, :-1] - disp[:, :, :, 1:]).abs()
    grad_disp_y = (disp[:, :, :-1, :] - disp[:, :, 1:, :]).abs()
    grad_img_x = (image[:, :, :, :-1] - image[:, :, :, 1:]).abs().mean(1, keepdim=True)
    grad_img_y = (image[:, :, :-1, :] - image[:, :, 1:, :]).abs().mean(1, keepdim=True)
    return (grad_disp_x * (-grad_img_x).exp()).mean() + (grad_disp_y * (-grad_img_y).exp()).mean()


def multiscale_smoothness(disps: Sequence[Tensor], image: Tensor, scales: Sequence[int]) -> Tensor:
    """Monodepth2's smoothness term over scales: the mean over ``scales`` of
    :func:`edge_aware_smoothness` of each scale's mean-normalised disparity ``disps[i]`` against
    ``image`` area-downsampled to its size, divided by 2^scale. Small element-wise ops only, so
    that torch.compile fuses it, forward and backward (``trainer.kernels.dispatch.depth_functions``)."""
    terms = []
    for disp, scale in zip(disps, scales):
        target = image if disp.shape[-2:] == image.shape[-2:] else F.interpolate(image, size=disp.shape[-2:],
                                                                                 mode="area")
        terms.append(edge_aware_smoothness(normalize_disp(disp), target) / (2 ** scale))
    return torch.stack(terms).mean()
