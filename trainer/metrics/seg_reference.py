"""The reference study's KITTI semantics scores, for parity (``task.parity_classes=[...]``).

Its ``train_utils.get_miou_and_pix_acc`` scores each test image on its own (batch size 1):
for each scored class c, IoU = TP / (P + L - TP) with P the pixels *predicted* c over the whole
image -- unlabelled pixels included, so a prediction there counts as a false positive -- and L
the pixels labelled c; a class absent from both is undefined (NaN) and left out. An image's
mIoU is the mean over its defined scored classes; the split's value is the mean over images
(images with none defined left out), each class's IoU the mean over the images defining it.
Pixel accuracy per image = correct labelled pixels / labelled pixels, averaged over images.
Its class list: the 8 classes the paper names minus bicycle, which the code never scores (its
ignore list holds -1, and numpy's ``iou[-1]`` is the last class, bicycle): pass those 7 train ids.

Our :class:`~trainer.metrics.segmentation.SegmentationMetric` (``miou_subset_per_image``)
scores labelled pixels only; the two differ exactly by the predictions on unlabelled pixels.
The state is summable over ranks: per-class (IoU sum, count), mIoU (sum, count), accuracy
(sum, count).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from trainer.metrics.base import Metric


def reference_image_ious(gt: torch.Tensor, pred: torch.Tensor, classes: torch.Tensor,
                         ignore_index: int = 255) -> torch.Tensor:
    """Per-class IoU (float64, NaN = undefined) of one image, the reference code's way:
    predictions are counted on every pixel, labels only where not ``ignore_index``."""
    gt, pred = gt.reshape(-1).long(), pred.reshape(-1).long()
    labelled = gt != ignore_index
    out = torch.full((len(classes),), float("nan"), dtype=torch.float64)
    for i, c in enumerate(classes.tolist()):
        p = pred == c
        lab = labelled & (gt == c)
        tp = int((p & lab).sum())
        union = int(p.sum()) + int(lab.sum()) - tp
        if union > 0:
            out[i] = tp / union
    return out


class ReferencePerImageMetric(Metric):
    """Summable per-image scores of the reference code; see the module docstring.
    Reports ``parity/miou_per_image``, ``parity/pixel_acc_per_image``, ``parity/images`` and
    ``parity/iou/<class>``, over ``subset`` (or all classes when empty)."""

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 class_names: Optional[Sequence[str]] = None, subset: Sequence[int] = ()) -> None:
        self.ignore_index = ignore_index
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        chosen = sorted(set(subset)) or list(range(num_classes))
        bad = [c for c in chosen if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"parity metric classes {bad} outside 0..{num_classes - 1}")
        self.classes = torch.tensor(chosen, dtype=torch.long)
        self.names = [names[c] for c in chosen]
        k = len(chosen)
        self.sums = torch.zeros(2 * k + 4, dtype=torch.float64)  # iou sums, iou counts, miou, acc

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        pred = outputs["pred"] if isinstance(outputs, dict) else outputs
        gt = batch["seg"]
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(gt.shape)}")
        valid = batch.get("__valid__")
        k = len(self.classes)
        for i in range(gt.shape[0]):
            if valid is not None and not bool(valid[i]):
                continue
            g, p = gt[i].detach().cpu(), pred[i].detach().cpu()
            iou = reference_image_ious(g, p, self.classes, self.ignore_index)
            defined = ~iou.isnan()
            self.sums[:k] += torch.where(defined, iou, torch.zeros_like(iou))
            self.sums[k:2 * k] += defined.double()
            if defined.any():
                self.sums[2 * k] += iou[defined].mean()
                self.sums[2 * k + 1] += 1
            labelled = g != self.ignore_index
            if labelled.any():
                self.sums[2 * k + 2] += float((p[labelled] == g[labelled]).double().mean())
                self.sums[2 * k + 3] += 1

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        k = len(self.classes)
        if state.numel() != 2 * k + 4:
            raise ValueError(f"parity metric state has {state.numel()} values, expected {2 * k + 4}")
        nan = float("nan")
        out = {
            "parity/miou_per_image": float(state[2 * k] / state[2 * k + 1]) if state[2 * k + 1] > 0 else nan,
            "parity/pixel_acc_per_image": float(state[2 * k + 2] / state[2 * k + 3]) if state[2 * k + 3] > 0 else nan,
            "parity/images": float(state[2 * k + 1]),
        }
        for j, name in enumerate(self.names):
            if state[k + j] > 0:
                out[f"parity/iou/{name}"] = float(state[j] / state[k + j])
        return out


class MetricSet(Metric):
    """Several metrics as one: states concatenated, results merged (names must not collide)."""

    def __init__(self, metrics: Sequence[Metric]) -> None:
        self.metrics = list(metrics)
        self._sizes: list[int] = []

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        for m in self.metrics:
            m.update(batch, outputs)

    def state(self) -> torch.Tensor:
        states = [m.state() for m in self.metrics]
        self._sizes = [s.numel() for s in states]
        return torch.cat(states)

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        sizes = self._sizes or [m.state().numel() for m in self.metrics]
        if state.numel() != sum(sizes):
            raise ValueError(f"metric set state has {state.numel()} values, expected {sum(sizes)}")
        out: dict[str, float] = {}
        for m, part in zip(self.metrics, torch.split(state, sizes)):
            result = m.compute(part)
            clash = set(out) & set(result)
            if clash:
                raise ValueError(f"metric names computed twice: {sorted(clash)}")
            out.update(result)
        return out
