"""Training-time augmentation that keeps multi-frame samples consistent.

* Colour jitter: one set of factors drawn per sample and applied identically to every frame
  (the photometric loss compares frames, so they must be jittered alike).
* Horizontal flip of every spatial key, with the intrinsics' principal point mirrored, flow's
  u component negated, and the stereo baseline negated (after a flip the right image shows
  the mirrored world from the camera at -baseline).

All randomness comes from the ``torch.Generator`` the caller passes (exact resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

#: sample keys holding images / maps with the spatial layout (..., H, W)
SPATIAL_KEYS = ("rgb", "rgb_prev", "rgb_next", "rgb_right", "depth", "seg", "flow")


@dataclass(frozen=True)
class JitterParams:
    """Factors of one colour jitter; ``order`` is a permutation of the four adjustments
    (0 brightness, 1 contrast, 2 saturation, 3 hue), as torchvision's ColorJitter does."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, ...]


def sample_jitter(generator: torch.Generator, brightness: float = 0.2, contrast: float = 0.2,
                  saturation: float = 0.2, hue: float = 0.1) -> JitterParams:
    """Draw jitter factors uniformly: brightness/contrast/saturation in [1 - x, 1 + x], hue in
    [-hue, hue] (Monodepth2's ranges by default)."""
    if not (0 <= brightness and 0 <= contrast and 0 <= saturation and 0 <= hue <= 0.5):
        raise ValueError(f"colour jitter ranges must be >= 0 (hue <= 0.5), got {brightness}, "
                         f"{contrast}, {saturation}, {hue}")
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    order = tuple(torch.randperm(4, generator=generator).tolist())
    return JitterParams(
        brightness=1 + brightness * (2 * u[0] - 1),
        contrast=1 + contrast * (2 * u[1] - 1),
        saturation=1 + saturation * (2 * u[2] - 1),
        hue=hue * (2 * u[3] - 1),
        order=order,
    )


def apply_jitter(image: Tensor, params: JitterParams) -> Tensor:
    """Apply the jitter to one image (3, H, W) or a batch (..., 3, H, W), uint8 or float in [0, 1]."""
    ops = (
        lambda x: TF.adjust_brightness(x, params.brightness),
        lambda x: TF.adjust_contrast(x, params.contrast),
        lambda x: TF.adjust_saturation(x, params.saturation),
        lambda x: TF.adjust_hue(x, params.hue),
    )
    # an adjustment at its identity is skipped, as torchvision's ColorJitter skips a zero range
    # (a hue shift of 0 would still round-trip uint8 through HSV)
    identity = (params.brightness == 1, params.contrast == 1, params.saturation == 1, params.hue == 0)
    for i in params.order:
        if not identity[i]:
            image = ops[i](image)
    return image


def jitter_frames(sample: dict[str, Any], keys: Iterable[str], params: JitterParams,
                  prefix: str = "aug_") -> dict[str, Any]:
    """Add ``prefix + key`` with the jittered copy of each image ``key``; the originals stay
    untouched (the loss must see unaugmented frames). Returns a new dict."""
    out = dict(sample)
    for key in keys:
        if key not in sample:
            raise KeyError(f"jitter_frames: sample {sample.get('__key__', '?')} has no key {key!r}")
        out[prefix + key] = apply_jitter(sample[key], params)
    return out


def hflip_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Mirror a sample left-right: every spatial key (also ``aug_*`` copies), ``K``'s principal
    point (cx -> W - 1 - cx, pixel centres at integers), flow u -> -u, baseline -> -baseline.
    Returns a new dict; unknown non-spatial keys are copied as they are."""
    out = dict(sample)
    width = None
    for key, value in sample.items():
        base = key[4:] if key.startswith("aug_") else key
        if base in SPATIAL_KEYS and isinstance(value, Tensor):
            out[key] = value.flip(-1)
            width = value.shape[-1]
    if "flow" in out:
        flow = out["flow"].clone()
        flow[0] = -flow[0]
        out["flow"] = flow
    if "K" in sample:
        if width is None:
            raise KeyError(f"hflip_sample: sample {sample.get('__key__', '?')} has K but no image")
        K = sample["K"].clone()
        K[0, 2] = (width - 1) - K[0, 2]
        K[0, 1] = -K[0, 1]
        out["K"] = K
    if "baseline" in sample:
        out["baseline"] = -sample["baseline"]
    return out
