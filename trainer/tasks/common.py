"""Helpers the task modules share: config coercion, per-sample key filtering, the joint
image + label augmentation and image-to-float conversion. A task module imports what it shares
with its siblings from here only.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_shards.schema import IGNORE_INDEX


def as_dataclass(cfg: Any, cls: type) -> Any:
    """The task config as its dataclass (Hydra hands over a DictConfig; plain lists, not ListConfig)."""
    if isinstance(cfg, cls):
        return cfg
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        obj = OmegaConf.to_object(cfg)
        return obj if isinstance(obj, cls) else cls(**obj)
    return cls(**dict(cfg))


def random_scale_crop_flip(rgb: torch.Tensor, labels: list[torch.Tensor], generator: torch.Generator,
                           scale_range=(1.0, 1.0), crop=(0, 0), hflip: bool = True,
                           label_fill: int = IGNORE_INDEX) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rescale (bilinear image, nearest labels), pad (image 0, labels ``label_fill``), crop and
    flip an uint8 (3, H, W) image and its (H, W) label maps the same way. Always draws the same
    number of values from ``generator`` (scale, y, x, flip), whatever the sizes."""
    _, h, w = rgb.shape
    ch, cw = (crop[0] or h), (crop[1] or w)
    lo, hi = float(scale_range[0]), float(scale_range[1])
    u = torch.rand(4, generator=generator, dtype=torch.float64)
    s = lo + (hi - lo) * float(u[0])
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if (nh, nw) != (h, w):
        img = F.interpolate(rgb[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=s < 1)
        rgb = img[0].round().clamp(0, 255).to(torch.uint8)
        labels = [F.interpolate(l[None, None].float(), size=(nh, nw), mode="nearest-exact")[0, 0].to(l.dtype)
                  for l in labels]
    ph, pw = max(ch - nh, 0), max(cw - nw, 0)
    if ph or pw:
        rgb = F.pad(rgb, (0, pw, 0, ph), value=0)
        labels = [F.pad(l, (0, pw, 0, ph), value=label_fill) for l in labels]
    y0 = int(float(u[1]) * (rgb.shape[1] - ch + 1))
    x0 = int(float(u[2]) * (rgb.shape[2] - cw + 1))
    rgb = rgb[:, y0:y0 + ch, x0:x0 + cw]
    labels = [l[y0:y0 + ch, x0:x0 + cw] for l in labels]
    if hflip and float(u[3]) < 0.5:
        rgb = rgb.flip(-1)
        labels = [l.flip(-1) for l in labels]
    return rgb.contiguous(), [l.contiguous() for l in labels]


def keep_keys(sample: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The keys a task uses plus the stream's bookkeeping keys (``__key__``, ``__valid__`` ...)."""
    out = {k: v for k, v in sample.items() if k.startswith("__")}
    for k in keys:
        if k in sample:
            out[k] = sample[k]
    return out


def to_unit_float(x: torch.Tensor, like: nn.Module) -> torch.Tensor:
    """uint8 images -> float [0, 1] on the model's device."""
    dev = next(like.parameters()).device
    x = x.to(dev, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
