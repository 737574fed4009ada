"""Depth network: ResNet encoder + Monodepth2 U-Net decoder with sigmoid disparity heads.

The parts live under the ModuleDict keys ``encoder`` and ``depth_decoder`` of the task's model,
so fine-tuning can load the ``encoder.`` prefix of the exported weights.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.geometry import disp_to_depth
from trainer.models.encoders import build_encoder
from trainer.models.unet import UNetDecoder


def build_depth_net(model_cfg, scales: Sequence[int] = (0, 1, 2, 3)) -> dict[str, nn.Module]:
    """{"encoder": ResNetEncoder (3 channels), "depth_decoder": UNetDecoder(1 channel, sigmoid)}."""
    encoder = build_encoder(model_cfg, in_channels=3)
    decoder = UNetDecoder(encoder.num_ch, out_channels=1, scales=scales, activation="sigmoid")
    return {"encoder": encoder, "depth_decoder": decoder}


def upsampled_depths(disps: dict[int, Tensor], size: tuple[int, int], min_depth: float,
                     max_depth: float) -> dict[int, tuple[Tensor, Tensor]]:
    """Each scale's sigmoid disparity, bilinearly upsampled to ``size`` (Monodepth2 v2: every
    scale's loss is computed at the input resolution) -> {scale: (scaled_disp, depth)}."""
    out = {}
    for s, disp in disps.items():
        if disp.shape[-2:] != torch.Size(size):
            disp = F.interpolate(disp, size=size, mode="bilinear", align_corners=False)
        out[s] = disp_to_depth(disp, min_depth, max_depth)
    return out


def predict_depth(model: nn.ModuleDict, images: Tensor, min_depth: float, max_depth: float) -> Tensor:
    """Full-resolution metric depth (B, 1, H, W) from float images in [0, 1] (scale-0 head)."""
    disps = model["depth_decoder"](model["encoder"](images))
    return upsampled_depths({0: disps[0]}, tuple(images.shape[-2:]), min_depth, max_depth)[0][1]
