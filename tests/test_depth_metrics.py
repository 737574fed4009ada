"""Depth metrics on hand-checked arrays; median / fixed scaling, caps, crops, padding, summing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses.depth_supervised import masked_l1, scale_invariant_log
from trainer.losses.smoothness import edge_aware_smoothness, multiscale_smoothness, normalize_disp
from trainer.metrics.depth import DepthMetric, crop_mask, depth_errors, median
from trainer.tasks.visuals import depth_panel


def test_depth_errors_hand_computed():
    gt = torch.tensor([1.0, 2.0, 4.0, 10.0])
    pred = torch.tensor([1.0, 3.0, 2.0, 10.0])
    e = depth_errors(pred, gt).tolist()
    # |d|/gt = 0, .5, .5, 0 ; d^2/gt = 0, .5, 1, 0 ; d^2 = 0, 1, 4, 0
    assert e[0] == pytest.approx(0.25)
    assert e[1] == pytest.approx(0.375)
    assert e[2] == pytest.approx(math.sqrt(5 / 4))
    assert e[3] == pytest.approx(math.sqrt((math.log(2 / 3) ** 2 + math.log(2) ** 2) / 4))
    # max ratios 1, 1.5, 2, 1 -> a1 = 0.5 ; 1.5625: 0.75 ; 1.953125: 0.75
    assert e[4:] == pytest.approx([0.5, 0.75, 0.75])


def test_median_numpy_semantics():
    assert float(median(torch.tensor([3.0, 1.0, 2.0]))) == 2.0
    assert float(median(torch.tensor([4.0, 1.0, 3.0, 2.0]))) == 2.5


def test_metric_median_scaling_caps_and_padding():
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])          # 0 = invalid
    pred = 0.5 * torch.tensor([[1.0, 3.0], [2.0, 7.0]])  # half scale, invalid pixel ignored
    m = DepthMetric(min_depth=1e-3, max_depth=80.0, scaling="median")
    batch = {"depth": torch.stack([gt, gt, torch.zeros(2, 2)])[:, None],
             "__valid__": torch.tensor([True, False, True])}
    m.update(batch, torch.stack([pred, pred * 9, pred])[:, None])
    r = m.compute(m.state())
    # image 0 after median scaling (ratio 2/1 = 2): pred 1, 3, 2 vs gt 1, 2, 4
    assert r["images"] == 1 and r["images_without_gt"] == 1  # padding skipped, empty gt counted
    assert r["median_ratio"] == pytest.approx(2.0)
    assert r["abs_rel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert r["a1"] == pytest.approx(1 / 3)

    # fixed scale 1 with a cap: gt 4 is above max_depth=3 -> ignored; preds clamped to [min, max]
    m = DepthMetric(min_depth=0.6, max_depth=3.0, scaling="fixed", fixed_scale=1.0)
    m.update_image(torch.tensor([[0.1, 5.0], [1.0, 1.0]]), gt)
    r = m.compute(m.state())
    # pixels gt 1 -> pred clamp 0.6 ; gt 2 -> pred clamp 3.0
    assert r["abs_rel"] == pytest.approx((0.4 / 1 + 1.0 / 2) / 2)
    assert "median_ratio" not in r


def test_metric_states_sum_like_one_pass():
    g = torch.Generator().manual_seed(0)
    gt = 1 + 20 * torch.rand(4, 1, 6, 8, generator=g)
    pred = 1 + 20 * torch.rand(4, 1, 6, 8, generator=g)
    whole, a, b = DepthMetric(), DepthMetric(), DepthMetric()
    whole.update({"depth": gt}, pred)
    a.update({"depth": gt[:1]}, pred[:1])
    b.update({"depth": gt[1:]}, pred[1:])
    s = a.state() + b.state()
    assert whole.compute(whole.state()) == pytest.approx(whole.compute(s))
    assert whole.compute(s)["images"] == 4


def test_prediction_resized_to_ground_truth():
    m = DepthMetric(scaling="fixed")
    m.update_image(torch.full((3, 4), 5.0), torch.full((6, 8), 5.0))
    r = m.compute(m.state())
    assert r["abs_rel"] == pytest.approx(0.0) and r["a1"] == 1.0


def test_crops_and_bad_options():
    garg = crop_mask(375, 1242, "garg")
    rows, cols = garg.any(1).nonzero(), garg.any(0).nonzero()
    assert (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) == (153, 371, 44, 1197)
    assert crop_mask(4, 4, "none").all()
    with pytest.raises(ValueError, match="crop"):
        DepthMetric(crop="kitti")
    with pytest.raises(ValueError, match="scaling"):
        DepthMetric(scaling="mean")
    with pytest.raises(KeyError, match="depth"):
        DepthMetric().update({"rgb": torch.zeros(1, 3, 2, 2)}, torch.ones(1, 1, 2, 2))


def test_supervised_losses_hand_computed():
    gt = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])
    pred = torch.tensor([[[[2.0, 2.0], [9.0, 2.0]]]])
    valid = gt > 0
    assert float(masked_l1(pred, gt, valid)) == pytest.approx((1 + 0 + 2) / 3)
    # g = log 2, 0, log 0.5: mean 0 -> sqrt(mean g^2)
    assert float(scale_invariant_log(pred, gt, valid)) == pytest.approx(math.sqrt(2 * math.log(2) ** 2 / 3))
    # fully scale invariant: a scaled prediction costs (almost) nothing
    assert float(scale_invariant_log(gt * 3 + (gt == 0), gt, valid, 1.0)) < 1e-5
    zero = masked_l1(pred.requires_grad_(), gt, torch.zeros_like(valid))
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_edge_aware_smoothness_hand_computed():
    disp = torch.tensor([[[[1.0, 2.0], [1.0, 4.0]]]])
    img = torch.zeros(1, 3, 2, 2)
    img[..., 1] = 1.0  # a vertical edge between the columns (each channel's x-gradient is 1)
    # x: |1-2|, |1-4| weighted by exp(-1) -> mean 2 e^-1 ; y: |1-1|, |2-4| weight 1 -> mean 1
    assert float(edge_aware_smoothness(disp, img)) == pytest.approx(2 * math.exp(-1) + 1)
    nd = normalize_disp(disp)
    assert float(nd.mean()) == pytest.approx(1.0)


def test_multiscale_smoothness_is_the_mean_of_the_scales_against_the_area_downsampled_image():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 8, 12, generator=g)
    disps = [torch.rand(2, 1, 8 >> s, 12 >> s, generator=g) for s in (0, 2)]
    by_hand = [edge_aware_smoothness(normalize_disp(disps[0]), img),
               edge_aware_smoothness(normalize_disp(disps[1]), F.avg_pool2d(img, 4)) / 4]
    assert float(multiscale_smoothness(disps, img, (0, 2))) == pytest.approx(float(sum(by_hand) / 2), rel=1e-6)


def test_depth_panel_shape():
    img = torch.randint(0, 256, (3, 6, 8), dtype=torch.uint8)
    panel = depth_panel(img, torch.rand(3, 4) + 1, torch.rand(6, 8) + 1)
    assert panel.size == (24, 6) and panel.mode == "RGB"
