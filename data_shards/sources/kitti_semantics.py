"""KITTI semantic segmentation (data_semantics) -> schema samples with N-shot train/test splits.

Reads ``<root>/training/image_2/<id>_10.png`` and ``<root>/training/semantic/<id>_10.png``
(8-bit Cityscapes *label ids*), maps labels to train ids (255 ignore) with the official table.
The 200 labelled images are split deterministically as the reference study does: the first
N (sorted by name) train, the rest test; or, with ``--shot-seed``, a seeded random N.

``--label-resize bicubic`` reproduces a quirk of the reference code (DepthToSemantic
``KITTI/data_utils_semantic.py:42``: ``Image.open(path).convert('L').resize(reshape)``, whose
default filter for 8-bit images is bicubic): the label *ids* are resized bicubically, which
invents ids along class boundaries, and only then mapped to train ids. Default: nearest.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from data_shards.sources.labels import labelid_to_trainid
#: ``build kitti_semantics --help``: what to download and how --root must look
DOWNLOAD = """what to download: data_semantics.zip, the KITTI semantic segmentation benchmark's labels
(https://www.cvlibs.net/datasets/kitti/eval_semseg.php); unzip it and pass the folder as --root:
  <root>/training/image_2/000000_10.png ... 000199_10.png   the 200 labelled frames
  <root>/training/semantic/000000_10.png ...                8-bit Cityscapes label ids
(testing/ is not read: it has no labels.) Details: docs/real-datasets.md#kitti-semantics-fine-tuning"""


from data_shards.sources.resize import (
    Geometry, SourceError, add_common_arguments, geometry_from_args, read_png_gray, read_rgb, require,
    write_splits,
)


@dataclass(frozen=True)
class SemOptions:
    """Dataset root and the conversion-time geometry."""

    root: str
    geometry: Geometry = Geometry()
    label_resize: str = "nearest"
    """nearest (train ids, never a new class) | bicubic (label ids with PIL, the reference's quirk)."""


def list_images(root: Path) -> list[Path]:
    """The labelled training images, sorted, each checked to have its ``semantic`` label file."""
    img_dir = root / "training" / "image_2"
    if not img_dir.is_dir():
        raise SourceError(f"{img_dir}: missing; expected KITTI semantics' training/image_2/<id>_10.png")
    images = sorted(p for p in img_dir.iterdir() if p.suffix == ".png")
    if not images:
        raise SourceError(f"{img_dir}: no .png images")
    for p in images:
        require(root / "training" / "semantic" / p.name, f"the label-id PNG of {p.name}")
    return images


def nshot_split(items: list[Any], shots: int, seed: Optional[int]) -> tuple[list[Any], list[Any]]:
    """First ``shots`` items (``seed`` None) or a seeded random choice of them; the rest keep their order."""
    if shots <= 0 or shots > len(items):
        raise SourceError(f"--shots {shots}: only {len(items)} images, need 1..{len(items)}")
    if seed is None:
        chosen = set(range(shots))
    else:
        chosen = set(np.random.default_rng(seed).permutation(len(items))[:shots].tolist())
    train = [x for i, x in enumerate(items) if i in chosen]
    test = [x for i, x in enumerate(items) if i not in chosen]
    return train, test


def label_train_ids(label_ids: np.ndarray, opts: SemOptions, where: str) -> np.ndarray:
    """Label ids -> train ids at the converted size: train ids resized nearest, or (``bicubic``) the
    ids cropped, resized bicubically with PIL as the reference code does, then mapped."""
    geo = opts.geometry
    if opts.label_resize == "nearest" or geo.size is None:
        return geo.labels(labelid_to_trainid(label_ids), where)
    ids = Geometry(crop=geo.crop).labels(label_ids, where)  # the crop alone (none: as is)
    h, w = geo.size
    resized = np.asarray(Image.fromarray(ids).resize((w, h), Image.Resampling.BICUBIC))
    return labelid_to_trainid(resized)


def make_sample(opts: SemOptions, image: Path) -> dict[str, Any]:
    """One image + its label-id PNG -> schema sample (rgb, seg train ids, provenance)."""
    root = Path(opts.root)
    rgb = read_rgb(image)
    label_path = root / "training" / "semantic" / image.name
    label_ids = read_png_gray(label_path, 8, "an 8-bit PNG of Cityscapes label ids")
    if label_ids.shape != rgb.shape[:2]:
        raise SourceError(f"{label_path}: size {label_ids.shape[::-1]} differs from {image} ({rgb.shape[1::-1]})")
    seg = label_train_ids(label_ids, opts, str(label_path))
    meta: dict[str, Any] = {
        "source": {"dataset": "kitti_semantics", "path": str(image.relative_to(root)), "frame": image.stem},
        "classes": sorted(set(np.unique(seg).tolist()) - {255}),
    }
    if not opts.geometry.identity:
        meta["source"]["geometry"] = opts.geometry.describe()
    return {"__key__": image.stem, "rgb": opts.geometry.rgb(rgb, str(image)), "seg": seg, "meta": meta}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m data_shards build kitti_semantics`` options."""
    add_common_arguments(parser)
    parser.add_argument("--shots", type=int, default=16,
                        help="training images; the other labelled images form the test split (reference: 16 of 200)")
    parser.add_argument("--shot-seed", type=int, default=None,
                        help="choose the training images at random with this seed (default: the first N by name)")
    parser.add_argument("--train-split", default="train", help="name of the N-shot split")
    parser.add_argument("--test-split", default="test", help="name of the split holding the rest")
    parser.add_argument("--label-resize", choices=("nearest", "bicubic"), default="nearest",
                        help="with --resize: nearest on train ids (default), or bicubic on label ids with PIL, as "
                             "the reference code does (a quirk: it invents ids along class boundaries)")


def plan(args: argparse.Namespace) -> dict[str, list[Path]]:
    """The images of the train and test splits."""
    train, test = nshot_split(list_images(Path(args.root)), args.shots, args.shot_seed)
    out = {args.train_split: train}
    if test:
        out[args.test_split] = test
    return out


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Convert KITTI semantics into N-shot train / test shards under ``args.out``."""
    opts = SemOptions(str(args.root), geometry_from_args(args), getattr(args, "label_resize", "nearest"))
    extra = {"geometry": opts.geometry.describe(), "shots": args.shots, "shot_seed": args.shot_seed,
             "label_set": "cityscapes19", "label_resize": opts.label_resize}
    return write_splits(args, "kitti_semantics", plan(args), functools.partial(make_sample, opts), extra)
