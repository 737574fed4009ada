"""A real depth pre-training (``python -m trainer task=depth`` with the default CPU loss, which is
compiled where a C++ compiler is found, and 2 loader workers) killed with SIGKILL after step 3
resumes from its step-2 checkpoint and ends bit-equal to the uninterrupted run, in fp32 and in
bf16 autocast."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_helpers import build_synthetic, child_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("syn"), "--width", "96", "--sequences", "train=2",
                           "--frames-per-sequence", "6", "--splits", "train")


def _train(out: Path, shards: Path, precision: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = child_env()
    if kill_at is not None:
        env.update(GEOPRIME_TEST_KILL_AT_STEP=str(kill_at), GEOPRIME_TEST_KILL_RANK="0")
    return subprocess.run([sys.executable, "-m", "trainer", "task=depth", "task.supervision=mono",
                           f"data.root={shards}", "data.val_split=",
                           "data.test_split=", "data.num_workers=2", "train.batch_size=2", "train.steps=5",
                           "train.ckpt_every=2", "train.progress=false", "tracking=none",
                           f"parallel.precision={precision}", f"out_dir={out}"],
                          env=env, timeout=240, capture_output=True, text=True, cwd=REPO)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_killed_depth_run_resumes_bit_exactly(tmp_path, shards, precision):
    ref = _train(tmp_path / "ref", shards, precision)
    assert ref.returncode == 0, ref.stderr[-3000:]
    first = _train(tmp_path / "run", shards, precision, kill_at=3)
    assert first.returncode != 0 and not (tmp_path / "run" / "weights.pt").exists()
    second = _train(tmp_path / "run", shards, precision)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in (tmp_path / "run" / "logs" / "rank0.log").read_text()
    a = torch.load(tmp_path / "ref" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and len(a) > 100
    for k in a:
        assert torch.equal(a[k], b[k]), k
