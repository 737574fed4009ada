"""Dealing an epoch's global order into steps, ranks and DataLoader workers.

Pure functions (see ``docs/data.md``, "The ordering contract"):

* **Steps.** From position ``start`` (the samples consumed before a resume), step ``t`` of a run
  with ``W`` ranks and per-rank batch ``B`` takes the next ``Q = W*B`` positions of the epoch's
  order as a set. The tail (fewer than ``Q`` positions left): ``drop_last`` and ``tail="drop"`` drop
  it; ``drop_last`` and ``tail="pad"`` make one more full step whose positions past the end repeat
  the epoch's first samples, marked invalid; without ``drop_last`` one more step gives each rank
  ``rem // W`` (``tail="drop"``, dropping ``rem mod W``) or ``ceil(rem / W)`` (``"pad"``) positions.
* **Ranks.** Within a step each rank gets exactly its per-rank count. A position's home rank is its
  lane slot mod ``W`` (so a rank reads its own lanes, front to back); where a step holds more of a
  rank's positions than it may take (``W`` not dividing the lane count, a round's end, the tail),
  that rank gives its last ones to the ranks short of theirs (lowest rank first, in position order).
* **Workers.** A position's worker is ``(slot // W) mod num_workers``: each lane has one reader.
  Workers' shares of a step differ in size (possibly empty); the loader puts the rank's batch
  together from all of them, in position order, so batches do not depend on the worker count.

The result depends on ``W`` and ``B`` only through which positions form a step's set and which
rank reads them; the sequence itself (:mod:`data_shards.epoch_order`) does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_shards.epoch_order import EpochOrder

TAILS = ("drop", "pad")


@dataclass(frozen=True)
class Steps:
    """The steps left in an epoch of ``n`` positions from ``start``: ``full`` steps of ``world*batch``
    positions, then, if ``last > 0``, one step of ``world*last`` (positions >= n are padding)."""

    n: int
    start: int
    world: int
    batch: int
    full: int
    last: int

    @property
    def count(self) -> int:
        """Steps (batches per rank) left in the epoch."""
        return self.full + (1 if self.last else 0)

    @property
    def end(self) -> int:
        """The position after the last step's (may pass ``n``: padding)."""
        return self.start + self.full * self.world * self.batch + self.world * self.last

    def bounds(self, t: int) -> tuple[int, int]:
        """Positions ``[a, b)`` of step ``t``."""
        q = self.world * self.batch
        a = self.start + t * q
        return a, a + (q if t < self.full else self.world * self.last)

    def per_rank(self, t: int) -> int:
        """Samples each rank gets in step ``t``."""
        return self.batch if t < self.full else self.last


def epoch_steps(n: int, start: int, world: int, batch: int, drop_last: bool, tail: str) -> Steps:
    """The steps of an epoch of ``n`` positions left from ``start`` (module docstring)."""
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r}: must be 'drop' or 'pad'")
    if world < 1 or batch < 1 or not 0 <= start <= n:
        raise ValueError(f"world={world}, batch={batch}, start={start}: need world, batch >= 1 and 0 <= start <= {n}")
    full, rem = divmod(n - start, world * batch)
    if rem == 0:
        last = 0
    elif drop_last:
        last = batch if tail == "pad" else 0
    else:
        last = math.ceil(rem / world) if tail == "pad" else rem // world
    return Steps(n, start, world, batch, full, last)


def balance(home: np.ndarray, world: int, per_rank: int) -> np.ndarray:
    """Rank of each of one step's positions (ascending): its home rank, except that a rank with more
    than ``per_rank`` positions gives its last ones to the ranks with fewer (lowest rank first)."""
    counts = np.bincount(home, minlength=world)
    if (counts == per_rank).all():
        return home
    rank = home.copy()
    given = np.sort(np.concatenate([np.flatnonzero(home == r)[per_rank:] for r in range(world)]))
    k = 0
    for r in np.flatnonzero(counts < per_rank):
        need = per_rank - int(counts[r])
        rank[given[k:k + need]] = r
        k += need
    return rank


@dataclass(frozen=True, eq=False)
class Dealt:
    """Every position of the remaining steps (ascending) with its step, rank and worker."""

    steps: Steps
    pos: np.ndarray
    step: np.ndarray
    rank: np.ndarray
    worker: np.ndarray

    def positions(self, rank: int, worker: int | None = None) -> list[np.ndarray]:
        """Per step, the ascending positions that ``rank`` (its ``worker``; None: all) reads."""
        mask = self.rank == rank
        if worker is not None:
            mask &= self.worker == worker
        pos, step = self.pos[mask], self.step[mask]
        cuts = np.searchsorted(step, np.arange(self.steps.count + 1))
        return [pos[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def deal(order: EpochOrder, steps: Steps, num_workers: int) -> Dealt:
    """Deal the remaining steps' positions to ranks and workers (module docstring)."""
    w, nw = steps.world, max(1, num_workers)
    pos = np.arange(steps.start, steps.end, dtype=np.int64)
    q = w * steps.batch
    step = np.minimum((pos - steps.start) // q, steps.full).astype(np.int64)
    slot = order.slot(pos)
    rank = slot % w
    counts = np.bincount(step * w + rank, minlength=steps.count * w).reshape(steps.count, w)
    want = np.array([steps.per_rank(t) for t in range(steps.count)], dtype=np.int64)
    for t in np.flatnonzero((counts != want[:, None]).any(axis=1)):
        a, b = steps.bounds(int(t))
        a, b = a - steps.start, b - steps.start
        rank[a:b] = balance(rank[a:b], w, int(want[t]))
    return Dealt(steps, pos, step, rank, (slot // w) % nw)
