"""KITTI raw export of the synthetic world: layout, calibration text, LiDAR scans, depth ground truth."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_shards.sources.kitti_export import MARKER, beam_rows, export_kitti_raw, main
from data_shards.sources.synthetic import SyntheticConfig, intrinsics, iter_samples

DATE = "2011_09_26"
DRIVE = f"{DATE}_drive_0001_sync"


def cfg() -> SyntheticConfig:
    return SyntheticConfig(seed=11, height=40, width=128, sequences={"train": 1, "val": 1}, frames_per_sequence=4)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("kitti")
    date_dir = export_kitti_raw(root, cfg(), split="train", date=DATE)
    return root, date_dir


def parse_calib(path) -> dict[str, np.ndarray]:
    """KITTI calibration text -> key -> floats (non-numeric lines such as calib_time skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, val = line.partition(":")
        try:
            out[key] = np.array([float(x) for x in val.split()])
        except ValueError:
            continue
    return out


def test_layout_and_images_match_the_samples(export):
    root, date_dir = export
    assert date_dir == root / DATE
    drive = date_dir / DRIVE
    for cam in ("image_02", "image_03"):
        names = sorted(p.name for p in (drive / cam / "data").iterdir())
        assert names == [f"{f:010d}.png" for f in range(4)]
        assert len((drive / cam / "timestamps.txt").read_text().splitlines()) == 4
    assert sorted(p.name for p in (drive / "velodyne_points" / "data").iterdir()) == [f"{f:010d}.bin" for f in range(4)]
    gts = sorted((drive / "proj_depth" / "groundtruth" / "image_02").iterdir())
    assert [p.name for p in gts] == [f"{f:010d}.png" for f in range(4)]
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no temporary left behind
    for s in iter_samples("train", cfg()):
        f = s["meta"]["source"]["frame"]
        left = np.asarray(Image.open(drive / "image_02" / "data" / f"{f:010d}.png"))
        right = np.asarray(Image.open(drive / "image_03" / "data" / f"{f:010d}.png"))
        prev = np.asarray(Image.open(drive / "image_02" / "data" / f"{f - 1:010d}.png"))
        assert np.array_equal(left, s["rgb"]) and np.array_equal(right, s["rgb_right"])
        assert np.array_equal(prev, s["rgb_prev"])
        with Image.open(drive / "proj_depth" / "groundtruth" / "image_02" / f"{f:010d}.png") as im:
            assert im.mode in ("I;16", "I")
            gt = np.asarray(im).astype(np.float64) / 256.0
        assert np.abs(gt - s["depth"]).max() <= 0.5 / 256 + 1e-6
        assert np.all((gt == 0) == (s["depth"] == 0))


def test_calibration_parses_back_to_k_and_baseline(export):
    _, date_dir = export
    c = parse_calib(date_dir / "calib_cam_to_cam.txt")
    for i in range(4):
        for key in ("S", "K", "D", "R", "T", "S_rect", "R_rect", "P_rect"):
            assert f"{key}_0{i}" in c, f"{key}_0{i}"
    K = intrinsics(cfg())
    P2, P3 = c["P_rect_02"].reshape(3, 4), c["P_rect_03"].reshape(3, 4)
    np.testing.assert_allclose(P2[:, :3], K, rtol=1e-6)
    np.testing.assert_allclose(P3[:, :3], K, rtol=1e-6)
    assert P2[0, 3] == 0.0
    np.testing.assert_allclose(-P3[0, 3] / P3[0, 0], 0.54, rtol=1e-6)  # P_rect_03[0, 3] = -fx * b
    np.testing.assert_allclose(c["S_rect_02"], [128, 40])
    np.testing.assert_allclose(c["T_03"], [-0.54, 0, 0])
    # The project's KITTI reader agrees.
    kitti = pytest.importorskip("data_shards.sources.kitti")
    calib = kitti.load_calib(str(date_dir), with_velo=True)
    np.testing.assert_allclose(calib.K("l"), K, rtol=1e-6)
    assert calib.baseline("l") == pytest.approx(0.54)
    assert kitti.list_drives(date_dir.parent) == [f"{DATE}/{DRIVE}"]


def test_lidar_points_project_onto_the_depth_map(export):
    _, date_dir = export
    c = parse_calib(date_dir / "calib_cam_to_cam.txt")
    v2c = parse_calib(date_dir / "calib_velo_to_cam.txt")
    Tv = np.eye(4)
    Tv[:3, :3], Tv[:3, 3] = v2c["R"].reshape(3, 3), v2c["T"]
    Rr = np.eye(4)
    Rr[:3, :3] = c["R_rect_00"].reshape(3, 3)
    P = c["P_rect_02"].reshape(3, 4) @ Rr @ Tv
    drive = date_dir / DRIVE
    for f in range(4):
        scan = np.fromfile(drive / "velodyne_points" / "data" / f"{f:010d}.bin", dtype=np.float32).reshape(-1, 4)
        with Image.open(drive / "proj_depth" / "groundtruth" / "image_02" / f"{f:010d}.png") as im:
            gt = np.asarray(im).astype(np.float64) / 256.0
        assert len(scan) > 500 and np.all(scan[:, 0] > 0)  # in front of the scanner (x forward)
        assert np.all((scan[:, 3] >= 0) & (scan[:, 3] <= 1))
        pts = np.c_[scan[:, :3].astype(np.float64), np.ones(len(scan))] @ P.T
        u, v, z = pts[:, 0] / pts[:, 2], pts[:, 1] / pts[:, 2], pts[:, 2]
        ui, vi = np.rint(u).astype(int), np.rint(v).astype(int)
        assert np.abs(u - ui).max() < 0.02 and np.abs(v - vi).max() < 0.02  # on pixel centres
        assert set(np.unique(vi)) <= set(beam_rows(intrinsics(cfg()), 40).tolist())  # along beam rows
        assert np.all(np.abs(z - gt[vi, ui]) <= 0.5 / 256 + 1e-5 * z)
        # LiDAR-like: far fewer points than pixels with depth.
        assert len(scan) < 0.8 * (gt > 0).sum()


def test_one_based_calibration_matches_devkit_style_velodyne_projection(tmp_path):
    """With one_based=True, a devkit-style reader (round(u) - 1) puts LiDAR depth on the rendered pixels."""
    kitti = pytest.importorskip("data_shards.sources.kitti")
    small = SyntheticConfig(seed=5, height=32, width=96, sequences={"train": 1}, frames_per_sequence=3)
    d = export_kitti_raw(tmp_path, small, one_based=True)
    c = parse_calib(d / "calib_cam_to_cam.txt")
    K = intrinsics(small)
    np.testing.assert_allclose(c["P_rect_02"].reshape(3, 4)[:2, 2], K[:2, 2] + 1)
    calib = kitti.load_calib(str(d), with_velo=True)
    drive = d / f"{DATE}_drive_0001_sync"
    depth = kitti.velodyne_depth(calib, drive / "velodyne_points" / "data" / "0000000001.bin", "l", (32, 96))
    with Image.open(drive / "proj_depth" / "groundtruth" / "image_02" / "0000000001.png") as im:
        gt = np.asarray(im).astype(np.float64) / 256.0
    has = depth > 0
    assert has.sum() > 300
    assert np.abs(depth[has] - gt[has]).max() <= 0.5 / 256 + 1e-3


def test_rerun_replaces_and_foreign_folders_are_kept(tmp_path):
    small = SyntheticConfig(height=16, width=48, sequences={"val": 1}, frames_per_sequence=3)
    d = export_kitti_raw(tmp_path, small, split="val", date="2012_01_02")
    assert (d / MARKER).is_file()
    (d / "stale.txt").write_text("x")
    d2 = export_kitti_raw(tmp_path, small, split="val", date="2012_01_02")
    assert d2 == d and not (d / "stale.txt").exists() and (d / "2012_01_02_drive_0001_sync").is_dir()
    (tmp_path / "2011_09_26").mkdir()
    with pytest.raises(FileExistsError, match="not a synthetic export"):
        export_kitti_raw(tmp_path, small, split="val", date="2011_09_26")
    with pytest.raises(ValueError, match="unknown split 'train'"):
        export_kitti_raw(tmp_path, small, split="train")
    with pytest.raises(ValueError, match="YYYY_MM_DD"):
        export_kitti_raw(tmp_path, small, split="val", date="2011-09-26")
    # The command line writes the same tree.
    assert main([str(tmp_path / "cli"), "--split", "val", "--sequences", "1", "--frames-per-sequence", "3",
                 "--height", "16", "--width", "48", "--date", "2012_01_02"]) == 0
    for f in ("image_02/data/0000000002.png", "velodyne_points/data/0000000002.bin"):
        a = (tmp_path / "cli" / "2012_01_02" / "2012_01_02_drive_0001_sync" / f).read_bytes()
        assert a == (d / "2012_01_02_drive_0001_sync" / f).read_bytes()
