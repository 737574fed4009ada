"""KITTI raw and KITTI semantics converters on fixtures written in the releases' exact layout."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from data_shards.schema import decode_sample, encode_sample
from data_shards.sources import kitti, kitti_semantics
from data_shards.sources.labels import labelid_to_trainid
from data_shards.sources.resize import Geometry, SourceError
from fixtures_real import KITTI_DATE, KITTI_P2, KITTI_P3, kitti_pixel, kitti_velo_point, write_kitti_raw, \
    write_kitti_semantics

D1, D2 = f"{KITTI_DATE}_drive_0001_sync", f"{KITTI_DATE}_drive_0002_sync"


def _args(parse, root: Path, out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parse(parser)
    return parser.parse_args(["--root", str(root), "--out", str(out), *extra])


@pytest.fixture()
def raw(tmp_path):
    root = tmp_path / "kitti_raw"
    index = write_kitti_raw(root, {D1: 4, D2: 3})
    return root, index


def test_calibration_gives_intrinsics_and_signed_baseline(raw):
    root, _ = raw
    calib = kitti.load_calib(str(root / KITTI_DATE))
    np.testing.assert_allclose(calib.K("l"), KITTI_P2[:, :3])
    np.testing.assert_allclose(calib.K("r"), KITTI_P3[:, :3])
    expected = (4.485728e+01 + 3.395242e+02) / 7.215377e+02  # 0.5327 m, the real KITTI stereo rig
    assert calib.baseline("l") == pytest.approx(expected, rel=1e-12)
    assert calib.baseline("r") == pytest.approx(-expected, rel=1e-12)
    assert 0.53 < expected < 0.54


def test_triplets_skip_drive_boundaries_and_neighbours_are_right(raw):
    root, index = raw
    opts, splits, skipped = kitti.plan(_args(kitti.add_arguments, root, root / "out"))
    frames = splits["train"]
    # Drive 1 has frames 0..3 -> targets 1, 2; drive 2 has 0..2 -> target 1 only.
    assert [(Path(f.folder).name, f.frame) for f in frames] == [(D1, 1), (D1, 2), (D2, 1)]
    assert skipped["train"] == {"static": 0, "no_neighbours": 4, "no_depth": 0}
    s = kitti.make_sample(opts, frames[1])
    assert s["__key__"] == f"{D1}_0000000002_l"
    hw = (6, 10)
    np.testing.assert_array_equal(s["rgb"], kitti_pixel(index[D1], 2, "l", hw))
    np.testing.assert_array_equal(s["rgb_prev"], kitti_pixel(index[D1], 1, "l", hw))
    np.testing.assert_array_equal(s["rgb_next"], kitti_pixel(index[D1], 3, "l", hw))
    np.testing.assert_array_equal(s["rgb_right"], kitti_pixel(index[D1], 2, "r", hw))
    assert s["meta"]["source"] == {"dataset": "kitti", "drive": f"{KITTI_DATE}/{D1}", "frame": 2, "side": "l",
                                   "path": f"{KITTI_DATE}/{D1}/image_02/data/0000000002.png"}
    # Through the schema encoder and decoder: K and baseline arrive as tensors.
    dec = decode_sample(encode_sample(s))
    np.testing.assert_allclose(dec["K"].numpy(), KITTI_P2[:, :3], rtol=1e-6)
    assert float(dec["baseline"]) == pytest.approx(0.5327, abs=1e-4)
    assert tuple(dec["rgb_prev"].shape) == (3, 6, 10)


def test_split_file_static_frames_and_right_side(raw, tmp_path):
    root, index = raw
    split = tmp_path / "train_files.txt"
    split.write_text(f"{KITTI_DATE}/{D1} 1 l\n{KITTI_DATE}/{D1} 2 r\n{KITTI_DATE}/{D2} 0 l\n{KITTI_DATE}/{D2} 1 l\n")
    static = tmp_path / "static_frames.txt"
    static.write_text(f"{KITTI_DATE} {D2} 0000000001\n")
    opts, splits, skipped = kitti.plan(_args(kitti.add_arguments, root, tmp_path / "o",
                                             "--split", f"train={split}", "--static-frames", str(static)))
    assert splits["train"] == [kitti.KittiFrame(f"{KITTI_DATE}/{D1}", 1, "l"), kitti.KittiFrame(f"{KITTI_DATE}/{D1}", 2, "r")]
    assert skipped["train"] == {"static": 1, "no_neighbours": 1, "no_depth": 0}
    s = kitti.make_sample(opts, splits["train"][1])
    np.testing.assert_array_equal(s["rgb"], kitti_pixel(index[D1], 2, "r", (6, 10)))
    np.testing.assert_array_equal(s["rgb_right"], kitti_pixel(index[D1], 2, "l", (6, 10)))
    np.testing.assert_array_equal(s["rgb_prev"], kitti_pixel(index[D1], 1, "r", (6, 10)))
    assert s["meta"]["baseline_m"] < 0
    np.testing.assert_allclose(s["meta"]["K"], KITTI_P3[:, :3])
    with pytest.raises(SourceError, match=r"lacks frame t-1 or t\+1"):
        kitti.plan(_args(kitti.add_arguments, root, tmp_path / "o", "--split", f"train={split}", "--strict"))


def test_bad_split_line_and_missing_files_name_the_path(raw, tmp_path):
    root, _ = raw
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{KITTI_DATE}/{D1} 1 l\n{KITTI_DATE}/{D1} one l\n")
    with pytest.raises(SourceError, match=rf"bad.txt:2: expected .*got '{KITTI_DATE}/{D1} one l'"):
        kitti.read_split_file(bad)
    missing = tmp_path / "m.txt"
    missing.write_text(f"{KITTI_DATE}/{KITTI_DATE}_drive_0099_sync 5 l\n")
    with pytest.raises(SourceError, match="drive_0099_sync: missing"):
        kitti.plan(_args(kitti.add_arguments, root, tmp_path / "o", "--split", f"x={missing}"))
    (root / KITTI_DATE / "calib_cam_to_cam.txt").write_text("calib_time: never\nP_rect_02: 1 2 3\n")
    kitti.load_calib.cache_clear()
    opts = kitti.KittiOptions(root=str(root))
    with pytest.raises(SourceError, match=r"calib_cam_to_cam.txt: entry 'P_rect_02' has 3 numbers, expected 12"):
        kitti.make_sample(opts, kitti.KittiFrame(f"{KITTI_DATE}/{D1}", 1, "l"))
    kitti.load_calib.cache_clear()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no <date>/<date>_drive_XXXX_sync folders"):
        kitti.list_drives(tmp_path / "empty")
    with pytest.raises(SourceError, match="expected the KITTI raw root"):
        kitti.list_drives(tmp_path / "nowhere")


def test_velodyne_depth_projection_as_kitti_does(tmp_path):
    root = tmp_path / "k"
    P = KITTI_P2
    # KITTI pixel (u, v) 1-based -> stored at (v - 1, u - 1); nearest wins on a shared pixel.
    scan = np.stack([
        kitti_velo_point(P, 4.0, 3.0, 12.5),
        kitti_velo_point(P, 4.2, 2.9, 20.0),   # same pixel after rounding, farther -> loses
        kitti_velo_point(P, 1.0, 1.0, 7.25),   # top-left pixel
        kitti_velo_point(P, 10.0, 6.0, 30.0),  # bottom-right pixel
        kitti_velo_point(P, 11.0, 3.0, 9.0),   # right of the image -> dropped
        np.array([-5.0, 0.0, 0.0, 1.0], np.float32),  # behind the scanner -> dropped
    ])
    write_kitti_raw(root, {D1: 3}, velodyne={(D1, 1): scan})
    kitti.load_calib.cache_clear()
    opts = kitti.KittiOptions(root=str(root), depth="velodyne")
    s = kitti.make_sample(opts, kitti.KittiFrame(f"{KITTI_DATE}/{D1}", 1, "l"))
    expected = np.zeros((6, 10), np.float32)
    expected[2, 3], expected[0, 0], expected[5, 9] = 12.5, 7.25, 30.0
    np.testing.assert_allclose(s["depth"], expected, rtol=1e-5)
    (root / KITTI_DATE / D1 / "velodyne_points" / "data" / "0000000001.bin").write_bytes(b"\0" * 10)
    with pytest.raises(SourceError, match=r"0000000001.bin: .*expected a multiple of 4"):
        kitti.make_sample(opts, kitti.KittiFrame(f"{KITTI_DATE}/{D1}", 1, "l"))


def test_groundtruth_depth_and_resize_scale_K(tmp_path):
    root = tmp_path / "k"
    gt = np.zeros((6, 10), np.float32)
    gt[1, 2], gt[4, 7] = 5.5, 80.25
    write_kitti_raw(root, {D1: 3}, groundtruth={(D1, 1): gt})
    kitti.load_calib.cache_clear()
    f = kitti.KittiFrame(f"{KITTI_DATE}/{D1}", 1, "l")
    s = kitti.make_sample(kitti.KittiOptions(root=str(root), depth="groundtruth"), f)
    np.testing.assert_array_equal(s["depth"], gt)
    half = kitti.make_sample(kitti.KittiOptions(root=str(root), depth="groundtruth", geometry=Geometry(size=(3, 5))), f)
    assert half["rgb"].shape == (3, 5, 3) and half["rgb_next"].shape == (3, 5, 3)
    exp_depth = np.zeros((3, 5), np.float32)
    exp_depth[0, 1], exp_depth[2, 3] = 5.5, 80.25  # sparse points survive downsampling
    np.testing.assert_array_equal(half["depth"], exp_depth)
    K = np.array(half["meta"]["K"])
    assert K[0, 0] == pytest.approx(KITTI_P2[0, 0] / 2) and K[1, 1] == pytest.approx(KITTI_P2[1, 1] / 2)
    assert K[0, 2] == pytest.approx((KITTI_P2[0, 2] + 0.5) / 2 - 0.5)
    assert half["meta"]["source"]["geometry"] == {"crop_tlhw": None, "resize_hw": [3, 5]}
    _, splits, skipped = kitti.plan(_args(kitti.add_arguments, root, tmp_path / "o", "--frames", "single",
                                          "--depth", "groundtruth"))
    assert [f.frame for f in splits["train"]] == [1] and skipped["train"]["no_depth"] == 2
    with pytest.raises(SourceError, match=r"proj_depth/groundtruth/image_02/0000000000.png: missing"):
        kitti.plan(_args(kitti.add_arguments, root, tmp_path / "o", "--frames", "single", "--depth", "groundtruth",
                         "--strict"))
    with pytest.raises(SourceError, match=r"proj_depth/groundtruth/image_02/0000000002.png: missing"):
        kitti.make_sample(kitti.KittiOptions(root=str(root), depth="groundtruth", triplet=False),
                          kitti.KittiFrame(f.folder, 2, "l"))


# --------------------------------------------------------------------------- KITTI semantics


def test_kitti_semantics_nshot_first_and_seeded(tmp_path):
    root = tmp_path / "data_semantics"
    write_kitti_semantics(root, n=10)
    a = _args(kitti_semantics.add_arguments, root, tmp_path / "o", "--shots", "3")
    splits = kitti_semantics.plan(a)
    assert [i.stem for i in splits["train"]] == ["000000_10", "000001_10", "000002_10"]
    assert [i.stem for i in splits["test"]] == [f"{i:06d}_10" for i in range(3, 10)]
    seeded = kitti_semantics.plan(_args(kitti_semantics.add_arguments, root, tmp_path / "o", "--shots", "3",
                                        "--shot-seed", "5"))
    again = kitti_semantics.plan(_args(kitti_semantics.add_arguments, root, tmp_path / "o", "--shots", "3",
                                       "--shot-seed", "5"))
    assert seeded == again
    assert sorted(i.stem for i in seeded["train"] + seeded["test"]) == [f"{i:06d}_10" for i in range(10)]
    assert not set(seeded["train"]) & set(seeded["test"]) and len(seeded["train"]) == 3
    other = kitti_semantics.plan(_args(kitti_semantics.add_arguments, root, tmp_path / "o", "--shots", "3",
                                       "--shot-seed", "6"))
    assert other["train"] != seeded["train"]
    s = kitti_semantics.make_sample(kitti_semantics.SemOptions(str(root)), splits["test"][0])
    from PIL import Image
    label_ids = np.asarray(Image.open(root / "training" / "semantic" / "000003_10.png"))
    np.testing.assert_array_equal(s["seg"], labelid_to_trainid(label_ids))
    assert s["rgb"][0, 0, 0] == 3 and s["__key__"] == "000003_10"
    assert s["meta"]["classes"] == sorted(set(np.unique(s["seg"]).tolist()) - {255})
    assert s["meta"]["source"] == {"dataset": "kitti_semantics", "path": "training/image_2/000003_10.png",
                                   "frame": "000003_10"}
    with pytest.raises(SourceError, match="--shots 11: only 10 images"):
        kitti_semantics.plan(_args(kitti_semantics.add_arguments, root, tmp_path / "o", "--shots", "11"))
    (root / "training" / "semantic" / "000004_10.png").unlink()
    with pytest.raises(SourceError, match=r"semantic/000004_10.png: missing"):
        kitti_semantics.plan(a)


def test_build_stops_on_a_bad_file_then_resumes(raw, tmp_path):
    root, index = raw
    out = tmp_path / "shards"
    bad = root / KITTI_DATE / D2 / "image_02" / "data" / "0000000001.png"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:40])  # truncated PNG
    args = _args(kitti.add_arguments, root, out, "--max-samples-per-shard", "1", "--no-progress")
    with pytest.raises(SourceError, match=r"drive_0002_sync/image_02/data/0000000001.png: cannot read"):
        kitti.build(args)
    split_dir = out / "train"
    assert not (split_dir / "manifest.json").exists()
    assert sorted(p.name for p in split_dir.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not list(split_dir.glob(".*.tmp-*"))
    first = [(split_dir / n).stat().st_mtime_ns for n in ("train-000000.tar", "train-000001.tar")]
    bad.write_bytes(good_bytes)
    m = kitti.build(args)["train"]
    assert [(split_dir / n).stat().st_mtime_ns for n in ("train-000000.tar", "train-000001.tar")] == first
    assert m.num_samples == 3 and [s.name for s in m.shards] == [f"train-00000{i}.tar" for i in range(3)]
    assert set(m.keys) == {"rgb.png", "rgb_prev.png", "rgb_next.png", "rgb_right.png", "json"}
    assert m.source["dataset"] == "kitti" and m.source["skipped"] == {"train": {"static": 0, "no_neighbours": 4, "no_depth": 0}}
    from data_shards.stream import ShardStream, StreamConfig
    got = {s["__key__"]: s for s in ShardStream(StreamConfig(str(out), "train", shuffle=False))}
    s = got[f"{D2}_0000000001_l"]
    np.testing.assert_array_equal(s["rgb_next"].permute(1, 2, 0).numpy(), kitti_pixel(index[D2], 2, "l", (6, 10)))
    assert s["meta"]["source"]["drive"] == f"{KITTI_DATE}/{D2}"
    assert float(s["baseline"]) == pytest.approx(0.5327, abs=1e-4)


def test_kitti_semantics_build(tmp_path):
    root = tmp_path / "data_semantics"
    write_kitti_semantics(root, n=6)
    ms = kitti_semantics.build(_args(kitti_semantics.add_arguments, root, tmp_path / "o", "--shots", "2",
                                     "--no-progress", "--resize", "3", "4"))
    assert ms["train"].num_samples == 2 and ms["test"].num_samples == 4
    assert ms["train"].source["geometry"] == {"crop_tlhw": None, "resize_hw": [3, 4]}
    from data_shards.stream import ShardStream, StreamConfig
    got = [s["__key__"] for s in ShardStream(StreamConfig(str(tmp_path / "o"), "train", shuffle=False))]
    assert got == ["000000_10", "000001_10"]


def test_real_data_configs_validate_against_dataconfig():
    import os
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from trainer.config import DataConfig, register_configs
    register_configs()
    conf = os.path.join(os.path.dirname(__file__), "..", "configs")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base=None):
        for name in ("kitti", "kitti_semantics", "cityscapes", "nyuv2"):
            data = OmegaConf.to_object(compose(overrides=[f"+data={name}"]).data)
            assert isinstance(data, DataConfig) and data.name == name and data.root == f"data/{name}"


def test_synthetic_world_export_round_trip(tmp_path):
    """The world written in the KITTI raw layout converts back to the world's K, baseline, frames, depth."""
    from data_shards.sources.kitti_export import export_kitti_raw
    from data_shards.sources.synthetic import SyntheticConfig, intrinsics, iter_sequence

    cfg = SyntheticConfig(seed=3, height=24, width=64, sequences={"train": 1}, frames_per_sequence=4)
    export_kitti_raw(tmp_path / "raw", cfg, split="train", date=KITTI_DATE)
    world = list(iter_sequence(cfg, "train", 0))  # frames 1, 2 with t-1, t+1, right view, depth
    kitti.load_calib.cache_clear()
    opts, splits, skipped = kitti.plan(_args(kitti.add_arguments, tmp_path / "raw", tmp_path / "o",
                                             "--depth", "groundtruth"))
    assert [f.frame for f in splits["train"]] == [1, 2]
    for f, w in zip(splits["train"], world):
        s = kitti.make_sample(opts, f)
        for key in ("rgb", "rgb_prev", "rgb_next", "rgb_right"):
            np.testing.assert_array_equal(s[key], w[key], err_msg=key)
        np.testing.assert_allclose(s["meta"]["K"], intrinsics(cfg), rtol=1e-6)
        assert s["meta"]["baseline_m"] == pytest.approx(cfg.baseline_m, rel=1e-6)
        enc = w["depth"] * 256 < 65535
        np.testing.assert_allclose(s["depth"][enc], np.where(w["depth"] > 0, w["depth"], 0)[enc], atol=1 / 512 + 1e-5)
    # Velodyne: the exporter's 0-based calibration -> every scanned pixel gets the world's depth.
    velo_opts = kitti.KittiOptions(root=str(tmp_path / "raw"), depth="velodyne", velo_pixel_offset=0)
    s = kitti.make_sample(velo_opts, splits["train"][0])
    hit = s["depth"] > 0
    assert hit.sum() > 64
    np.testing.assert_allclose(s["depth"][hit], world[0]["depth"][hit], rtol=1e-4)
    shifted = kitti.make_sample(kitti.KittiOptions(root=str(tmp_path / "raw"), depth="velodyne"), splits["train"][0])
    np.testing.assert_array_equal(shifted["depth"][:-1, :-1], s["depth"][1:, 1:])  # KITTI's 1-based offset


def test_geometry_crop_resize_rules():
    geo = Geometry(crop=(1, 2, 4, 6), size=(8, 12))  # crop 4x6 then enlarge x2
    K = np.array([[100.0, 0, 50], [0, 90, 40], [0, 0, 1]])
    K2 = geo.intrinsics(K, (10, 20))
    np.testing.assert_allclose(K2, [[200, 0, (48 + 0.5) * 2 - 0.5], [0, 180, (39 + 0.5) * 2 - 0.5], [0, 0, 1]])
    depth = np.zeros((10, 20), np.float32)
    depth[1, 2], depth[2, 3] = 4.0, 7.0  # inside the crop at (0, 0) and (1, 1)
    up = geo.depth(depth)
    assert up.shape == (8, 12)
    np.testing.assert_array_equal(up[0:2, 0:2], 4.0)  # enlarging: nearest, no blending with 7 or 0
    np.testing.assert_array_equal(up[2:4, 2:4], 7.0)
    assert up[0:2, 2:4].max() == 0.0
    down = Geometry(size=(2, 2)).depth(np.array([[1, 0, 5, 6], [2, 0, 0, 0]], np.float32))
    np.testing.assert_array_equal(down, [[1, 5], [2, 0]])  # nearest valid depth per block; empty block invalid
    seg = np.array([[1, 2], [3, 255]], np.uint8)
    np.testing.assert_array_equal(Geometry(size=(4, 4)).labels(seg), np.repeat(np.repeat(seg, 2, 0), 2, 1))
    with pytest.raises(SourceError, match=r"where.png: crop \(top=1, left=2, h=4, w=6\) does not fit in an image of 4x4"):
        geo.rgb(np.zeros((4, 4, 3), np.uint8), "where.png")
    parser = argparse.ArgumentParser()
    kitti.add_arguments(parser)
    from data_shards.sources.resize import geometry_from_args
    with pytest.raises(SourceError, match=r"--resize 0 10: H and W must be > 0"):
        geometry_from_args(parser.parse_args(["--root", "r", "--out", "o", "--resize", "0", "10"]))
