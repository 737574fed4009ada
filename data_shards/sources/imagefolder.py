"""ImageNet-style image folders (``ROOT/<split>/<class>/*.jpg``) -> single-label classification shards.

The torchvision ``ImageFolder`` layout: one folder per class in each split, images found
recursively inside. Class index = position of the folder name in the sorted class folders of
the ``train`` split, the same mapping for every split. Images become RGB, are resized (bilinear,
antialiased) so that they just cover H x W (the shorter side equals the target for a square
target) and centre-cropped to H x W. Each sample holds ``rgb`` and a meta with ``label``.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_shards.sources.resize import SourceError, tar_safe, write_splits

log = logging.getLogger(__name__)

#: Image file suffixes taken (case-insensitive), as torchvision's ImageFolder does for these.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: PIL modes converted to RGB (alpha dropped, palette expanded, CMYK/YCbCr converted).
CONVERTIBLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")
CLASS_SPLIT = "train"
RESIZE_POLICY = ("resize (bilinear, antialiased) by max(H/h, W/w) so the image covers HxW "
                 "(shorter side = target for a square target), then centre crop to HxW; RGB, alpha dropped")


@dataclass(frozen=True)
class FolderItem:
    """One image to convert: its path relative to the root, class name and index."""

    rel: str
    class_name: str
    label: int


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders of one split (hidden folders skipped)."""
    if not split_dir.is_dir():
        raise SourceError(f"{split_dir}: missing; expected the split folder with one sub-folder per class")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise SourceError(f"{split_dir}: no class folders")
    return names


def sample_key(item: FolderItem) -> str:
    """Deterministic tar-safe key: ``<label:04d>_<stem>_<8 hex of the relative path>``."""
    stem = tar_safe(Path(item.rel).stem)[:48]
    digest = hashlib.sha1(item.rel.encode("utf-8")).hexdigest()[:8]
    return f"{item.label:04d}_{stem}_{digest}"


def list_split(root: Path, split: str, classes: list[str]) -> list[FolderItem]:
    """Every image of ``root/split``, labelled with ``classes``; ordered by key hash so shards mix classes."""
    index = {c: i for i, c in enumerate(classes)}
    items: list[FolderItem] = []
    for name in class_folders(root / split):
        if name not in index:
            raise SourceError(f"{root / split / name}: class {name!r} is not a class folder of the "
                              f"{CLASS_SPLIT} split ({root / CLASS_SPLIT})")
        folder = root / split / name
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise SourceError(f"{folder}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} images)")
        if len(images) < len(files):
            log.warning("%s: skipped %d file(s) that are not %s images", folder, len(files) - len(images),
                        "/".join(IMAGE_SUFFIXES))
        items += [FolderItem(p.relative_to(root).as_posix(), name, index[name]) for p in images]
    return sorted(items, key=lambda it: hashlib.sha1(it.rel.encode("utf-8")).hexdigest())


def read_image(path: Path) -> Image.Image:
    """Any 8-bit image file -> RGB PIL image; unreadable files are an error naming the path."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in CONVERTIBLE_MODES:
                raise SourceError(f"{path}: expected an 8-bit image, got PIL mode {im.mode}")
            return im.convert("RGB")
    except SourceError:
        raise
    except Exception as e:  # truncated / not an image
        raise SourceError(f"{path}: cannot read as an image ({e})") from e


def cover_and_centre_crop(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize so the image covers (H, W), then centre-crop -> uint8 (H, W, 3)."""
    h, w = size
    iw, ih = img.size
    s = max(h / ih, w / iw)
    nw, nh = max(w, round(iw * s)), max(h, round(ih * s))
    if (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return np.ascontiguousarray(np.asarray(img.crop((left, top, left + w, top + h))))


def make_sample(root: str, size: tuple[int, int], item: FolderItem) -> dict[str, Any]:
    """One image file -> schema sample (rgb, meta with label and provenance)."""
    rgb = cover_and_centre_crop(read_image(Path(root) / item.rel), size)
    meta = {"label": item.label,
            "source": {"dataset": "imagefolder", "path": item.rel, "class": item.class_name}}
    return {"__key__": sample_key(item), "rgb": rgb, "meta": meta}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m data_shards build imagefolder`` options."""
    parser.add_argument("--root", required=True, help="folder holding <split>/<class>/<image> (train must exist)")
    parser.add_argument("--out", required=True, help="output folder; one sub-folder of shards per split")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), required=True,
                        help="stored image size: resize to cover HxW, then centre crop")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders to convert")
    parser.add_argument("--workers", type=int, default=1, help="parallel conversion processes")
    parser.add_argument("--max-samples-per-shard", type=int, default=256, help="samples per shard tar")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def plan(args: argparse.Namespace) -> tuple[list[str], dict[str, list[FolderItem]]]:
    """The class names (from the train split) and the labelled images of every requested split."""
    root = Path(args.root)
    classes = class_folders(root / CLASS_SPLIT)
    return classes, {split: list_split(root, split, classes) for split in args.splits}


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Convert the requested splits of an image-folder tree into shards under ``args.out``."""
    size = tuple(int(v) for v in args.size)
    if min(size) <= 0:
        raise SourceError(f"--size {size[0]} {size[1]}: H and W must be > 0")
    classes, splits = plan(args)
    extra = {"classes": classes, "label_set": "imagefolder", "resolution": list(size), "resize": RESIZE_POLICY}
    return write_splits(args, "imagefolder", splits, functools.partial(make_sample, str(args.root), size), extra)
