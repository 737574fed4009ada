"""The initial depth follows the supervision mode: Monodepth2's init for scale-free mono video,
a start at 10 m for the metric stereo modes, whose 0.54 m baseline makes Monodepth2's initial
0.2 m depth ask for disparities wider than the image (a flat loss: training collapsed)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import ModelConfig
from trainer.tasks.depth import MODE_INIT_DEPTH, DepthTask, DepthTaskConfig, with_mode_defaults

MODEL = ModelConfig()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stereo_batch():
    """Two synthetic-world samples at 64x192 (metric 0.54 m baseline, fx ~111 px)."""
    from data_shards.sources.synthetic import SyntheticConfig, iter_samples

    cfg = SyntheticConfig(height=64, width=192, sequences={"train": 1}, frames_per_sequence=4)
    samples = list(iter_samples("train", cfg))
    out = {k: torch.stack([torch.from_numpy(np.ascontiguousarray(s[k].transpose(2, 0, 1))) for s in samples])
           for k in ("rgb", "rgb_right")}
    out["K"] = torch.stack([torch.tensor(s["meta"]["K"], dtype=torch.float32) for s in samples])
    out["baseline"] = torch.tensor([s["meta"]["baseline_m"] for s in samples], dtype=torch.float32)
    assert torch.allclose(out["baseline"], torch.tensor(0.54))
    return out


def test_defaults_follow_the_mode_and_explicit_values_win():
    assert MODE_INIT_DEPTH == {"mono": None, "supervised": None, "stereo": 10.0, "mono_stereo": 10.0}
    for mode, init in MODE_INIT_DEPTH.items():
        cfg = DepthTask(DepthTaskConfig(supervision=mode), MODEL).cfg
        assert (cfg.min_depth, cfg.init_depth) == (0.1, init)
    cfg = DepthTask(DepthTaskConfig(supervision="stereo", min_depth=0.2, init_depth=5.0), MODEL).cfg
    assert (cfg.min_depth, cfg.init_depth) == (0.2, 5.0)
    # Hydra's DictConfig is resolved the same way, without touching the run's config
    node = OmegaConf.structured(DepthTaskConfig(supervision="mono_stereo"))
    resolved = with_mode_defaults(node)
    assert isinstance(resolved, DepthTaskConfig) and resolved.init_depth == 10.0 and node.init_depth is None
    with pytest.raises(ValueError, match="supervision"):
        with_mode_defaults(DepthTaskConfig(supervision="sonar"))


@torch.no_grad()
def test_untrained_stereo_net_predicts_about_ten_metres_and_mono_keeps_monodepth2(stereo_batch):
    torch.manual_seed(0)
    stereo = DepthTask(DepthTaskConfig(supervision="stereo"), MODEL)
    depth = stereo.eval_step(stereo.build_model().eval(), stereo_batch)
    assert 7.0 < float(depth.median()) < 14.0
    mono = DepthTask(DepthTaskConfig(supervision="mono"), MODEL)
    heads = mono.build_model()["depth_decoder"].heads
    assert all(float(h.bias.abs().max()) < 0.1 for h in heads.values())  # PyTorch's default init untouched


def _initial_gradient(batch, **kw) -> float:
    torch.manual_seed(0)
    task = DepthTask(DepthTaskConfig(supervision="stereo", **kw), MODEL)
    model = task.build_model()
    loss, _ = task.training_step(model, batch)
    loss.backward()
    return float(torch.sqrt(sum((p.grad ** 2).sum() for p in model["depth_decoder"].parameters())))


def test_stereo_defaults_give_the_loss_a_gradient_monodepth2s_init_does_not(stereo_batch):
    """Monodepth2's init here (0.2 m, ~300 px disparity on a 192 px wide image) leaves the depth
    decoder a gradient ~1e-4: the loss is flat and the network never leaves it (abs_rel 0.99
    after 300 steps, docs/depth.md). The stereo defaults start where the warp sees the image."""
    flat = _initial_gradient(stereo_batch, min_depth=0.1, init_depth=0.1998)  # = sigmoid 0.5
    ours = _initial_gradient(stereo_batch)
    assert flat < 1e-3 and ours > 100 * flat, (flat, ours)
