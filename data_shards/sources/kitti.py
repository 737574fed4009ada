"""KITTI raw (synced + rectified) -> schema samples: video triplets, stereo pair, optional LiDAR depth.

Reads the release's own layout::

    <root>/<date>/calib_cam_to_cam.txt          P_rect_02 / P_rect_03 -> K and the stereo baseline
    <root>/<date>/calib_velo_to_cam.txt         R, T (only for velodyne depth)
    <root>/<date>/<date>_drive_XXXX_sync/image_02/data/0000000123.png   left colour camera
    <root>/<date>/<date>_drive_XXXX_sync/image_03/data/0000000123.png   right colour camera
    <root>/<date>/<date>_drive_XXXX_sync/velodyne_points/data/0000000123.bin
    <root>/<date>/<date>_drive_XXXX_sync/proj_depth/groundtruth/image_02/0000000123.png  (optional)

A sample is the target frame t of one camera (``side`` l = image_02, r = image_03) with
frames t-1 and t+1 of the same camera and, with ``stereo``, the other camera at t.
``baseline_m`` is the signed x offset of ``rgb_right``'s camera in the target camera's frame:
+0.54 m for side l, -0.54 m for side r (the other view then sits on the left).
Frames without both neighbours in their drive (a drive's first and last frames) cannot form
a triplet: they are skipped, counted and reported (``--strict`` makes them an error).
Split files use the Eigen/Zhou format, one ``<date>/<drive> <frame> <l|r>`` per line;
static-frame lists use Zhou's ``<date> <drive> <frame>`` lines.
"""
from __future__ import annotations

import argparse
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

#: ``build kitti --help``: what to download and how --root must look
DOWNLOAD = """what to download (https://www.cvlibs.net/datasets/kitti/raw_data.php, "synced+rectified data"):
  <date>_drive_<NNNN>_sync.zip   one per drive (Monodepth2's splits/kitti_archives_to_download.txt lists the
                                 Eigen split's drives, each URL an archive)
  <date>_calib.zip               one per date: calib_cam_to_cam.txt, calib_velo_to_cam.txt
  data_depth_annotated.zip       optional: KITTI's annotated depth (--depth annotated --depth-root)
  split files                    Monodepth2's splits/eigen_zhou/{train,val}_files.txt, splits/eigen/test_files.txt
unzip the archives into one folder and pass it as --root; it then holds:
  <root>/<date>/calib_cam_to_cam.txt
  <root>/<date>/<date>_drive_<NNNN>_sync/image_02/data/0000000123.png  (image_03: the right camera)
  <root>/<date>/<date>_drive_<NNNN>_sync/velodyne_points/data/0000000123.bin  (--depth velodyne)
Details: docs/real-datasets.md#kitti-raw-self-supervised-depth-video--stereo-optional-lidar-depth"""


from data_shards.sources.resize import (
    Geometry, SourceError, add_common_arguments, add_layout_argument, geometry_from_args, read_png_gray, read_rgb,
    require, tar_safe, write_splits,
)

log = logging.getLogger(__name__)

CAMERA = {"l": "image_02", "r": "image_03"}
CAM_INDEX = {"l": 2, "r": 3}
OTHER_SIDE = {"l": "r", "r": "l"}
DRIVE_RE = re.compile(r"^(\d{4}_\d{2}_\d{2})_drive_\d{4}_sync$")
DEPTH_MODES = ("none", "velodyne", "groundtruth")


@dataclass(frozen=True, order=True)
class KittiFrame:
    """One target frame: drive folder ``<date>/<date>_drive_XXXX_sync``, frame index, side l|r."""

    folder: str
    frame: int
    side: str = "l"


# --------------------------------------------------------------------------- calibration


def read_calib_file(path: Path) -> dict[str, np.ndarray]:
    """KITTI calibration text (``KEY: v v v ...`` lines) -> name -> float64 array.

    Lines whose values are not all numbers (``calib_time: 09-Jan-2012 13:57:47``) are skipped,
    as the devkit does; a file with no numeric entry at all is an error naming it.
    """
    require(path, "a KITTI calibration text file of 'KEY: numbers' lines")
    out: dict[str, np.ndarray] = {}
    for line in path.read_text().splitlines():
        if ":" not in line:
            continue
        key, value = line.split(":", 1)
        try:
            out[key.strip()] = np.array([float(v) for v in value.split()], dtype=np.float64)
        except ValueError:
            continue
    if not out:
        raise SourceError(f"{path}: no 'KEY: numbers' entries; expected a KITTI calibration file")
    return out


def _entry(calib: dict[str, np.ndarray], path: Path, key: str, size: int) -> np.ndarray:
    if key not in calib:
        raise SourceError(f"{path}: missing entry {key!r}")
    if calib[key].size != size:
        raise SourceError(f"{path}: entry {key!r} has {calib[key].size} numbers, expected {size}")
    return calib[key]


@dataclass(frozen=True)
class KittiCalib:
    """The rectified projections of cameras 2 and 3 and (optionally) the LiDAR extrinsics of one date."""

    P_rect: dict[int, np.ndarray]
    R_rect_00: np.ndarray
    velo_to_cam: Optional[np.ndarray] = field(default=None)
    path: str = ""

    def K(self, side: str) -> np.ndarray:
        """3x3 intrinsics of the rectified camera of ``side`` (the left 3x3 block of P_rect)."""
        return self.P_rect[CAM_INDEX[side]][:, :3].copy()

    def baseline(self, side: str) -> float:
        """Signed x position (m) of the other camera in the frame of ``side``'s camera.

        P_rect_0i = K [I | t_i] with t_i(x) = P[0, 3] / fx, camera centre at -t_i.
        """
        p_self, p_other = self.P_rect[CAM_INDEX[side]], self.P_rect[CAM_INDEX[OTHER_SIDE[side]]]
        return float((p_self[0, 3] - p_other[0, 3]) / p_self[0, 0])


@functools.lru_cache(maxsize=64)
def load_calib(date_dir: str, with_velo: bool = False) -> KittiCalib:
    """Read ``calib_cam_to_cam.txt`` (and ``calib_velo_to_cam.txt``) of one date folder."""
    cam_path = Path(date_dir) / "calib_cam_to_cam.txt"
    cam = read_calib_file(cam_path)
    P = {i: _entry(cam, cam_path, f"P_rect_0{i}", 12).reshape(3, 4) for i in (2, 3)}
    if P[2][0, 0] <= 0:
        raise SourceError(f"{cam_path}: P_rect_02 has focal length {P[2][0, 0]}, expected > 0")
    R_rect = _entry(cam, cam_path, "R_rect_00", 9).reshape(3, 3)
    velo = None
    if with_velo:
        velo_path = Path(date_dir) / "calib_velo_to_cam.txt"
        v = read_calib_file(velo_path)
        velo = np.eye(4)
        velo[:3, :3] = _entry(v, velo_path, "R", 9).reshape(3, 3)
        velo[:3, 3] = _entry(v, velo_path, "T", 3)
    return KittiCalib(P, R_rect, velo, str(cam_path))


def velodyne_depth(calib: KittiCalib, velo_path: Path, side: str, hw: tuple[int, int],
                   pixel_offset: int = 1) -> np.ndarray:
    """Project a velodyne scan into the rectified image of ``side`` as Monodepth2 / the devkit do.

    Points behind the scanner (x < 0) are dropped; pixel = round(u) - offset, round(v) - offset
    with ``pixel_offset`` 1 by default (the devkit's MATLAB 1-based convention that Monodepth2's
    ``generate_depth_map`` keeps, so the depth matches the standard Eigen ground truth; 0 for
    calibrations in the 0-based convention, e.g. the synthetic world's export); where several
    points land in one pixel the nearest wins; depth is the third row of
    P_rect @ R_rect @ T_velo_to_cam (z in the rectified camera).
    """
    require(velo_path, "a velodyne scan (float32 x, y, z, reflectance records)")
    raw = np.fromfile(velo_path, dtype=np.float32)
    if raw.size % 4:
        raise SourceError(f"{velo_path}: {raw.size} float32 values, expected a multiple of 4 (x, y, z, r)")
    velo = raw.reshape(-1, 4).astype(np.float64)
    velo[:, 3] = 1.0
    velo = velo[velo[:, 0] >= 0]
    R = np.eye(4)
    R[:3, :3] = calib.R_rect_00
    P = calib.P_rect[CAM_INDEX[side]] @ R @ calib.velo_to_cam
    pts = velo @ P.T
    z = pts[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.round(pts[:, 0] / z) - pixel_offset
        v = np.round(pts[:, 1] / z) - pixel_offset
    h, w = hw
    ok = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (v >= 0) & (u < w) & (v < h) & (z > 0)
    depth = np.full((h, w), np.inf)
    np.minimum.at(depth, (v[ok].astype(np.int64), u[ok].astype(np.int64)), z[ok])
    depth[~np.isfinite(depth)] = 0.0
    return depth.astype(np.float32)


# --------------------------------------------------------------------------- listing frames


def frame_path(root: Path, folder: str, side: str, frame: int) -> Path:
    """Image file of one camera frame (``.png`` as released; ``.jpg`` if the user converted them)."""
    base = root / folder / CAMERA[side] / "data" / f"{frame:010d}"
    png = base.with_suffix(".png")
    if not png.exists() and base.with_suffix(".jpg").exists():
        return base.with_suffix(".jpg")
    return png


def read_split_file(path: Path) -> list[KittiFrame]:
    """Eigen/Zhou split file -> frames. Each line: ``<date>/<date>_drive_XXXX_sync <frame> <l|r>``."""
    require(Path(path), "a split file of '<date>/<drive> <frame> <l|r>' lines")
    frames: list[KittiFrame] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        folder_ok = len(parts) == 3 and len(Path(parts[0]).parts) == 2 and DRIVE_RE.match(Path(parts[0]).name)
        if not folder_ok or not parts[1].isdigit() or parts[2] not in CAMERA:
            raise SourceError(f"{path}:{n}: expected '<date>/<date>_drive_XXXX_sync <frame> <l|r>' "
                              f"(e.g. '2011_09_26/2011_09_26_drive_0022_sync 473 r'), got {line!r}")
        frames.append(KittiFrame(parts[0], int(parts[1]), parts[2]))
    if not frames:
        raise SourceError(f"{path}: empty split file")
    return frames


def read_static_frames(path: Path) -> set[tuple[str, int]]:
    """Zhou et al.'s static-frame list (``<date> <drive> <frame>`` lines) -> {(folder, frame)}."""
    require(Path(path), "a static-frame list of '<date> <drive> <frame>' lines")
    out: set[tuple[str, int]] = set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or not DRIVE_RE.match(parts[1]) or not parts[2].isdigit():
            raise SourceError(f"{path}:{n}: expected '<date> <date>_drive_XXXX_sync <frame>', got {line!r}")
        out.add((f"{parts[0]}/{parts[1]}", int(parts[2])))
    return out


def list_drives(root: Path) -> list[str]:
    """Every ``<date>/<date>_drive_XXXX_sync`` folder under ``root``, sorted."""
    if not root.is_dir():
        raise SourceError(f"{root}: missing; expected the KITTI raw root holding <date>/<date>_drive_XXXX_sync/")
    drives = sorted(f"{d.parent.name}/{d.name}" for d in root.glob("*/*_drive_*_sync")
                    if d.is_dir() and DRIVE_RE.match(d.name) and DRIVE_RE.match(d.name).group(1) == d.parent.name)
    if not drives:
        raise SourceError(f"{root}: no <date>/<date>_drive_XXXX_sync folders; expected the KITTI raw layout")
    return drives


def list_frames(root: Path, sides: Sequence[str] = ("l",)) -> list[KittiFrame]:
    """Every frame of every drive that has an image of each requested side, sorted."""
    frames = []
    for folder in list_drives(root):
        for side in sides:
            data = root / folder / CAMERA[side] / "data"
            if not data.is_dir():
                raise SourceError(f"{data}: missing; expected the {CAMERA[side]} frames of drive {folder}")
            frames += [KittiFrame(folder, int(p.stem), side) for p in sorted(data.iterdir())
                       if p.suffix in (".png", ".jpg") and p.stem.isdigit()]
    return sorted(frames)


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class KittiOptions:
    """What each sample holds: triplet frames, the other stereo view, which depth, geometry."""

    root: str
    triplet: bool = True
    stereo: bool = True
    depth: str = "none"
    depth_root: Optional[str] = None
    velo_pixel_offset: int = 1
    geometry: Geometry = Geometry()


def has_neighbours(root: Path, f: KittiFrame) -> bool:
    """Whether frames t-1 and t+1 exist in the same drive and camera."""
    return f.frame > 0 and all(frame_path(root, f.folder, f.side, f.frame + d).exists() for d in (-1, 1))


def select_frames(opts: KittiOptions, frames: Sequence[KittiFrame], static: set[tuple[str, int]] = frozenset(),
                  strict: bool = False, where: str = "") -> tuple[list[KittiFrame], dict[str, int]]:
    """Drop static frames, frames without both neighbours (triplets) and frames without the
    requested ground-truth depth (KITTI's annotated depth skips each drive's first and last 5
    frames); count what was dropped. ``strict`` turns a dropped neighbour/depth into an error."""
    root = Path(opts.root)
    kept, stats = [], {"static": 0, "no_neighbours": 0, "no_depth": 0}
    for f in frames:
        if not (root / f.folder).is_dir():
            raise SourceError(f"{root / f.folder}: missing; {where or 'the frame list'} names drive {f.folder}")
        if (f.folder, f.frame) in static:
            stats["static"] += 1
            continue
        if opts.triplet and not has_neighbours(root, f):
            if strict:
                raise SourceError(f"{frame_path(root, f.folder, f.side, f.frame)}: frame {f.frame} of {f.folder} "
                                  f"lacks frame t-1 or t+1 (drive boundary); listed in {where or 'the frame list'}")
            stats["no_neighbours"] += 1
            continue
        if opts.depth != "none":
            try:
                if opts.depth == "groundtruth":
                    _groundtruth_path(opts, f)
                else:
                    require(root / f.folder / "velodyne_points" / "data" / f"{f.frame:010d}.bin", "a velodyne scan")
            except SourceError:
                if strict:
                    raise
                stats["no_depth"] += 1
                continue
        kept.append(f)
    return kept, stats


def _groundtruth_path(opts: KittiOptions, f: KittiFrame) -> Path:
    drive = Path(f.folder).name
    rel = Path("proj_depth") / "groundtruth" / CAMERA[f.side] / f"{f.frame:010d}.png"
    candidates = [Path(opts.root) / f.folder / rel]
    if opts.depth_root:
        d = Path(opts.depth_root)
        candidates += [d / drive / rel, d / "train" / drive / rel, d / "val" / drive / rel, d / f.folder / rel]
    for c in candidates:
        if c.exists():
            return c
    raise SourceError(f"{candidates[0]}: missing; expected KITTI's annotated depth (16-bit PNG, metres * 256)"
                      + (f" here or under {opts.depth_root}" if opts.depth_root else " (set --depth-root?)"))


def make_sample(opts: KittiOptions, f: KittiFrame) -> dict[str, Any]:
    """Read one frame's files and return a schema sample (numpy arrays + meta)."""
    root = Path(opts.root)
    geo = opts.geometry
    date_dir = root / Path(f.folder).parts[0]
    calib = load_calib(str(date_dir), with_velo=opts.depth == "velodyne")
    path = frame_path(root, f.folder, f.side, f.frame)
    rgb = read_rgb(path)
    hw = rgb.shape[:2]
    sample: dict[str, Any] = {
        "__key__": tar_safe(f"{Path(f.folder).name}_{f.frame:010d}_{f.side}"),
        "rgb": geo.rgb(rgb, str(path)),
    }

    def same_size(img: np.ndarray, p: Path) -> np.ndarray:
        if img.shape[:2] != hw:
            raise SourceError(f"{p}: size {img.shape[1]}x{img.shape[0]} differs from {path} ({hw[1]}x{hw[0]})")
        return geo.rgb(img, str(p))

    if opts.triplet:
        for name, d in (("rgb_prev", -1), ("rgb_next", 1)):
            p = frame_path(root, f.folder, f.side, f.frame + d)
            sample[name] = same_size(read_rgb(p), p)
    meta: dict[str, Any] = {
        "K": geo.intrinsics(calib.K(f.side), hw).tolist(),
        "source": {"dataset": "kitti", "drive": f.folder, "frame": f.frame, "side": f.side,
                   "path": str(path.relative_to(root))},
    }
    if opts.stereo:
        p = frame_path(root, f.folder, OTHER_SIDE[f.side], f.frame)
        sample["rgb_right"] = same_size(read_rgb(p), p)
        meta["baseline_m"] = calib.baseline(f.side)
    if opts.depth == "velodyne":
        velo = root / f.folder / "velodyne_points" / "data" / f"{f.frame:010d}.bin"
        sample["depth"] = geo.depth(velodyne_depth(calib, velo, f.side, hw, opts.velo_pixel_offset), str(velo))
    elif opts.depth == "groundtruth":
        p = _groundtruth_path(opts, f)
        raw = read_png_gray(p, 16, "KITTI annotated depth (16-bit PNG, metres * 256)")
        if raw.shape != hw:
            raise SourceError(f"{p}: size {raw.shape[1]}x{raw.shape[0]} differs from {path} ({hw[1]}x{hw[0]})")
        sample["depth"] = geo.depth(raw.astype(np.float32) / 256.0, str(p))
    if not geo.identity:
        meta["source"]["geometry"] = geo.describe()
    sample["meta"] = meta
    return sample


def frame_name(folder: str, frame: int, side: str) -> str:
    """The compact-shard member key of one camera frame, e.g.
    ``2011_09_26_drive_0001_sync_0000000002_image_02`` (never a sample key: those end in _l / _r)."""
    return tar_safe(f"{Path(folder).name}_{frame:010d}_{CAMERA[side]}")


def make_compact_sample(opts: KittiOptions, f: KittiFrame) -> dict[str, Any]:
    """:func:`make_sample` plus ``__frames__``: which camera frame each image is (data_shards.compact
    stores each once per shard)."""
    sample = make_sample(opts, f)
    names = {"rgb": frame_name(f.folder, f.frame, f.side)}
    if opts.triplet:
        names["rgb_prev"] = frame_name(f.folder, f.frame - 1, f.side)
        names["rgb_next"] = frame_name(f.folder, f.frame + 1, f.side)
    if opts.stereo:
        names["rgb_right"] = frame_name(f.folder, f.frame, OTHER_SIDE[f.side])
    sample["__frames__"] = names
    return sample


def iter_samples(opts: KittiOptions, frames: Sequence[KittiFrame]) -> Iterator[dict[str, Any]]:
    """Schema samples for ``frames`` (already selected), in order."""
    for f in frames:
        yield make_sample(opts, f)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m data_shards build kitti`` options."""
    add_common_arguments(parser)
    parser.add_argument("--split", action="append", default=[], metavar="NAME=FILE",
                        help="a split from an Eigen/Zhou split file (repeatable), e.g. train=splits/eigen_zhou/"
                             "train_files.txt; without any, every frame of every drive goes to split 'train'")
    parser.add_argument("--sides", default="l", choices=["l", "r", "lr"],
                        help="cameras used as targets when listing drives (split files name their own)")
    parser.add_argument("--static-frames", default=None, help="Zhou's static_frames.txt: frames to exclude")
    parser.add_argument("--frames", default="triplet", choices=["triplet", "single"],
                        help="triplet: t-1, t, t+1 (frames without both neighbours are skipped); single: t only")
    parser.add_argument("--no-stereo", action="store_true", help="leave out the other camera's view")
    parser.add_argument("--depth", default="none", choices=DEPTH_MODES,
                        help="ground-truth depth: projected velodyne scans, or KITTI's annotated proj_depth PNGs")
    parser.add_argument("--depth-root", default=None,
                        help="folder of the KITTI depth benchmark (data_depth_annotated: [train|val/]<drive>/proj_depth)")
    parser.add_argument("--velodyne-pixels", default="kitti", choices=["kitti", "zero-based"],
                        help="kitti: pixel = round(u) - 1 as Monodepth2 / the Eigen ground truth; "
                             "zero-based: round(u), for calibrations with integer pixel centres (synthetic export)")
    parser.add_argument("--strict", action="store_true",
                        help="a listed frame without both neighbours or without the requested depth is an error "
                             "instead of being skipped")
    add_layout_argument(parser)


def options_from_args(args: argparse.Namespace) -> KittiOptions:
    """KittiOptions from parsed CLI arguments."""
    return KittiOptions(root=str(args.root), triplet=args.frames == "triplet", stereo=not args.no_stereo,
                        depth=args.depth, depth_root=args.depth_root,
                        velo_pixel_offset=1 if args.velodyne_pixels == "kitti" else 0,
                        geometry=geometry_from_args(args))


def plan(args: argparse.Namespace) -> tuple[KittiOptions, dict[str, list[KittiFrame]], dict[str, dict[str, int]]]:
    """Resolve the CLI into options, the frames of each split and what was skipped per split."""
    opts = options_from_args(args)
    static = read_static_frames(Path(args.static_frames)) if args.static_frames else set()
    sources: dict[str, tuple[list[KittiFrame], str]] = {}
    for spec in args.split:
        if "=" not in spec:
            raise SourceError(f"--split {spec!r}: expected NAME=FILE")
        name, path = spec.split("=", 1)
        sources[name] = (read_split_file(Path(path)), path)
    if not sources:
        sides = ["l", "r"] if args.sides == "lr" else [args.sides]
        sources["train"] = (list_frames(Path(args.root), sides), str(args.root))
    splits, skipped = {}, {}
    for name, (frames, where) in sources.items():
        splits[name], skipped[name] = select_frames(opts, frames, static, args.strict, where)
        if any(skipped[name].values()):
            log.warning("kitti split %s: skipped %d static frames, %d without both neighbours and %d without "
                        "ground-truth depth (of %d)", name, skipped[name]["static"], skipped[name]["no_neighbours"],
                        skipped[name]["no_depth"], len(frames))
    return opts, splits, skipped


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Convert KITTI raw into shards under ``args.out/<split>/``, in the layout ``args.layout``:
    compact (default) sorts samples by (drive, frame, side) so a frame's users share a shard, and
    stores each camera frame once per shard; plain stores every sample's 4 images, in split order."""
    opts, splits, skipped = plan(args)
    extra = {"geometry": opts.geometry.describe(), "skipped": skipped, "depth": opts.depth,
             "velodyne_pixel_offset": opts.velo_pixel_offset if opts.depth == "velodyne" else None,
             "frames": "triplet" if opts.triplet else "single", "stereo": opts.stereo}
    if getattr(args, "layout", "compact") == "plain":
        return write_splits(args, "kitti", splits, functools.partial(make_sample, opts), extra)
    ordered = {name: sorted(frames) for name, frames in splits.items()}  # neighbours land in the same shard
    return write_splits(args, "kitti", ordered, functools.partial(make_compact_sample, opts),
                        {**extra, "layout": "compact"}, compact=True)
