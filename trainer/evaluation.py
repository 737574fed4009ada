"""Evaluation on every rank's part of a split, each sample counted once (Metric state summed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch


def evaluate(engine: Any, task: Any, loader: Any, max_batches: int = 0,
             visualize_to: Optional[Path] = None) -> dict[str, float]:
    """Evaluate on every rank's part of a split; the Metric state is summed over ranks, so
    every sample counts once. With ``visualize_to``, the logging rank writes the task's
    qualitative PNGs for its first batch (from the outputs already computed: the model may be
    sharded, so ``visualize`` must not run it). Leaves the model in train mode."""
    engine.train(False)
    metric = task.new_metric()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = engine.to_device(batch)
            outputs = engine.forward(task.eval_step, batch)
            metric.update(batch, outputs)
            if i == 0 and visualize_to is not None and engine.is_logging_rank:
                visualize_to.mkdir(parents=True, exist_ok=True)
                task.visualize(engine.parts, batch, outputs, visualize_to)
    state = engine.all_reduce_sum(metric.state().to(torch.float64))
    engine.train(True)
    task.on_train_mode(engine.parts)
    return {k: float(v) for k, v in metric.compute(state).items()}
