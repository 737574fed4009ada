"""`python -m launch demo`: builds the demo shards only when missing, then runs the demo study on them."""
from __future__ import annotations

import json

import pytest

import launch.demo as demo


def test_demo_skips_built_shards_and_runs_the_demo_study(tmp_path, monkeypatch, capsys):
    data = tmp_path / "shards"
    for split in demo.SPLITS:
        (data / split).mkdir(parents=True)
        (data / split / "manifest.json").write_text("{}")
    seen = {}

    def fake_run_study(study, verbose=False):
        seen["study"] = study
        return 0

    monkeypatch.setattr(demo, "run_study", fake_run_study)
    rc = demo.main(["--data", str(data), "--out", str(tmp_path / "out"), "study.seeds=[3,4]"])
    assert rc == 0
    study = seen["study"]
    assert study.seeds == [3, 4] and study.out_dir == str(tmp_path / "out")
    assert [o for o in study.common if o.startswith("data.root")] == [f"data.root='{data}'"]
    assert {"depth_mono", "flow", "classification", "random"} <= set(study.pretrainings)
    assert "already in" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_demo_builds_missing_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "BUILD_ARGS", [*demo.BUILD_ARGS, "--sequences", "train=1", "val=1", "test=1",
                                             "--frames-per-sequence", "3", "--workers", "1"])
    root = tmp_path / "shards"
    assert not demo.shards_ready(root)
    demo.build_shards(root, verbose=False)
    assert demo.shards_ready(root)
    manifest = json.loads((root / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0 and "rgb.png" in manifest["keys"]
    assert demo.build_shards(root, verbose=False) == 0.0  # idempotent: nothing rebuilt
