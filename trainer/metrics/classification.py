"""Single-label classification accuracy: top-1 / top-5 as summable correct counts and a sample count.

Given the number of classes it also counts the labels per class, for ``baseline_top<k>``: the
accuracy of always answering the k most frequent classes of the evaluated split (class frequencies).
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.metrics.base import Metric


class TopKAccuracy(Metric):
    """Correct counts for each k (a label among the k highest logits) and the number of samples.

    With fewer classes than k every sample counts as correct for that k. Padding samples
    (``__valid__`` False) are ignored; the state sums exactly over ranks. With ``num_classes``
    the labels are also counted per class, for the class-frequency baseline ``baseline_top<k>``.
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5), num_classes: int = 0) -> None:
        if not ks or min(ks) < 1 or num_classes < 0:
            raise ValueError(f"top-k accuracy: ks={ks} must be non-empty and >= 1, num_classes={num_classes} >= 0")
        self.ks = tuple(int(k) for k in ks)
        self.num_classes = int(num_classes)
        # correct@k..., count, then the labels per class (when num_classes is given)
        self.sums = torch.zeros(len(self.ks) + 1 + self.num_classes, dtype=torch.float64)

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        logits = (outputs["logits"] if isinstance(outputs, dict) else outputs).detach().float().cpu()
        label = batch["label"].detach().long().cpu()
        valid = batch.get("__valid__")
        if valid is not None:
            keep = torch.as_tensor(valid, dtype=torch.bool).cpu()
            logits, label = logits[keep], label[keep]
        if logits.ndim != 2 or label.shape != logits.shape[:1]:
            raise ValueError(f"top-k accuracy: logits {tuple(logits.shape)} and labels {tuple(label.shape)} "
                             "must be (N, C) and (N,)")
        if label.numel():
            ranked = logits.topk(min(max(self.ks), logits.shape[1]), dim=1).indices
            hit = ranked == label[:, None]
            for i, k in enumerate(self.ks):
                self.sums[i] += float(hit[:, :k].any(dim=1).sum())
        n = len(self.ks)
        self.sums[n] += label.numel()
        if self.num_classes and label.numel():
            if int(label.min()) < 0 or int(label.max()) >= self.num_classes:
                raise ValueError(f"top-k accuracy: label {int(label.max())} outside 0..{self.num_classes - 1}")
            self.sums[n + 1:] += torch.bincount(label, minlength=self.num_classes).double()

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        expected = len(self.ks) + 1 + self.num_classes
        if state.numel() != expected:
            raise ValueError(f"top-k accuracy state has {state.numel()} values, expected {expected}")
        n = float(state[len(self.ks)])
        out = {f"top{k}": (float(state[i]) / n if n > 0 else float("nan")) for i, k in enumerate(self.ks)}
        out["samples"] = n
        if self.num_classes and n > 0:
            by_frequency = state[len(self.ks) + 1:].sort(descending=True).values
            out |= {f"baseline_top{k}": float(by_frequency[:k].sum()) / n for k in self.ks}
        return out
