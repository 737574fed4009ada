"""Write the synthetic world as a KITTI raw folder tree, so KITTI readers and outside tools can use it.

Layout (KITTI raw, plus the depth-completion ground truth inside each drive)::

    <out_dir>/<date>/calib_cam_to_cam.txt     S_/K_/D_/R_/T_/S_rect_/R_rect_/P_rect_ for cameras 00..03
    <out_dir>/<date>/calib_velo_to_cam.txt    R, T, delta_f, delta_c
    <out_dir>/<date>/calib_imu_to_velo.txt    R, T
    <out_dir>/<date>/<date>_drive_XXXX_sync/image_02/data/0000000000.png      left colour camera
    <out_dir>/<date>/<date>_drive_XXXX_sync/image_03/data/0000000000.png      right colour camera
    <out_dir>/<date>/<date>_drive_XXXX_sync/velodyne_points/data/0000000000.bin  float32 (N, 4)
    <out_dir>/<date>/<date>_drive_XXXX_sync/proj_depth/groundtruth/image_02/0000000000.png  uint16 depth*256
    (each data folder also has KITTI's timestamps.txt, 10 Hz)

Sequence ``i`` of the split becomes drive ``i + 1``. Camera 00 coincides with camera 02 (the
left colour camera) and camera 01 with 03, so ``P_rect_02 = K [I | 0]`` and
``P_rect_03 = K [I | (-fx * b, 0, 0)]`` with b = the baseline, as KITTI encodes it. K is in
the renderer's 0-based pixel convention (``u = fx X / Z + cx``, pixel centres at integers)
unless ``one_based=True``: then cx, cy are written +1, the MATLAB convention that KITTI's
devkit and Monodepth2 assume when they project velodyne points with ``round(u) - 1``.
Velodyne points are in KITTI's velodyne frame (x forward, y left, z up, 8 cm above and
27 cm behind camera 00) and are exact 3D points of the rendered depth along 64 beam
elevations of an HDL-64E (+2 deg to -24.8 deg), one per image column, in the camera's field
of view only. The ground truth is the full rendered z-depth (0 = sky / beyond the render
distance). The tree is built under a temporary name and renamed when whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from ..schema import encode_depth
from .synthetic import SyntheticConfig, intrinsics, make_sequence

#: Camera-from-velodyne rotation (velodyne x forward, y left, z up -> camera x right, y down, z forward).
VELO_TO_CAM_R = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
#: Velodyne origin in camera-00 coordinates (metres): 8 cm above and 27 cm behind it.
VELO_TO_CAM_T = np.array([0.0, -0.08, -0.27])
#: HDL-64E beam elevations (degrees), top to bottom.
BEAM_ELEVATIONS_DEG = np.linspace(2.0, -24.8, 64)
MARKER = "synthetic_export.json"


def _fmt(values) -> str:
    """Numbers as KITTI writes them: space-separated ``%e``."""
    return " ".join(f"{v:e}" for v in np.asarray(values, dtype=np.float64).ravel())


def calib_cam_to_cam(K: np.ndarray, width: int, height: int, baseline: float) -> str:
    """``calib_cam_to_cam.txt`` text for rectified, distortion-free cameras 00..03."""
    lines = ["calib_time: 09-Jan-2012 13:57:47", "corner_dist: 9.950000e-02"]
    for i in range(4):
        right = i in (1, 3)
        P = np.hstack([K, np.zeros((3, 1))])
        P[0, 3] = -K[0, 0] * baseline if right else 0.0
        T = np.array([-baseline if right else 0.0, 0.0, 0.0])
        lines += [f"S_0{i}: {_fmt([width, height])}", f"K_0{i}: {_fmt(K)}", f"D_0{i}: {_fmt(np.zeros(5))}",
                  f"R_0{i}: {_fmt(np.eye(3))}", f"T_0{i}: {_fmt(T)}", f"S_rect_0{i}: {_fmt([width, height])}",
                  f"R_rect_0{i}: {_fmt(np.eye(3))}", f"P_rect_0{i}: {_fmt(P)}"]
    return "\n".join(lines) + "\n"


def calib_velo_to_cam() -> str:
    """``calib_velo_to_cam.txt`` text (camera-00 point = R @ velodyne point + T)."""
    return (f"calib_time: 15-Mar-2012 11:37:16\nR: {_fmt(VELO_TO_CAM_R)}\nT: {_fmt(VELO_TO_CAM_T)}\n"
            f"delta_f: {_fmt([0, 0])}\ndelta_c: {_fmt([0, 0])}\n")


def calib_imu_to_velo() -> str:
    """``calib_imu_to_velo.txt`` text (KITTI's mounting offsets; the world has no IMU data)."""
    return f"calib_time: 25-May-2012 16:47:16\nR: {_fmt(np.eye(3))}\nT: {_fmt([-0.8086759, 0.3195559, -0.7997231])}\n"


def beam_rows(K: np.ndarray, height: int) -> np.ndarray:
    """Image rows (unique, sorted) nearest to the HDL-64E beam elevations, inside the image."""
    v = K[1, 2] - K[1, 1] * np.tan(np.deg2rad(BEAM_ELEVATIONS_DEG))
    rows = np.unique(np.rint(v).astype(np.int64))
    return rows[(rows >= 0) & (rows < height)]


def lidar_scan(depth: np.ndarray, rgb: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(N, 4) float32 velodyne-frame points (x, y, z, reflectance) sampled from a depth map."""
    H, W = depth.shape
    rows = beam_rows(K, H)
    vv, uu = np.meshgrid(rows, np.arange(W), indexing="ij")
    d = depth[vv, uu].astype(np.float64)
    ok = d > 0
    u, v, d = uu[ok], vv[ok], d[ok]
    cam = np.stack([(u - K[0, 2]) / K[0, 0] * d, (v - K[1, 2]) / K[1, 1] * d, d], -1)
    velo = (cam - VELO_TO_CAM_T) @ VELO_TO_CAM_R  # R^T (p - T)
    refl = rgb[v, u].astype(np.float64).mean(-1) / 255.0
    return np.concatenate([velo, refl[:, None]], 1).astype(np.float32)


def _timestamps(n: int, date: str) -> str:
    """KITTI ``timestamps.txt`` text for ``n`` frames at 10 Hz."""
    day = date.replace("_", "-")
    return "".join(f"{day} 12:00:{i * 0.1:012.9f}\n" for i in range(n))


def _png(path: Path, arr: np.ndarray) -> None:
    """Write an 8-bit PNG."""
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _write_drive(drive_dir: Path, cfg: SyntheticConfig, split: str, sequence: int, date: str) -> None:
    """Render one sequence (both cameras, every frame) into a drive folder."""
    world = make_sequence(cfg, split, sequence)
    F = cfg.frames_per_sequence
    dirs = {k: drive_dir / k / "data" for k in ("image_02", "image_03", "velodyne_points")}
    gt_dir = drive_dir / "proj_depth" / "groundtruth" / "image_02"
    for d in (*dirs.values(), gt_dir):
        d.mkdir(parents=True)
    for k in dirs:
        (drive_dir / k / "timestamps.txt").write_text(_timestamps(F, date))
    for f in range(F):
        left, right = world.render_left(f), world.render_right(f)
        name = f"{f:010d}"
        _png(dirs["image_02"] / f"{name}.png", left.rgb)
        _png(dirs["image_03"] / f"{name}.png", right.rgb)
        lidar_scan(left.depth, left.rgb, world.K).tofile(dirs["velodyne_points"] / f"{name}.bin")
        (gt_dir / f"{name}.png").write_bytes(encode_depth(left.depth))


def export_kitti_raw(out_dir, cfg: SyntheticConfig, split: str = "train", date: str = "2011_09_26",
                     one_based: bool = False) -> Path:
    """Write ``split`` of the synthetic world under ``out_dir/<date>`` in the KITTI raw layout.

    ``one_based``: write the principal point in 1-based (MATLAB / devkit) pixel coordinates,
    so readers that subtract 1 after projecting velodyne points land on the rendered pixels;
    the default writes the renderer's 0-based K exactly.

    Returns the date folder. Re-running replaces an earlier synthetic export of the same date;
    a ``<date>`` folder that is not a synthetic export (no ``synthetic_export.json``) is never
    touched: that raises ``FileExistsError`` naming it.
    """
    if split not in cfg.sequences:
        raise ValueError(f"export_kitti_raw: unknown split {split!r}; configured splits: {sorted(cfg.sequences)}")
    parts = date.split("_")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or [len(p) for p in parts] != [4, 2, 2]:
        raise ValueError(f"export_kitti_raw: date {date!r} must look like 2011_09_26 (KITTI's YYYY_MM_DD)")
    out = Path(out_dir)
    final = out / date
    if final.exists() and not (final / MARKER).is_file():
        raise FileExistsError(f"{final}: exists and is not a synthetic export (no {MARKER}); refusing to replace it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{date}.partial-", dir=out))
    try:
        K = intrinsics(cfg)
        if one_based:
            K[:2, 2] += 1.0
        (tmp / "calib_cam_to_cam.txt").write_text(calib_cam_to_cam(K, cfg.width, cfg.height, cfg.baseline_m))
        (tmp / "calib_velo_to_cam.txt").write_text(calib_velo_to_cam())
        (tmp / "calib_imu_to_velo.txt").write_text(calib_imu_to_velo())
        for s in range(cfg.sequences[split]):
            _write_drive(tmp / f"{date}_drive_{s + 1:04d}_sync", cfg, split, s, date)
        (tmp / MARKER).write_text(json.dumps({"split": split, "one_based": one_based, "config": asdict(cfg)},
                                             sort_keys=True, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m data_shards.sources.kitti_export OUT [--split S] [--seed N] ...``: write a KITTI raw tree."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m data_shards.sources.kitti_export",
                                description="Write the synthetic world in the KITTI raw layout.")
    p.add_argument("out", help="KITTI raw root to write (<out>/<date>/...)")
    p.add_argument("--split", default="train", help="split to export (default: train)")
    p.add_argument("--date", default="2011_09_26", help="date folder name, YYYY_MM_DD")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--height", type=int, default=None, help="image height (default: the world's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the world's)")
    p.add_argument("--sequences", type=int, default=None, help="number of sequences (drives) of the split")
    p.add_argument("--frames-per-sequence", type=int, default=None, help="frames per drive")
    p.add_argument("--one-based", action="store_true", help="write cx, cy in the devkit's 1-based convention")
    a = p.parse_args(argv)
    base = SyntheticConfig(seed=a.seed)
    cfg = SyntheticConfig(
        seed=a.seed, height=a.height or base.height, width=a.width or base.width,
        sequences={**base.sequences, **({a.split: a.sequences} if a.sequences is not None else {})},
        frames_per_sequence=a.frames_per_sequence or base.frames_per_sequence)
    print(export_kitti_raw(a.out, cfg, split=a.split, date=a.date, one_based=a.one_based))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
