"""Depth evaluation at any image size: KITTI's full 375x1242 frames (not a multiple of 32) are
padded, or resized as Monodepth2 does, and the disparity is upsampled to the ground truth."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.geometry import disp_to_depth
from trainer.models.depth import predict_depth
from trainer.models.unet import pad_to_stride
from trainer.tasks.depth import DepthTask, DepthTaskConfig

KITTI_HW = (375, 1242)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _task(**kw) -> DepthTask:
    return DepthTask(DepthTaskConfig(**kw), ModelConfig())


def _batch(hw=KITTI_HW, n=1):
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(n, 1, *hw, generator=g) * 60 + 2
    depth[:, :, : hw[0] // 3] = 0  # no lidar above the horizon
    return {"rgb": torch.randint(0, 256, (n, 3, *hw), generator=g, dtype=torch.uint8), "depth": depth,
            "__key__": [f"k{i}" for i in range(n)], "__valid__": torch.ones(n, dtype=torch.bool)}


def _encoder_inputs(model):
    seen = []
    model["encoder"].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    return seen


@torch.no_grad()
def test_full_resolution_kitti_frame_evaluates():
    task = _task(supervision="mono", eval_crop="garg")
    model = task.build_model().eval()
    seen = _encoder_inputs(model)
    batch = _batch()
    depth = task.eval_step(model, batch)  # crashed with "Expected size 48 but got size 47"
    assert seen == [(384, 1248)]  # padded to a multiple of 32
    assert depth.shape == (1, 1, *KITTI_HW) and torch.isfinite(depth).all()
    assert (depth >= 0.1).all() and (depth <= 100).all()
    metric = task.new_metric()
    metric.update(batch, depth)
    result = metric.compute(metric.state())
    assert result["images"] == 1 and 0 < result["abs_rel"] < 10


@torch.no_grad()
def test_padding_leaves_the_image_part_of_the_prediction_as_the_padded_input_gives():
    task = _task(supervision="stereo")
    model = task.build_model().eval()
    images = torch.rand(2, 3, 70, 100)
    got = predict_depth(model, images, 0.1, 100.0)
    padded = pad_to_stride(images)
    assert padded.shape[-2:] == (96, 128)
    assert torch.equal(padded[..., :70, :100], images) and torch.equal(padded[..., 70:, :100], images[..., 69:, :].expand(-1, -1, 26, -1))
    disp = model["depth_decoder"](model["encoder"](padded))[0][..., :70, :100]
    assert torch.allclose(got, disp_to_depth(disp, 0.1, 100.0)[1])


@torch.no_grad()
def test_monodepth2_protocol_resizes_input_and_upsamples_disparity_to_the_ground_truth():
    task = _task(supervision="mono", eval_resize=[64, 192])
    model = task.build_model().eval()
    seen = _encoder_inputs(model)
    batch = _batch()
    depth = task.eval_step(model, batch)
    assert seen == [(64, 192)] and depth.shape == (1, 1, *KITTI_HW)
    # the disparity (not the depth) is interpolated, then inverted
    x = F.interpolate(batch["rgb"].float() / 255, size=(64, 192), mode="bilinear", align_corners=False)
    sig = model["depth_decoder"](model["encoder"](x))[0]
    sig = F.interpolate(sig, size=KITTI_HW, mode="bilinear", align_corners=False)
    assert torch.allclose(depth, disp_to_depth(sig, 0.1, 100.0)[1])
    interpolated_depth = F.interpolate(disp_to_depth(model["depth_decoder"](model["encoder"](x))[0], 0.1, 100.0)[1],
                                       size=KITTI_HW, mode="bilinear", align_corners=False)
    assert not torch.allclose(depth, interpolated_depth, rtol=1e-6, atol=0)


@torch.no_grad()
def test_prediction_follows_the_ground_truth_size_and_plain_frames():
    task = _task(supervision="supervised")
    model = task.build_model().eval()
    batch = _batch(hw=(40, 90))
    batch["depth"] = F.interpolate(batch["depth"], size=(80, 180), mode="nearest")
    assert task.eval_step(model, batch).shape == (1, 1, 80, 180)
    del batch["depth"]
    assert task.eval_step(model, batch).shape == (1, 1, 40, 90)


@torch.no_grad()
def test_any_eval_resize_is_padded_too():
    task = _task(supervision="stereo", eval_resize=[40, 100])
    model = task.build_model().eval()
    seen = _encoder_inputs(model)
    assert task.eval_step(model, _batch(hw=(50, 120))).shape == (1, 1, 50, 120)
    assert seen == [(64, 128)]


def test_bad_eval_resize_is_named():
    for bad in ([192], [0, 640], [-1, 640]):
        with pytest.raises(ValueError, match="eval_resize"):
            _task(eval_resize=bad)
