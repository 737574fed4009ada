"""Small frames (issue 32, item 2): every size the docs allow trains depth, or preflight refuses it.

docs/data.md builds a 32x96 synthetic world; the depth task failed there at step 1 (reflection
padding of the 1x3 stride-32 map). The network now sees frames padded to a multiple of 32 (at
least 64), each scale cropped back; the one real limit left, 2 px at the coarsest loss scale for the
smoothness term (9 px for scales 0..3), is a one-line preflight error naming that size. Training
batches of mixed frame sizes are refused there too, naming two sizes.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import ModelConfig, RunConfig
from trainer.models.depth import disparities
from trainer.preflight import PreflightError, preflight
from trainer.tasks import build_task
from trainer.tasks.depth import DepthTask, DepthTaskConfig
from trainer.tasks.segmentation import SegmentationConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _task(**kw) -> DepthTask:
    return DepthTask(DepthTaskConfig(photometric_impl="handwritten", **kw), ModelConfig())


def _batch(h, w, n=2):
    g = torch.Generator().manual_seed(0)
    b = {k: torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
         for k in ("rgb", "rgb_prev", "rgb_next", "rgb_right")}
    b["K"] = torch.tensor([[0.58 * w, 0, w / 2], [0, 1.92 * h, h / 2], [0, 0, 1.0]]).expand(n, 3, 3)
    b["baseline"] = torch.full((n,), 0.54)
    return b


@pytest.mark.parametrize("mode,pose,hw", [("mono", "separate", (32, 96)), ("mono", "shared", (9, 30)),
                                          ("stereo", "separate", (16, 48))])
def test_depth_trains_on_small_frames(mode, pose, hw):
    task = _task(supervision=mode, pose_encoder=pose)
    torch.manual_seed(0)
    model = task.build_model()
    loss, logs = task.training_step(model, _batch(*hw))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_frames_that_need_no_padding_run_exactly_as_before():
    task = _task(supervision="stereo")
    model = task.build_model().eval()
    x = torch.rand(2, 3, 64, 96)
    feats, disps = disparities(model, x)
    direct = model["depth_decoder"](model["encoder"](x))
    assert all(torch.equal(disps[s], direct[s]) for s in direct)
    _, small = disparities(model, torch.rand(1, 3, 20, 44))  # padded to 64x64
    assert [tuple(small[s].shape[-2:]) for s in sorted(small)] == [(20, 44), (10, 22), (5, 11), (3, 6)]


def _synthetic(root, h, w):
    subprocess.run([sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(root), "--height",
                    str(h), "--width", str(w), "--sequences", "train=1", "val=1", "test=1",
                    "--frames-per-sequence", "4", "--workers", "1", "--no-progress"],
                   check=True, timeout=120, capture_output=True)
    return root


def _cfg(root, out, task):
    cfg = OmegaConf.structured(RunConfig(task=task))
    cfg.data.root, cfg.out_dir = str(root), str(out)
    cfg.train.steps, cfg.train.batch_size, cfg.train.progress, cfg.train.resume = 1, 2, False, "never"
    cfg.tracking.enabled = False
    return cfg


def test_the_docs_32x96_world_trains_depth_end_to_end(tmp_path):
    from trainer.loop import train

    task = DepthTaskConfig(photometric_impl="handwritten")
    result = train(_cfg(_synthetic(tmp_path / "w", 32, 96), tmp_path / "run", task))
    assert result["train"]["train/loss"] > 0 and result["test"]["images"] == 2  # 4 frames: 2 with both neighbours


def test_preflight_names_the_smallest_size_depth_trains_on(tmp_path):
    root = _synthetic(tmp_path / "w", 8, 24)  # the synthetic builder's smallest (>= 8)
    cfg = _cfg(root, tmp_path / "run", DepthTaskConfig())
    with pytest.raises(PreflightError, match=r"data.train_split='train' .*: frames of 8x24 \(sample \S+\) are "
                                             r"below the smallest size task=depth trains on, 9x9 \(the edge"):
        preflight(cfg, build_task(cfg))
    # supervised depth has no smoothness term: it trains at any size
    cfg = _cfg(root, tmp_path / "run", DepthTaskConfig(supervision="supervised"))
    preflight(cfg, build_task(cfg))


def test_preflight_refuses_a_training_split_of_mixed_sizes(tmp_path):
    from frame_sizes import EIGEN_SIZES, write_frames

    root = write_frames(tmp_path / "d", "train", [(40, 60)] * 3 + [(48, 60)])
    write_frames(root, "test", [(40, 60)])
    cfg = _cfg(root, tmp_path / "run", DepthTaskConfig(supervision="supervised"))
    cfg.data.val_split = ""
    with pytest.raises(PreflightError, match=r"frames of different sizes \(40x60 in sample \S+, 48x60 in sample "
                                             r"\S+\) cannot share a training batch: convert the split with --resize"):
        preflight(cfg, build_task(cfg))
    # a segmentation run cropping to a fixed size can train on them; mixed test sizes are fine
    write_frames(root, "test2", EIGEN_SIZES[:2], start=50)
    cfg = _cfg(root, tmp_path / "run", SegmentationConfig(num_classes=5, crop=[32, 48]))
    cfg.data.val_split, cfg.data.test_split = "", "test2"
    preflight(cfg, build_task(cfg))


def test_preflight_refuses_labels_of_another_size_than_their_image(tmp_path):
    from data_shards.writer import write_split
    from frame_sizes import frame_sample, write_frames

    root = write_frames(tmp_path / "d", "train", [(40, 60)] * 2)
    bad = frame_sample(9, (40, 60))
    bad["seg"] = bad["seg"][:32]
    write_split([bad], str(root), "test", source={"dataset": "test"}, progress=False)
    cfg = _cfg(root, tmp_path / "run", SegmentationConfig(num_classes=5))
    cfg.data.val_split = ""
    with pytest.raises(PreflightError, match=r"data.test_split='test' .*: sample \S+ has rgb 40x60, seg 32x60: "
                                             r"task=segmentation needs them the same size"):
        preflight(cfg, build_task(cfg))
