"""Evaluation on every rank's part of a split, each sample counted once (Metric state summed).

Splits whose frames come in several sizes (KITTI's Eigen test split: five; user data for
segmentation) evaluate at any batch size: a batch with ragged keys (``data_shards.collate``) is
cut into same-size parts, each run through the model on its own, so a prediction never depends on
the other frames of its batch. Ranks agree on the number of forward passes per batch (a sharded
model gathers its parameters in every forward: unequal counts would hang), topping up with
throw-away passes over one padding sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from data_shards.collate import RAGGED


def _take(batch: dict[str, Any], idx: list[int], ragged: list[str]) -> dict[str, Any]:
    """The samples ``idx`` of a collated batch (ragged keys stacked: they share a size there)."""
    n = len(batch["__key__"])
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k == RAGGED:
            continue
        if k in ragged:
            out[k] = torch.stack([v[i] for i in idx])
        elif isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n:
            out[k] = v[idx]
        elif isinstance(v, list) and len(v) == n:
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out


def uniform_parts(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """``[batch]`` when every key stacked; else one sub-batch per distinct combination of the
    ragged keys' sizes, in order of first appearance (samples keep their order within a part)."""
    ragged = list(batch.get(RAGGED) or ())
    if not ragged:
        return [batch]
    groups: dict[tuple, list[int]] = {}
    for i in range(len(batch["__key__"])):
        groups.setdefault(tuple(tuple(batch[k][i].shape) for k in ragged), []).append(i)
    return [_take(batch, idx, ragged) for idx in groups.values()]


def filler(part: dict[str, Any]) -> dict[str, Any]:
    """One sample of ``part`` marked as padding (``__valid__`` False): a forward pass that
    no metric counts and no export writes."""
    one = _take(part, [0], [])
    one["__valid__"] = torch.zeros(1, dtype=torch.bool)
    return one


def agreed_passes(engine: Any, passes: int) -> int:
    """The largest ``passes`` over all ranks (every rank must call it for every batch)."""
    if engine.world_size == 1:
        return passes
    counts = torch.zeros(engine.world_size, dtype=torch.float64)
    counts[engine.rank] = passes
    return int(engine.all_reduce_sum(counts).max())


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
            parts = uniform_parts(batch)
            for j in range(agreed_passes(engine, len(parts))):
                part = engine.to_device(parts[j] if j < len(parts) else filler(parts[0]))
                outputs = engine.forward(task.eval_step, part)
                if j >= len(parts):
                    continue
                metric.update(part, outputs)
                if i == 0 and j == 0 and visualize_to is not None and engine.is_logging_rank:
                    visualize_to.mkdir(parents=True, exist_ok=True)
                    task.visualize(engine.parts, part, outputs, visualize_to)
    state = engine.all_reduce_sum(metric.state().to(torch.float64))
    engine.train(True)
    task.on_train_mode(engine.parts)
    return {k: float(v) for k, v in metric.compute(state).items()}
