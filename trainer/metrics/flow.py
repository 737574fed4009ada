"""Optical-flow metrics as a summable state: end-point error and the KITTI outlier rate.

EPE is the Euclidean distance (pixels) between predicted and ground-truth flow, averaged over
every valid ground-truth pixel of the split (``flow`` channel 2 = 1). Fl-all is the fraction of
valid pixels whose error exceeds both 3 px and 5 % of the ground-truth magnitude (KITTI 2015).
Beside them ``baseline_epe`` / ``baseline_fl_all``: the same metrics of zero flow (every pixel
predicted static), the trivial predictor a flow model must beat.
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.metrics.base import Metric


def flow_error_sums(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """float64 [sum EPE, valid pixels, outliers, zero flow's sum EPE, zero flow's outliers] for
    pred (B, 2, H, W) vs gt (B, 3, H, W)."""
    if pred.dim() != 4 or pred.shape[1] != 2 or gt.dim() != 4 or gt.shape[1] != 3:
        raise ValueError(f"flow metric: expected pred (B,2,H,W) and gt (B,3,H,W), got "
                         f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    if pred.shape[-2:] != gt.shape[-2:] or pred.shape[0] != gt.shape[0]:
        raise ValueError(f"flow metric: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in size")
    pred, gt = pred.detach().double().cpu(), gt.detach().double().cpu()
    valid = gt[:, 2] > 0.5
    epe = (pred - gt[:, :2]).norm(dim=1)
    mag = gt[:, :2].norm(dim=1)
    outlier = (epe > 3.0) & (epe > 0.05 * mag)
    zero_outlier = mag > 3.0  # zero flow's error is the magnitude itself (> 0.05 x it whenever > 0)
    return torch.stack([epe[valid].sum(), valid.sum().double(), outlier[valid].sum().double(),
                        mag[valid].sum(), zero_outlier[valid].sum().double()])


class FlowMetric(Metric):
    """EPE and Fl-all over a split, and zero flow's; ``update`` takes ``outputs['flow']`` (B, 2, H, W) pixels."""

    def __init__(self) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64)

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        if "flow" not in batch:
            return  # no ground truth in this split: nothing to score
        pred = outputs["flow"] if isinstance(outputs, dict) else outputs
        gt = batch["flow"]
        valid = batch.get("__valid__")
        if valid is not None:
            keep = torch.as_tensor(valid, dtype=torch.bool).cpu()
            pred, gt = pred[keep.to(pred.device)], gt[keep.to(gt.device)]
            if pred.shape[0] == 0:
                return
        self.sums += flow_error_sums(pred, gt)

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        if state.numel() != 5:
            raise ValueError(f"flow metric state has {state.numel()} values, expected 5")
        n = float(state[1])
        if n == 0:
            return {"epe": float("nan"), "fl_all": float("nan"), "flow_pixels": 0.0}
        return {"epe": float(state[0]) / n, "fl_all": float(state[2]) / n, "flow_pixels": n,
                "baseline_epe": float(state[3]) / n, "baseline_fl_all": float(state[4]) / n}
