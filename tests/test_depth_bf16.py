"""The depth task under bf16 autocast on the CPU (``parallel.precision=bf16``; AMX / AVX512-BF16
CPUs run the convolutions ~2.5x faster): the networks run in bf16, but the output heads, the
pose, the depths and every pixel coordinate stay fp32, so the loss is the fp32 loss up to the
networks' rounding."""
from __future__ import annotations


import pytest
import torch

from trainer.config import ModelConfig
from trainer.geometry import pose_vec_to_mat, warp_scales
from trainer.models.pose import PoseDecoder
from trainer.models.unet import UNetDecoder
from trainer.tasks.depth import DepthTask, DepthTaskConfig

from test_depth_task import batch  # noqa: F401 -- the fixture: two synthetic-world samples

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_geometry_is_fp32_under_autocast_and_for_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 12, 40
    aa, tr = 0.05 * torch.randn(b, 3, generator=g), 0.3 * torch.randn(b, 3, generator=g)
    K = torch.tensor([[0.58 * w, 0, w / 2], [0, 1.92 * h, h / 2], [0, 0, 1]]).repeat(b, 1, 1)
    depth = 1 + 20 * torch.rand(b, 3, h, w, generator=g)
    img = torch.rand(b, 3, h, w, generator=g)

    def run():
        T = pose_vec_to_mat(aa, tr, invert=True)
        return T, warp_scales(img, depth, T, K, pad=3)

    ref = run()
    with torch.autocast(**BF16):
        got = run()
    for a, r in zip(got, ref):
        assert a.dtype == torch.float32 and torch.equal(a, r)
    T16 = pose_vec_to_mat(aa.bfloat16(), tr.bfloat16())  # bf16 inputs are upcast, not computed in bf16
    assert T16.dtype == torch.float32
    torch.testing.assert_close(T16, pose_vec_to_mat(aa.bfloat16().float(), tr.bfloat16().float()), rtol=0, atol=0)


def test_output_heads_are_fp32_under_autocast():
    torch.manual_seed(0)
    enc_ch = (64, 64, 128, 256, 512)
    feats = [torch.randn(1, c, 64 // 2 ** (i + 1), 96 // 2 ** (i + 1)) for i, c in enumerate(enc_ch)]
    dec, pose = UNetDecoder(enc_ch, 1), PoseDecoder(enc_ch, 1)
    with torch.autocast(**BF16):
        disps = dec(feats)
        axisangle, translation = pose([feats[-1]])
        inner = dec.upconvs["0_1"](torch.randn(1, 16, 8, 8))
    assert inner.dtype == torch.bfloat16  # the body does run in bf16
    assert all(d.dtype == torch.float32 for d in disps.values())
    assert axisangle.dtype == translation.dtype == torch.float32


def test_bf16_training_step_is_close_to_fp32_and_trains_every_parameter(batch):
    torch.manual_seed(0)
    task = DepthTask(DepthTaskConfig(supervision="mono", scales=[0, 1, 2, 3]), ModelConfig())
    model = task.build_model().train()
    loss32, logs32 = task.training_step(model, batch)
    with torch.autocast(**BF16):
        loss16, logs16 = task.training_step(model, batch)
    assert loss16.dtype == torch.float32
    assert float(loss16.detach()) == pytest.approx(float(loss32.detach()), rel=0.02)
    assert float(logs16["automask_fraction"]) == pytest.approx(float(logs32["automask_fraction"]), abs=0.03)
    loss16.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
