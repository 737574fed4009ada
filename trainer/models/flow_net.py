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

#: The finest head's input channels (the U-Net's scale-0 width): heads' outputs are scaled to it.
HEAD_CHANNELS = 16


class FlowDecoder(nn.Module):
    """U-Net decoder over the per-level concatenation of both frames' features.

    Output: ``{scale: flow (B, 2, H, W)}`` in pixels of the *input* resolution (u right, v
    down), every scale bilinearly upsampled to the input size. The raw head output is flow as a
    fraction of the image width / height, so it does not depend on the resolution; the output
    convolutions start scaled by 0.01 (bias 0), so training starts from almost zero flow.
    ``coordinates``: each level also gets the pixels' normalised positions (CoordConv), so the
    decoder can learn where in the image a motion is typical (ego-motion's expanding field).
    """

    def __init__(self, num_ch_enc: Sequence[int], scales: Sequence[int] = (0, 1, 2, 3),
                 coordinates: bool = False) -> None:
        super().__init__()
        self.coordinates = coordinates
        extra = 2 if coordinates else 0
        self.unet = UNetDecoder([2 * c + extra for c in num_ch_enc], out_channels=2, scales=scales, activation="none")
        with torch.no_grad():  # start near the identity warp (zero flow), not at random pixel shifts
            for head in self.unet.heads.values():
                head.weight.mul_(0.01)
                head.bias.zero_()
        # Adam moves every head weight by about the lr per step, so a head's output moves in
        # proportion to its fan-in: scaled by 1 / channels, every scale's flow moves as fast as
        # the finest one's (unscaled, the 128-channel coarsest head ran away to flows of
        # hundreds of pixels, where the warped frame is all border and the loss has no gradient)
        self.gains = {int(s): HEAD_CHANNELS / head.in_channels for s, head in self.unet.heads.items()}

    def fractions(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{scale: flow (B, 2, H / 2^s, W / 2^s)}`` at each head's own resolution, as a fraction of
        the image width (u) and height (v): the same numbers describe the flow at every scale."""
        pairs = [torch.cat([a, b], dim=1) for a, b in zip(feats_a, feats_b)]
        if self.coordinates:
            pairs = [torch.cat([p, coordinate_maps(p)], dim=1) for p in pairs]
        return {s: self.gains[s] * f for s, f in self.unet(pairs).items()}

    def forward(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor],
                size: tuple[int, int]) -> dict[int, torch.Tensor]:
        return {s: fraction_to_pixels(frac, size) for s, frac in self.fractions(feats_a, feats_b).items()}


def coordinate_maps(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) normalised pixel-centre coordinates (u, v) in [-1, 1] for a (B, C, H, W) map."""
    b, _, h, w = x.shape
    v, u = torch.meshgrid(torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device),
                          torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device), indexing="ij")
    return torch.stack([u, v])[None].expand(b, 2, h, w)


def fraction_to_pixels(frac: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 2, h, w) flow as a fraction of the image size -> (B, 2, H, W) pixels of an (H, W)
    image, bilinearly resized when (h, w) differs."""
    h, w = size
    if tuple(frac.shape[-2:]) != (h, w):
        frac = F.interpolate(frac, size=(h, w), mode="bilinear", align_corners=False)
    return frac * torch.tensor([w, h], dtype=frac.dtype, device=frac.device).view(1, 2, 1, 1)


def flow_to_pixel_coords(flow: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) flow t -> t+1 in pixels -> (B, H, W, 2) sampling coordinates (u + du, v + dv)
    in frame t+1, for ``trainer.geometry.bilinear_warp``."""
    b, _, h, w = flow.shape
    v, u = torch.meshgrid(torch.arange(h, dtype=flow.dtype, device=flow.device),
                          torch.arange(w, dtype=flow.dtype, device=flow.device), indexing="ij")
    return torch.stack([u + flow[:, 0], v + flow[:, 1]], dim=-1)
