"""Standard monocular depth metrics (Eigen et al.; Monodepth2's ``evaluate_depth``) as a summable Metric.

Per image: keep ground-truth pixels in (min_depth, max_depth) (and inside the Garg / Eigen
crop for KITTI), scale the prediction (median ratio for scale-ambiguous monocular models, a
fixed factor otherwise), clamp it to [min_depth, max_depth], then compute abs_rel, sq_rel,
rmse, rmse_log, a1, a2, a3. The split's value is the mean over images.

Beside each metric the same metric of a trivial predictor, ``baseline_<name>``: a constant depth,
scaled as median scaling scales any prediction, i.e. each image's median ground-truth depth. A
model that has learned depth beats it; a model that predicts one depth everywhere ties it (with
fixed scaling the baseline still gets the median scale, so it is an optimistic reference there).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.metrics.base import Metric

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")
#: crop boxes as fractions (top, bottom, left, right) of the ground truth's height / width
CROPS = {
    "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
    "eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
}


def crop_mask(height: int, width: int, crop: str) -> Tensor:
    """(H, W) bool: the evaluation region (all True for crop="none"; KITTI's garg / eigen boxes)."""
    if crop == "none":
        return torch.ones(height, width, dtype=torch.bool)
    if crop not in CROPS:
        raise ValueError(f"depth eval crop={crop!r}: expected none, {', '.join(CROPS)}")
    t, b, l, r = CROPS[crop]
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[int(t * height):int(b * height), int(l * width):int(r * width)] = True
    return mask


def median(x: Tensor) -> Tensor:
    """numpy-style median of a 1-D tensor (mean of the two middle values for even sizes), by
    selection (``kthvalue``, linear time, where a sort is n log n)."""
    n = x.numel()
    upper = x.kthvalue(n // 2 + 1).values
    return upper if n % 2 else (x.kthvalue(n // 2).values + upper) / 2


def depth_errors(pred: Tensor, gt: Tensor) -> Tensor:
    """The 7 metrics (METRIC_NAMES order) of matching 1-D positive depth vectors, float64."""
    pred, gt = pred.double(), gt.double()
    thresh = torch.maximum(gt / pred, pred / gt)
    a1 = (thresh < 1.25).double().mean()
    a2 = (thresh < 1.25 ** 2).double().mean()
    a3 = (thresh < 1.25 ** 3).double().mean()
    rmse = ((gt - pred) ** 2).mean().sqrt()
    rmse_log = ((gt.log() - pred.log()) ** 2).mean().sqrt()
    abs_rel = ((gt - pred).abs() / gt).mean()
    sq_rel = ((gt - pred) ** 2 / gt).mean()
    return torch.stack([abs_rel, sq_rel, rmse, rmse_log, a1, a2, a3])


class DepthMetric(Metric):
    """Sums of the per-image metrics, of the constant-depth baseline's metrics, image count (+ count
    of images with no valid ground truth, reported rather than dropped silently, + sum of median ratios)."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 80.0, scaling: str = "median",
                 fixed_scale: float = 1.0, crop: str = "none") -> None:
        if scaling not in ("median", "fixed"):
            raise ValueError(f"depth eval scaling={scaling!r}: expected median or fixed")
        if not 0 < min_depth < max_depth:
            raise ValueError(f"depth eval: need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        if fixed_scale <= 0:
            raise ValueError(f"depth eval fixed_scale={fixed_scale} must be > 0")
        crop_mask(1, 1, crop)  # validates the name
        self.min_depth, self.max_depth = min_depth, max_depth
        self.scaling, self.fixed_scale, self.crop = scaling, fixed_scale, crop
        n = len(METRIC_NAMES)  # state: metric sums | baseline sums | images, images without gt, ratio sum
        self._sums = torch.zeros(2 * n + 3, dtype=torch.float64)

    def update_image(self, pred: Tensor, gt: Tensor) -> None:
        """Add one image: ``pred`` (H', W') predicted depth, ``gt`` (H, W) metres, 0 = invalid.
        The prediction is bilinearly resized to the ground truth's resolution if needed."""
        if pred.shape != gt.shape:
            pred = F.interpolate(pred[None, None].double(), size=gt.shape, mode="bilinear",
                                 align_corners=False)[0, 0]
        mask = (gt > self.min_depth) & (gt < self.max_depth) & crop_mask(*gt.shape, self.crop).to(gt.device)
        if not mask.any():
            self._sums[-2] += 1
            return
        p, g = pred[mask].double().cpu(), gt[mask].double().cpu()
        ratio = median(g) / median(p).clamp(min=1e-12) if self.scaling == "median" else torch.tensor(
            self.fixed_scale, dtype=torch.float64)
        p = (p * ratio).clamp(self.min_depth, self.max_depth)
        n = len(METRIC_NAMES)
        self._sums[:n] += depth_errors(p, g)
        self._sums[n:2 * n] += depth_errors(median(g).expand_as(g), g)  # constant depth, median-scaled
        self._sums[-3] += 1
        self._sums[-1] += float(ratio)

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        """``outputs``: predicted depth (B, 1, H, W) (or a dict with key "depth"); ground truth
        from ``batch["depth"]``; samples with ``batch["__valid__"] == False`` are skipped."""
        pred = outputs["depth"] if isinstance(outputs, dict) else outputs
        if "depth" not in batch:
            raise KeyError("depth metric: the evaluation batch has no 'depth' ground truth "
                           f"(keys: {', '.join(sorted(batch))})")
        gt = batch["depth"]
        valid = batch.get("__valid__")
        for i in range(gt.shape[0]):
            if valid is not None and not bool(valid[i]):
                continue
            self.update_image(pred[i, 0].detach(), gt[i, 0])

    def state(self) -> Tensor:
        return self._sums.clone()

    def compute(self, state: Tensor) -> dict[str, float]:
        n = float(state[-3])
        out = {"images": n, "images_without_gt": float(state[-2])}
        if n == 0:
            return out
        for i, name in enumerate(METRIC_NAMES):
            out[name] = float(state[i]) / n
            out[f"baseline_{name}"] = float(state[len(METRIC_NAMES) + i]) / n
        if self.scaling == "median":
            out["median_ratio"] = float(state[-1]) / n
        return out
