"""The epoch plan: which samples each rank and each DataLoader worker reads, in which order.

Pure functions over shard sample counts, so the exactly-once arithmetic is testable on its own.

Layout of one epoch (documented policy; see ``docs/data.md``):

1. The split's samples (or its seeded N-shot subset) are laid out as one global sequence:
   shards in an order shuffled by ``(seed, epoch)`` (manifest order when not shuffling), each
   shard's samples in file order. A sequence is a list of :class:`Piece` (a run of members
   of one shard), so only shards overlapping a consumer's range are ever opened.
2. Rank ``r`` of ``W`` gets the contiguous slice ``[r*P, (r+1)*P)``. ``tail="drop"``:
   ``P = N // W`` and the last ``N % W`` samples of this epoch's order are not used (which
   ones changes every epoch when shuffling). ``tail="pad"``: ``P = ceil(N / W)``; positions
   past ``N`` wrap around to the start and are marked invalid (``__valid__ = False``), so an
   evaluation counts every real sample exactly once.
3. The rank's ``nb`` batches (``ceil(P/B)``, or ``P // B`` with ``drop_last``) are dealt to
   ``nw`` *layout workers* round-robin (batch ``j`` -> worker ``j % nw``), as the DataLoader
   collects them; each layout worker reads one contiguous chunk of the rank slice whose length
   is the sum of its batches' sizes. So every worker reads few shards, and the batch order is
   a pure function of (seed, epoch, rank, world size, workers, batch size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Piece:
    """A run of samples of one shard: ``members`` are ascending sample indices within the shard."""

    shard: int
    members: Sequence[int]
    valid: bool = True

    def __len__(self) -> int:
        return len(self.members)


def rng(*entropy: int) -> np.random.Generator:
    """A numpy generator seeded from a tuple of non-negative ints (stable across platforms)."""
    return np.random.default_rng([int(e) for e in entropy])


def subset_indices(total: int, subset: int, subset_seed: int) -> list[int] | None:
    """Sorted global indices (manifest order) of a seeded N-shot subset; None when subset == 0."""
    if subset <= 0:
        return None
    if subset > total:
        raise ValueError(f"subset={subset} is larger than the split ({total} samples)")
    return sorted(int(i) for i in rng(subset_seed, 0x5B5E7).choice(total, size=subset, replace=False))


def epoch_pieces(counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool,
                 subset: list[int] | None = None) -> list[Piece]:
    """The epoch's global sample sequence as pieces (step 1 of the module docstring)."""
    per_shard: list[Sequence[int]] = [range(c) for c in counts]
    if subset is not None:
        starts = np.cumsum([0] + list(counts))
        chosen: list[list[int]] = [[] for _ in counts]
        for g in subset:
            s = int(np.searchsorted(starts, g, side="right") - 1)
            chosen[s].append(g - int(starts[s]))
        per_shard = chosen
    order = list(range(len(counts)))
    if shuffle:
        order = [int(i) for i in rng(seed, epoch, 0x5A4D).permutation(len(counts))]
    return [Piece(s, per_shard[s]) for s in order if len(per_shard[s]) > 0]


def take(pieces: Sequence[Piece], start: int, stop: int) -> list[Piece]:
    """Pieces covering ``[start, stop)`` of the sequence; positions past its end wrap around
    (and are marked invalid), which is how ``tail="pad"`` pads."""
    total = sum(len(p) for p in pieces)
    if stop > start and total == 0:
        raise ValueError("cannot take samples from an empty sequence")
    out: list[Piece] = []
    pos = start
    while pos < stop:
        lap, offset = divmod(pos, total)
        want = min(stop - pos, total - offset)  # stay within one lap
        cum = 0
        for p in pieces:
            n = len(p)
            if cum + n > offset and want > 0:
                a = max(0, offset - cum)
                b = min(n, a + want)
                out.append(Piece(p.shard, p.members[a:b], p.valid and lap == 0))
                taken = b - a
                want -= taken
                offset += taken
                pos += taken
            cum += n
            if want == 0:
                break
    return out


def per_rank_count(total: int, world_size: int, tail: str) -> int:
    """Samples each rank yields per epoch: floor (drop) or ceil (pad) of total / world_size."""
    if tail == "drop":
        return total // world_size
    if tail == "pad":
        return math.ceil(total / world_size)
    raise ValueError(f"tail={tail!r}: must be 'drop' or 'pad'")


def num_batches(per_rank: int, batch_size: int, drop_last: bool) -> int:
    """Batches per rank per epoch."""
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def batch_size_of(j: int, per_rank: int, batch_size: int, drop_last: bool) -> int:
    """Size of the rank's batch ``j`` (only the last one can be short, and only without drop_last)."""
    nb = num_batches(per_rank, batch_size, drop_last)
    if j == nb - 1 and not drop_last:
        return per_rank - (nb - 1) * batch_size
    return batch_size


@dataclass(frozen=True)
class WorkerChunk:
    """What layout worker ``worker`` reads: ``count`` samples from ``offset`` of the rank slice,
    emitted as the rank's batches ``batches`` (ascending), whose sizes are ``sizes``."""

    worker: int
    offset: int
    count: int
    batches: list[int]
    sizes: list[int]


def worker_chunks(per_rank: int, batch_size: int, drop_last: bool, num_workers: int) -> list[WorkerChunk]:
    """Deal the rank's batches round-robin to ``num_workers`` and give each a contiguous chunk."""
    nw = max(1, num_workers)
    nb = num_batches(per_rank, batch_size, drop_last)
    out, offset = [], 0
    for w in range(nw):
        js = list(range(w, nb, nw))
        sizes = [batch_size_of(j, per_rank, batch_size, drop_last) for j in js]
        out.append(WorkerChunk(w, offset, sum(sizes), js, sizes))
        offset += sum(sizes)
    return out


def resampled_pieces(counts: Sequence[int], n: int, *entropy: int) -> list[Piece]:
    """``n`` samples drawn by picking whole shards at random (with replacement, weighted by
    size) from a generator seeded by ``entropy``: the resampled mode, not exactly-once."""
    total = sum(counts)
    if total == 0:
        raise ValueError("cannot resample an empty split")
    g = rng(*entropy)
    p = np.asarray(counts, dtype=np.float64) / total
    out: list[Piece] = []
    while n > 0:
        s = int(g.choice(len(counts), p=p))
        k = min(n, counts[s])
        out.append(Piece(s, range(k)))
        n -= k
    return out


def buffer_order(n: int, buffer: int, g: np.random.Generator) -> list[int]:
    """Output order of ``n`` items through a shuffle buffer of ``buffer`` slots: fill the buffer,
    then emit a random slot and put the next item there; drain randomly at the end. Computed on
    positions, so a stream knows in advance which samples it will emit (and skip) when."""
    if buffer <= 1:
        return list(range(n))
    buf: list[int] = []
    out: list[int] = []
    for i in range(n):
        if len(buf) < buffer:
            buf.append(i)
            continue
        j = int(g.integers(len(buf)))
        out.append(buf[j])
        buf[j] = i
    while buf:
        out.append(buf.pop(int(g.integers(len(buf)))))
    return out
