"""NYU-Depth V2 labeled (1449 RGB-D frames) -> schema samples: rgb, metric depth, 40/13-class labels.

Reads ``nyu_depth_v2_labeled.mat``, a MATLAB v7.3 file (= HDF5, read with h5py). MATLAB
stores arrays column-major, so h5py sees every axis reversed: ``images`` (H, W, 3, N) in
MATLAB is (N, 3, W, H) here, ``depths`` / ``rawDepths`` / ``labels`` (H, W, N) are (N, W, H).
``labels`` hold the 894 raw classes (0 = unlabeled); they become NYU40 ids through the
user's ``classMapping40.mat`` and optionally NYU13 ids, stored as train ids ``id - 1``
with 255 for unlabeled. The official split is ``splits.mat`` (``trainNdxs`` 795 /
``testNdxs`` 654, 1-based). Raw NYU video (``*.ppm``/``*.pgm`` + ``INDEX.txt``) is not read.
"""
from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from data_shards.sources.labels import load_nyu40_mapping, nyu_raw_to_trainids
from data_shards.sources.resize import Geometry, SourceError, add_common_arguments, geometry_from_args, require, \
    write_splits

#: Colour-camera intrinsics of the NYU Kinect (toolbox camera_params.m), for 640x480 frames.
NYU_K = ((5.1885790117450188e+02, 0.0, 3.2558244941119034e+02),
         (0.0, 5.1946961112127485e+02, 2.5373616633400465e+02),
         (0.0, 0.0, 1.0))
DATASETS = ("images", "depths", "rawDepths", "labels")


@dataclass(frozen=True)
class NyuOptions:
    """The .mat file, which depth and label set to store, the 894->40 table and the geometry."""

    mat: str
    depth: str = "depths"
    num_classes: int = 40
    map40: Optional[tuple[int, ...]] = None
    geometry: Geometry = Geometry()


_OPEN: dict[str, Any] = {}


def open_mat(path: str):
    """The labeled .mat as an open h5py file (one handle per process, never shared over fork), checked."""
    key = f"{os.getpid()}:{path}"
    if key not in _OPEN:
        import h5py

        require(Path(path), "nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5)")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise SourceError(f"{path}: not an HDF5 / MATLAB v7.3 file ({e}); expected nyu_depth_v2_labeled.mat") from e
        missing = [d for d in ("images", "depths", "labels") if d not in f]
        if missing:
            raise SourceError(f"{path}: datasets {missing} missing; expected images, depths, labels "
                              f"(found {sorted(f.keys())})")
        img = f["images"]
        if img.ndim != 4 or img.shape[1] != 3:
            raise SourceError(f"{path}: 'images' has shape {img.shape}, expected (N, 3, W, H) as h5py reads MATLAB's "
                              "(H, W, 3, N)")
        n, w, h = img.shape[0], img.shape[2], img.shape[3]
        for d in DATASETS[1:]:
            if d in f and f[d].shape != (n, w, h):
                raise SourceError(f"{path}: '{d}' has shape {f[d].shape}, expected (N, W, H) = {(n, w, h)}")
        _OPEN[key] = f
    return _OPEN[key]


def num_frames(path: str) -> int:
    """Number of labelled frames in the .mat."""
    return int(open_mat(path)["images"].shape[0])


def scene_name(f, index0: int) -> Optional[str]:
    """The scene of a frame (``scenes`` cell array of char arrays), or None if the file has none."""
    if "scenes" not in f:
        return None
    try:
        ref = f["scenes"][0, index0]
        return "".join(chr(c) for c in np.asarray(f[ref]).ravel())
    except Exception:  # an unexpected cell layout only costs the provenance detail
        return None


def read_split_indices(path: Path, n: int) -> dict[str, list[int]]:
    """``splits.mat`` -> {"train": [...], "test": [...]} as 0-based indices, validated against ``n`` frames."""
    require(path, "splits.mat with 1-based trainNdxs / testNdxs")
    try:
        import scipy.io

        mat = scipy.io.loadmat(str(path))
    except NotImplementedError:  # saved as v7.3: HDF5
        import h5py

        with h5py.File(path, "r") as f:
            mat = {k: np.asarray(f[k]) for k in f.keys()}
    except (ValueError, OSError) as e:
        raise SourceError(f"{path}: cannot read as a .mat file ({e})") from e
    out = {}
    for key, split in (("trainNdxs", "train"), ("testNdxs", "test")):
        if key not in mat:
            raise SourceError(f"{path}: variable {key!r} missing; expected trainNdxs and testNdxs")
        idx = np.asarray(mat[key], dtype=np.float64).ravel()
        if idx.size == 0 or np.any(idx != np.round(idx)) or idx.min() < 1 or idx.max() > n:
            raise SourceError(f"{path}: {key} must hold 1-based frame numbers in 1..{n}")
        if len(set(idx.tolist())) != idx.size:
            raise SourceError(f"{path}: {key} lists a frame twice")
        out[split] = sorted(int(i) - 1 for i in idx)
    if set(out["train"]) & set(out["test"]):
        raise SourceError(f"{path}: trainNdxs and testNdxs overlap")
    return out


def make_sample(opts: NyuOptions, index0: int) -> dict[str, Any]:
    """Frame ``index0`` (0-based) of the .mat -> schema sample."""
    f = open_mat(opts.mat)
    geo = opts.geometry
    rgb = np.ascontiguousarray(np.asarray(f["images"][index0]).transpose(2, 1, 0))
    if rgb.dtype != np.uint8:
        raise SourceError(f"{opts.mat}: 'images' has dtype {rgb.dtype}, expected uint8")
    if opts.depth not in f:
        raise SourceError(f"{opts.mat}: dataset {opts.depth!r} missing")
    depth = np.asarray(f[opts.depth][index0], dtype=np.float32).T
    hw = rgb.shape[:2]
    sample: dict[str, Any] = {"__key__": f"nyu_{index0 + 1:04d}", "rgb": geo.rgb(rgb, opts.mat),
                              "depth": geo.depth(depth, opts.mat)}
    source: dict[str, Any] = {"dataset": "nyuv2", "path": Path(opts.mat).name, "index": index0 + 1}
    scene = scene_name(f, index0)
    if scene:
        source["scene"] = scene
    meta: dict[str, Any] = {"K": geo.intrinsics(np.array(NYU_K), hw).tolist(), "source": source}
    if opts.map40 is not None:
        labels = np.asarray(f["labels"][index0]).T
        seg = geo.labels(nyu_raw_to_trainids(labels, np.asarray(opts.map40), opts.num_classes), opts.mat)
        sample["seg"] = seg
        meta["classes"] = sorted(set(np.unique(seg).tolist()) - {255})
    if not geo.identity:
        source["geometry"] = geo.describe()
    sample["meta"] = meta
    return sample


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m data_shards build nyuv2`` options."""
    add_common_arguments(parser)
    parser.add_argument("--mat", default=None, help="the labeled .mat (default: <root>/nyu_depth_v2_labeled.mat)")
    parser.add_argument("--splits-file", default=None, help="official split (default: <root>/splits.mat)")
    parser.add_argument("--mapping40", default=None,
                        help="894->40 class mapping: classMapping40.mat ('mapClass'), .npy or text "
                             "(default: <root>/classMapping40.mat if present; without one no labels are written)")
    parser.add_argument("--classes", type=int, default=40, choices=[40, 13], help="label set written as seg")
    parser.add_argument("--depth", default="depths", choices=["depths", "rawDepths"],
                        help="depths: the in-painted dense maps; rawDepths: the sensor's (0 = missing)")
    parser.add_argument("--no-labels", action="store_true", help="write rgb + depth only")


def plan(args: argparse.Namespace) -> tuple[NyuOptions, dict[str, list[int]]]:
    """Options and the 0-based frame indices of the train / test splits."""
    root = Path(args.root)
    mat = str(Path(args.mat) if args.mat else root / "nyu_depth_v2_labeled.mat")
    map40 = None
    if not args.no_labels:
        mapping = Path(args.mapping40) if args.mapping40 else root / "classMapping40.mat"
        if not mapping.exists():
            raise SourceError(f"{mapping}: missing; expected the 894->40 class mapping (classMapping40.mat from "
                              "the NYUv2 meta-data of Gupta et al.); pass --mapping40 or --no-labels")
        map40 = tuple(int(v) for v in load_nyu40_mapping(mapping))
    opts = NyuOptions(mat, args.depth, args.classes, map40, geometry_from_args(args))
    splits = read_split_indices(Path(args.splits_file) if args.splits_file else root / "splits.mat", num_frames(mat))
    return opts, splits


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Convert NYU-Depth V2 labeled into train / test shards under ``args.out``."""
    opts, splits = plan(args)
    extra = {"geometry": opts.geometry.describe(), "depth": opts.depth,
             "label_set": None if opts.map40 is None else f"nyu{opts.num_classes}"}
    return write_splits(args, "nyuv2", splits, functools.partial(make_sample, opts), extra)
