"""The global order of an epoch: one sequence of sample positions per (data, seed, epoch).

Pure functions over shard sample counts (see ``docs/data.md``, "The ordering contract"):

1. **Base sequence.** The split's samples (or its seeded N-shot subset; or, in resampled mode,
   whole shards drawn with replacement) with shards in an order permuted by ``(seed, epoch)``
   (manifest order without ``shuffle``), each shard's samples in file order.
2. **Lanes.** The base sequence is cut into ``L = min(lanes, N)`` contiguous runs ("lanes", lengths
   differing by at most one), which are put in ``L`` slots in a seeded random order (slot ``j``
   holds run ``j`` without ``shuffle``). Slots ``0 .. r-1`` (``r = N mod L``) hold the longer runs.
3. **Interleave.** Position ``p`` of the epoch is sample ``k = p // L`` of the lane in slot
   ``p mod L``: the sequence visits every lane once per round of ``L`` positions.

So a window of consecutive positions holds samples of many lanes (each a run of neighbouring
samples of one shard piece: one drive, for time-ordered data), while every lane is still a
contiguous run that one consumer can read once, front to back. Nothing here depends on the
number of ranks, workers or the batch size: :mod:`data_shards.deal` cuts the sequence into steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_LANES = 960
"""Lanes per epoch: >= 12 distinct lanes per rank batch of 12 at 64 ranks needs >= 768; 960 = 2^6*3*5 is
divided by most world sizes up to 64 (then every rank's share of a step comes from its own lanes)."""


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


def shard_members(counts: Sequence[int], subset: Sequence[int] | None) -> list[np.ndarray]:
    """Per shard, the ascending member indices the epoch uses (all, or those of the subset)."""
    if subset is None:
        return [np.arange(c, dtype=np.int64) for c in counts]
    starts = np.cumsum([0] + list(counts))
    chosen = np.asarray(subset, dtype=np.int64)
    which = np.searchsorted(starts, chosen, side="right") - 1
    return [chosen[which == s] - starts[s] for s in range(len(counts))]


@dataclass(frozen=True, eq=False)
class EpochOrder:
    """The epoch's sequence: position ``p`` (0 <= p < n) is sample ``member[i]`` of shard ``shard[i]``
    with ``i = base_index(p)``; positions ``p >= n`` (padding) repeat position ``p mod n``."""

    shard: np.ndarray
    """Base sequence: shard index of each sample."""
    member: np.ndarray
    """Base sequence: sample index within its shard."""
    lanes: int
    """L: lanes (slots) per round, ``min(requested lanes, n)``."""
    lane_start: np.ndarray
    """Per slot: index in the base sequence where its lane starts."""

    @property
    def n(self) -> int:
        """Samples in the epoch."""
        return len(self.shard)

    def slot(self, p: np.ndarray) -> np.ndarray:
        """Lane slot of each position (padding positions: that of the position they repeat)."""
        return (np.asarray(p) % self.n) % self.lanes

    def base_index(self, p: np.ndarray) -> np.ndarray:
        """Index in the base sequence of each position."""
        q = np.asarray(p) % self.n
        return self.lane_start[q % self.lanes] + q // self.lanes

    def samples(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, member) of each position."""
        i = self.base_index(p)
        return self.shard[i], self.member[i]


def interleave(shard: np.ndarray, member: np.ndarray, lanes: int, g: np.random.Generator | None) -> EpochOrder:
    """Cut a base sequence into lanes and put them in slots (randomly with ``g``; in order without)."""
    n = len(shard)
    if n == 0:
        raise ValueError("cannot order an empty epoch")
    if lanes < 1:
        raise ValueError(f"lanes={lanes}: must be >= 1")
    L = min(int(lanes), n)
    q, r = divmod(n, L)
    lane_len = np.full(L, q, dtype=np.int64)
    lane_len[:r] += 1
    run_slot = g.permutation(L) if g is not None else np.arange(L)  # run m of the base sequence -> slot
    run_len = lane_len[run_slot]
    run_start = np.concatenate([[0], np.cumsum(run_len)[:-1]])
    lane_start = np.empty(L, dtype=np.int64)
    lane_start[run_slot] = run_start
    return EpochOrder(shard, member, L, lane_start)


def _concat(order: Sequence[int], members: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    shards = [np.full(len(members[s]), s, dtype=np.int64) for s in order]
    parts = [members[s] for s in order]
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(shards), np.concatenate(parts).astype(np.int64)


def resampled_base(members: Sequence[np.ndarray], n: int, g: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples as whole shards drawn with replacement (weighted by size), the last one cut."""
    sizes = np.array([len(m) for m in members], dtype=np.float64)
    if sizes.sum() == 0:
        raise ValueError("cannot resample an empty split")
    drawn: list[int] = []
    have = 0
    while have < n:
        s = int(g.choice(len(members), p=sizes / sizes.sum()))
        drawn.append(s)
        have += len(members[s])
    shard, member = _concat(drawn, members)
    return shard[:n], member[:n]


def epoch_order(counts: Sequence[int], *, seed: int, epoch: int, shuffle: bool, lanes: int = DEFAULT_LANES,
                subset: Sequence[int] | None = None, resampled: bool = False) -> EpochOrder:
    """The epoch's global order (module docstring). ``subset``: global indices from
    :func:`subset_indices`; ``resampled``: shards drawn with replacement (not exactly-once)."""
    members = shard_members(counts, subset)
    n = sum(len(m) for m in members)
    if resampled:
        shard, member = resampled_base(members, n, rng(seed, epoch, 0x2E5))
    else:
        order = rng(seed, epoch, 0x5A4D).permutation(len(counts)) if shuffle else range(len(counts))
        shard, member = _concat([int(s) for s in order], members)
    return interleave(shard, member, lanes, rng(seed, epoch, 0x1A7E) if shuffle or resampled else None)
