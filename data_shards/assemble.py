"""A rank's batch from its workers' partial batches: in position order, whatever the worker count.

Each consumer (DataLoader worker, or the training process itself) delivers, for every step, a
*partial*: the positions of the step it read, the collated good samples among them (in position
order), and the positions that are stand-ins (``bad``: unreadable under ``on_corrupt="skip"``, or
dropped by a stage). :func:`assemble` puts the step's partials together in position order, with
one copy of each tensor (straight into pinned memory when asked); a stand-in is a copy of the
nearest good sample before it in the batch (after it, when none is before), ``__valid__`` False.
List-valued keys (``meta``, ``__key__``) stay lists; a key whose tensors differ in shape, within a
partial or between partials, becomes a per-sample list named in ``__ragged__`` (as ``collate`` does).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from data_shards.collate import RAGGED
from data_shards.reader import ShardError

BOOKKEEPING = ("__key__", "__valid__", "__skipped__")


def partial(step: int, positions: Sequence[int], bad: dict[int, tuple[str, str]], batch: Optional[dict]) -> dict:
    """One consumer's share of one step (``bad``: position -> (kind "corrupt" | "filtered", message))."""
    return {"step": step, "positions": [int(p) for p in positions], "bad": bad, "batch": batch}


def pack(parts: list[dict]) -> dict:
    """Several partials with every tensor of their batches in one buffer (and where each one is):
    a DataLoader worker then hands over one shared-memory block per item instead of one per tensor."""
    tensors = [(n, k, v) for n, p in enumerate(parts) if p["batch"] is not None
               for k, v in p["batch"].items() if isinstance(v, torch.Tensor)]
    starts = [0]
    for _, _, v in tensors:  # each tensor 64-byte aligned, so it can be viewed as its dtype
        starts.append(starts[-1] + -(-v.numel() * v.element_size() // 64) * 64)
    buf = torch.empty(starts[-1], dtype=torch.uint8)
    where = []
    for (n, k, v), at in zip(tensors, starts):
        size = v.numel() * v.element_size()
        buf[at:at + size].view(v.dtype).view(v.shape).copy_(v)
        where.append((n, k, v.dtype, tuple(v.shape), at, size))
    light = [{**p, "batch": None if p["batch"] is None else
              {k: v for k, v in p["batch"].items() if not isinstance(v, torch.Tensor)}} for p in parts]
    return {"parts": light, "buffer": buf, "where": where}


def unpack(packed: dict) -> list[dict]:
    """The partials of a :func:`pack`-ed item, their tensors views of its buffer (no copy)."""
    parts, buf = packed["parts"], packed["buffer"]
    for n, k, dtype, shape, at, size in packed["where"]:
        parts[n]["batch"][k] = buf[at:at + size].view(dtype).view(shape)
    return parts


def _sources(parts: Sequence[dict]) -> tuple[list[int], list[Optional[tuple[int, int]]]]:
    """The step's positions in order, and for each its (partial, row among that partial's goods)."""
    entries = []
    for i, part in enumerate(parts):
        row = 0
        for p in part["positions"]:
            if p in part["bad"]:
                entries.append((p, None))
            else:
                entries.append((p, (i, row)))
                row += 1
    entries.sort(key=lambda e: e[0])
    return [p for p, _ in entries], [src for _, src in entries]


def _resolve(sources: list[Optional[tuple[int, int]]], fallback: int) -> list[tuple[int, int]]:
    """Each row's source, a stand-in taking that of the nearest good row before it (else after
    it; with no good row at all, partial ``fallback``'s first row)."""
    good = [r for r, src in enumerate(sources) if src is not None]
    out = []
    for r, src in enumerate(sources):
        if src is None:
            before = [g for g in good if g < r]
            src = sources[before[-1]] if before else (sources[good[0]] if good else (fallback, 0))
        out.append(src)
    return out


def _tensor_key(parts: Sequence[dict], k: str) -> bool:
    """True when every partial holds key ``k`` as one tensor of the same trailing shape and dtype."""
    values = [p["batch"][k] for p in parts if p["batch"] is not None]
    return all(isinstance(v, torch.Tensor) for v in values) and len({(v.shape[1:], v.dtype) for v in values}) == 1


def _gather_tensor(parts: Sequence[dict], k: str, sources: list[tuple[int, int]], pin: bool) -> torch.Tensor:
    first = next(p["batch"][k] for p in parts if p["batch"] is not None)
    out = torch.empty((len(sources), *first.shape[1:]), dtype=first.dtype, pin_memory=pin)
    for r, (i, row) in _runs(sources):
        n = len(row)
        out[r:r + n].copy_(parts[i]["batch"][k][row[0]:row[0] + n])
    return out


def _runs(sources: list[tuple[int, int]]) -> list[tuple[int, tuple[int, list[int]]]]:
    """Output rows grouped into runs copied by one slice copy (consecutive rows of one partial):
    ``(first output row, (partial, its rows))`` (much faster than ``index_copy_`` on CPU)."""
    runs: list[tuple[int, tuple[int, list[int]]]] = []
    for r, (i, row) in enumerate(sources):
        if runs and runs[-1][1][0] == i and runs[-1][1][1][-1] + 1 == row and runs[-1][0] + len(runs[-1][1][1]) == r:
            runs[-1][1][1].append(row)
        else:
            runs.append((r, (i, [row])))
    return runs


def assemble(parts: Sequence[dict], pin: bool = False, fallback: Optional[dict] = None) -> dict:
    """The rank's batch for one step from its partials (module docstring). ``fallback``: a
    one-sample batch to stand in when no sample of the step is good (else :class:`ShardError`)."""
    positions, sources = _sources(parts)
    standin = [src is None for src in sources]
    live = [p for p in parts if p["batch"] is not None]
    if not live:
        if fallback is None:
            reason = next(m for p in parts for _, m in p["bad"].values())
            raise ShardError(f"{reason} (and no good sample seen yet to stand in for it)")
        parts = [*parts, partial(-1, [], {}, fallback)]
    elif len(live) == 1 and not any(standin) and not pin:
        return _finish(dict(live[0]["batch"]), parts, positions)  # already whole and in order
    resolved = _resolve(sources, len(parts) - 1)
    live = [p["batch"] for p in parts if p["batch"] is not None]
    ragged = [k for b in live for k in b.get(RAGGED, ())]
    out: dict[str, Any] = {}
    for k in dict.fromkeys(k for b in live for k in b if k not in ("__skipped__", RAGGED)):
        if k not in ragged and _tensor_key(parts, k):
            out[k] = _gather_tensor(parts, k, resolved, pin)
            continue
        values = [list(p["batch"][k]) if p["batch"] is not None else [] for p in parts]
        out[k] = [values[i][row] for i, row in resolved]
        if any(isinstance(b[k], torch.Tensor) for b in live):  # tensors of several shapes: per-sample list
            ragged.append(k)
    out["__valid__"] &= ~torch.tensor(standin, dtype=torch.bool)
    if ragged:
        out[RAGGED] = list(dict.fromkeys(ragged))
    return _finish(out, parts, positions)


def _finish(batch: dict, parts: Sequence[dict], positions: list[int]) -> dict:
    bad = {p: kind_msg for part in parts for p, kind_msg in part["bad"].items()}
    batch["__skipped__"] = [bad[p][1] for p in positions if p in bad and bad[p][0] == "corrupt"]
    return batch
