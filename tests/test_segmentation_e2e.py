"""End to end through the real loop and engine on synthetic-world shards: a flow pre-training
exports weights, segmentation fine-tunes from them with a frozen encoder, metrics come out,
and the exported encoder is still bitwise the pre-trained one (BN statistics included)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import ModelConfig, RunConfig
from trainer.tasks import TASK_CONFIGS


def _cfg(task, root, out, **task_kw):
    c = OmegaConf.structured(RunConfig(task=TASK_CONFIGS()[task](**task_kw)))
    c.data.root, c.out_dir = str(root), str(out)
    c.train.steps, c.train.batch_size, c.train.progress, c.train.resume = 2, 2, False, "never"
    c.data.val_split = ""  # validation only at the end on the test split
    c.tracking.enabled = False
    return c


def _check_nshot(root):
    """N-shot subsets through the segmentation transform: deterministic by seed, inside the
    training split, and no image shared with the test split."""
    from data_shards.stream import ShardStream, StreamConfig
    from trainer.tasks.segmentation import SegmentationTask

    task = SegmentationTask(TASK_CONFIGS()["segmentation"](), ModelConfig())

    def images(split, **kw):
        stream = ShardStream(StreamConfig(str(root), split, shuffle=False, keys=task.required_keys,
                             transform=lambda s, g: task.eval_transform(s), **kw))
        return {s["__key__"]: s["rgb"] for s in stream}

    a, b = images("train", subset=2, subset_seed=1), images("train", subset=2, subset_seed=1)
    assert list(a) == list(b) and len(a) == 2 and all(torch.equal(a[k], b[k]) for k in a)
    subsets = {tuple(images("train", subset=2, subset_seed=s)) for s in range(6)}
    assert len(subsets) > 1 and all(set(k) <= set(images("train")) for k in subsets)
    test = list(images("test").values())
    assert not any(torch.equal(x, t) for x in a.values() for t in test)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flow_pretraining_then_frozen_segmentation(tmp_path):
    from trainer.loop import train

    root = tmp_path / "synth"
    subprocess.run([sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(root),
                    "--height", "64", "--width", "96", "--sequences", "train=1", "val=0", "test=1",
                    "--frames-per-sequence", "5", "--splits", "train", "test", "--no-progress"],
                   check=True, timeout=240, capture_output=True)
    _check_nshot(root)
    flow = train(_cfg("flow", root, tmp_path / "flow"))
    assert flow["test"]["flow_pixels"] > 0 and flow["test"]["epe"] > 0
    seg_out = tmp_path / "seg"
    seg = train(_cfg("segmentation", root, seg_out, init="flow", protocol="frozen", eval_subset=[0, 10],
                     weights=str(tmp_path / "flow" / "weights.pt")))
    test = json.loads((seg_out / "metrics.json").read_text())["test"]
    assert test == seg["test"] and 0 <= test["miou"] <= 1 and "miou_subset_per_image" in test
    pre = torch.load(tmp_path / "flow" / "weights.pt", weights_only=True)
    post = torch.load(seg_out / "weights.pt", weights_only=True)
    enc = [k for k in pre if k.startswith("encoder.")]
    assert enc and all(torch.equal(pre[k], post[k]) for k in enc)
