"""`python -m launch demo`: builds the demo shards only when missing, then runs the demo study on them."""
from __future__ import annotations

import json

import pytest

import launch.demo as demo


def test_demo_skips_built_shards_and_runs_the_demo_study(tmp_path, monkeypatch, capsys):
    data, other = tmp_path / "shards", tmp_path / "other"
    _fake_shards(data, demo.SPLITS, demo.DEMO_WORLD)
    _fake_shards(other, demo.OTHER_SPLITS, demo.OTHER_WORLD)
    seen = {}

    def fake_run_study(study, verbose=False):
        seen["study"] = study
        return 0

    monkeypatch.setattr(demo, "run_study", fake_run_study)
    rc = demo.main(["--data", str(data), "--data-other", str(other), "--out", str(tmp_path / "out"),
                    "study.seeds=[3,4,5,6]"])
    assert rc == 0
    study = seen["study"]
    assert study.seeds == [3, 4, 5, 6] and study.out_dir == str(tmp_path / "out")
    assert [o for o in study.common if o.startswith("data.root")] == [f"data.root='{data}'"]
    assert {"depth_stereo_full", "flow", "classification_other_domain", "random"} <= set(study.pretrainings)
    # the honest semantic baseline reads the other world; everything else the demo's own
    assert f"data.root='{other}'" in study.pretrainings["classification_other_domain"].overrides
    assert not any(o.startswith("data.root") for o in study.pretrainings["flow"].overrides)
    assert capsys.readouterr().out.count("already in") == 2


def _fake_shards(root, splits, world):
    """Manifests (only) of shards rendered with the ``world`` config."""
    for split in splits:
        (root / split).mkdir(parents=True)
        (root / split / "manifest.json").write_text(json.dumps({"source": {"config": world}}))


def test_shards_of_another_world_are_not_reused(tmp_path):
    old = {**demo.DEMO_WORLD, "sequences": {"train": 22, "val": 3, "test": 5}}  # an older demo's 5 test sequences
    _fake_shards(tmp_path / "old", demo.SPLITS, old)
    with pytest.raises(RuntimeError, match=r"built with sequences=\{'test': 5\}.*needs sequences=\{'test': 15\}"):
        demo.build_shards(tmp_path / "old", False, demo.BUILD_ARGS, demo.SPLITS, demo.DEMO_WORLD)
    _fake_shards(tmp_path / "wrong", demo.OTHER_SPLITS, {**demo.OTHER_WORLD, "palette": "default"})
    with pytest.raises(RuntimeError, match="palette='default', the demo needs palette='gbr'"):
        demo.build_shards(tmp_path / "wrong", False, demo.OTHER_BUILD_ARGS, demo.OTHER_SPLITS, demo.OTHER_WORLD)


@pytest.mark.timeout(300)
def test_demo_builds_missing_shards(tmp_path, monkeypatch):
    args = [*demo.OTHER_BUILD_ARGS, "--sequences", "train=1", "val=1", "--frames-per-sequence", "3", "--workers", "1"]
    root = tmp_path / "shards"
    assert not demo.shards_ready(root, demo.OTHER_SPLITS)
    demo.build_shards(root, False, args, demo.OTHER_SPLITS, demo.OTHER_WORLD)
    assert demo.shards_ready(root, demo.OTHER_SPLITS) and not (root / "test").exists()
    manifest = json.loads((root / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0 and "rgb.png" in manifest["keys"]
    assert manifest["source"]["config"]["palette"] == "gbr" and manifest["source"]["config"]["seed"] == 1
    # idempotent: nothing rebuilt, and the world config matches what the demo asks for
    assert demo.build_shards(root, False, args, demo.OTHER_SPLITS, demo.OTHER_WORLD) == 0.0
