"""Monocular depth pre-training's settings (``task=depth``): typed fields, each with a one-line docstring.

Torch-free on purpose: Hydra checks a config against it before anything heavy is imported, so
``python -m trainer --help``, ``--cfg job`` and config errors answer in about a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DepthTaskConfig:
    name: str = "depth"
    """Task name (selects trainer.tasks.depth)."""
    supervision: str = "mono"
    """Training signal: mono (video, predicted pose) | stereo (known baseline) | mono_stereo | supervised."""
    pose_encoder: str = "separate"
    """Pose net layout (mono / mono_stereo): separate (own 6-channel ResNet) | shared (depth encoder features)."""
    scales: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Decoder output scales (s = 1/2^s resolution) used in the loss; each upsampled to the input size."""
    min_depth: float = 0.1
    """Smallest depth the network can output (metres); disparity sigmoid maps to [1/max, 1/min]."""
    max_depth: float = 100.0
    """Largest depth the network can output (metres)."""
    init_depth: Optional[float] = None
    """Depth (metres) the untrained network predicts (disparity-head bias); None = by mode
    (MODE_INIT_DEPTH): Monodepth2's init (sigmoid 0.5, ~2 x min_depth) for mono / supervised,
    10 m for the metric stereo modes."""
    ssim_weight: float = 0.85
    """Weight of (1 - SSIM) / 2 in the photometric error; 1 - ssim_weight goes to L1."""
    photometric_impl: str = "auto"
    """Reprojection loss implementation: auto (fused Triton on CUDA; on a CPU ``compiled`` where a C++
    compiler is found, else ``handwritten``) | triton | compiled (trainer/kernels/photometric_cpu and
    the warp's projection compiled by inductor) | handwritten (the same eager: the loss with a
    hand-written backward) | reference (plain autograd, per scale)."""
    smoothness_weight: float = 1e-3
    """Edge-aware smoothness weight (divided by 2^scale); 0 disables it (self-supervised modes)."""
    automask: bool = True
    """Auto-masking: ignore pixels where an unwarped source already matches better (static scenes)."""
    supervised_loss: str = "l1"
    """supervised mode: l1 (masked L1 in metres) | silog (scale-invariant log loss)."""
    silog_variance_focus: float = 0.85
    """silog: weight of the mean term (1 = fully scale invariant, 0 = log L2)."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip of a training sample (all frames, K, baseline)."""
    jitter_prob: float = 0.5
    """Probability of colour jitter (same factors on all frames; networks only, not the loss)."""
    jitter_brightness: float = 0.2
    """Colour jitter brightness range: factor in [1 - x, 1 + x]."""
    jitter_contrast: float = 0.2
    """Colour jitter contrast range: factor in [1 - x, 1 + x]."""
    jitter_saturation: float = 0.2
    """Colour jitter saturation range: factor in [1 - x, 1 + x]."""
    jitter_hue: float = 0.1
    """Colour jitter hue range: shift in [-x, x]."""
    jitter_on: str = "auto"
    """Where the colour jitter runs: loader (per sample, in the loader's workers) | step (batched, on the
    trainer's device: same values on the CPU) | auto (step where CUDA is available, else loader)."""
    eval_scaling: str = "auto"
    """Prediction scaling at evaluation: auto (median for mono, fixed otherwise) | median | fixed."""
    eval_fixed_scale: float = 1.0
    """Scale applied to predictions when eval scaling is fixed (1 = metric, e.g. stereo on the synthetic world)."""
    eval_min_depth: float = 1e-3
    """Evaluation cap: ground truth below is ignored, predictions are clamped up to it (metres)."""
    eval_max_depth: float = 80.0
    """Evaluation cap: ground truth above is ignored, predictions are clamped down to it (metres)."""
    eval_crop: str = "none"
    """Evaluation region: none | garg | eigen (KITTI crops)."""
    eval_resize: list[int] = field(default_factory=lambda: [0, 0])
    """Network input (height, width) at evaluation, e.g. [192, 640] as Monodepth2 (the training
    resolution); [0, 0] = the image's own size, padded to a multiple of 32. The prediction is
    upsampled to the ground truth's size either way."""
    vis_samples: int = 4
    """Validation images written as depth colour-map PNGs by visualize()."""
    weights: Optional[str] = None
    """Initialise every part (encoder, depth decoder, pose parts) from this, strictly: an exported weights.pt,
    or a Monodepth2 release folder (encoder.pth, depth.pth, pose_encoder.pth, pose.pth; needs
    model.input_norm=monodepth2); None = model.init."""
