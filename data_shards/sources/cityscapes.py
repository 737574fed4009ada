"""Cityscapes -> schema samples (video triplets, stereo, depth from disparity, fine labels),
and predictions written back out as official label-id PNGs for cityscapesScripts.

Reads the release's own layout (``<s>`` = train | val | test, ``<stem>`` = ``<city>_<seq>_<frame>``)::

    leftImg8bit/<s>/<city>/<stem>_leftImg8bit.png        the annotated frame (frame 19 of a snippet)
    rightImg8bit/<s>/<city>/<stem>_rightImg8bit.png      right view
    disparity/<s>/<city>/<stem>_disparity.png            16-bit: d = (p - 1) / 256 for p > 0, else invalid
    camera/<s>/<city>/<stem>_camera.json                 extrinsic.baseline (m), intrinsic fx fy u0 v0
    gtFine/<s>/<city>/<stem>_gtFine_labelIds.png         label ids -> train ids (official table)
    leftImg8bit_sequence/<s>/<city>/<city>_<seq>_<frame>_leftImg8bit.png   the 30-frame snippets
    rightImg8bit_sequence/<s>/<city>/<city>_<seq>_<frame>_rightImg8bit.png  (sequence mode, stereo)

Depth = fx * baseline / d in metres, 0 where the disparity is invalid or 0. ``annotated``
mode makes one sample per annotated frame with the parts asked for (``--with``);
``sequence`` mode makes one per snippet frame that has both neighbours (for self-supervised
pre-training; no labels or disparity there).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from data_shards.atomic import atomic_write
from data_shards.sources.labels import labelid_to_trainid, trainid_to_labelid
#: ``build cityscapes --help``: what to download and how --root must look
DOWNLOAD = """what to download (https://www.cityscapes-dataset.com/downloads/, an account is needed):
  leftImg8bit_trainvaltest.zip            the annotated frames (always)
  gtFine_trainvaltest.zip                 fine labels (part seg)
  rightImg8bit_trainvaltest.zip           right view (part right)
  disparity_trainvaltest.zip              disparity -> depth (part depth, with camera_*)
  camera_trainvaltest.zip                 intrinsics and baseline (depth, K)
  leftImg8bit_sequence_trainvaltest.zip   the 30-frame snippets (part video; --mode sequence)
  rightImg8bit_sequence_trainvaltest.zip  right snippets (--mode sequence, stereo)
unzip them into one folder and pass it as --root; it then holds:
  leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
  rightImg8bit/ disparity/ camera/ leftImg8bit_sequence/ rightImg8bit_sequence/  (same tree, where downloaded)
--with auto converts the parts whose folders exist. Details: docs/real-datasets.md#cityscapes"""


from data_shards.sources.resize import (
    Geometry, SourceError, add_common_arguments, geometry_from_args, read_png_gray, read_rgb, require,
    write_splits,
)

PARTS = ("video", "right", "depth", "seg")
NAME_RE = re.compile(r"^(?P<city>[a-z_-]+?)_(?P<seq>\d{6})_(?P<frame>\d{6})(?:_.*)?$")
PART_FOLDER = {"video": "leftImg8bit_sequence", "right": "rightImg8bit", "depth": "disparity", "seg": "gtFine"}


@dataclass(frozen=True, order=True)
class CsFrame:
    """One target frame: split, city, sequence number, frame number."""

    split: str
    city: str
    seq: int
    frame: int

    @property
    def stem(self) -> str:
        """``<city>_<seq:06d>_<frame:06d>``, the official file-name prefix."""
        return f"{self.city}_{self.seq:06d}_{self.frame:06d}"


@dataclass(frozen=True)
class CsOptions:
    """Root, mode (annotated | sequence), which parts each sample holds, geometry."""

    root: str
    mode: str = "annotated"
    parts: tuple[str, ...] = PARTS
    geometry: Geometry = Geometry()


def parse_name(name: str) -> tuple[str, int, int]:
    """``aachen_000000_000019_leftImg8bit.png`` (or a path / bare stem) -> (city, seq, frame)."""
    m = NAME_RE.match(Path(name).name.split(".")[0])
    if not m:
        raise SourceError(f"{name}: not a Cityscapes file name; expected <city>_<seq:6 digits>_<frame:6 digits>_*.png")
    return m["city"], int(m["seq"]), int(m["frame"])


def _path(root: Path, folder: str, f: CsFrame, suffix: str, frame: Optional[int] = None) -> Path:
    stem = f.stem if frame is None else f"{f.city}_{f.seq:06d}_{frame:06d}"
    return root / folder / f.split / f.city / f"{stem}_{suffix}"


def list_frames(root: Path, split: str, mode: str = "annotated") -> list[CsFrame]:
    """Annotated frames (``leftImg8bit``) or snippet frames with both neighbours (``leftImg8bit_sequence``)."""
    folder = "leftImg8bit" if mode == "annotated" else "leftImg8bit_sequence"
    base = root / folder / split
    if not base.is_dir():
        raise SourceError(f"{base}: missing; expected Cityscapes' {folder}/{split}/<city>/*_leftImg8bit.png")
    frames = []
    for p in sorted(base.glob("*/*_leftImg8bit.png")):
        city, seq, frame = parse_name(p.name)
        if city != p.parent.name:
            raise SourceError(f"{p}: file name's city {city!r} differs from its folder {p.parent.name!r}")
        frames.append(CsFrame(split, city, seq, frame))
    if not frames:
        raise SourceError(f"{base}: no <city>/*_leftImg8bit.png files")
    if mode == "sequence":
        have = set(frames)
        frames = [f for f in frames if CsFrame(f.split, f.city, f.seq, f.frame - 1) in have
                  and CsFrame(f.split, f.city, f.seq, f.frame + 1) in have]
    return frames


def read_camera(path: Path) -> dict[str, float]:
    """``*_camera.json`` -> fx, fy, u0, v0, baseline (checked, named on error)."""
    require(path, "a Cityscapes camera JSON with extrinsic.baseline and intrinsic fx/fy/u0/v0")
    try:
        cam = json.loads(path.read_text())
        out = {k: float(cam["intrinsic"][k]) for k in ("fx", "fy", "u0", "v0")}
        out["baseline"] = float(cam["extrinsic"]["baseline"])
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{path}: expected extrinsic.baseline and intrinsic.fx/fy/u0/v0 ({type(e).__name__}: {e})") from e
    if out["fx"] <= 0 or out["baseline"] <= 0:
        raise SourceError(f"{path}: fx {out['fx']} and baseline {out['baseline']} must be positive")
    return out


@functools.lru_cache(maxsize=4096)
def _sequence_camera(cam_dir: str, city: str, seq: int) -> Optional[str]:
    hits = sorted(Path(cam_dir).glob(f"{city}_{seq:06d}_*_camera.json"))
    return str(hits[0]) if hits else None


def camera_path(root: Path, f: CsFrame, mode: str) -> Path:
    """The camera JSON of a frame; sequence frames use their snippet's annotated frame's file."""
    exact = _path(root, "camera", f, "camera.json")
    if mode == "annotated" or exact.exists():
        return exact
    found = _sequence_camera(str(exact.parent), f.city, f.seq)
    if found is None:
        raise SourceError(f"{exact.parent}: no {f.city}_{f.seq:06d}_*_camera.json for sequence frame {f.stem}")
    return Path(found)


def disparity_to_depth(p: np.ndarray, fx: float, baseline: float) -> np.ndarray:
    """Cityscapes 16-bit disparity PNG values -> depth in metres (0 where invalid or d == 0)."""
    d = (p.astype(np.float64) - 1.0) / 256.0
    valid = (p > 0) & (d > 0)
    depth = np.zeros(p.shape, dtype=np.float64)
    depth[valid] = fx * baseline / d[valid]
    return depth.astype(np.float32)


def make_sample(opts: CsOptions, f: CsFrame) -> dict[str, Any]:
    """Read one frame's files and return a schema sample."""
    root, geo = Path(opts.root), opts.geometry
    seq_mode = opts.mode == "sequence"
    path = _path(root, "leftImg8bit_sequence" if seq_mode else "leftImg8bit", f, "leftImg8bit.png")
    rgb = read_rgb(path)
    hw = rgb.shape[:2]

    def fit(arr: np.ndarray, p: Path) -> np.ndarray:
        if arr.shape[:2] != hw:
            raise SourceError(f"{p}: size {arr.shape[1]}x{arr.shape[0]} differs from {path} ({hw[1]}x{hw[0]})")
        return arr

    sample: dict[str, Any] = {"__key__": f.stem, "rgb": geo.rgb(rgb, str(path))}
    meta: dict[str, Any] = {"source": {"dataset": "cityscapes", "split": f.split, "city": f.city, "sequence": f.seq,
                                       "frame": f.frame, "path": str(path.relative_to(root))}}
    needs_camera = seq_mode or any(p in opts.parts for p in ("video", "right", "depth"))
    cam = read_camera(camera_path(root, f, opts.mode)) if needs_camera else None
    if cam is not None:
        K = np.array([[cam["fx"], 0, cam["u0"]], [0, cam["fy"], cam["v0"]], [0, 0, 1]])
        meta["K"] = geo.intrinsics(K, hw).tolist()
    if "video" in opts.parts:
        for name, d in (("rgb_prev", -1), ("rgb_next", 1)):
            p = _path(root, "leftImg8bit_sequence", f, "leftImg8bit.png", f.frame + d)
            sample[name] = geo.rgb(fit(read_rgb(p), p), str(p))
    if "right" in opts.parts:
        p = _path(root, "rightImg8bit_sequence" if seq_mode else "rightImg8bit", f, "rightImg8bit.png")
        sample["rgb_right"] = geo.rgb(fit(read_rgb(p), p), str(p))
        meta["baseline_m"] = cam["baseline"]
    if "depth" in opts.parts:
        p = _path(root, "disparity", f, "disparity.png")
        disp = fit(read_png_gray(p, 16, "a 16-bit Cityscapes disparity PNG"), p)
        sample["depth"] = geo.depth(disparity_to_depth(disp, cam["fx"], cam["baseline"]), str(p))
    if "seg" in opts.parts:
        p = _path(root, "gtFine", f, "gtFine_labelIds.png")
        seg = geo.labels(labelid_to_trainid(fit(read_png_gray(p, 8, "an 8-bit gtFine labelIds PNG"), p)), str(p))
        sample["seg"] = seg
        meta["classes"] = sorted(set(np.unique(seg).tolist()) - {255})
    if not geo.identity:
        meta["source"]["geometry"] = geo.describe()
    sample["meta"] = meta
    return sample


def write_cityscapes_predictions(pred_trainids: np.ndarray, input_name: str, out_dir: str | Path,
                                 size: Optional[tuple[int, int]] = None) -> Path:
    """Write a train-id prediction as the label-id PNG cityscapesScripts evaluates.

    ``input_name`` is the input's file name, path or sample key (``<city>_<seq>_<frame>...``);
    the file goes to ``out_dir/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` (the evaluator
    finds predictions by that prefix). ``size`` (H, W), e.g. (1024, 2048), resizes with
    nearest neighbour first. Written atomically. Returns the path.
    """
    city, seq, frame = parse_name(input_name)
    pred = np.asarray(pred_trainids)
    if pred.ndim != 2:
        raise ValueError(f"{input_name}: prediction must be (H, W) train ids, got shape {pred.shape}")
    label_ids = trainid_to_labelid(pred)
    if size is not None and label_ids.shape != tuple(size):
        label_ids = Geometry(size=tuple(size)).labels(label_ids)
    target = Path(out_dir) / city / f"{city}_{seq:06d}_{frame:06d}_leftImg8bit.png"
    return atomic_write(target, lambda f: Image.fromarray(label_ids.astype(np.uint8)).save(f, format="PNG"), mkdir=True)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m data_shards build cityscapes`` options."""
    add_common_arguments(parser)
    parser.add_argument("--splits", default="train,val", help="comma-separated Cityscapes splits to convert")
    parser.add_argument("--mode", default="annotated", choices=["annotated", "sequence"],
                        help="annotated: the labelled frames; sequence: every snippet frame with both neighbours")
    parser.add_argument("--with", dest="parts", default="auto",
                        help="comma-separated parts per sample: video,right,depth,seg; 'auto' = those whose folders "
                             "exist (sequence mode: video and, if present, right)")


def resolve_parts(root: Path, mode: str, spec: str) -> tuple[str, ...]:
    """The sample parts: ``spec`` checked, or (auto) the ones whose release folders exist."""
    if mode == "sequence":
        allowed = ("video", "right")
        folders = {"video": "leftImg8bit_sequence", "right": "rightImg8bit_sequence"}
    else:
        allowed, folders = PARTS, PART_FOLDER
    if spec == "auto":
        return tuple(p for p in allowed if (root / folders[p]).is_dir())
    parts = tuple(p.strip() for p in spec.split(",") if p.strip())
    bad = [p for p in parts if p not in allowed]
    if bad:
        raise SourceError(f"--with {spec}: unknown or unsupported in {mode} mode: {bad}; choose from {list(allowed)}")
    for p in parts:
        require(root / folders[p], f"the Cityscapes {folders[p]}/ folder (asked for by --with {p})")
    return parts


def plan(args: argparse.Namespace) -> tuple[CsOptions, dict[str, list[CsFrame]]]:
    """Options and the frames of each split."""
    root = Path(args.root)
    opts = CsOptions(str(root), args.mode, resolve_parts(root, args.mode, args.parts), geometry_from_args(args))
    splits = {s: list_frames(root, s, args.mode) for s in args.splits.split(",") if s}
    return opts, splits


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Convert Cityscapes into shards under ``args.out/<split>/``."""
    opts, splits = plan(args)
    extra = {"geometry": opts.geometry.describe(), "mode": opts.mode, "parts": list(opts.parts),
             "label_set": "cityscapes19"}
    return write_splits(args, "cityscapes", splits, functools.partial(make_sample, opts), extra)
