"""Stacking decoded samples into a batch: the one collate function every loader uses.

Tensors of one key are stacked along a new dim 0. When their shapes differ (an evaluation split
whose frames come in several sizes, as KITTI's Eigen test split with five), the key holds the
list of per-sample tensors instead and is named in ``batch["__ragged__"]``: evaluation splits
such a batch into same-size parts (``trainer.evaluation``), training refuses it with
:func:`require_uniform`.
"""
from __future__ import annotations

from typing import Any

import torch

#: Batch key listing the keys whose tensors could not be stacked (absent when every key stacked).
RAGGED = "__ragged__"


def _stack_or_list(key: str, values: list[torch.Tensor], keys: list[str]) -> tuple[Any, bool]:
    """(stacked tensor, False), or (the list, True) when only the sizes differ."""
    first = values[0]
    if all(v.shape == first.shape for v in values):
        return torch.stack(values), False
    if all(v.dim() == first.dim() and v.dtype == first.dtype for v in values):
        return list(values), True
    shapes = sorted({f"{tuple(v.shape)} {v.dtype}" for v in values})
    raise ValueError(f"cannot batch key {key!r} over samples {keys}: tensors of different rank or dtype ({shapes})")


def collate(samples: list[dict]) -> dict:
    """Stack a batch: tensors along dim 0 (per-sample lists for ragged keys, named in
    ``__ragged__``), ``meta``/``__key__`` as lists, ``__valid__`` as bool."""
    out: dict[str, Any] = {
        "__key__": [s["__key__"] for s in samples],
        "__valid__": torch.tensor([bool(s["__valid__"]) for s in samples], dtype=torch.bool),
        "__skipped__": [s["__skipped__"] for s in samples if "__skipped__" in s],
    }
    ragged = []
    for k, v in samples[0].items():
        if k in out:
            continue
        if isinstance(v, torch.Tensor):
            missing = [s["__key__"] for s in samples if k not in s]
            if missing:
                raise ValueError(f"cannot batch key {k!r} over samples {out['__key__']}: missing in {missing}")
            out[k], is_ragged = _stack_or_list(k, [s[k] for s in samples], out["__key__"])
            if is_ragged:
                ragged.append(k)
        else:
            out[k] = [s.get(k) for s in samples]
    if ragged:
        out[RAGGED] = ragged
    return out


def sizes_of(batch: dict, key: str) -> list[tuple[int, ...]]:
    """The distinct per-sample shapes of ``batch[key]`` (several for a ragged key), in batch order."""
    value = batch[key]
    shapes = [tuple(value.shape[1:])] if isinstance(value, torch.Tensor) else [tuple(v.shape) for v in value]
    return list(dict.fromkeys(shapes))


def require_uniform(batch: dict) -> dict:
    """``batch`` unchanged if every key stacked; else a ValueError naming the key, the sizes and
    the samples (a training batch needs one size: convert with ``--resize`` or set a crop)."""
    ragged = batch.get(RAGGED)
    if not ragged:
        return batch
    key = ragged[0]
    raise ValueError(f"cannot batch key {key!r} over samples {batch['__key__']}: sizes "
                     f"{[s for s in sizes_of(batch, key)]} differ; a training batch needs one size "
                     "(convert the split with --resize H W, or set a training crop)")
