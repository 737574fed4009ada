"""Single-label classification accuracy: top-1 / top-5 as summable correct counts and a sample count."""
from __future__ import annotations

from typing import Any

import torch

from trainer.metrics.base import Metric


class TopKAccuracy(Metric):
    """Correct counts for each k (a label among the k highest logits) and the number of samples.

    With fewer classes than k every sample counts as correct for that k. Padding samples
    (``__valid__`` False) are ignored; the state sums exactly over ranks.
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        if not ks or min(ks) < 1:
            raise ValueError(f"top-k accuracy: ks={ks} must be non-empty and >= 1")
        self.ks = tuple(int(k) for k in ks)
        self.sums = torch.zeros(len(self.ks) + 1, dtype=torch.float64)  # correct@k..., count

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
        self.sums[-1] += label.numel()

    def state(self) -> torch.Tensor:
        return self.sums.clone()

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        if state.numel() != len(self.ks) + 1:
            raise ValueError(f"top-k accuracy state has {state.numel()} values, expected {len(self.ks) + 1}")
        n = float(state[-1])
        return {f"top{k}": (float(state[i]) / n if n > 0 else float("nan")) for i, k in enumerate(self.ks)} | \
            {"samples": n}
