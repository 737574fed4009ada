"""NYU-Depth V2 labeled converter on an HDF5 .mat fixture with the real file's names and axis order."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from data_shards.sources import nyuv2
from data_shards.sources.labels import NYU13_CLASSES, NYU40_CLASSES, NYU40_TO_13, load_nyu40_mapping, \
    nyu_raw_to_trainids
from data_shards.sources.resize import SourceError
from data_shards.stream import ShardStream, StreamConfig
from fixtures_real import write_nyu_labeled, write_nyu_mapping40, write_nyu_raw_scene, write_nyu_splits

TRAIN, TEST = [1, 3, 4], [2, 6]  # 1-based, as in splits.mat; frame 5 in neither


def _args(root: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    nyuv2.add_arguments(parser)
    return parser.parse_args(["--root", str(root), "--out", str(root / "out"), "--no-progress", *extra])


@pytest.fixture()
def nyu(tmp_path):
    root = tmp_path / "nyu"
    arrays = write_nyu_labeled(root / "nyu_depth_v2_labeled.mat", n=6, hw=(4, 5))
    write_nyu_splits(root / "splits.mat", TRAIN, TEST)
    mapping = write_nyu_mapping40(root / "classMapping40.mat")
    return root, arrays, mapping


def test_40_to_13_table_matches_class_names():
    by_name = {n: NYU13_CLASSES[NYU40_TO_13[i + 1] - 1] for i, n in enumerate(NYU40_CLASSES)}
    assert by_name["wall"] == "wall" and by_name["floor"] == "floor" and by_name["bed"] == "bed"
    assert by_name["ceiling"] == "ceiling" and by_name["books"] == "books" and by_name["television"] == "tv"
    assert by_name["window"] == "window" and by_name["sofa"] == "sofa" and by_name["picture"] == "picture"
    assert by_name["chair"] == "chair" and by_name["table"] == "table" and by_name["desk"] == "table"
    assert by_name["cabinet"] == "furniture" and by_name["lamp"] == "objects"
    assert NYU40_TO_13[0] == 0 and len(NYU40_TO_13) == 41


def test_axis_order_depth_labels_and_split(nyu):
    root, arrays, mapping = nyu
    opts, splits = nyuv2.plan(_args(root))
    assert splits == {"train": [0, 2, 3], "test": [1, 5]}
    s = nyuv2.make_sample(opts, 3)
    assert s["__key__"] == "nyu_0004"
    np.testing.assert_array_equal(s["rgb"], arrays["images"][3])  # (H, W, 3), not transposed
    assert s["rgb"][0, 0, 0] == 3 and s["rgb"].shape == (4, 5, 3)
    np.testing.assert_array_equal(s["depth"], arrays["depths"][3])
    raw = arrays["labels"][3].astype(np.int64)
    expected = np.where(mapping[raw] > 0, mapping[raw] - 1, 255)
    np.testing.assert_array_equal(s["seg"], expected)
    assert s["seg"][0, 1] == 255  # raw 0 = unlabeled
    assert s["meta"]["source"] == {"dataset": "nyuv2", "path": "nyu_depth_v2_labeled.mat", "index": 4,
                                   "scene": "bedroom_0002"}
    np.testing.assert_allclose(s["meta"]["K"], nyuv2.NYU_K)
    opts13, _ = nyuv2.plan(_args(root, "--classes", "13", "--depth", "rawDepths"))
    s13 = nyuv2.make_sample(opts13, 3)
    nyu13 = NYU40_TO_13[mapping[raw]]
    np.testing.assert_array_equal(s13["seg"], np.where(nyu13 > 0, nyu13 - 1, 255))
    assert set(np.unique(s13["seg"]).tolist()) <= set(range(13)) | {255}
    np.testing.assert_array_equal(s13["depth"][-1], 0.0)  # rawDepths' missing row stays invalid
    crop, _ = nyuv2.plan(_args(root, "--crop", "1", "2", "3", "3"))
    sc = nyuv2.make_sample(crop, 3)
    np.testing.assert_array_equal(sc["rgb"], arrays["images"][3][1:4, 2:5])
    assert sc["meta"]["K"][0][2] == pytest.approx(nyuv2.NYU_K[0][2] - 2)
    assert sc["meta"]["K"][1][2] == pytest.approx(nyuv2.NYU_K[1][2] - 1)


def test_mapping_and_split_errors(nyu, tmp_path):
    root, _, _ = nyu
    with pytest.raises(SourceError, match=r"nope.mat: missing; expected the 894->40 class mapping"):
        nyuv2.plan(_args(root, "--mapping40", str(tmp_path / "nope.mat")))
    short = tmp_path / "map.txt"
    short.write_text(" ".join(["1"] * 893))
    with pytest.raises(ValueError, match=r"map.txt: expected 894 entries .* got 893"):
        load_nyu40_mapping(short)
    short.write_text(" ".join(["41"] * 894))
    with pytest.raises(ValueError, match=r"map.txt: entries must be integers in 0..40"):
        load_nyu40_mapping(short)
    write_nyu_splits(root / "bad_splits.mat", [1, 2], [2, 3])
    with pytest.raises(SourceError, match=r"bad_splits.mat: trainNdxs and testNdxs overlap"):
        nyuv2.plan(_args(root, "--splits-file", str(root / "bad_splits.mat")))
    write_nyu_splits(root / "bad_splits.mat", [0, 2], [3])
    with pytest.raises(SourceError, match=r"trainNdxs must hold 1-based frame numbers in 1..6"):
        nyuv2.plan(_args(root, "--splits-file", str(root / "bad_splits.mat")))
    with pytest.raises(ValueError, match=r"raw NYU labels must lie in 0..894"):
        nyu_raw_to_trainids(np.array([[895]]), np.zeros(895, np.int64), 40)
    import h5py
    with h5py.File(tmp_path / "wrong.mat", "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4, 5, 3), np.uint8))
        f.create_dataset("depths", data=np.zeros((2, 5, 4), np.float32))
        f.create_dataset("labels", data=np.zeros((2, 5, 4), np.uint16))
    with pytest.raises(SourceError, match=r"wrong.mat: 'images' has shape \(2, 4, 5, 3\), expected \(N, 3, W, H\)"):
        nyuv2.plan(_args(root, "--mat", str(tmp_path / "wrong.mat")))
    (tmp_path / "text.mat").write_text("not hdf5")
    with pytest.raises(SourceError, match=r"text.mat: not an HDF5 / MATLAB v7.3 file"):
        nyuv2.plan(_args(root, "--mat", str(tmp_path / "text.mat")))


def test_build_parallel_and_read_back(nyu):
    root, arrays, mapping = nyu
    args = _args(root, "--workers", "2", "--max-samples-per-shard", "2", "--classes", "13")
    manifests = nyuv2.build(args)
    assert manifests["train"].num_samples == 3 and len(manifests["train"].shards) == 2
    assert manifests["test"].num_samples == 2
    assert manifests["train"].source["label_set"] == "nyu13"
    assert set(manifests["train"].keys) == {"rgb.png", "depth.png", "seg.png", "json"}
    got = {s["__key__"]: s for s in ShardStream(StreamConfig(str(root / "out"), "test", shuffle=False))}
    assert sorted(got) == ["nyu_0002", "nyu_0006"]
    s = got["nyu_0006"]
    np.testing.assert_array_equal(s["rgb"].permute(1, 2, 0).numpy(), arrays["images"][5])
    np.testing.assert_allclose(s["depth"][0].numpy(), arrays["depths"][5], atol=1 / 512 + 1e-6)
    nyu13 = NYU40_TO_13[mapping[arrays["labels"][5].astype(np.int64)]]
    np.testing.assert_array_equal(s["seg"].numpy(), np.where(nyu13 > 0, nyu13 - 1, 255))
    # Re-running with the same settings keeps the finished build untouched.
    before = (root / "out" / "train" / "manifest.json").stat().st_mtime_ns
    nyuv2.build(args)
    assert (root / "out" / "train" / "manifest.json").stat().st_mtime_ns == before


def test_undistortion_samples_the_distorted_position():
    h, w = 24, 32
    K = np.array([[26.0, 0, 15.7], [0, 26.0, 12.2], [0, 0, 1]])
    dist = (0.2, -0.5, 7e-4, 1e-3, 0.5)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w)[None, :] * 4  # a linear ramp: bilinear sampling returns 4 * x exactly
    img[..., 1] = np.arange(h)[:, None] * 4
    out = nyuv2.undistort(img, K, dist)
    # Hand-computed Brown-Conrady distortion for pixel (u=5, v=20).
    x, y = (5 - 15.7) / 26.0, (20 - 12.2) / 26.0
    r2 = x * x + y * y
    radial = 1 + 0.2 * r2 - 0.5 * r2 ** 2 + 0.5 * r2 ** 3
    xd = (x * radial + 2 * 7e-4 * x * y + 1e-3 * (r2 + 2 * x * x)) * 26.0 + 15.7
    yd = (y * radial + 7e-4 * (r2 + 2 * y * y) + 2 * 1e-3 * x * y) * 26.0 + 12.2
    assert abs(int(out[20, 5, 0]) - 4 * xd) <= 0.5 + 1e-9 and abs(int(out[20, 5, 1]) - 4 * yd) <= 0.5 + 1e-9
    np.testing.assert_array_equal(nyuv2.undistort(img, K, (0, 0, 0, 0, 0)), img)  # no distortion: identity


def test_raw_video_triplets_and_test_scene_exclusion(nyu, tmp_path):
    root, _, _ = nyu
    raw = tmp_path / "raw"
    names = write_nyu_raw_scene(raw / "bedrooms_part1", "bedroom_0001", n=7, hw=(6, 8))
    write_nyu_raw_scene(raw / "bedrooms_part1", "bedroom_0002", n=5, hw=(6, 8))
    write_nyu_raw_scene(raw, "kitchen_0003", n=3, hw=(6, 8))
    frames = nyuv2.plan_raw(raw, step=2, stride=1)
    assert [(Path(f.scene).name, f.index) for f in frames] == [
        ("bedroom_0001", 2), ("bedroom_0001", 3), ("bedroom_0001", 4), ("bedroom_0002", 2)]
    assert frames[1].files == (names[1], names[3], names[5])
    s = nyuv2.make_raw_sample(nyuv2.RawOptions(str(raw), undistort=False), frames[1])
    assert s["__key__"] == "bedroom_0001_f000003"
    assert (s["rgb_prev"][0, 0, 0], s["rgb"][0, 0, 0], s["rgb_next"][0, 0, 0]) == (1, 3, 5)
    assert s["meta"]["source"]["path"] == f"bedrooms_part1/bedroom_0001/{names[3]}"
    with pytest.raises(SourceError, match=r"but the calibration is for 640x480"):
        nyuv2.make_raw_sample(nyuv2.RawOptions(str(raw)), frames[1])
    # The fixture .mat puts frames 2 and 6 (test) in scenes bedroom_0001 and bedroom_0003.
    excluded = nyuv2.official_test_scenes(str(root / "nyu_depth_v2_labeled.mat"), root / "splits.mat")
    assert excluded == {"bedroom_0001", "bedroom_0003"}
    parser = argparse.ArgumentParser()
    nyuv2.add_arguments(parser)
    args = parser.parse_args(["--root", str(raw), "--out", str(tmp_path / "o"), "--mode", "raw", "--frame-step", "1", "--target-stride", "1",
                              "--no-undistort", "--no-progress", "--exclude-test-scenes", "--mat",
                              str(root / "nyu_depth_v2_labeled.mat"), "--splits-file", str(root / "splits.mat")])
    m = nyuv2.build(args)["train"]
    assert m.num_samples == 4  # bedroom_0002 frames 1..3, kitchen_0003 frame 1
    assert m.source["excluded_scenes"] == ["bedroom_0001", "bedroom_0003"]
    (raw / "kitchen_0003" / "INDEX.txt").write_text("r-12.5-1.ppm\nbogus.txt\n")
    with pytest.raises(SourceError, match=r"kitchen_0003/INDEX.txt:1: .*missing|kitchen_0003/r-12.5-1.ppm: missing"):
        nyuv2.plan_raw(raw, 1, 1)
