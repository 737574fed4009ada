"""Stacking decoded samples into a batch: the one collate function every loader uses."""
from __future__ import annotations

from typing import Any

import torch


def collate(samples: list[dict]) -> dict:
    """Stack a batch: tensors along dim 0, ``meta``/``__key__`` as lists, ``__valid__`` as bool."""
    out: dict[str, Any] = {
        "__key__": [s["__key__"] for s in samples],
        "__valid__": torch.tensor([bool(s["__valid__"]) for s in samples], dtype=torch.bool),
        "__skipped__": [s["__skipped__"] for s in samples if "__skipped__" in s],
    }
    for k, v in samples[0].items():
        if k in out:
            continue
        if isinstance(v, torch.Tensor):
            try:
                out[k] = torch.stack([s[k] for s in samples])
            except (KeyError, RuntimeError) as e:
                raise ValueError(f"cannot batch key {k!r} over samples {out['__key__']}: {e}") from None
        else:
            out[k] = [s.get(k) for s in samples]
    return out
