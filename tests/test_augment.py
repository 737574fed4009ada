"""Colour jitter: torchvision's formulas, seeded, the same values in the loader and in the step."""
from __future__ import annotations


import pytest
import torch
import torchvision.transforms.v2.functional as TF

from data_shards.collate import collate
from trainer.tasks.augment import (JITTER_ROW, JitterParams, apply_jitter, jitter_batch, jitter_frames, jitter_images,
                             jitter_row, sample_jitter)
from trainer.tasks.depth import DepthTask
from trainer.tasks.depth_config import DepthTaskConfig


def _torchvision(image: torch.Tensor, p: JitterParams) -> torch.Tensor:
    ops = (lambda x: TF.adjust_brightness(x, p.brightness), lambda x: TF.adjust_contrast(x, p.contrast),
           lambda x: TF.adjust_saturation(x, p.saturation), lambda x: TF.adjust_hue(x, p.hue))
    for i in p.order:
        image = ops[i](image)
    return image


def _images(n: int = 3, h: int = 24, w: int = 40, seed: int = 0) -> torch.Tensor:
    """Smooth colour images with saturated and grey areas (all hue sextants, clipping, ties)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, h // 4, w // 4, generator=g)
    img = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    img[:, :, :4] = img[:, :1, :4]  # grey rows: r == g == b
    img[:, 0, -3:] = 1.0  # a clipped red band
    return (img * 255).round().to(torch.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_float_jitter_is_torchvisions(seed):
    p = sample_jitter(torch.Generator().manual_seed(seed), 0.4, 0.4, 0.4, 0.5)
    x = _images(seed=seed).float() / 255
    torch.testing.assert_close(apply_jitter(x, p), _torchvision(x, p), atol=2e-6, rtol=0)


def test_uint8_jitter_within_rounding_of_torchvision_and_identity_is_exact():
    x = _images()
    for seed in range(10):
        p = sample_jitter(torch.Generator().manual_seed(seed))
        ours, theirs = apply_jitter(x, p).int(), _torchvision(x, p).int()
        # torchvision truncates to uint8 after each of the four adjustments; we round once at the end
        assert (ours - theirs).abs().max() <= 6 and (ours - theirs).float().mean().abs() < 2.5
    assert torch.equal(apply_jitter(x, JitterParams(1.0, 1.0, 1.0, 0.0, (3, 2, 1, 0))), x)
    shifted = apply_jitter(x, JitterParams(1.0, 1.0, 1.0, 0.25, (3, 2, 1, 0)))
    assert not torch.equal(shifted, x)
    assert torch.equal(shifted.amax(1), x.amax(1))  # hue keeps each pixel's max (value) ...
    assert ((shifted.amin(1).int() - x.amin(1).int()).abs() <= 1).all()  # ... and min, up to rounding


def test_stacked_rows_match_one_image_at_a_time():
    """The whole-stack path (what CUDA runs) gives what the CPU's one-image path gives, each image its
    own row and order, identity rows untouched."""
    x = _images(n=5)
    rows = torch.stack([jitter_row(sample_jitter(torch.Generator().manual_seed(s)), applied=s != 2)
                        for s in range(5)])
    from trainer.tasks.augment import _jitter_stack
    one_by_one = jitter_images(x, rows)
    stacked = _jitter_stack(x, rows)
    assert torch.equal(one_by_one[2], x[2])
    assert (stacked.int() - one_by_one.int()).abs().max() <= 1
    assert (stacked != one_by_one).float().mean() < 0.01
    with pytest.raises(ValueError, match=r"\(N, 9\) rows"):
        jitter_images(x, rows[:, :4])


def _depth_task(**kw) -> DepthTask:
    return DepthTask(DepthTaskConfig(supervision="mono_stereo", **kw), None)


def test_step_jitter_equals_loader_jitter_on_cpu():
    """task.jitter_on=step: the loader sends a jitter row, the step makes the same aug_* frames."""
    frames = ("rgb", "rgb_prev", "rgb_next", "rgb_right")
    samples = []
    for i in range(4):
        x = _images(n=4, seed=10 + i)
        samples.append({"__key__": f"s{i}", "__valid__": True, **{k: x[j] for j, k in enumerate(frames)},
                        "K": torch.eye(3), "baseline": torch.tensor(0.5)})
    loader_side, step_side = _depth_task(jitter_on="loader"), _depth_task(jitter_on="step")
    a = collate([loader_side.train_transform(dict(s), torch.Generator().manual_seed(i)) for i, s in enumerate(samples)])
    b = collate([step_side.train_transform(dict(s), torch.Generator().manual_seed(i)) for i, s in enumerate(samples)])
    assert "aug_rgb" not in b and b["jitter"].shape == (4, JITTER_ROW)
    assert "aug_rgb_right" not in a  # only the frames the networks see are jittered
    stepped = step_side.augmented(b)
    jittered = 0
    for k in ("rgb", "rgb_prev", "rgb_next"):
        assert torch.equal(stepped["aug_" + k], a["aug_" + k]), k
        assert torch.equal(stepped[k], a[k])  # the loss's frames (flipped alike, never jittered)
        jittered += int((a["aug_" + k] != a[k]).any(dim=(1, 2, 3)).sum())
    assert jittered > 0 and b["jitter"][:, 0].sum() > 0
    with pytest.raises(ValueError, match="jitter_on"):
        _depth_task(jitter_on="gpu")


def test_jitter_frames_one_draw_for_all_frames():
    x = _images(n=1)[0]
    out = jitter_frames({"rgb": x, "rgb_prev": x.clone()}, ["rgb", "rgb_prev"], sample_jitter(torch.Generator()))
    assert torch.equal(out["aug_rgb"], out["aug_rgb_prev"]) and torch.equal(out["rgb"], x)
    batch = {"rgb": x[None].repeat(2, 1, 1, 1), "jitter": torch.stack([jitter_row(JitterParams(1.2, 1, 1, 0, (0, 1, 2, 3))),
                                                                      jitter_row(JitterParams(1.2, 1, 1, 0, (0, 1, 2, 3)), False)])}
    out = jitter_batch(batch, ["rgb"])
    assert torch.equal(out["aug_rgb"][1], x) and not torch.equal(out["aug_rgb"][0], x)
