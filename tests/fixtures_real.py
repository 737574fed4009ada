"""Tiny fixtures in the exact on-disk formats of the real releases (KITTI raw, KITTI semantics,
Cityscapes, NYU-Depth V2 labeled), so the converters are tested on the layout they will meet.

Every image encodes where it came from in its pixel values, so tests can check that the right
file landed in the right sample key (e.g. frame t-1 really is frame t-1 of the same drive).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Real KITTI 2011_09_26 rectified projections (calib_cam_to_cam.txt), fx = 721.5377.
KITTI_P2 = np.array([[7.215377e+02, 0.0, 6.095593e+02, 4.485728e+01],
                     [0.0, 7.215377e+02, 1.728540e+02, 2.163791e-01],
                     [0.0, 0.0, 1.0, 2.745884e-03]])
KITTI_P3 = np.array([[7.215377e+02, 0.0, 6.095593e+02, -3.395242e+02],
                     [0.0, 7.215377e+02, 1.728540e+02, 2.199936e+00],
                     [0.0, 0.0, 1.0, 2.729905e-03]])
KITTI_DATE = "2011_09_26"


def _fmt(values) -> str:
    return " ".join(f"{v:e}" for v in np.asarray(values, dtype=np.float64).ravel())


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def kitti_pixel(drive_idx: int, frame: int, side: str, hw: tuple[int, int]) -> np.ndarray:
    """The image a fixture writes for (drive, frame, side): R = frame, G = drive, B = 2|3."""
    img = np.zeros(hw + (3,), dtype=np.uint8)
    img[..., 0] = frame % 256
    img[..., 1] = drive_idx
    img[..., 2] = 2 if side == "l" else 3
    img[0, 0] = (200, 100, 50)  # a corner marker: checks the orientation survives
    return img


def write_kitti_calib(date_dir: Path, P2: np.ndarray = KITTI_P2, P3: np.ndarray = KITTI_P3,
                      hw: tuple[int, int] = (375, 1242)) -> None:
    """calib_cam_to_cam.txt and calib_velo_to_cam.txt in the release's exact text format."""
    date_dir.mkdir(parents=True, exist_ok=True)
    lines = ["calib_time: 09-Jan-2012 13:57:47", "corner_dist: 9.950000e-02"]
    for i in range(4):
        P = {2: P2, 3: P3}.get(i, np.hstack([P2[:, :3], np.zeros((3, 1))]))
        lines += [f"S_0{i}: 1.392000e+03 5.120000e+02", f"K_0{i}: {_fmt(np.eye(3))}",
                  f"D_0{i}: {_fmt(np.zeros(5))}", f"R_0{i}: {_fmt(np.eye(3))}", f"T_0{i}: {_fmt(np.zeros(3))}",
                  f"S_rect_0{i}: {_fmt([hw[1], hw[0]])}", f"R_rect_0{i}: {_fmt(np.eye(3))}",
                  f"P_rect_0{i}: {_fmt(P)}"]
    (date_dir / "calib_cam_to_cam.txt").write_text("\n".join(lines) + "\n")
    # Velodyne axes: x forward, y left, z up -> camera x right, y down, z forward.
    R = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    (date_dir / "calib_velo_to_cam.txt").write_text(
        f"calib_time: 15-Mar-2012 11:37:16\nR: {_fmt(R)}\nT: {_fmt(np.zeros(3))}\n"
        f"delta_f: 0.000000e+00 0.000000e+00\ndelta_c: 0.000000e+00 0.000000e+00\n")


def kitti_velo_point(P: np.ndarray, u: float, v: float, z: float) -> np.ndarray:
    """A velodyne-frame point that the fixture calibration projects to pixel (u, v) (KITTI 1-based) at depth z."""
    fx, cx, fy, cy = P[0, 0], P[0, 2], P[1, 1], P[1, 2]
    zc = z - P[2, 3]  # P's third row adds P[2, 3] to the camera z
    x = (u * z - cx * zc - P[0, 3]) / fx
    y = (v * z - cy * zc - P[1, 3]) / fy
    return np.array([zc, -x, -y, 0.5], dtype=np.float32)


def write_kitti_raw(root: Path, drives: dict[str, int], hw: tuple[int, int] = (6, 10),
                    velodyne: dict[tuple[str, int], np.ndarray] | None = None,
                    groundtruth: dict[tuple[str, int], np.ndarray] | None = None) -> dict[str, Any]:
    """A KITTI raw tree: ``drives`` maps ``<date>_drive_XXXX_sync`` -> number of frames.

    ``velodyne[(drive, frame)]`` is an (N, 4) float32 scan; ``groundtruth[(drive, frame)]`` a
    depth map in metres written as KITTI's proj_depth 16-bit PNG. Returns the drive indices.
    """
    date_dir = root / KITTI_DATE
    write_kitti_calib(date_dir)
    index = {}
    for d_idx, (drive, n) in enumerate(sorted(drives.items()), 1):
        index[drive] = d_idx
        for side, cam in (("l", "image_02"), ("r", "image_03")):
            for f in range(n):
                _save(date_dir / drive / cam / "data" / f"{f:010d}.png", kitti_pixel(d_idx, f, side, hw))
            (date_dir / drive / cam / "timestamps.txt").write_text(
                "".join(f"2011-09-26 13:02:{25 + f * 0.1:09.6f}\n" for f in range(n)))
    for (drive, f), scan in (velodyne or {}).items():
        p = date_dir / drive / "velodyne_points" / "data" / f"{f:010d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        np.asarray(scan, dtype=np.float32).tofile(p)
    for (drive, f), depth in (groundtruth or {}).items():
        _save(date_dir / drive / "proj_depth" / "groundtruth" / "image_02" / f"{f:010d}.png",
              np.round(depth * 256).astype(np.uint16))
    return index


# --------------------------------------------------------------------------- KITTI semantics


def write_kitti_semantics(root: Path, n: int = 10, hw: tuple[int, int] = (5, 8)) -> None:
    """``training/image_2/000000_10.png`` + ``training/semantic/000000_10.png`` (label ids)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.zeros(hw + (3,), dtype=np.uint8)
        img[..., 0] = i
        _save(root / "training" / "image_2" / f"{i:06d}_10.png", img)
        labels = rng.choice([0, 7, 8, 11, 21, 23, 26, 33, 9, 4], size=hw).astype(np.uint8)
        labels[0, 0] = i % 34
        _save(root / "training" / "semantic" / f"{i:06d}_10.png", labels)
        _save(root / "training" / "semantic_rgb" / f"{i:06d}_10.png", np.zeros(hw + (3,), np.uint8))
    (root / "testing" / "image_2").mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- Cityscapes

CITYSCAPES_CAMERA = {"extrinsic": {"baseline": 0.209313, "pitch": 0.038, "roll": 0.0, "x": 1.7, "y": 0.1,
                                   "yaw": -0.0195, "z": 1.22},
                     "intrinsic": {"fx": 2262.52, "fy": 2265.3017905988554, "u0": 1096.98, "v0": 513.137}}


def cityscapes_image(city_idx: int, seq: int, frame: int, right: bool, hw: tuple[int, int]) -> np.ndarray:
    """Fixture image of one Cityscapes frame: R = frame % 256, G = seq, B = city * 10 + right."""
    img = np.zeros(hw + (3,), dtype=np.uint8)
    img[..., 0] = frame % 256
    img[..., 1] = seq
    img[..., 2] = city_idx * 10 + int(right)
    return img


def write_cityscapes(root: Path, frames: dict[str, list[tuple[str, int, int]]], hw: tuple[int, int] = (4, 6),
                     sequence: bool = True, camera: dict | None = None) -> dict[str, np.ndarray]:
    """Cityscapes tree: ``frames[split] = [(city, seq, frame), ...]`` annotated frames.

    Writes leftImg8bit, rightImg8bit, disparity (16-bit), camera JSON, gtFine labelIds and,
    with ``sequence``, leftImg8bit_sequence frames t-1, t, t+1. Returns the label-id and
    disparity arrays by ``<city>_<seq>_<frame>``.
    """
    out = {}
    cities = sorted({c for fl in frames.values() for c, _, _ in fl})
    rng = np.random.default_rng(1)
    for split, fl in frames.items():
        for city, seq, frame in fl:
            c_idx = cities.index(city) + 1
            stem = f"{city}_{seq:06d}_{frame:06d}"
            _save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                  cityscapes_image(c_idx, seq, frame, False, hw))
            _save(root / "rightImg8bit" / split / city / f"{stem}_rightImg8bit.png",
                  cityscapes_image(c_idx, seq, frame, True, hw))
            disp = rng.integers(0, 30000, size=hw).astype(np.uint16)
            disp[0, 0], disp[0, 1] = 0, 1  # invalid, and zero disparity
            disp[0, 2] = 1 + 256 * 32  # exactly 32 px disparity
            _save(root / "disparity" / split / city / f"{stem}_disparity.png", disp)
            (root / "camera" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "camera" / split / city / f"{stem}_camera.json").write_text(
                json.dumps(camera or CITYSCAPES_CAMERA, indent=4))
            labels = rng.integers(0, 34, size=hw).astype(np.uint8)
            _save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", labels)
            _save(root / "gtFine" / split / city / f"{stem}_gtFine_color.png", np.zeros(hw + (4,), np.uint8))
            out[stem], out[stem + "_disparity"] = labels, disp
            if sequence:
                for d in (-1, 0, 1):
                    _save(root / "leftImg8bit_sequence" / split / city /
                          f"{city}_{seq:06d}_{frame + d:06d}_leftImg8bit.png",
                          cityscapes_image(c_idx, seq, frame + d, False, hw))
    return out


# --------------------------------------------------------------------------- NYU-Depth V2


def write_nyu_labeled(path: Path, n: int = 6, hw: tuple[int, int] = (4, 5)) -> dict[str, np.ndarray]:
    """``nyu_depth_v2_labeled.mat`` as MATLAB v7.3 writes it: HDF5, arrays stored transposed.

    MATLAB's (H, W, 3, N) images appear in h5py as (N, 3, W, H); depths/labels (H, W, N) as
    (N, W, H). Returns the arrays in natural (N, H, W[, 3]) order for the tests to compare.
    """
    import h5py

    rng = np.random.default_rng(2)
    h, w = hw
    images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    images[:, 0, 0, :] = np.arange(n)[:, None]  # sample index in the corner
    depths = rng.uniform(0.5, 9.5, size=(n, h, w)).astype(np.float32)
    raw_depths = depths.copy()
    raw_depths[:, -1, :] = 0.0
    labels = rng.integers(0, 895, size=(n, h, w)).astype(np.uint16)
    labels[:, 0, 1] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("images", data=images.transpose(0, 3, 2, 1))
        f.create_dataset("depths", data=depths.transpose(0, 2, 1))
        f.create_dataset("rawDepths", data=raw_depths.transpose(0, 2, 1))
        f.create_dataset("labels", data=labels.transpose(0, 2, 1))
        f.create_dataset("instances", data=np.zeros((n, w, h), np.uint8))
        refs = []
        for i in range(n):  # cell array of char arrays: object references into #refs#
            name = f"bedroom_{i // 2 + 1:04d}"
            ds = f.create_dataset(f"#refs#/s{i}", data=np.array([[ord(c) for c in name]], np.uint16).T)
            refs.append(ds.ref)
        scenes = f.create_dataset("scenes", shape=(1, n), dtype=h5py.ref_dtype)
        scenes[0, :] = refs
    with open(path, "r+b") as fh:  # MATLAB's 128-byte text header in the user block
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jun 11 2012 HDF5 schema 1.00 .".ljust(116))
    return {"images": images, "depths": depths, "rawDepths": raw_depths, "labels": labels}


def write_nyu_splits(path: Path, train: list[int], test: list[int]) -> None:
    """``splits.mat`` (MATLAB v5) with 1-based column vectors ``trainNdxs`` / ``testNdxs``."""
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"trainNdxs": np.array(train, dtype=np.float64)[:, None],
                                 "testNdxs": np.array(test, dtype=np.float64)[:, None]})


def write_nyu_mapping40(path: Path) -> np.ndarray:
    """``classMapping40.mat`` with ``mapClass`` (1 x 894): raw class i -> NYU40 id ((i * 7) % 41)."""
    import scipy.io

    mapping = (np.arange(1, 895) * 7) % 41
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"mapClass": mapping[None, :].astype(np.float64),
                                 "className": np.array([f"c{i}" for i in range(40)], dtype=object)})
    return np.concatenate([[0], mapping])


def write_kitti_photo_like(root: str | Path, n: int = 42, hw: tuple[int, int] = (375, 1242)) -> int:
    """One full-resolution KITTI drive of photo-like PNGs (gradient + noise, ~1 MB each) for
    conversion-speed measurements (docs/real-datasets.md). Returns the mean PNG size in bytes."""
    root = Path(root)
    rng = np.random.default_rng(0)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1)
    write_kitti_calib(root / KITTI_DATE, hw=hw)
    sizes = []
    for cam in ("image_02", "image_03"):
        for f in range(n):
            img = (base + rng.integers(0, 48, size=base.shape) + f).clip(0, 255).astype(np.uint8)
            path = root / KITTI_DATE / f"{KITTI_DATE}_drive_0001_sync" / cam / "data" / f"{f:010d}.png"
            _save(path, img)
            sizes.append(path.stat().st_size)
    return int(np.mean(sizes))


def write_nyu_raw_scene(root: Path, scene: str, n: int, hw: tuple[int, int] = (480, 640), t0: float = 1294439283.0,
                        shuffle_index: bool = True) -> list[str]:
    """A raw NYU scene folder: ``r-<t>-<n>.ppm`` colour frames (R = frame index), ``d-*.pgm``
    16-bit big-endian depth frames, ``a-*.dump`` and ``INDEX.txt`` (listed out of time order,
    as a directory listing may be). Returns the colour file names in time order."""
    d = root / scene
    d.mkdir(parents=True, exist_ok=True)
    names, listing = [], []
    for i in range(n):
        t = t0 + i / 30.0
        rgb = f"r-{t:.6f}-{2381571548 + i * 33}.ppm"
        img = np.zeros(hw + (3,), np.uint8)
        img[..., 0] = i
        Image.fromarray(img).save(d / rgb)  # binary PPM (P6)
        dep = f"d-{t - 0.01:.6f}-{2381000000 + i * 33}.pgm"
        Image.fromarray(np.full(hw, 700 + i, np.uint16)).save(d / dep)  # PGM (P5), 16-bit
        acc = f"a-{t + 0.005:.6f}-{2381500000 + i}.dump"
        (d / acc).write_bytes(np.zeros(4, np.float64).tobytes())
        names.append(rgb)
        listing += [rgb, dep, acc]
    if shuffle_index:
        listing = listing[::-1]
    (d / "INDEX.txt").write_text("\n".join(listing) + "\n")
    return names
