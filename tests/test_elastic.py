"""Fault tolerance and multi-node: a rank SIGKILLed mid-run under ``torchrun --max-restarts``
restarts the group, which resumes from the last checkpoint and ends with the uninterrupted
run's exact weights; two torchrun processes (``--nnodes=2``, c10d rendezvous on 127.0.0.1)
train like one node with two ranks. Workers: ``tests/test_loop.py`` (the tiny task).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_helpers import run_multinode, run_torchrun

WORKER = str(Path(__file__).resolve().parent / "test_loop.py")
ARGS = ["train.steps=8", "train.ckpt_every=3", "parallel.strategy=ddp"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted 2-rank DDP run."""
    out = tmp_path_factory.mktemp("ddp_ref")
    run_torchrun([WORKER, f"out_dir={out}", *ARGS], nproc=2, timeout=150)
    return _weights(out)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_rank_restarts_and_resumes_exactly(tmp_path, ddp_reference):
    proc = run_torchrun([WORKER, f"out_dir={tmp_path}", *ARGS], nproc=2, timeout=280, max_restarts=1,
                        env={"GEOPRIME_TEST_KILL_AT_STEP": "5", "GEOPRIME_TEST_KILL_RANK": "1"})
    log1 = (tmp_path / "logs" / "rank1.log").read_text()
    assert "test hook: killing rank 1 at step 5" in log1, proc.stderr[-3000:]
    assert "resumed from" in log1 and "step_00000003" in log1
    got = _weights(tmp_path)
    for k, v in ddp_reference.items():
        assert torch.equal(got[k], v), k


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_on_localhost_match_one_node(tmp_path, ddp_reference):
    run_multinode([WORKER, f"out_dir={tmp_path}", *ARGS], nnodes=2, nproc=1, timeout=240)
    assert "[rank 1/2 node 1]" in (tmp_path / "logs" / "rank1.log").read_text()
    got = _weights(tmp_path)
    for k, v in ddp_reference.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
