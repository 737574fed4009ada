"""Every pre-training task's metric comes with a trivial predictor's value beside it: constant depth
(median-scaled), zero flow, class frequencies. Hand-computed values; states still sum over ranks."""
from __future__ import annotations

import pytest
import torch

from trainer.metrics.classification import TopKAccuracy
from trainer.metrics.depth import DepthMetric
from trainer.metrics.flow import FlowMetric
from trainer.tasks.classification import MultiLabelMetric


def test_depth_baseline_is_a_constant_depth_median_scaled():
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # 0 = invalid; median of 1, 2, 4 = 2
    m = DepthMetric(scaling="median")
    m.update_image(torch.tensor([[1.0, 2.0], [4.0, 9.0]]), gt)  # a perfect prediction
    r = m.compute(m.state())
    assert r["abs_rel"] == pytest.approx(0.0) and r["a1"] == 1.0
    # constant 2 m against 1, 2, 4: |d| / gt = 1, 0, 0.5; ratios 2, 1, 2 -> a1 = a3 (< 1.953) = 1/3
    assert r["baseline_abs_rel"] == pytest.approx(0.5)
    assert r["baseline_a1"] == pytest.approx(1 / 3) and r["baseline_a3"] == pytest.approx(1 / 3)
    # any constant prediction ties the baseline exactly (median scaling maps it to the median)
    flat = DepthMetric(scaling="median")
    flat.update_image(torch.full((2, 2), 7.0), gt)
    r = flat.compute(flat.state())
    assert r["abs_rel"] == pytest.approx(r["baseline_abs_rel"]) and r["rmse"] == pytest.approx(r["baseline_rmse"])
    # the baseline ignores the fixed scale (it always gets the median): the metric itself does not
    fixed = DepthMetric(scaling="fixed", fixed_scale=2.0)
    fixed.update_image(torch.full((2, 2), 7.0), gt)
    r = fixed.compute(fixed.state())
    assert r["baseline_abs_rel"] == pytest.approx(0.5) and r["abs_rel"] > 1.0


def test_depth_baseline_sums_over_ranks():
    g = torch.Generator().manual_seed(0)
    gt, pred = 1 + 20 * torch.rand(3, 1, 4, 5, generator=g), 1 + 20 * torch.rand(3, 1, 4, 5, generator=g)
    whole, a, b = DepthMetric(), DepthMetric(), DepthMetric()
    whole.update({"depth": gt}, pred)
    a.update({"depth": gt[:1]}, pred[:1])
    b.update({"depth": gt[1:]}, pred[1:])
    assert whole.compute(a.state() + b.state()) == pytest.approx(whole.compute(whole.state()))


def test_flow_baseline_is_zero_flow():
    gt = torch.zeros(1, 3, 1, 3)
    gt[0, 0] = torch.tensor([3.0, 4.0, 100.0])  # u; v = 0
    gt[0, 2] = torch.tensor([1.0, 1.0, 0.0])    # third pixel invalid
    pred = gt[:, :2].clone()                     # perfect
    m = FlowMetric()
    m.update({"flow": gt}, {"flow": pred})
    r = m.compute(m.state())
    # zero flow: errors 3 and 4 px (the magnitudes); outliers: > 3 px and > 5 % of it -> only the 4
    assert r["epe"] == 0.0 and r["baseline_epe"] == pytest.approx(3.5) and r["baseline_fl_all"] == pytest.approx(0.5)
    zero = FlowMetric()
    zero.update({"flow": gt}, {"flow": torch.zeros_like(pred)})
    z = zero.compute(zero.state())
    assert (z["epe"], z["fl_all"]) == pytest.approx((z["baseline_epe"], z["baseline_fl_all"]))


def test_multilabel_baseline_is_class_frequency_map():
    # class 0 present in 2 of 4 images, class 1 in 1 of 4, class 2 in none (not averaged, as map)
    labels = torch.tensor([[1., 0., 0.], [1., 1., 0.], [0., 0., 0.], [0., 0., 0.]])
    m = MultiLabelMetric(3, bins=50)
    m.update({"labels": labels}, {"prob": labels * 0.9 + 0.05})  # perfect ranking
    r = m.compute(m.state())
    assert r["map"] == pytest.approx(1.0) and r["baseline_map"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # a constant score per class (what class frequencies give) scores exactly the baseline
    const = MultiLabelMetric(3, bins=50)
    const.update({"labels": labels}, {"prob": torch.tensor([0.5, 0.25, 0.0]).expand(4, 3)})
    r = const.compute(const.state())
    assert r["map"] == pytest.approx(r["baseline_map"])


def test_topk_baseline_is_the_most_frequent_classes():
    logits = torch.eye(4)[[0, 1, 1, 2, 1, 3]] * 5  # perfect predictions
    label = torch.tensor([0, 1, 1, 2, 1, 3])
    m = TopKAccuracy((1, 2), num_classes=4)
    m.update({"label": label}, {"logits": logits})
    r = m.compute(m.state())
    # class 1 holds 3 of 6 labels; the two most frequent (1, then one of the singles) 4 of 6
    assert r["top1"] == 1.0 and r["baseline_top1"] == pytest.approx(0.5) and r["baseline_top2"] == pytest.approx(4 / 6)
    a, b = TopKAccuracy((1, 2), num_classes=4), TopKAccuracy((1, 2), num_classes=4)
    a.update({"label": label[:2]}, {"logits": logits[:2]})
    b.update({"label": label[2:]}, {"logits": logits[2:]})
    assert torch.equal(a.state() + b.state(), m.state())
    assert "baseline_top1" not in TopKAccuracy((1,)).compute(torch.tensor([1.0, 2.0]))  # no class count given
    with pytest.raises(ValueError, match="label 3 outside 0..2"):
        TopKAccuracy((1,), num_classes=3).update({"label": torch.tensor([3])}, {"logits": torch.zeros(1, 3)})


def test_classification_eval_crop_is_keyed_and_makes_targets_vary():

    from trainer.config import ModelConfig
    from trainer.tasks.classification import ClassificationConfig, ClassificationTask

    seg = torch.zeros(8, 8, dtype=torch.uint8)
    seg[:, 4:] = 1  # class 0 left, class 1 right: every full frame shows both
    sample = {"__key__": "a", "rgb": torch.arange(3 * 64, dtype=torch.uint8).reshape(3, 8, 8), "seg": seg}
    full = ClassificationTask(ClassificationConfig(num_classes=2, crop=[4, 2]), ModelConfig())
    assert full.eval_transform(sample)["labels"].tolist() == [1.0, 1.0]
    task = ClassificationTask(ClassificationConfig(num_classes=2, crop=[4, 2], eval_crop=True),
                              ModelConfig())
    out = task.eval_transform(sample)
    assert out["rgb"].shape == (3, 4, 2) and torch.equal(out["rgb"], task.eval_transform(sample)["rgb"])
    labels = {tuple(task.eval_transform({**sample, "__key__": f"k{i}"})["labels"].tolist()) for i in range(20)}
    assert labels == {(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)}  # 2-wide crops: left, right or across the edge
