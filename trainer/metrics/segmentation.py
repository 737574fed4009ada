"""Semantic segmentation metrics from one confusion matrix summed over a whole split and all ranks.

Conventions (Cityscapes / mmseg): pixels whose label is the ignore index are excluded; a class
absent from both the prediction and the ground truth of the whole split is excluded from the
mean IoU (its IoU is undefined), and a class absent from the ground truth is excluded from the
mean class accuracy. Padding samples (``batch['__valid__'] == False``) are skipped.

Beside each mean, the number of classes it averages (``miou_classes``, ``miou_subset_classes``) and,
with a subset, the share of scored pixels predicted / labelled outside it (``pred_outside_subset``,
``gt_outside_subset``): what makes ``miou`` and ``miou_subset`` differ, or shows why they are equal.

For parity with the reference study's code the state also carries per-image averaged mIoU
(mean over images of the mean IoU over classes present in that image's prediction or ground
truth), for all classes and for an optional class subset (e.g. its 8 scored KITTI classes).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from trainer.metrics.base import Metric


def confusion_matrix(gt: torch.Tensor, pred: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    Ground-truth pixels equal to ``ignore_index`` are dropped; any other label or prediction
    outside ``0..num_classes-1`` is an error (a wrong class count must not pass silently).
    """
    gt = gt.reshape(-1).long()
    pred = pred.reshape(-1).long()
    if gt.shape != pred.shape:
        raise ValueError(f"confusion_matrix: {gt.numel()} labels vs {pred.numel()} predictions")
    keep = gt != ignore_index
    gt, pred = gt[keep], pred[keep]
    if gt.numel():
        bad_gt = (gt < 0) | (gt >= num_classes)
        if bad_gt.any():
            raise ValueError(f"segmentation label {int(gt[bad_gt][0])} outside 0..{num_classes - 1} "
                             f"(and not the ignore index {ignore_index})")
        if ((pred < 0) | (pred >= num_classes)).any():
            raise ValueError(f"prediction outside 0..{num_classes - 1}")
    idx = gt * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU (float64) and a mask of the classes present in prediction or ground truth."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou, present


def _mean_iou(conf: torch.Tensor, classes: Optional[torch.Tensor] = None) -> tuple[float, bool]:
    """Mean IoU over present classes (restricted to ``classes`` if given); (value, any present)."""
    iou, present = iou_from_confusion(conf)
    if classes is not None:
        iou, present = iou[classes], present[classes]
    if not present.any():
        return float("nan"), False
    return float(iou[present].mean()), True


def _outside_subset(conf: torch.Tensor, subset: torch.Tensor, total: torch.Tensor) -> dict[str, float]:
    """What separates ``miou`` from ``miou_subset``: the share of scored pixels predicted as, and
    labelled as, a class outside the subset (both 0: the two means cover the same classes)."""
    outside = torch.ones(conf.shape[0], dtype=torch.bool)
    outside[subset] = False
    if total <= 0:
        return {"pred_outside_subset": float("nan"), "gt_outside_subset": float("nan")}
    return {"pred_outside_subset": float(conf[:, outside].sum() / total),
            "gt_outside_subset": float(conf[outside, :].sum() / total)}


class SegmentationMetric(Metric):
    """Summable state: confusion matrix (C*C), per-image mIoU sum and count, and the same pair
    for the class subset. ``update`` takes ``outputs['pred']`` (B, H, W) class ids and
    ``batch['seg']`` (B, H, W) train ids.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 class_names: Optional[Sequence[str]] = None,
                 subset: Sequence[int] = ()) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        bad = [c for c in subset if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"eval subset classes {bad} outside 0..{num_classes - 1}")
        self.subset = torch.tensor(sorted(set(subset)), dtype=torch.long)
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.per_image = torch.zeros(4, dtype=torch.float64)  # miou sum, images, subset sum, subset images

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        pred = outputs["pred"] if isinstance(outputs, dict) else outputs
        gt = batch["seg"]
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(gt.shape)}")
        valid = batch.get("__valid__")
        pred, gt = pred.detach().cpu(), gt.detach().cpu()
        for i in range(gt.shape[0]):
            if valid is not None and not bool(valid[i]):
                continue
            conf = confusion_matrix(gt[i], pred[i], self.num_classes, self.ignore_index)
            self.conf += conf.double()
            miou, any_present = _mean_iou(conf)
            if any_present:
                self.per_image[0] += miou
                self.per_image[1] += 1
            if self.subset.numel():
                miou, any_present = _mean_iou(conf, self.subset)
                if any_present:
                    self.per_image[2] += miou
                    self.per_image[3] += 1

    def state(self) -> torch.Tensor:
        return torch.cat([self.conf.reshape(-1), self.per_image])

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        c = self.num_classes
        if state.numel() != c * c + 4:
            raise ValueError(f"segmentation metric state has {state.numel()} values, expected {c * c + 4}")
        conf = state[: c * c].reshape(c, c).double()
        per_image = state[c * c:]
        iou, present = iou_from_confusion(conf)
        total = conf.sum()
        gt_count = conf.sum(1)
        out: dict[str, float] = {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "miou_classes": float(present.sum()),
            "pixel_acc": float(conf.diagonal().sum() / total) if total > 0 else float("nan"),
            "mean_class_acc": (float((conf.diagonal()[gt_count > 0] / gt_count[gt_count > 0]).mean())
                               if (gt_count > 0).any() else float("nan")),
            "miou_per_image": float(per_image[0] / per_image[1]) if per_image[1] > 0 else float("nan"),
            "num_pixels": float(total),
        }
        for k in range(c):
            if present[k]:
                out[f"iou/{self.class_names[k]}"] = float(iou[k])
        if self.subset.numel():
            sub_iou, sub_present = iou[self.subset], present[self.subset]
            out["miou_subset"] = float(sub_iou[sub_present].mean()) if sub_present.any() else float("nan")
            out |= _outside_subset(conf, self.subset, total) | {"miou_subset_classes": float(sub_present.sum())}
            out["miou_subset_per_image"] = (float(per_image[2] / per_image[3]) if per_image[3] > 0
                                            else float("nan"))
        return out
