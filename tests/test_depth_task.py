"""Depth task: every supervision mode trains (loss decreases) with no unused parameter,
augmentation keeps the loss inputs unaugmented and the geometry consistent, config checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from trainer.config import ModelConfig
from trainer.tasks.depth import CONFIG, TASK, DepthTask, DepthTaskConfig

MODEL = ModelConfig()
H, W = 64, 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tiny convolutions gain nothing from more, and the 2-core
    test machine is shared (oversubscription made the steps 10x slower in wall time)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch():
    """Two synthetic-world samples at 64x64, as the stream collates them."""
    from data_shards.sources.synthetic import SyntheticConfig, iter_samples

    cfg = SyntheticConfig(height=H, width=W, sequences={"train": 1}, frames_per_sequence=4)
    samples = list(iter_samples("train", cfg))
    out = {}
    for k in ("rgb", "rgb_prev", "rgb_next", "rgb_right"):
        out[k] = torch.stack([torch.from_numpy(np.ascontiguousarray(s[k].transpose(2, 0, 1))) for s in samples])
    out["depth"] = torch.stack([torch.from_numpy(s["depth"])[None] for s in samples])
    out["K"] = torch.stack([torch.tensor(s["meta"]["K"], dtype=torch.float32) for s in samples])
    out["baseline"] = torch.tensor([s["meta"]["baseline_m"] for s in samples], dtype=torch.float32)
    out["__key__"] = [s["__key__"] for s in samples]
    out["__valid__"] = torch.tensor([True, True])
    return out


def _task(**kw) -> DepthTask:
    return DepthTask(DepthTaskConfig(**kw), MODEL)


@pytest.mark.parametrize("mode,pose", [("mono", "separate"), ("mono", "shared"), ("stereo", "separate"),
                                       ("mono_stereo", "shared"), ("supervised", "separate")])
def test_modes_train_without_unused_parameters(batch, mode, pose):
    torch.manual_seed(0)
    task = _task(supervision=mode, pose_encoder=pose, scales=[0, 1, 2, 3])
    model = task.build_model()
    expected = {"encoder", "depth_decoder"}
    if mode in ("mono", "mono_stereo"):
        expected |= {"pose_decoder"} | ({"pose_encoder"} if pose == "separate" else set())
    assert set(model.keys()) == expected
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss, logs = task.training_step(model, batch)
        loss.backward()
        if not losses:
            unused = [n for n, p in model.named_parameters() if p.grad is None]
            assert not unused, unused  # DDP would fail with find_unused_parameters=False
            assert all(torch.isfinite(v) and v.dim() == 0 for v in logs.values())
        losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < losses[0] and min(losses[1:]) < losses[0], losses


def test_required_keys_follow_the_mode():
    # self-supervised modes train on frames alone; every mode evaluates on rgb + depth
    assert set(_task(supervision="mono").required_keys) == {"rgb", "rgb_prev", "rgb_next", "K"}
    assert set(_task(supervision="stereo").required_keys) == {"rgb", "rgb_right", "K", "baseline"}
    assert set(_task(supervision="mono_stereo").required_keys) == {
        "rgb", "rgb_prev", "rgb_next", "rgb_right", "K", "baseline"}
    assert set(_task(supervision="supervised").required_keys) == {"rgb", "depth"}
    for mode in ("mono", "stereo", "supervised"):
        task = _task(supervision=mode)
        assert task.stream_keys(train=False) == ("rgb", "depth")
        assert task.stream_keys(train=True) == task.required_keys


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_depth_and_flow_pretrain_on_video_only_shards(tmp_path):
    """A training split with frames only (like KITTI raw without LiDAR) trains mono depth and
    flow; their evaluation splits carry the ground truth that the metrics read."""
    import json
    import subprocess
    import sys

    from dist_helpers import child_env

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "syn"
    common = [sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(data), "--height", "64",
              "--width", "64", "--sequences", "train=1", "val=1", "test=1", "--frames-per-sequence", "4",
              "--workers", "1", "--no-progress"]
    for extra in (["--splits", "train", "--without", "depth", "seg", "flow", "rgb_right"], ["--splits", "val", "test"]):
        subprocess.run(common + extra, check=True, env=child_env(), timeout=120, capture_output=True, cwd=repo)
    keys = json.loads((data / "train" / "manifest.json").read_text())["keys"]
    assert not {"depth.png", "seg.png", "flow.npz", "rgb_right.png"} & set(keys)
    for task, metric in (("depth", "abs_rel"), ("flow", "epe")):
        out = tmp_path / task
        proc = subprocess.run([sys.executable, "-m", "trainer", f"task={task}", f"data.root={data}", f"out_dir={out}",
                               "train.steps=2", "train.batch_size=1", "train.progress=false", "tracking=none"],
                              env=child_env(), timeout=240, capture_output=True, text=True, cwd=repo)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["step"] == 2 and metric in metrics["val"] and metric in metrics["test"], metrics

def test_train_transform_is_seeded_and_keeps_loss_frames_unaugmented(batch):
    task = _task(supervision="mono_stereo", flip_prob=0.0, jitter_prob=1.0)
    sample = {k: (v[0] if not isinstance(v, list) else v[0]) for k, v in batch.items()}
    a = task.train_transform(sample, torch.Generator().manual_seed(3))
    b = task.train_transform(sample, torch.Generator().manual_seed(3))
    for k in ("rgb", "rgb_prev", "rgb_next"):
        assert torch.equal(a[k], sample[k])                      # the loss's frames: untouched
        assert torch.equal(a["aug_" + k], b["aug_" + k])         # generator-only randomness
        assert not torch.equal(a["aug_" + k], sample[k])         # the networks' frames: jittered
    assert torch.equal(a["rgb_right"], sample["rgb_right"]) and "aug_rgb_right" not in a  # loss only
    flipped = _task(supervision="mono_stereo", flip_prob=1.0, jitter_prob=0.0).train_transform(
        sample, torch.Generator().manual_seed(0))
    assert torch.equal(flipped["rgb"], sample["rgb"].flip(-1)) and torch.equal(flipped["aug_rgb"], flipped["rgb"])
    assert float(flipped["baseline"]) == -float(sample["baseline"])
    assert float(flipped["K"][0, 2]) == pytest.approx(W - 1 - float(sample["K"][0, 2]))


def test_flipped_stereo_sample_has_the_same_loss_with_known_depth(batch):
    """With the true depth, the stereo photometric error is the same on a flipped sample
    (baseline and K handled), and much lower than with a wrong depth."""
    from trainer.geometry import stereo_pose, warp_frame
    from trainer.losses.photometric import reprojection_loss

    def loss(s, scale=1.0):
        depth = torch.where(s["depth"] > 0, s["depth"], torch.full_like(s["depth"], 1e3))[None] * scale
        img = lambda k: s[k][None].float() / 255
        warped, _ = warp_frame(img("rgb_right"), depth, stereo_pose(s["baseline"][None]), s["K"][None])
        return float(reprojection_loss(img("rgb"), [warped], None))

    sample = {k: v[0] for k, v in batch.items() if not isinstance(v, list)}
    sample["__key__"] = "x"
    flipped = _task(supervision="stereo", flip_prob=1.0, jitter_prob=0.0).train_transform(
        sample, torch.Generator().manual_seed(0))
    assert loss(flipped) == pytest.approx(loss(sample), rel=0.05)
    assert loss(sample, 0.5) > 1.5 * loss(sample)


def test_eval_metric_scaling_and_visualize(batch, tmp_path: Path):
    task = _task(supervision="mono")
    model = task.build_model().eval()
    with torch.no_grad():
        depth = task.eval_step(model, batch)
    assert depth.shape == (2, 1, H, W) and (depth >= 0.1).all() and (depth <= 100).all()
    metric = task.new_metric()
    assert metric.scaling == "median" and _task(supervision="stereo").new_metric().scaling == "fixed"
    metric.update(batch, depth)
    result = metric.compute(metric.state())
    assert result["images"] == 2 and 0 < result["abs_rel"]
    files = task.visualize(model, batch, depth, tmp_path / "vis")
    assert [f.name for f in files] == [f"depth_{k}.png" for k in batch["__key__"]]
    assert all(f.stat().st_size > 0 for f in files) and not list((tmp_path / "vis").glob("*.tmp"))


def test_init_depth_sets_the_untrained_prediction(batch):
    task = _task(supervision="stereo", min_depth=0.5, init_depth=10.0)
    with torch.no_grad():
        depth = task.eval_step(task.build_model().eval(), batch)
    assert 7.0 < float(depth.median()) < 14.0
    with pytest.raises(ValueError, match="init_depth"):
        _task(init_depth=500.0).build_model()


def test_bad_config_values_are_named():
    for kw, name in [({"supervision": "video"}, "supervision"), ({"pose_encoder": "x"}, "pose_encoder"),
                     ({"scales": [1, 2]}, "scales"), ({"min_depth": 5.0, "max_depth": 1.0}, "min_depth"),
                     ({"supervised_loss": "l2"}, "supervised_loss"), ({"eval_scaling": "mean"}, "eval_scaling"),
                     ({"photometric_impl": "cuda"}, "photometric_impl"), ({"flip_prob": 2.0}, "flip_prob")]:
        with pytest.raises(ValueError, match=name):
            _task(**kw)


def test_yaml_matches_the_schema():
    """configs/task/depth.yaml sets exactly the schema's fields, with values the schema accepts."""
    text = (Path(__file__).resolve().parents[1] / "configs" / "task" / "depth.yaml").read_text()
    values = yaml.safe_load(text)
    assert values.pop("defaults") == ["depth_schema", "_self_"]
    schema = OmegaConf.structured(CONFIG)
    assert set(values) == set(schema.keys())
    merged = OmegaConf.to_object(OmegaConf.merge(schema, values))
    assert merged == DepthTaskConfig() and TASK is DepthTask


def test_frames_converted_in_one_stack_and_the_pose_pairs_are_its_views():
    """The temporal triplet converted in one pass: each frame equals its own conversion bit for bit, and
    the pose pairs are views equal to ``cat`` of their two frames (no copy); other frames convert alone."""
    from trainer.tasks.depth import _float, _float_frames

    g = torch.Generator().manual_seed(0)
    frames = {k: torch.randint(0, 256, (2, 3, 6, 10), dtype=torch.uint8, generator=g)
              for k in ("rgb_prev", "rgb", "rgb_next", "rgb_right")}
    out = _float_frames(frames)
    for k, v in frames.items():
        assert torch.equal(out[k], _float(v))
    assert torch.equal(out["pair_prev"], torch.cat([out["rgb_prev"], out["rgb"]], 1))
    assert torch.equal(out["pair_next"], torch.cat([out["rgb"], out["rgb_next"]], 1))
    assert out["pair_prev"].data_ptr() == out["rgb_prev"].data_ptr()  # a view of the one stack
    assert out["pair_next"].data_ptr() == out["rgb"].data_ptr()
    assert "pair_prev" not in _float_frames({"rgb": frames["rgb"], "rgb_right": frames["rgb_right"]})
