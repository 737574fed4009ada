"""Optical-flow pre-training's settings (``task=flow``): typed fields, each with a one-line docstring.

Torch-free on purpose: Hydra checks a config against it before anything heavy is imported, so
``python -m trainer --help``, ``--cfg job`` and config errors answer in about a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FlowConfig:
    name: str = "flow"
    """Task name (selects this module)."""
    scales: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Decoder output scales (s = 1/2^s of the input), each upsampled to full size for the loss."""
    ssim_weight: float = 0.85
    """Weight of SSIM vs L1 in the photometric error (Monodepth2: 0.85)."""
    smoothness_weight: float = 1e-3
    """Edge-aware smoothness weight on flow in units of the image size, divided by 2^scale."""
    photometric_impl: str = "auto"
    """Photometric loss implementation, as depth's ``photometric_impl``: auto (fused Triton on CUDA;
    on a CPU ``compiled`` where a C++ compiler is found, else ``handwritten``) | triton | compiled |
    handwritten | reference (trainer/losses/photometric.py)."""
    coordinates: bool = False
    """Give the flow decoder each pixel's normalised image position (2 channels per level)."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip of both frames (flow u negated)."""
    jitter_prob: float = 0.5
    """Probability of colour jitter (same factors on both frames; the loss sees the originals)."""
    visualize_max: int = 4
    """Qualitative flow images written per ``visualize`` call."""
    gt_flow: bool = True
    """Read ground-truth flow (key ``flow``) so evaluation reports EPE; false for data without it."""
