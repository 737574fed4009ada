"""Image handling shared by the real-dataset converters: checked reads, crop/resize, options.

Reads PNG/JPEG files with errors that name the file and the expected format, applies an
optional crop then resize at conversion time (RGB bilinear, labels nearest, depth without
ever mixing invalid pixels into valid ones) and keeps the intrinsics ``K`` consistent with
the pixels. Also holds the CLI options every real-dataset ``build`` shares, and the one call
into the shard writer, so that the four converters differ only in what they read.
"""
from __future__ import annotations

import argparse
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from data_shards import schema

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A raw dataset file is missing or not in the release's format; the message names the path."""


# --------------------------------------------------------------------------- reading


def require(path: Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise naming it and what it should have been."""
    if not path.exists():
        raise SourceError(f"{path}: missing; expected {what}")
    return path


def read_rgb(path: Path) -> np.ndarray:
    """An 8-bit colour image file -> uint8 (H, W, 3); anything else is an error naming the file."""
    require(path, "an 8-bit RGB image")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "P", "L"):
                raise SourceError(f"{path}: expected an 8-bit RGB image, got PIL mode {im.mode}")
            arr = np.asarray(im.convert("RGB"))
    except SourceError:
        raise
    except Exception as e:  # truncated / not an image
        raise SourceError(f"{path}: cannot read as an image ({e})") from e
    return np.ascontiguousarray(arr)


def read_png_gray(path: Path, bits: int, what: str) -> np.ndarray:
    """A single-channel PNG of ``bits`` (8 or 16) bits -> uint8 / uint16 (H, W), checked."""
    require(path, what)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if bits == 16 and mode in ("I;16", "I;16B", "I;16L"):
                arr = np.asarray(im, dtype=np.uint16)
            elif bits == 16 and mode == "I":
                arr = np.asarray(im)
                if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
                    raise SourceError(f"{path}: expected {what}, values outside 16 bits")
                arr = arr.astype(np.uint16)
            elif bits == 8 and mode in ("L", "P"):
                arr = np.asarray(im, dtype=np.uint8)  # "P": the palette indices are the labels
            else:
                raise SourceError(f"{path}: expected {what} ({bits}-bit single channel), got PIL mode {mode}")
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{path}: cannot read as a PNG ({e})") from e
    return np.ascontiguousarray(arr)


def tar_safe(key: str) -> str:
    """Make a dataset's own id usable as a sample ``__key__`` (only ``[A-Za-z0-9_-]``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Optional crop (top, left, height, width) then resize (height, width), applied to every image.

    Pixel-centre convention throughout: output pixel ``u`` covers input ``(u + 0.5) / s - 0.5``.
    """

    crop: Optional[tuple[int, int, int, int]] = None
    size: Optional[tuple[int, int]] = None

    @property
    def identity(self) -> bool:
        """True when the images are stored at their original resolution."""
        return self.crop is None and self.size is None

    def describe(self) -> dict[str, Any]:
        """JSON-able record of what was done (for the manifest / sample meta)."""
        return {"crop_tlhw": list(self.crop) if self.crop else None, "resize_hw": list(self.size) if self.size else None}

    def _crop(self, arr: np.ndarray, where: str) -> np.ndarray:
        if self.crop is None:
            return arr
        t, l, h, w = self.crop
        if t < 0 or l < 0 or t + h > arr.shape[0] or l + w > arr.shape[1]:
            raise SourceError(f"{where}: crop (top={t}, left={l}, h={h}, w={w}) does not fit in an image of "
                              f"{arr.shape[0]}x{arr.shape[1]}")
        return arr[t:t + h, l:l + w]

    def rgb(self, img: np.ndarray, where: str = "image") -> np.ndarray:
        """Crop + bilinear (antialiased) resize of a uint8 (H, W, 3) image."""
        img = self._crop(img, where)
        if self.size is None or img.shape[:2] == tuple(self.size):
            return np.ascontiguousarray(img)
        h, w = self.size
        return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))

    def labels(self, seg: np.ndarray, where: str = "labels") -> np.ndarray:
        """Crop + nearest-neighbour resize of a label map (never invents a class)."""
        seg = self._crop(seg, where)
        if self.size is None or seg.shape[:2] == tuple(self.size):
            return np.ascontiguousarray(seg)
        ys, xs = _nearest_index(seg.shape[0], self.size[0]), _nearest_index(seg.shape[1], self.size[1])
        return np.ascontiguousarray(seg[ys[:, None], xs[None, :]])

    def depth(self, depth: np.ndarray, where: str = "depth") -> np.ndarray:
        """Crop + resize of metric depth (0 = invalid) that never blends invalid into valid pixels.

        Downsampling (both axes shrink) scatters every valid input pixel into the output pixel
        holding its centre and keeps the nearest depth (a z-buffer: sparse LiDAR points survive,
        no mixed foreground/background values). Otherwise nearest-neighbour sampling.
        """
        depth = self._crop(np.asarray(depth, dtype=np.float32), where)
        if self.size is None or depth.shape[:2] == tuple(self.size):
            return np.ascontiguousarray(depth)
        H, W = depth.shape
        h, w = self.size
        if h <= H and w <= W:
            valid = np.isfinite(depth) & (depth > 0)
            yy, xx = np.nonzero(valid)
            oy = np.minimum(((yy + 0.5) * h / H).astype(np.int64), h - 1)
            ox = np.minimum(((xx + 0.5) * w / W).astype(np.int64), w - 1)
            out = np.full((h, w), np.inf, dtype=np.float32)
            np.minimum.at(out, (oy, ox), depth[yy, xx])
            out[~np.isfinite(out)] = 0.0
            return out
        ys, xs = _nearest_index(H, h), _nearest_index(W, w)
        return np.ascontiguousarray(depth[ys[:, None], xs[None, :]])

    def intrinsics(self, K: np.ndarray, in_hw: tuple[int, int]) -> np.ndarray:
        """K of the original image -> K of the stored image (crop shifts, resize scales)."""
        K = np.array(K, dtype=np.float64).reshape(3, 3).copy()
        h, w = in_hw
        if self.crop is not None:
            t, l, h, w = self.crop
            K[0, 2] -= l
            K[1, 2] -= t
        if self.size is not None:
            sy, sx = self.size[0] / h, self.size[1] / w
            K[0, 0] *= sx
            K[0, 1] *= sx
            K[1, 1] *= sy
            K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
            K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
        return K


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel centre for nearest-neighbour resampling."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


# --------------------------------------------------------------------------- CLI + writer


def _add_if_missing(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> None:
    """Add an option unless the dispatcher already defines it (``--root``/``--out`` may be its)."""
    if not any(n in parser._option_string_actions for n in names):  # noqa: SLF001
        parser.add_argument(*names, **kwargs)


LAYOUTS = ("compact", "plain")


def add_layout_argument(parser: argparse.ArgumentParser) -> None:
    """``--layout compact|plain`` for converters of video data whose samples share frames."""
    parser.add_argument("--layout", default="compact", choices=LAYOUTS,
                        help="compact (default): each frame stored once per shard, samples sorted by drive and "
                             "frame; plain: every sample stores its own images, in split-file order")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every real-dataset converter has: root, out, workers, crop/resize, shard size."""
    _add_if_missing(parser, "--root", required=True, help="the dataset's root folder, as released")
    _add_if_missing(parser, "--out", required=True, help="output folder; one sub-folder of shards per split")
    _add_if_missing(parser, "--workers", type=int, default=1, help="parallel conversion processes")
    _add_if_missing(parser, "--crop", type=int, nargs=4, metavar=("TOP", "LEFT", "H", "W"), default=None,
                    help="crop every image to this box (before resizing); K is shifted accordingly")
    _add_if_missing(parser, "--resize", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="resize every image to HxW (RGB bilinear, labels nearest, depth z-buffer); K scaled")
    _add_if_missing(parser, "--max-samples-per-shard", type=int, default=256, help="samples per shard tar")
    _add_if_missing(parser, "--no-progress", action="store_true", help="no progress bar")
    _add_if_missing(parser, "--image-format", default="png", choices=["png", "jpeg"],
                    help="RGB frames as lossless PNG (default) or JPEG (4:4:4, lossy: smaller, faster to decode)")
    _add_if_missing(parser, "--jpeg-quality", type=int, default=95, help="JPEG quality 1-100 (--image-format jpeg)")


def image_encoding_from_args(args: argparse.Namespace) -> schema.ImageEncoding:
    """The RGB encoding asked for on the command line (PNG when the options are absent)."""
    try:
        return schema.ImageEncoding(getattr(args, "image_format", "png") or "png", int(getattr(args, "jpeg_quality", 95)))
    except schema.SchemaError as e:
        raise SourceError(f"--image-format / --jpeg-quality: {e}") from None


def geometry_from_args(args: argparse.Namespace) -> Geometry:
    """The Geometry requested on the command line (identity when neither option is given)."""
    crop = getattr(args, "crop", None)
    size = getattr(args, "resize", None)
    if crop is not None and (crop[0] < 0 or crop[1] < 0 or crop[2] <= 0 or crop[3] <= 0):
        raise SourceError(f"--crop {' '.join(map(str, crop))}: need TOP, LEFT >= 0 and H, W > 0")
    if size is not None and min(size) <= 0:
        raise SourceError(f"--resize {' '.join(map(str, size))}: H and W must be > 0")
    return Geometry(tuple(crop) if crop else None, tuple(size) if size else None)


def _convert_chunk(make_sample: Callable[[Any], dict[str, Any]], items: Sequence[Any]) -> Iterator[dict[str, Any]]:
    """Samples of one chunk of work items (runs in a writer process)."""
    for item in items:
        yield make_sample(item)


def write_splits(args: argparse.Namespace, dataset: str, splits: dict[str, Sequence[Any]],
                 make_sample: Callable[[Any], dict[str, Any]], extra: Optional[dict[str, Any]] = None,
                 compact: bool = False) -> dict[str, Any]:
    """Convert each split's work items with ``make_sample`` (picklable) through the shard writer.

    Items are cut, in their deterministic order, into chunks of ``--max-samples-per-shard``;
    each chunk becomes one shard written by ``writer.write_split_parallel`` (worker
    processes, progress bar, finished shards kept and skipped on a re-run). The manifest's
    ``source`` records the dataset, its absolute root and ``extra`` (conversion settings).
    ``compact``: frames shared by samples are stored once per shard (``data_shards.compact``;
    samples must name them in ``__frames__``). Returns the manifest of each split.
    """
    from data_shards import writer

    per_shard = int(getattr(args, "max_samples_per_shard", 256))
    if per_shard < 1:
        raise SourceError(f"--max-samples-per-shard {per_shard}: must be >= 1")
    source = {"dataset": dataset, "root": str(Path(args.root).resolve()), **(extra or {})}
    results: dict[str, Any] = {}
    for split, items in splits.items():
        items = list(items)
        if not items:
            raise SourceError(f"{args.root}: no samples found for split {split!r}")
        log.info("%s: converting %d samples of split %s", dataset, len(items), split)
        chunks = [functools.partial(_convert_chunk, make_sample, items[i:i + per_shard])
                  for i in range(0, len(items), per_shard)]
        results[split] = writer.write_split_parallel(
            chunks, str(args.out), split, source=source, workers=int(getattr(args, "workers", 1) or 1),
            progress=not getattr(args, "no_progress", False), compact=compact, images=image_encoding_from_args(args))
    return results
