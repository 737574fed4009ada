"""Evaluation on every rank's part of a split, each sample counted once (Metric state summed).

Splits whose frames come in several sizes (KITTI's Eigen test split: five; user data for
segmentation) evaluate at any batch size: a batch with ragged keys (``data_shards.collate``) is
cut into same-size parts, each run through the model on its own, so a prediction never depends on
the other frames of its batch. Ranks agree on the number of forward passes per batch (a sharded
model gathers its parameters in every forward: unequal counts would hang), topping up with
throw-away passes over one padding sample.

The qualitative pictures (``visualize_to``) show samples spread over the whole split
(:func:`picture_positions`), not the first batch's neighbours: consecutive frames of one sequence
look alike.
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


def picture_count(task: Any) -> int:
    """How many qualitative pictures the task draws per evaluation (its config's ``vis_samples`` or
    ``visualize_max``; 4 when it has neither)."""
    cfg = getattr(task, "cfg", None)
    for name in ("vis_samples", "visualize_max"):
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    return 4


def picture_positions(num_batches: int, batch_size: int, count: int) -> dict[int, list[int]]:
    """``{batch index: [positions in the batch]}`` of ``count`` samples spread evenly over
    ``num_batches`` batches of ``batch_size`` (the first sample, then every (total / count)-th)."""
    total = num_batches * batch_size
    count = min(count, total)
    picks: dict[int, list[int]] = {}
    for k in range(count):
        batch, pos = divmod(k * total // count, batch_size)
        picks.setdefault(batch, []).append(pos)
    return picks


def _take_outputs(outputs: Any, idx: list[int], n: int) -> Any:
    """The samples ``idx`` of a task's outputs (a tensor, or dicts / lists of them, batch first)."""
    if isinstance(outputs, torch.Tensor) and outputs.dim() and outputs.shape[0] == n:
        return outputs[idx]
    if isinstance(outputs, dict):
        return {k: _take_outputs(v, idx, n) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)) and len(outputs) == n:
        return [outputs[i] for i in idx]
    return outputs


def _batch_len(batch: dict[str, Any]) -> int:
    """Samples in a collated batch."""
    if "__key__" in batch:
        return len(batch["__key__"])
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim())


def _draw(task: Any, engine: Any, part: dict[str, Any], outputs: Any, positions: list[int], out: Path) -> None:
    """The task's pictures of the samples at ``positions`` in ``part`` (positions past its end: its last)."""
    n = _batch_len(part)
    idx = sorted({min(p, n - 1) for p in positions})
    out.mkdir(parents=True, exist_ok=True)
    task.visualize(engine.parts, _take(part, idx, []), _take_outputs(outputs, idx, n), out)


def evaluate(engine: Any, task: Any, loader: Any, max_batches: int = 0,
             visualize_to: Optional[Path] = None, num_batches: int = 0) -> dict[str, float]:
    """Evaluate on every rank's part of a split; the Metric state is summed over ranks, so
    every sample counts once. With ``visualize_to``, the logging rank writes the task's
    qualitative PNGs (from the outputs already computed: the model may be sharded, so
    ``visualize`` must not run it) of samples spread over its ``num_batches`` batches (the
    loader's length; 0 = unknown: the first batch's samples). Leaves the model in train mode."""
    engine.train(False)
    metric = task.new_metric()
    batches = min(num_batches, max_batches) if max_batches and num_batches else num_batches
    picks: dict[int, list[int]] = {}
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            parts = uniform_parts(batch)
            if i == 0 and visualize_to is not None:
                picks = picture_positions(max(batches, 1), _batch_len(batch), picture_count(task))
            for j in range(agreed_passes(engine, len(parts))):
                part = engine.to_device(parts[j] if j < len(parts) else filler(parts[0]))
                outputs = engine.forward(task.eval_step, part)
                if j >= len(parts):
                    continue
                metric.update(part, outputs)
                if i in picks and j == 0 and visualize_to is not None and engine.is_logging_rank:
                    _draw(task, engine, part, outputs, picks[i], visualize_to)
    state = engine.all_reduce_sum(metric.state().to(torch.float64))
    engine.train(True)
    task.on_train_mode(engine.parts)
    return {k: float(v) for k, v in metric.compute(state).items()}
