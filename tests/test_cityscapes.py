"""Cityscapes converter and prediction writer on a fixture in the release's exact layout."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards.schema import decode_sample, encode_sample
from data_shards.sources import cityscapes
from data_shards.sources.labels import LABELID_TO_TRAINID, labelid_to_trainid, trainid_to_labelid
from data_shards.sources.resize import SourceError
from fixtures_real import CITYSCAPES_CAMERA, cityscapes_image, write_cityscapes

FRAMES = {"train": [("aachen", 0, 19), ("bochum", 3, 19)], "val": [("frankfurt", 0, 294)]}


def _args(root: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cityscapes.add_arguments(parser)
    return parser.parse_args(["--root", str(root), "--out", str(root / "out"), *extra])


@pytest.fixture()
def cs(tmp_path):
    root = tmp_path / "cityscapes"
    arrays = write_cityscapes(root, FRAMES)
    return root, arrays


def test_official_label_table():
    # Spot checks against cityscapesScripts helpers/labels.py.
    assert LABELID_TO_TRAINID[7] == 0 and LABELID_TO_TRAINID[8] == 1 and LABELID_TO_TRAINID[11] == 2
    assert LABELID_TO_TRAINID[23] == 10 and LABELID_TO_TRAINID[26] == 13 and LABELID_TO_TRAINID[33] == 18
    for ignored in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255):
        assert LABELID_TO_TRAINID[ignored] == 255
    assert sum(LABELID_TO_TRAINID != 255) == 19
    train = np.arange(19, dtype=np.uint8)
    np.testing.assert_array_equal(labelid_to_trainid(trainid_to_labelid(train)), train)
    assert trainid_to_labelid(np.array([255], np.uint8))[0] == 0
    with pytest.raises(ValueError, match=r"train ids must be 0..18 or 255, got \[19\]"):
        trainid_to_labelid(np.array([3, 19]))


def test_annotated_sample_all_parts(cs):
    root, arrays = cs
    opts, splits = cityscapes.plan(_args(root))
    assert opts.parts == ("video", "right", "depth", "seg")
    assert [f.stem for f in splits["train"]] == ["aachen_000000_000019", "bochum_000003_000019"]
    assert [f.stem for f in splits["val"]] == ["frankfurt_000000_000294"]
    f = splits["train"][1]
    s = cityscapes.make_sample(opts, f)
    hw = (4, 6)
    np.testing.assert_array_equal(s["rgb"], cityscapes_image(2, 3, 19, False, hw))
    np.testing.assert_array_equal(s["rgb_prev"], cityscapes_image(2, 3, 18, False, hw))
    np.testing.assert_array_equal(s["rgb_next"], cityscapes_image(2, 3, 20, False, hw))
    np.testing.assert_array_equal(s["rgb_right"], cityscapes_image(2, 3, 19, True, hw))
    np.testing.assert_array_equal(s["seg"], LABELID_TO_TRAINID[arrays["bochum_000003_000019"]])
    cam = CITYSCAPES_CAMERA
    assert s["meta"]["K"] == [[cam["intrinsic"]["fx"], 0, cam["intrinsic"]["u0"]],
                              [0, cam["intrinsic"]["fy"], cam["intrinsic"]["v0"]], [0, 0, 1]]
    assert s["meta"]["baseline_m"] == 0.209313
    # depth = fx * B / ((p - 1) / 256); p = 0 and p = 1 are invalid.
    p = arrays["bochum_000003_000019_disparity"].astype(np.float64)
    fxB = cam["intrinsic"]["fx"] * cam["extrinsic"]["baseline"]
    expected = np.where(p > 1, fxB / np.maximum((p - 1) / 256, 1e-12), 0.0)
    np.testing.assert_allclose(s["depth"], expected, rtol=1e-6)
    assert s["depth"][0, 0] == 0 and s["depth"][0, 1] == 0
    assert s["depth"][0, 2] == pytest.approx(2262.52 * 0.209313 / 32.0, rel=1e-6)
    assert s["meta"]["source"] == {"dataset": "cityscapes", "split": "train", "city": "bochum", "sequence": 3,
                                   "frame": 19, "path": "leftImg8bit/train/bochum/bochum_000003_000019_leftImg8bit.png"}
    dec = decode_sample(encode_sample(s), where="mem")
    # 16-bit depth PNG keeps 1/256 m resolution.
    valid = expected * 256 < 65535
    np.testing.assert_allclose(dec["depth"][0].numpy()[valid], expected[valid], atol=1 / 512 + 1e-6)


def test_parts_and_sequence_mode(cs, tmp_path):
    root, _ = cs
    opts, _ = cityscapes.plan(_args(root, "--with", "seg"))
    s = cityscapes.make_sample(opts, cityscapes.CsFrame("val", "frankfurt", 0, 294))
    assert set(s) == {"__key__", "rgb", "seg", "meta"} and "K" not in s["meta"]
    opts, splits = cityscapes.plan(_args(root, "--mode", "sequence", "--splits", "train"))
    # Each fixture snippet has frames 18, 19, 20: only 19 has both neighbours.
    assert [f.stem for f in splits["train"]] == ["aachen_000000_000019", "bochum_000003_000019"]
    assert opts.parts == ("video",)
    s = cityscapes.make_sample(opts, splits["train"][0])
    assert set(s) == {"__key__", "rgb", "rgb_prev", "rgb_next", "meta"}
    np.testing.assert_array_equal(s["rgb_prev"], cityscapes_image(1, 0, 18, False, (4, 6)))
    assert s["meta"]["source"]["path"].startswith("leftImg8bit_sequence/train/aachen/")
    with pytest.raises(SourceError, match=r"--with seg: unknown or unsupported in sequence mode"):
        cityscapes.plan(_args(root, "--mode", "sequence", "--with", "seg"))


def test_errors_name_the_file(cs):
    root, _ = cs
    opts, splits = cityscapes.plan(_args(root))
    f = splits["train"][0]
    (root / "camera" / "train" / "aachen" / "aachen_000000_000019_camera.json").write_text(json.dumps({"intrinsic": {}}))
    with pytest.raises(SourceError, match=r"aachen_000000_000019_camera.json: expected extrinsic.baseline"):
        cityscapes.make_sample(opts, f)
    (root / "disparity" / "train" / "bochum" / "bochum_000003_000019_disparity.png").unlink()
    with pytest.raises(SourceError, match=r"bochum_000003_000019_disparity.png: missing; expected a 16-bit"):
        cityscapes.make_sample(opts, splits["train"][1])
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(root / "disparity" / "train" / "bochum" /
                                                     "bochum_000003_000019_disparity.png")
    with pytest.raises(SourceError, match=r"disparity.png: expected a 16-bit .* got PIL mode L"):
        cityscapes.make_sample(opts, splits["train"][1])
    with pytest.raises(SourceError, match=r"leftImg8bit/test: missing"):
        cityscapes.plan(_args(root, "--splits", "test"))
    with pytest.raises(SourceError, match="not a Cityscapes file name"):
        cityscapes.parse_name("aachen_19_leftImg8bit.png")


def test_write_predictions_official_names(tmp_path):
    pred = np.array([[0, 1, 2], [13, 18, 255]], np.uint8)
    out = cityscapes.write_cityscapes_predictions(pred, "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
                                                  tmp_path / "results")
    assert out == tmp_path / "results" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png"
    back = np.asarray(Image.open(out))
    np.testing.assert_array_equal(back, [[7, 8, 11], [26, 33, 0]])
    big = cityscapes.write_cityscapes_predictions(pred, "frankfurt_000000_000294", tmp_path / "r2", size=(4, 6))
    np.testing.assert_array_equal(np.asarray(Image.open(big)), np.repeat(np.repeat(back, 2, 0), 2, 1))
    assert not list((tmp_path / "results").rglob(".tmp-*"))


def test_build_two_workers_and_read_back(cs):
    root, arrays = cs
    from data_shards.stream import ShardStream, StreamConfig
    ms = cityscapes.build(_args(root, "--workers", "2", "--max-samples-per-shard", "1", "--no-progress",
                                "--crop", "0", "0", "4", "4", "--resize", "2", "2"))
    assert ms["train"].num_samples == 2 and len(ms["train"].shards) == 2 and ms["val"].num_samples == 1
    assert set(ms["train"].keys) == {"rgb.png", "rgb_prev.png", "rgb_next.png", "rgb_right.png", "depth.png",
                                     "seg.png", "json"}
    assert ms["train"].source["parts"] == ["video", "right", "depth", "seg"]
    s = next(iter(ShardStream(StreamConfig(str(root / "out"), "val", shuffle=False))))
    assert s["__key__"] == "frankfurt_000000_000294" and tuple(s["rgb"].shape) == (3, 2, 2)
    K = s["K"].numpy()
    cam = CITYSCAPES_CAMERA["intrinsic"]
    assert K[0, 0] == pytest.approx(cam["fx"] / 2, rel=1e-6) and K[1, 1] == pytest.approx(cam["fy"] / 2, rel=1e-6)
    assert K[0, 2] == pytest.approx((cam["u0"] + 0.5) / 2 - 0.5, rel=1e-6)
    seg = LABELID_TO_TRAINID[arrays["frankfurt_000000_000294"][:4, :4]]
    np.testing.assert_array_equal(s["seg"].numpy(), seg[[1, 3]][:, [1, 3]])  # nearest: floor((i + 0.5) * 2)


@pytest.mark.timeout(180)
def test_cli_build_then_verify(cs):
    import subprocess
    import sys
    root, _ = cs
    repo = Path(__file__).resolve().parents[1]
    out = root / "cli_out"
    run = subprocess.run([sys.executable, "-m", "data_shards", "build", "cityscapes", "--root", str(root),
                          "--out", str(out), "--splits", "val", "--with", "seg,depth", "--no-progress"],
                         cwd=repo, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr
    assert "val: 1 samples in 1 shards, keys depth.png, json, rgb.png, seg.png" in run.stdout
    ver = subprocess.run([sys.executable, "-m", "data_shards", "verify", str(out / "val")], cwd=repo,
                         capture_output=True, text=True, timeout=150)
    assert ver.returncode == 0 and "OK" in ver.stdout, ver.stdout + ver.stderr

