"""Everything a run needs is checked before step 1: real CLI on KITTI-raw-layout shards without LiDAR."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import child_env
from fixtures_real import KITTI_DATE, write_kitti_raw

REPO = Path(__file__).resolve().parents[1]
D1, D2 = f"{KITTI_DATE}_drive_0001_sync", f"{KITTI_DATE}_drive_0002_sync"


@pytest.fixture(scope="module")
def kitti_no_lidar(tmp_path_factory) -> Path:
    """KITTI raw converted as docs/real-datasets.md allows for self-supervised training: video +
    stereo, no depth, a train and a val split (triplets)."""
    tmp = tmp_path_factory.mktemp("kitti")
    write_kitti_raw(tmp / "raw", {D1: 6, D2: 5}, hw=(64, 96))
    (tmp / "train.txt").write_text("".join(f"{KITTI_DATE}/{D1} {i} l\n" for i in range(1, 5)))
    (tmp / "val.txt").write_text("".join(f"{KITTI_DATE}/{D2} {i} l\n" for i in range(1, 4)))
    subprocess.run([sys.executable, "-m", "data_shards", "build", "kitti", "--root", str(tmp / "raw"),
                    "--out", str(tmp / "shards"), "--split", f"train={tmp / 'train.txt'}",
                    "--split", f"val={tmp / 'val.txt'}", "--no-progress"],
                   check=True, env=child_env(), cwd=REPO, timeout=120, capture_output=True)
    return tmp / "shards"


def _trainer(out: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "data=kitti", f"out_dir={out}", "tracking=none",
                           "train.steps=2", "train.batch_size=2", "train.progress=false", *overrides],
                          env=child_env(), cwd=REPO, timeout=timeout, capture_output=True, text=True)


@pytest.mark.timeout(300)
def test_depth_on_kitti_without_lidar_skips_evaluation_it_cannot_do(kitti_no_lidar, tmp_path):
    out = tmp_path / "run"
    res = _trainer(out, "task=depth", f"data.root={kitti_no_lidar}", "data.test_split=val")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["val"] == {} and metrics["test"] == {}
    assert set(metrics["skipped"]) == {"val", "test"} and "['depth']" in metrics["skipped"]["val"]
    log = (out / "logs" / "rank0.log").read_text()
    assert log.count("data.val_split='val' has no ['depth']") == 1, log


@pytest.mark.timeout(300)
def test_what_the_run_cannot_do_fails_before_step_one(kitti_no_lidar, tmp_path):
    # segmentation needs 'seg' in training: refused before any step, naming split and key, no traceback
    res = _trainer(tmp_path / "seg", "task=segmentation", f"data.root={kitti_no_lidar}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "data.train_split='train'" in res.stderr and "['seg']" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "seg" / "checkpoints").exists()
    assert "PreflightError" in (tmp_path / "seg" / "logs" / "rank0.log").read_text()  # the log holds it
    # a typo added with '+' (Hydra accepts new keys that way) is refused, naming the key
    res = _trainer(tmp_path / "typo", "task=depth", f"data.root={kitti_no_lidar}", "+train.stepz=5")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == "[trainer] error: unknown key train.stepz; did you mean train.steps?", res.stderr


@pytest.mark.timeout(300)
def test_launch_side_check_names_init_files_and_batch_sizes(kitti_no_lidar, tmp_path):
    """What `python -m launch run` checks before starting torchrun (in-process: no subprocess)."""
    from trainer.preflight import check_job
    from trainer.errors import ConfigError

    base = ["data=kitti", f"data.root={kitti_no_lidar}", "data.test_split=val", "tracking=none", "train.batch_size=2",
            "parallel=ddp"]
    with pytest.raises(ConfigError, match="nope.pt"):  # a missing initialisation file
        check_job([*base, f"out_dir={tmp_path / 'init'}", "task=segmentation", "task.init=depth",
                   f"task.weights={tmp_path}/nope.pt"], world_size=1)
    with pytest.raises(ConfigError, match=r"4 samples give each of 2 ranks 2 .* fewer than train.batch_size=3"):
        check_job([*base, f"out_dir={tmp_path / 'big'}", "task=depth", "train.batch_size=3"], world_size=2)
    check_job([*base, f"out_dir={tmp_path / 'ok'}", "task=depth"], world_size=2)  # 2 per rank: fine
