"""`python -m data_shards build | inspect | verify` on the synthetic world and on damaged shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from data_shards.__main__ import SOURCES, main

TINY = ["--height", "16", "--width", "40", "--sequences", "train=2", "val=1", "--frames-per-sequence", "5",
        "--splits", "train", "val", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "synthetic")
    assert main(["build", "synthetic", "--out", out] + TINY) == 0
    return out


def test_build_synthetic_writes_manifests_and_is_idempotent(built, capsys):
    m = json.loads(open(os.path.join(built, "train", "manifest.json")).read())
    assert m["num_samples"] == 6 and len(m["shards"]) == 2  # one shard per sequence, 3 samples each
    assert m["source"]["dataset"] == "synthetic" and m["source"]["resolution"] == [16, 40]
    assert {"rgb.png", "rgb_prev.png", "rgb_next.png", "rgb_right.png", "depth.png", "seg.png", "flow.npz",
            "json"} == set(m["keys"])
    before = {f: os.stat(os.path.join(built, "train", f)).st_mtime_ns for f in os.listdir(os.path.join(built, "train"))}
    assert main(["build", "synthetic", "--out", built] + TINY) == 0
    after = {f: os.stat(os.path.join(built, "train", f)).st_mtime_ns for f in os.listdir(os.path.join(built, "train"))}
    assert before == after
    assert "train: 6 samples in 2 shards" in capsys.readouterr().out


def test_inspect_prints_summary_and_writes_sheet(built, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["inspect", os.path.join(built, "train"), "--sheet", str(sheet), "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "6 samples in 2 shards" in out and "depth.png" in out
    with Image.open(sheet) as im:
        assert im.size == (3 * 40 + 2 * 4, 3 * (16 + 4)) and im.mode == "RGB"


def test_verify_ok_then_names_corrupt_member(built, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(built, root)
    assert main(["verify", str(root / "train")]) == 0
    shard = root / "train" / "train-000001.tar"
    with tarfile.open(shard) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".depth.png"))
    with open(shard, "r+b") as f:  # damage the PNG data in place (the tar structure stays valid)
        f.seek(member.offset_data + 40)
        f.write(b"\0" * 16)
    capsys.readouterr()
    assert main(["verify", str(root / "train")]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar: checksum mismatch" in err
    assert f"member {member.name}" in err
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    assert main(["verify", str(root / "train")]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar" in err and ("truncated" in err or "unreadable" in err)


def test_build_dispatch_errors_are_clear(monkeypatch, capsys):
    assert main(["build", "imagenet"]) == 2
    assert "unknown source 'imagenet'" in capsys.readouterr().err
    monkeypatch.setitem(SOURCES, "nosuch", "a source whose module is missing")
    assert main(["build", "nosuch", "--root", "x"]) == 2
    assert "module data_shards.sources.nosuch does not exist" in capsys.readouterr().err
    assert main(["inspect", "/nonexistent/train"]) == 1
    assert capsys.readouterr().err.strip() == "error: no such folder /nonexistent/train"


def test_cli_subprocess_exit_code(built):
    proc = subprocess.run([sys.executable, "-m", "data_shards", "verify", os.path.join(built, "val")],
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    assert "1 shards, 3 samples decoded, OK" in proc.stdout


def test_verify_and_inspect_a_dataset_root(built, tmp_path, capsys):
    """`verify data/synthetic` checks every split of the root (it used to say "build the shards first")."""
    assert main(["verify", built]) == 0
    out = capsys.readouterr().out
    assert f"{built}/train: 2 shards, 6 samples decoded, OK" in out and f"{built}/val: 1 shards" in out
    assert out.rstrip().endswith(f"{built}: 2 splits, OK")
    assert main(["inspect", built, "--sheet", str(tmp_path / "s.png"), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "split train: 6 samples" in out and "split val: 3 samples" in out
    assert (tmp_path / "s_train.png").is_file() and (tmp_path / "s_val.png").is_file()


def test_a_bad_path_says_what_is_there_and_never_to_build_what_exists(built, tmp_path, capsys):
    assert main(["verify", os.path.join(built, "tset")]) == 1
    assert capsys.readouterr().err.strip() == f"error: no split 'tset' in {built} (its splits: train, val)"
    assert main(["verify", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.strip() == f"error: no such folder {tmp_path / 'none'}"


def test_a_bad_split_in_a_root_fails_verify_of_the_root(built, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(built, root)
    shard = root / "val" / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-2048])
    assert main(["verify", str(root)]) == 1
    captured = capsys.readouterr()
    assert f"{root}/train: 2 shards, 6 samples decoded, OK" in captured.out and "val-000000.tar" in captured.err
    assert captured.out.rstrip().endswith(f"{root}: 2 splits, 1 with problems")


@pytest.mark.parametrize("source,files", [
    ("cityscapes", ["leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip", "camera_trainvaltest.zip",
                    "leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png"]),
    ("kitti", ["<date>_drive_<NNNN>_sync.zip", "<date>_calib.zip", "kitti_archives_to_download.txt",
               "<root>/<date>/<date>_drive_<NNNN>_sync/image_02/data/0000000123.png"]),
    ("kitti_semantics", ["data_semantics.zip", "<root>/training/semantic/000000_10.png"]),
    ("nyuv2", ["nyu_depth_v2_labeled.mat", "splits.mat", "classMapping40.mat", "unless --no-labels"]),
])
def test_real_source_help_says_what_to_download_and_the_layout(source, files, capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", source, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in files:
        assert f in out, f
    assert "no labels are written" not in out  # NYU's build stops without the mapping (unless --no-labels)


def test_verify_notes_rgb_pngs_of_the_older_writer(built, tmp_path, monkeypatch, capsys):
    """Shards whose RGB PNGs carry Pillow's adaptive row filters (the writer before the Up-filtered one)
    verify clean but with a note naming the shard and how to get the faster PNGs; today's build has none."""
    import io

    import numpy as np

    from data_shards import schema

    def pillow_png(img: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 40, 3), dtype=np.uint8)
    assert schema.rgb_png_row_filters(schema.encode_rgb(img)) == {2}
    assert schema.rgb_png_row_filters(pillow_png(img)) - {2}
    assert schema.rgb_png_row_filters(b"not a png") == set()
    capsys.readouterr()
    assert main(["verify", os.path.join(built, "train")]) == 0
    assert "adaptive row filters" not in capsys.readouterr().out
    monkeypatch.setattr(schema, "_rgb_png_bytes", pillow_png)
    old = str(tmp_path / "old")
    assert main(["build", "synthetic", "--out", old] + TINY) == 0
    capsys.readouterr()
    assert main(["verify", os.path.join(old, "train")]) == 0
    out = capsys.readouterr()
    note = out.out + out.err
    assert "adaptive row filters" in note and "train-000000.tar: sample" in note and "build it again" in note
