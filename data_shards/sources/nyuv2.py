"""NYU-Depth V2 labeled (1449 RGB-D frames) -> schema samples: rgb, metric depth, 40/13-class labels.

Reads ``nyu_depth_v2_labeled.mat``, a MATLAB v7.3 file (= HDF5, read with h5py). MATLAB
stores arrays column-major, so h5py sees every axis reversed: ``images`` (H, W, 3, N) in
MATLAB is (N, 3, W, H) here, ``depths`` / ``rawDepths`` / ``labels`` (H, W, N) are (N, W, H).
``labels`` hold the 894 raw classes (0 = unlabeled); they become NYU40 ids through the
user's ``classMapping40.mat`` and optionally NYU13 ids, stored as train ids ``id - 1``
with 255 for unlabeled. The official split is ``splits.mat`` (``trainNdxs`` 795 /
``testNdxs`` 654, 1-based).

``--mode raw`` reads the raw video release instead (scene folders holding ``INDEX.txt`` and
``r-<time>-<n>.ppm`` colour frames), for self-supervised pre-training: triplets
t-k, t, t+k of the colour camera, undistorted with the toolbox's calibration; no depth or
labels (registering the raw ``d-*.pgm`` depth into the colour camera is not done).
"""
from __future__ import annotations

import argparse
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from data_shards.sources.labels import load_nyu40_mapping, nyu_raw_to_trainids
#: ``build nyuv2 --help``: what to download and how --root must look
DOWNLOAD = """what to download (--mode labeled, the default), into one folder passed as --root:
  nyu_depth_v2_labeled.mat   the 1449 labelled RGB-D frames
                             (http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat)
  splits.mat                 the official 795 / 654 train / test indices
                             (http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat)
  classMapping40.mat         894 -> 40 classes, from the NYUv2 meta-data of Gupta et al.
                             (github.com/ankurhanda/nyuv2-meta-data); required for labels: without it the
                             build stops, unless --no-labels (rgb + depth only)
--mode raw: the raw video release unzipped under --root (scene folders with INDEX.txt and r-*.ppm frames),
plus nyu_depth_v2_labeled.mat and splits.mat for --exclude-test-scenes.
Details: docs/real-datasets.md#nyu-depth-v2-labeled"""


from data_shards.sources.resize import Geometry, SourceError, add_common_arguments, geometry_from_args, read_rgb, \
    require, write_splits

#: Colour-camera intrinsics of the NYU Kinect (toolbox camera_params.m), for 640x480 frames.
NYU_K = ((5.1885790117450188e+02, 0.0, 3.2558244941119034e+02),
         (0.0, 5.1946961112127485e+02, 2.5373616633400465e+02),
         (0.0, 0.0, 1.0))
DATASETS = ("images", "depths", "rawDepths", "labels")
#: Colour-camera distortion (k1, k2, p1, p2, k3) of the raw frames (toolbox camera_params.m).
NYU_RGB_DISTORTION = (2.0796615318809061e-01, -5.8613825163911781e-01, 7.2231363135888329e-04,
                      1.0479627195765181e-03, 4.9856986684705107e-01)
RAW_NAME_RE = re.compile(r"^(?P<kind>[adr])-(?P<t>\d+(?:\.\d+)?)-(?P<n>\d+)\.(?:ppm|pgm|dump)$")


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


# --------------------------------------------------------------------------- raw video


@dataclass(frozen=True, order=True)
class RawFrame:
    """A raw-video target: scene folder (relative to the root), its colour files t-k, t, t+k."""

    scene: str
    index: int
    files: tuple[str, str, str]


@dataclass(frozen=True)
class RawOptions:
    """Raw-video root, undistortion on/off and the geometry."""

    root: str
    undistort: bool = True
    geometry: Geometry = Geometry()


@functools.lru_cache(maxsize=8)
def undistort_map(hw: tuple[int, int], K: tuple, dist: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates (x, y) in the distorted image of every pixel of the undistorted one.

    Brown-Conrady model as OpenCV / the NYU toolbox use it, same K before and after.
    """
    h, w = hw
    K = np.asarray(K, dtype=np.float64)
    k1, k2, p1, p2, k3 = dist
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return xd * K[0, 0] + K[0, 2], yd * K[1, 1] + K[1, 2]


def undistort(img: np.ndarray, K=NYU_K, dist=NYU_RGB_DISTORTION) -> np.ndarray:
    """Undistort a uint8 (H, W, 3) image by bilinear sampling; pixels mapping outside are black."""
    h, w = img.shape[:2]
    sx, sy = undistort_map((h, w), tuple(map(tuple, np.asarray(K, dtype=np.float64))), tuple(dist))
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    inside = (sx >= 0) & (sy >= 0) & (sx <= w - 1) & (sy <= h - 1)
    x0c, y0c = np.clip(x0, 0, w - 1), np.clip(y0, 0, h - 1)
    x1c, y1c = np.clip(x0 + 1, 0, w - 1), np.clip(y0 + 1, 0, h - 1)
    src = img.astype(np.float64)
    out = ((1 - fy) * ((1 - fx) * src[y0c, x0c] + fx * src[y0c, x1c])
           + fy * ((1 - fx) * src[y1c, x0c] + fx * src[y1c, x1c]))
    out[~inside] = 0
    return np.round(out).clip(0, 255).astype(np.uint8)


def raw_scene_frames(scene_dir: Path) -> list[tuple[float, str]]:
    """The colour frames of one raw scene (from ``INDEX.txt``), as (timestamp, file name) sorted by time."""
    index = require(scene_dir / "INDEX.txt", "the raw scene's INDEX.txt listing its r-/d-/a- files")
    frames = []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        m = RAW_NAME_RE.match(name)
        if not m:
            raise SourceError(f"{index}:{n}: expected '<r|d|a>-<timestamp>-<number>.<ppm|pgm|dump>', got {name!r}")
        if m["kind"] == "r":
            require(scene_dir / name, f"the colour frame listed in {index} line {n}")
            frames.append((float(m["t"]), name))
    return sorted(frames)


def plan_raw(root: Path, step: int, stride: int, scenes: Optional[set[str]] = None,
             exclude: frozenset[str] = frozenset()) -> list[RawFrame]:
    """Triplet targets of every scene folder (one with INDEX.txt) under ``root``, sorted by scene then time."""
    if step < 1 or stride < 1:
        raise SourceError(f"--frame-step {step} and --target-stride {stride} must be >= 1")
    if not root.is_dir():
        raise SourceError(f"{root}: missing; expected the NYU raw root holding scene folders with INDEX.txt")
    scene_dirs = sorted(p.parent for p in root.rglob("INDEX.txt"))
    if not scene_dirs:
        raise SourceError(f"{root}: no scene folder with an INDEX.txt; expected the raw NYU-Depth V2 release")
    known = {d.name for d in scene_dirs}
    if scenes is not None and scenes - known:
        raise SourceError(f"--scenes lists scenes not under {root}: {sorted(scenes - known)[:5]}")
    out = []
    for d in scene_dirs:
        if (scenes is not None and d.name not in scenes) or d.name in exclude:
            continue
        files = [name for _, name in raw_scene_frames(d)]
        rel = str(d.relative_to(root))
        out += [RawFrame(rel, i, (files[i - step], files[i], files[i + step]))
                for i in range(step, len(files) - step, stride)]
    return out


def make_raw_sample(opts: RawOptions, f: RawFrame) -> dict[str, Any]:
    """A raw-video triplet -> schema sample (rgb, rgb_prev, rgb_next, K, provenance)."""
    scene_dir = Path(opts.root) / f.scene
    imgs = []
    for name in f.files:
        img = read_rgb(scene_dir / name)
        if imgs and img.shape != imgs[0].shape:
            raise SourceError(f"{scene_dir / name}: size {img.shape[1]}x{img.shape[0]} differs from {f.files[0]}")
        imgs.append(undistort(img) if opts.undistort else img)
    hw = imgs[0].shape[:2]
    if opts.undistort and hw != (480, 640):
        raise SourceError(f"{scene_dir / f.files[1]}: {hw[1]}x{hw[0]}, but the calibration is for 640x480 frames")
    geo = opts.geometry
    scene = Path(f.scene).name
    source: dict[str, Any] = {"dataset": "nyuv2_raw", "scene": scene, "path": f"{f.scene}/{f.files[1]}",
                              "frame": f.index, "undistorted": opts.undistort}
    if not geo.identity:
        source["geometry"] = geo.describe()
    return {"__key__": f"{scene}_f{f.index:06d}", "rgb": geo.rgb(imgs[1]), "rgb_prev": geo.rgb(imgs[0]),
            "rgb_next": geo.rgb(imgs[2]), "meta": {"K": geo.intrinsics(np.array(NYU_K), hw).tolist(), "source": source}}


def official_test_scenes(mat: str, splits_file: Path) -> frozenset[str]:
    """Scene names of the official test frames (read from the labeled .mat and splits.mat)."""
    f = open_mat(mat)
    test = read_split_indices(splits_file, num_frames(mat))["test"]
    names = {scene_name(f, i) for i in test}
    if None in names:
        raise SourceError(f"{mat}: no 'scenes' cell array; cannot tell which raw scenes hold test frames")
    return frozenset(names)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m data_shards build nyuv2`` options."""
    add_common_arguments(parser)
    parser.add_argument("--mat", default=None, help="the labeled .mat (default: <root>/nyu_depth_v2_labeled.mat)")
    parser.add_argument("--splits-file", default=None, help="official split (default: <root>/splits.mat)")
    parser.add_argument("--mapping40", default=None,
                        help="894->40 class mapping: classMapping40.mat ('mapClass'), .npy or text "
                             "(default: <root>/classMapping40.mat); required unless --no-labels")
    parser.add_argument("--classes", type=int, default=40, choices=[40, 13], help="label set written as seg")
    parser.add_argument("--depth", default="depths", choices=["depths", "rawDepths"],
                        help="depths: the in-painted dense maps; rawDepths: the sensor's (0 = missing)")
    parser.add_argument("--no-labels", action="store_true", help="write rgb + depth only")
    parser.add_argument("--mode", default="labeled", choices=["labeled", "raw"],
                        help="labeled: the 1449-frame .mat; raw: video triplets from the raw release under --root")
    parser.add_argument("--frame-step", type=int, default=10, help="raw: neighbours are frames t-k and t+k")
    parser.add_argument("--target-stride", type=int, default=10, help="raw: a target every this many frames")
    parser.add_argument("--scenes", default=None, help="raw: text file of scene names to use (default: all)")
    parser.add_argument("--exclude-test-scenes", action="store_true",
                        help="raw: leave out the scenes of the official test frames (needs --mat and --splits-file)")
    parser.add_argument("--no-undistort", action="store_true", help="raw: keep the colour frames as recorded")
    parser.add_argument("--split-name", default="train", help="raw: name of the split written")


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


def build_raw(args: argparse.Namespace) -> dict[str, Any]:
    """Convert raw NYU video into one split of triplet shards."""
    scenes = None
    if args.scenes:
        scenes = {ln.strip() for ln in require(Path(args.scenes), "a text file of scene names").read_text().splitlines()
                  if ln.strip()}
    exclude: frozenset[str] = frozenset()
    if args.exclude_test_scenes:
        if not args.mat or not args.splits_file:
            raise SourceError("--exclude-test-scenes needs --mat (the labeled .mat) and --splits-file (splits.mat)")
        exclude = official_test_scenes(args.mat, Path(args.splits_file))
    frames = plan_raw(Path(args.root), args.frame_step, args.target_stride, scenes, exclude)
    opts = RawOptions(str(args.root), not args.no_undistort, geometry_from_args(args))
    extra = {"mode": "raw", "geometry": opts.geometry.describe(), "frame_step": args.frame_step,
             "target_stride": args.target_stride, "undistort": opts.undistort, "excluded_scenes": sorted(exclude)}
    return write_splits(args, "nyuv2", {args.split_name: frames}, functools.partial(make_raw_sample, opts), extra)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Convert NYU-Depth V2 (labeled .mat, or raw video with ``--mode raw``) into shards under ``args.out``."""
    if args.mode == "raw":
        return build_raw(args)
    opts, splits = plan(args)
    extra = {"geometry": opts.geometry.describe(), "depth": opts.depth,
             "label_set": None if opts.map40 is None else f"nyu{opts.num_classes}"}
    return write_splits(args, "nyuv2", splits, functools.partial(make_sample, opts), extra)
