"""Segmentation fine-tuning's settings (``task=segmentation``): typed fields, each with a one-line docstring.

Torch-free on purpose: Hydra checks a config against it before anything heavy is imported, so
``python -m trainer --help``, ``--cfg job`` and config errors answer in about a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data_shards.schema import IGNORE_INDEX


@dataclass
class SegmentationConfig:
    name: str = "segmentation"
    """Task name (selects this module)."""
    num_classes: int = 19
    """Classes trained (train ids 0..num_classes-1; 255 = ignore)."""
    head: str = "unet"
    """unet (Monodepth2-style decoder) | deeplabv3 (torchvision's) | aspp (the reference code's
    DeepLabV3 head); protocol=linear uses a 1x1 probe instead."""
    output_stride: int = 32
    """Encoder output stride: 32 (plain) | 16 | 8 (last strides replaced by dilation; DeepLab uses 16)."""
    encoder_bn_momentum: Optional[float] = None
    """BatchNorm momentum of the encoder (None = PyTorch's 0.1; the Cityscapes reference uses 0.05)."""
    atrous_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    """DeepLabV3 ASPP dilation rates."""
    init: str = "random"
    """random | imagenet | depth | depth_full (encoder + U-Net decoder) | classification | flow | checkpoint."""
    weights: Optional[str] = None
    """Exported weights.pt of the pre-training (init depth / depth_full / classification / flow / checkpoint),
    or a Monodepth2 release folder (encoder.pth, depth.pth ...; init depth / depth_full, model.input_norm=monodepth2)."""
    drop_prefixes: list[str] = field(default_factory=list)
    """File key prefixes to drop on purpose (otherwise any unmatched key is an error)."""
    keep_init_prefixes: list[str] = field(default_factory=list)
    """init=checkpoint: model key prefixes deliberately left at initialisation (e.g. decoder.)."""
    protocol: str = "full"
    """full (fine-tune everything) | frozen (encoder and its BN statistics frozen) | linear (frozen + 1x1 probe)."""
    ignore_index: int = IGNORE_INDEX
    """Label value excluded from loss and metrics."""
    class_weights: Optional[list[float]] = None
    """Per-class cross-entropy weights (length num_classes), or None for uniform."""
    crop: list[int] = field(default_factory=lambda: [0, 0])
    """Training crop (height, width) after scaling; 0 = the input's own size."""
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Random training rescale factor range [min, max] (1, 1 = no rescale)."""
    hflip: bool = True
    """Random horizontal flip (p = 0.5) in training."""
    jitter_prob: float = 0.0
    """Probability of colour jitter of a training image, after the crop (0 = off; Cityscapes reference: 1)."""
    jitter_brightness: float = 0.5
    """Colour jitter brightness range: factor in [1 - x, 1 + x]."""
    jitter_contrast: float = 0.5
    """Colour jitter contrast range: factor in [1 - x, 1 + x]."""
    jitter_saturation: float = 0.5
    """Colour jitter saturation range: factor in [1 - x, 1 + x]."""
    jitter_hue: float = 0.0
    """Colour jitter hue range: shift in [-x, x] (0 = no hue change)."""
    eval_subset: list[int] = field(default_factory=list)
    """Train ids also scored as a subset (miou_subset, miou_subset_per_image); empty = none."""
    parity_classes: list[int] = field(default_factory=list)
    """Train ids scored by the reference code's KITTI per-image metric (parity/*, predictions on
    unlabelled pixels count as false positives); empty = off. See trainer/metrics/seg_reference.py."""
    export_predictions: Optional[str] = None
    """Folder to write evaluation predictions to (None = off), in ``export_format``."""
    export_format: str = "cityscapes"
    """cityscapes (label-id PNGs, the benchmark's format) | trainid (train-id PNGs)."""
    export_size: list[int] = field(default_factory=lambda: [0, 0])
    """Resize exported predictions (nearest) to (height, width), e.g. [1024, 2048]; 0 = as predicted."""
    visualize_max: int = 4
    """Qualitative overlays written per ``visualize`` call."""
    quirk_no_zero_grad: bool = False
    """Reference quirk (DepthToSemantic KITTI/train_semantic.py:172-174, no optimizer.zero_grad()): every
    step uses the sum of all gradients so far. Off by default; single / ddp, fp32 / bf16."""
    quirk_double_normalize: bool = False
    """Reference quirk (KITTI/train_semantic.py:114-115, 124-125, 158-159 then resnet_encoder.py:89): the
    ImageNet / MoCo rows' images are ImageNet-normalised before the encoder normalises them again."""
    quirk_frozen_trains_encoder: bool = False
    """Reference quirk (--freezeencoder: train_semantic.py:85, 135; monodepth_semantic.py:75-81, 99-103):
    protocol=frozen only puts the encoder in eval mode (BatchNorm statistics fixed); its weights still train."""
