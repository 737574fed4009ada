"""The evaluation-metric contract: a summable accumulator (one float64 vector a split's ranks add up).

Every metric in :mod:`trainer.metrics` implements it, and every task's ``new_metric`` returns one;
``trainer.evaluation`` sums :meth:`Metric.state` over ranks and calls :meth:`Metric.compute` once.
It lives here, not in ``trainer.tasks.base`` (which re-exports it), so metrics need not import tasks.
"""
from __future__ import annotations

import abc
from typing import Any

import torch


class Metric(abc.ABC):
    """Accumulates evaluation statistics as one summable float64 vector.

    Distributed evaluation all-reduces (sums) :meth:`state` over ranks, then calls
    :meth:`compute` on the sum, so every sample counts exactly once whatever the world size.
    """

    @abc.abstractmethod
    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        """Add one batch. Samples with ``batch['__valid__'] == False`` (padding) must be ignored."""

    @abc.abstractmethod
    def state(self) -> torch.Tensor:
        """1-D float64 CPU tensor of sums (e.g. a flattened confusion matrix, metric sums + count)."""

    @abc.abstractmethod
    def compute(self, state: torch.Tensor) -> dict[str, float]:
        """Final metrics from a (possibly all-reduced) state vector."""
