"""The step-side decode (``data.decode_on=device``): a batch's still-encoded frames decoded together on
the trainer's device.

The loader then only reads and header-checks the members, draws the augmentation and mirrors the
geometry (``K``, baseline); each frame arrives as a list of :class:`~data_shards.schema.EncodedImage`.
JPEG frames are decoded as one batch by ``torchvision.io.decode_jpeg(list, device=...)`` (nvjpeg on a
GPU, libjpeg-turbo on the CPU: there bit-equal to the loader's decode); PNG frames by libpng on the
CPU (torchvision has no GPU PNG decoder), then copied over. Frames the loader flipped are mirrored here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from data_shards.schema import EncodedImage


def batch_device(batch: dict[str, Any]) -> torch.device:
    """The device the batch's tensors were moved to (the CPU if it has none)."""
    return next((v.device for v in batch.values() if isinstance(v, Tensor)), torch.device("cpu"))


def decode_frames(frames: list[EncodedImage], device: torch.device) -> Tensor:
    """uint8 (B, 3, H, W) on ``device`` from one key's encoded frames, each mirrored if it says so."""
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    sizes = {f.hw for f in frames}
    if len(sizes) != 1 or len({f.jpeg for f in frames}) != 1:
        raise ValueError(f"decode_frames: a batch's frames must share one size and format, got sizes "
                         f"{sorted(sizes)}, formats {sorted({'jpeg' if f.jpeg else 'png' for f in frames})}")
    data = [torch.frombuffer(bytearray(f.data), dtype=torch.uint8) for f in frames]
    if frames[0].jpeg:
        images = torch.stack(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    else:
        images = torch.stack([decode_png(d, mode=ImageReadMode.UNCHANGED) for d in data])
        images = images.to(device, non_blocking=True)
    flipped = [i for i, f in enumerate(frames) if f.flipped]
    if flipped:
        index = torch.tensor(flipped, device=images.device)
        images[index] = images[index].flip(-1)
    return images


def decode_on_device(batch: dict[str, Any], device: torch.device | None = None) -> dict[str, Any]:
    """The batch with every key holding a list of :class:`EncodedImage` decoded (:func:`decode_frames`)
    on ``device`` (default: the device of the batch's tensors); a batch without any is returned as is."""
    keys = [k for k, v in batch.items() if isinstance(v, list) and v and isinstance(v[0], EncodedImage)]
    if not keys:
        return batch
    device = batch_device(batch) if device is None else device
    return {**batch, **{k: decode_frames(batch[k], device) for k in keys}}
