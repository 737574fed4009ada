"""What runs in fp32 under mixed precision: the output heads, whose values feed geometry or losses.

Under bf16 autocast a head's output keeps 8 mantissa bits: a disparity logit near -4 is off by up
to 2^-6, i.e. the depth by ~1.5 %, and a pose decoder's rotation by ~0.004 rad (~1 px at KITTI's
focal length). The heads are small (one conv each), so running them in fp32 costs nothing measurable.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def run_fp32(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with autocast off and ``x`` in fp32 (the parameters are fp32 already)."""
    with torch.autocast(x.device.type, enabled=False):
        return module(x.float())
