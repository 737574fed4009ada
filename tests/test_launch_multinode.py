"""Two "nodes" on one machine: two `python -m launch run --nodes 2` processes meet at a c10d
rendezvous on 127.0.0.1 and train a real (short) job together, as users do on a cluster."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_helpers import build_synthetic, child_env, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_node_launch_trains_one_job(tmp_path):
    data = tmp_path / "syn"
    build_synthetic(data, "--width", "64", "--sequences", "train=1", "val=1", "test=1", "--frames-per-sequence", "6")
    out = tmp_path / "run"
    port = free_port()
    overrides = ["task=classification", "parallel=ddp", f"data.root={data}", f"out_dir={out}", "train.steps=3",
                 "train.batch_size=1", "train.progress=false", "tracking.enabled=false"]
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "launch", "run", *overrides, "--nodes", "2", "--gpus-per-node", "1",
               "--rdzv", f"127.0.0.1:{port}", "--max-restarts", "0", "--rdzv-conf", f"is_host={int(node == 0)}"]
        procs.append(subprocess.Popen(cmd, env=child_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-5000:]
        assert "--nnodes=2 --rdzv_backend=c10d" in text  # the printed command
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["strategy"] == "ddp"
    assert {"rank0.log", "rank1.log"} <= {f.name for f in (out / "logs").iterdir()}
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in weights)
