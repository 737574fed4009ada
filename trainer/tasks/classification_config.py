"""Classification pre-training's settings (``task=classification``): typed fields, each with a one-line docstring.

Torch-free on purpose: Hydra checks a config against it before anything heavy is imported, so
``python -m trainer --help``, ``--cfg job`` and config errors answer in about a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClassificationConfig:
    name: str = "classification"
    """Task name (selects this module)."""
    target: str = "multilabel"
    """``multilabel``: multi-hot classes present in ``seg``, BCE | ``single``: ImageNet-style
    folders, cross-entropy on the meta ``label`` (``num_classes`` must match the folders)."""
    num_classes: int = 19
    """Classes (train ids 0..num_classes-1 of ``seg``; 255 = ignore, never a target)."""
    min_pixels: int = 1
    """A class is a positive target when it covers at least this many pixels of the (cropped) label."""
    threshold: float = 0.5
    """Sigmoid probability above which a class is predicted present (F1 metrics)."""
    ap_bins: int = 200
    """Score histogram bins per class for the rank-exact binned average precision."""
    crop: list[int] = field(default_factory=lambda: [0, 0])
    """Training crop (height, width) after scaling; 0 = the input's own size."""
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Random training rescale factor range [min, max]."""
    hflip: bool = True
    """Random horizontal flip (p = 0.5) in training."""
    eval_crop: bool = False
    """Evaluate on one ``crop``-sized crop per image (scale in ``scale_range``, position drawn from the
    sample key: the same crop every time) instead of the full frame. For multi-label targets of a world
    whose full frames all show the same classes (the synthetic world) the full-frame metric is
    trivially perfect, and so is its class-frequency baseline: crops make both measure something."""
