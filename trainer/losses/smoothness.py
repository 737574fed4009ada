"""Edge-aware disparity smoothness (Monodepth2's ``get_smooth_loss``) on mean-normalised disparity.

Disparity gradients are down-weighted where the image has strong gradients (object edges):
``mean(|d_x disp| * exp(-mean_c |d_x img|)) + mean(|d_y disp| * exp(-mean_c |d_y img|))``.
"""
from __future__ import annotations

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
