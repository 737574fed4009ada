"""Siamese optical-flow network: one encoder (shared weights) on both frames, features
concatenated per pyramid level, and the shared U-Net decoder predicting flow at 4 scales.

The model is ``ModuleDict({"encoder": ResNetEncoder, "flow_decoder": FlowDecoder})`` so its
exported weights carry the ``encoder.`` prefix that segmentation fine-tuning loads; the encoder
has exactly the architecture of the depth encoder (the reference study's control experiment).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.unet import UNetDecoder


class FlowDecoder(nn.Module):
    """U-Net decoder over the per-level concatenation of both frames' features.

    Output: ``{scale: flow (B, 2, H, W)}`` in pixels of the *input* resolution (u right, v
    down), every scale bilinearly upsampled to the input size. The raw head output is flow as a
    fraction of the image width / height, so it does not depend on the resolution; the output
    convolutions start scaled by 0.01 (bias 0), so training starts from almost zero flow.
    """

    def __init__(self, num_ch_enc: Sequence[int], scales: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.unet = UNetDecoder([2 * c for c in num_ch_enc], out_channels=2, scales=scales, activation="none")
        with torch.no_grad():  # start near the identity warp (zero flow), not at random pixel shifts
            for head in self.unet.heads.values():
                head.weight.mul_(0.01)
                head.bias.zero_()

    def forward(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor],
                size: tuple[int, int]) -> dict[int, torch.Tensor]:
        pair = [torch.cat([a, b], dim=1) for a, b in zip(feats_a, feats_b)]
        h, w = size
        to_px = torch.tensor([w, h], dtype=pair[0].dtype, device=pair[0].device).view(1, 2, 1, 1)
        out = {}
        for s, frac in self.unet(pair).items():
            if tuple(frac.shape[-2:]) != (h, w):
                frac = F.interpolate(frac, size=(h, w), mode="bilinear", align_corners=False)
            out[s] = frac * to_px
        return out


def flow_to_pixel_coords(flow: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) flow t -> t+1 in pixels -> (B, H, W, 2) sampling coordinates (u + du, v + dv)
    in frame t+1, for ``trainer.geometry.bilinear_warp``."""
    b, _, h, w = flow.shape
    v, u = torch.meshgrid(torch.arange(h, dtype=flow.dtype, device=flow.device),
                          torch.arange(w, dtype=flow.dtype, device=flow.device), indexing="ij")
    return torch.stack([u + flow[:, 0], v + flow[:, 1]], dim=-1)
