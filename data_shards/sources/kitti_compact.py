"""KITTI raw in compact shards (the default layout): each camera frame stored once per shard.

A KITTI frame is the target of one sample, t-1 / t+1 of two others and the other stereo view
of one more, so the plain layout stores it about four times. Here samples are sorted by
(drive, frame, side) before being cut into shards, so a frame's users share a shard, and each
sample names its images' frames (``<drive>_<frame>_image_0{2,3}``) for the compact writer
(:mod:`data_shards.compact`). A frame used on both sides of a shard boundary is stored in both
shards (a few frames per boundary). Decoded samples are the plain layout's, bit for bit.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any, Sequence

from data_shards.sources import kitti
from data_shards.sources.resize import tar_safe, write_splits

LAYOUTS = ("compact", "plain")


def frame_name(folder: str, frame: int, side: str) -> str:
    """The shard member key of one camera frame, e.g. ``2011_09_26_drive_0001_sync_0000000002_image_02``
    (never a sample key: those end in ``_l`` / ``_r``)."""
    return tar_safe(f"{Path(folder).name}_{frame:010d}_{kitti.CAMERA[side]}")


def frame_names(opts: kitti.KittiOptions, f: kitti.KittiFrame) -> dict[str, str]:
    """Which camera frame each image of ``f``'s sample is."""
    names = {"rgb": frame_name(f.folder, f.frame, f.side)}
    if opts.triplet:
        names["rgb_prev"] = frame_name(f.folder, f.frame - 1, f.side)
        names["rgb_next"] = frame_name(f.folder, f.frame + 1, f.side)
    if opts.stereo:
        names["rgb_right"] = frame_name(f.folder, f.frame, kitti.OTHER_SIDE[f.side])
    return names


def make_sample(opts: kitti.KittiOptions, f: kitti.KittiFrame) -> dict[str, Any]:
    """:func:`kitti.make_sample` plus ``__frames__`` (the frame name of each image)."""
    sample = kitti.make_sample(opts, f)
    sample["__frames__"] = frame_names(opts, f)
    return sample


def add_layout_argument(parser: argparse.ArgumentParser) -> None:
    """``--layout compact|plain``."""
    parser.add_argument("--layout", default="compact", choices=LAYOUTS,
                        help="compact (default): each frame stored once per shard, samples sorted by drive and "
                             "frame; plain: every sample stores its own 4 images, in split-file order")


def write(args: argparse.Namespace, opts: kitti.KittiOptions, splits: dict[str, Sequence[kitti.KittiFrame]],
          extra: dict[str, Any]) -> dict[str, Any]:
    """Write each split in the layout ``args.layout`` (recorded in the manifest's source)."""
    layout = getattr(args, "layout", "compact")
    if layout == "plain":
        return write_splits(args, "kitti", splits, functools.partial(kitti.make_sample, opts), extra)
    ordered = {name: sorted(frames) for name, frames in splits.items()}  # neighbours land in the same shard
    return write_splits(args, "kitti", ordered, functools.partial(make_sample, opts), {**extra, "layout": "compact"},
                        compact=True)
