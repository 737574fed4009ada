"""The Monodepth2-style U-Net decoder, shared by depth (disparity), flow and segmentation heads.

Skips from the encoder pyramid, 3x3 convs with reflection padding + ELU, nearest 2x
upsampling, and an output head at each requested scale (scale s = 1/2^s of the input), run
in fp32 under mixed precision (``trainer.models.precision``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.precision import run_fp32


#: Input sides must be a multiple of this (5 stride-2 levels) for the skips to line up.
STRIDE = 32
#: Smallest padded side: the stride-32 map must be >= 2 px for the decoder's reflection padding.
MIN_SIDE = 64


def pad_to_stride(x: torch.Tensor) -> torch.Tensor:
    """Pad (replicated border, bottom / right) a (B, C, H, W) batch so that H and W are multiples
    of :data:`STRIDE` and at least :data:`MIN_SIDE`; crop outputs back with ``[..., :H, :W]``
    (at full resolution). Any size works then, e.g. KITTI's 375x1242 (padded to 384x1248)."""
    h, w = x.shape[-2:]
    ph, pw = max((-h) % STRIDE, MIN_SIDE - h), max((-w) % STRIDE, MIN_SIDE - w)
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


class ConvBlock(nn.Module):
    """3x3 conv (reflection padded) followed by ELU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class UNetDecoder(nn.Module):
    """Decoder over a 5-level encoder pyramid (strides 2..32).

    ``out_channels`` per head, ``activation`` "sigmoid" (disparity) or "none" (flow, logits).
    ``forward`` returns ``{scale: tensor (B, out_channels, H / 2**scale, W / 2**scale)}``.
    Heads live in ``self.heads`` keyed by the scale as a string (DDP-safe ModuleDict keys).
    """

    def __init__(self, num_ch_enc: Sequence[int], out_channels: int,
                 scales: Sequence[int] = (0, 1, 2, 3), activation: str = "sigmoid",
                 num_ch_dec: Sequence[int] = (16, 32, 64, 128, 256)) -> None:
        super().__init__()
        if activation not in ("sigmoid", "none"):
            raise ValueError(f"activation={activation!r}: expected sigmoid or none")
        if any(s not in range(4) for s in scales):
            raise ValueError(f"scales={list(scales)}: each must be in 0..3")
        self.scales = tuple(sorted(scales))
        self.activation = activation
        self.out_channels = out_channels
        self.upconvs = nn.ModuleDict()
        for i in range(4, -1, -1):
            cin = num_ch_enc[-1] if i == 4 else num_ch_dec[i + 1]
            self.upconvs[f"{i}_0"] = ConvBlock(cin, num_ch_dec[i])
            cin = num_ch_dec[i] + (num_ch_enc[i - 1] if i > 0 else 0)
            self.upconvs[f"{i}_1"] = ConvBlock(cin, num_ch_dec[i])
        self.heads = nn.ModuleDict({
            str(s): nn.Conv2d(num_ch_dec[s], out_channels, 3, padding=1, padding_mode="reflect")
            for s in self.scales
        })

    def forward(self, features: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        outputs: dict[int, torch.Tensor] = {}
        x = features[-1]
        for i in range(4, -1, -1):
            x = self.upconvs[f"{i}_0"](x)
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if i > 0:
                x = torch.cat([x, features[i - 1]], dim=1)
            x = self.upconvs[f"{i}_1"](x)
            if i in self.scales:
                y = run_fp32(self.heads[str(i)], x)  # fp32 under mixed precision
                outputs[i] = torch.sigmoid(y) if self.activation == "sigmoid" else y
        return outputs
