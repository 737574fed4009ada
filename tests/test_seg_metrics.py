"""Segmentation and flow metrics against hand-computed confusion matrices and errors."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.metrics.flow import FlowMetric
from trainer.metrics.segmentation import SegmentationMetric, confusion_matrix

# image 1 (4 classes, class 3 absent everywhere): pairs (gt, pred) after dropping the ignore pixel
GT1 = torch.tensor([[0, 0, 1], [1, 2, 255]], dtype=torch.uint8)
PRED1 = torch.tensor([[0, 1, 1], [1, 0, 2]])
# image 2: class 3 appears
GT2 = torch.tensor([[3, 3, 255]], dtype=torch.uint8)
PRED2 = torch.tensor([[3, 0, 1]])


def _batch(gt, pred, valid=None):
    batch = {"seg": gt[None]}
    if valid is not None:
        batch["__valid__"] = torch.tensor([valid])
    return batch, {"pred": pred[None]}


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(GT1, PRED1, 4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expected)


def test_single_image_values_and_absent_class_excluded():
    m = SegmentationMetric(4, subset=[0, 1])
    m.update(*_batch(GT1, PRED1))
    r = m.compute(m.state())
    # IoU: c0 1/3, c1 2/3, c2 0, c3 absent (excluded from the mean)
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["iou/0"] == pytest.approx(1 / 3) and r["iou/1"] == pytest.approx(2 / 3) and r["iou/2"] == 0
    assert "iou/3" not in r
    assert r["pixel_acc"] == pytest.approx(3 / 5)
    assert r["mean_class_acc"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert r["miou_per_image"] == pytest.approx(1 / 3)
    assert r["miou_subset"] == pytest.approx(0.5)
    assert r["num_pixels"] == 5
    # what separates miou (classes 0, 1, 2) from miou_subset (0, 1): class 2, labelled on 1 of the 5
    # scored pixels and never predicted there (its one prediction is on the ignored pixel)
    assert r["miou_classes"] == 3 and r["miou_subset_classes"] == 2
    assert r["gt_outside_subset"] == pytest.approx(1 / 5) and r["pred_outside_subset"] == 0


def test_equal_means_come_with_the_reason_they_are_equal():
    """A model that predicts only the subset's classes on data that has only them: miou == miou_subset,
    and the logged counts say why (the same classes, nothing outside the subset)."""
    m = SegmentationMetric(5, subset=[0, 1, 2])
    m.update(*_batch(torch.tensor([[0, 1, 2, 2]], dtype=torch.uint8), torch.tensor([[0, 1, 1, 2]])))
    r = m.compute(m.state())
    assert r["miou"] == r["miou_subset"] and r["miou_classes"] == r["miou_subset_classes"] == 3
    assert r["pred_outside_subset"] == 0 and r["gt_outside_subset"] == 0
    m.update(*_batch(torch.tensor([[0, 0]], dtype=torch.uint8), torch.tensor([[4, 0]])))  # one stray pixel
    r = m.compute(m.state())
    assert r["miou"] < r["miou_subset"] and r["miou_classes"] == 4 and r["pred_outside_subset"] == pytest.approx(1 / 6)


def test_two_ranks_sum_equals_one_pass_and_hand_values():
    whole = SegmentationMetric(4, subset=[0, 1])
    whole.update(*_batch(GT1, PRED1))
    whole.update(*_batch(GT2, PRED2))
    rank0, rank1 = SegmentationMetric(4, subset=[0, 1]), SegmentationMetric(4, subset=[0, 1])
    rank0.update(*_batch(GT1, PRED1))
    rank1.update(*_batch(GT2, PRED2))
    rank1.update(*_batch(GT1, torch.zeros_like(PRED1), valid=False))  # padding: ignored
    summed = rank0.state() + rank1.state()
    assert torch.equal(summed, whole.state())
    r = whole.compute(summed)
    # split confusion: c0 TP1 gt2 pred3 -> 1/4; c1 2/3; c2 0; c3 TP1 gt2 pred1 -> 1/2
    assert r["miou"] == pytest.approx((1 / 4 + 2 / 3 + 0 + 1 / 2) / 4)
    assert r["pixel_acc"] == pytest.approx(4 / 7)
    # per image: image 1 1/3, image 2 (c3 1/2, c0 0) 1/4
    assert r["miou_per_image"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    # subset {0, 1}: image 1 (1/3 + 2/3)/2, image 2 only c0 present (pred) -> 0
    assert r["miou_subset_per_image"] == pytest.approx((0.5 + 0.0) / 2)
    assert r["miou_subset"] == pytest.approx((1 / 4 + 2 / 3) / 2)


def test_all_ignored_gives_nan_not_crash():
    m = SegmentationMetric(3)
    m.update({"seg": torch.full((1, 2, 2), 255, dtype=torch.uint8)}, {"pred": torch.zeros(1, 2, 2, dtype=torch.long)})
    r = m.compute(m.state())
    assert math.isnan(r["miou"]) and math.isnan(r["miou_per_image"]) and r["num_pixels"] == 0


def test_bad_label_is_an_error():
    m = SegmentationMetric(3)
    with pytest.raises(ValueError, match="label 7 outside 0..2"):
        m.update({"seg": torch.tensor([[[7]]], dtype=torch.uint8)}, {"pred": torch.tensor([[[0]]])})
    with pytest.raises(ValueError, match="subset"):
        SegmentationMetric(3, subset=[5])


def test_flow_metric_by_hand_and_ranks():
    gt = torch.zeros(1, 3, 1, 3)
    gt[0, 0] = torch.tensor([3.0, 0.0, 100.0])  # u
    gt[0, 2] = torch.tensor([1.0, 1.0, 0.0])    # third pixel invalid
    pred = torch.zeros(1, 2, 1, 3)
    pred[0, 1, 0, 0] = 4.0   # error (3, 4) -> 5 px, gt magnitude 3: outlier (5 > 3 and > 0.15)
    pred[0, 0, 0, 1] = 1.0   # error 1 px: not an outlier
    m = FlowMetric()
    m.update({"flow": gt}, {"flow": pred})
    r = m.compute(m.state())
    assert r["epe"] == pytest.approx(3.0) and r["fl_all"] == pytest.approx(0.5) and r["flow_pixels"] == 2
    other = FlowMetric()
    other.update({"flow": gt, "__valid__": torch.tensor([False])}, {"flow": pred + 50})
    assert torch.equal(m.state() + other.state(), m.state())
