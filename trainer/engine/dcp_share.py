"""Each rank's share of a DCP state dict: what it stages and writes, so that no rank copies state that
another rank writes.

DCP writes one copy of every entry that is replicated across ranks (plain tensors under DDP; buffers,
optimizer step counts and param groups under FSDP2) but every rank passes, and a background save first
copies, all of them: under DDP each rank would stage the whole model and optimizer though it writes about
half. Here each replicated entry goes to one rank only, chosen from names and sizes alone (the same on
every rank, so the shares are disjoint and together whole without a collective); DTensor shards stay
with their rank. Module buffers go to rank 0: they are per rank in truth (BatchNorm statistics of each
rank's own batches) and the checkpoint holds rank 0's, as ``weights.pt`` does. The checkpoint written
from the shares has the same entries as one written from whole state dicts, so loading is unchanged.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

#: where an entry sits in nested dicts: its keys, outermost first
Where = tuple[Any, ...]


def leaves(tree: Any, prefix: Where = ()) -> Iterator[tuple[Where, Any]]:
    """``(path, value)`` for every non-dict value under nested dicts (lists are values, as is an empty dict)."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, prefix + (key,))
    else:
        yield prefix, tree


def _is_shard(value: Any) -> bool:
    """A DTensor: each rank holds (and writes) its own part of it."""
    return torch.is_tensor(value) and hasattr(value, "placements")


def assign(sizes: dict[Where, int], world_size: int, rank0: set[Where]) -> dict[Where, int]:
    """The rank that stages each entry: ``rank0`` entries rank 0, the others largest first to the rank with
    the fewest bytes so far (ties: the lowest rank). Depends only on ``sizes`` (same on every rank)."""
    load = [0] * world_size
    owner: dict[Where, int] = {}
    for path in sorted(sizes, key=lambda p: (p not in rank0, -sizes[p], tuple(map(str, p)))):
        rank = 0 if path in rank0 else min(range(world_size), key=lambda r: (load[r], r))
        owner[path] = rank
        load[rank] += sizes[path]
    return owner


def own_share(state: dict[str, Any], rank: int, world_size: int, rank0: set[Where]) -> dict[str, Any]:
    """The entries of ``state`` (nested dicts) that ``rank`` stages and writes: its DTensor shards, and the
    replicated entries :func:`assign` gives it (``rank0``: paths that must be rank 0's; every value that is
    not a tensor is). The same nesting, holding the same objects (nothing is copied)."""
    if world_size == 1:
        return state
    entries = [(p, v) for p, v in leaves(state) if p]
    sizes = {p: v.numel() * v.element_size() for p, v in entries if torch.is_tensor(v) and not _is_shard(v)}
    pinned = rank0 | {p for p, v in entries if not torch.is_tensor(v)}
    owner = assign({**sizes, **{p: 0 for p in pinned if p not in sizes}}, world_size, pinned)
    return _rebuild([(p, v) for p, v in entries if _is_shard(v) or owner[p] == rank])


def local_bytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in ``state`` that this rank holds (a DTensor's local part)."""
    tensors = (v.to_local() if _is_shard(v) else v for _, v in leaves(state) if torch.is_tensor(v))
    return sum(t.numel() * t.element_size() for t in tensors)


def _rebuild(entries: list[tuple[Where, Any]]) -> dict[str, Any]:
    """Nested dicts from ``(path, value)`` pairs."""
    tree: dict[str, Any] = {}
    for path, value in entries:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def unwrap_shards(state: dict[str, Any]) -> tuple[dict[str, Any], dict[Where, Any]]:
    """``state`` with each DTensor replaced by its local tensor (a plain copy of it is about twice as fast
    as a DTensor's, whose every op goes through DTensor's dispatch), and what :func:`rewrap_shards` needs
    to make DTensors of the copies again."""
    specs = {p: v for p, v in leaves(state) if _is_shard(v)}
    if not specs:
        return state, {}
    plain = [(p, v.to_local() if p in specs else v) for p, v in leaves(state) if p]
    return _rebuild(plain), {p: (v.device_mesh, v.placements, v.shape, v.stride()) for p, v in specs.items()}


def rewrap_shards(plain: dict[str, Any], specs: dict[Where, Any]) -> dict[str, Any]:
    """The DTensors of :func:`unwrap_shards` again, around the (copied) local tensors of ``plain``; no
    collective (the layout is the one they had)."""
    if not specs:
        return plain
    from torch.distributed.tensor import DTensor

    def wrap(path: Where, value: Any) -> Any:
        if path not in specs:
            return value
        mesh, placements, shape, stride = specs[path]
        return DTensor.from_local(value, mesh, placements, run_check=False, shape=shape, stride=stride)

    return _rebuild([(p, wrap(p, v)) for p, v in leaves(plain) if p])
