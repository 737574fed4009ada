"""Depth network: ResNet encoder + Monodepth2 U-Net decoder with sigmoid disparity heads.

The parts live under the ModuleDict keys ``encoder`` and ``depth_decoder`` of the task's model,
so fine-tuning can load the ``encoder.`` prefix of the exported weights.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.geometry import depth_to_disp, disp_to_depth
from trainer.models.encoders import build_encoder
from trainer.models.unet import UNetDecoder, pad_to_stride


def build_depth_net(model_cfg, scales: Sequence[int] = (0, 1, 2, 3), init_depth: Optional[float] = None,
                    min_depth: float = 0.1, max_depth: float = 100.0) -> dict[str, nn.Module]:
    """{"encoder": ResNetEncoder (3 channels), "depth_decoder": UNetDecoder(1 channel, sigmoid)}.

    ``init_depth``: set the disparity heads' bias so the untrained network predicts about this
    depth everywhere (None: PyTorch's default init, as Monodepth2, i.e. ~2 * min_depth)."""
    encoder = build_encoder(model_cfg, in_channels=3)
    decoder = UNetDecoder(encoder.num_ch, out_channels=1, scales=scales, activation="sigmoid")
    if init_depth is not None:
        if not min_depth < init_depth < max_depth:
            raise ValueError(f"task.init_depth={init_depth}: must lie in (min_depth={min_depth}, "
                             f"max_depth={max_depth})")
        # a CPU scalar on purpose: preflight builds the model under torch.device("meta")
        disp = float(depth_to_disp(torch.tensor(init_depth, dtype=torch.float64, device="cpu"), min_depth, max_depth))
        with torch.no_grad():
            for head in decoder.heads.values():
                head.bias.fill_(math.log(disp / (1 - disp)))
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


def disparities(model: nn.ModuleDict, images: Tensor) -> tuple[list[Tensor], dict[int, Tensor]]:
    """(encoder features, {scale: sigmoid disparity}) of float images of any size: the network sees
    them padded (:func:`pad_to_stride`: a multiple of 32, at least 64 px, which its reflection
    padding needs); each scale's output is cropped back to ceil(side / 2^scale). Sizes that need
    no padding (multiples of 32, >= 64) run exactly as before, unpadded."""
    h, w = images.shape[-2:]
    feats = model["encoder"](pad_to_stride(images))
    disps = model["depth_decoder"](feats)
    return feats, {s: d[..., :-(-h // 2 ** s), :-(-w // 2 ** s)] for s, d in disps.items()}


def predict_depth(model: nn.ModuleDict, images: Tensor, min_depth: float, max_depth: float,
                  out_size: Optional[tuple[int, int]] = None,
                  net_size: Optional[tuple[int, int]] = None) -> Tensor:
    """Metric depth (B, 1, *out_size) from float images in [0, 1] (scale-0 head), any image size.

    The network sees the images resized (bilinear) to ``net_size`` -- Monodepth2's evaluation,
    at the resolution it trained on -- or, with ``net_size`` None, at their own size; either is
    padded to a multiple of 32 (:func:`pad_to_stride`; the padded part of the output is cropped off).
    The disparity is then bilinearly upsampled to ``out_size`` (default: the input size; e.g.
    the ground truth's 375x1242) and only then turned into depth, as Monodepth2 resizes its
    disparity to the ground truth before inverting it.
    """
    h, w = images.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (h, w)
    x = images
    if net_size is not None and tuple(net_size) != (h, w):
        x = F.interpolate(images, size=tuple(net_size), mode="bilinear", align_corners=False)
    disp = disparities(model, x)[1][0]  # scale 0: full size
    return upsampled_depths({0: disp}, out_size, min_depth, max_depth)[0][1]
