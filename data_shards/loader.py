"""Batches for training and evaluation: :class:`ResumableLoader` over a :class:`ShardStream`.

Its state is the epoch and the number of the epoch's positions consumed so far (by every rank
together): the epoch's order does not depend on the world size, worker count or batch size, so
after ``load_state_dict`` the rest of the epoch is exactly the samples not yet consumed, each
once, under any of them. Each DataLoader worker delivers its share of every step (possibly
empty); the loader puts the rank's batch together in position order
(:func:`data_shards.assemble.assemble`), so batches do not depend on the worker count either.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from data_shards.assemble import assemble, pack, unpack
from data_shards.deal import Steps, epoch_steps
from data_shards.stream import Plan, ShardStream
from data_shards.workers import ignore_stop_signals, start_workers


class _PartialView(IterableDataset):
    """One worker's share of every step under a plan, ``chunk`` steps per item (packed into one
    buffer): what the DataLoader workers iterate."""

    def __init__(self, stream: ShardStream, plan: Plan, chunk: int):
        super().__init__()
        self.stream, self.plan, self.chunk = stream, plan, chunk

    def __iter__(self) -> Iterator[dict]:
        parts = []
        for part in self.stream.iter_partials(self.plan):
            parts.append(part)
            if len(parts) == self.chunk:
                yield pack(parts)
                parts = []
        if parts:
            yield pack(parts)


def _as_is(batch: dict) -> dict:
    return batch


class ResumableLoader:
    """Batches of a ShardStream with an exact, tiny resume state ``{"epoch", "samples", "order"}``."""

    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                 pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.stream, self.batch_size, self.num_workers, self.drop_last = stream, batch_size, num_workers, drop_last
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.batches_per_epoch = self._steps(0).count
        if self.batches_per_epoch == 0:
            raise ValueError(f"split {stream.split!r}: {stream.total} samples give no step of {batch_size} per rank "
                             f"for {stream.world_size} ranks with drop_last=True and tail={stream.config.tail!r}")
        self.epoch = stream.epoch
        self.samples = 0
        self._fallback: dict | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _steps(self, start: int) -> Steps:
        s = self.stream
        return epoch_steps(s.total, start, s.world_size, self.batch_size, self.drop_last, s.config.tail)

    @property
    def corrupt_count(self) -> int:
        """Corrupt samples skipped so far (the stream's one count)."""
        return self.stream.corrupt_count

    @property
    def skipped(self) -> list[str]:
        return self.stream.skipped

    def state_dict(self) -> dict:
        """The data position: epoch, positions of its order consumed, and what fixes the order (JSON-able)."""
        return {"epoch": self.epoch, "samples": self.samples, "order": self.stream.order_identity()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position from :meth:`state_dict`, written under any world size, worker
        count or batch size. Mid-epoch the order must be the checkpoint's (same data, seed,
        lanes, ...); a state of the earlier per-layout order resumes only at an epoch boundary."""
        epoch = int(state["epoch"])
        if "samples" not in state:  # {"epoch", "batches", "layout"}: the order before lanes
            if int(state.get("batches", 0)) != 0:
                raise ValueError(f"data state {state}: written {state['batches']} batches into epoch {epoch} under "
                                 f"the earlier data order, which this version cannot continue exactly; resume from "
                                 f"a checkpoint saved at an epoch boundary, or finish the run with the version "
                                 f"that wrote it")
            self.epoch, self.samples = epoch, 0
            return
        samples = int(state["samples"])
        if epoch < 0 or not 0 <= samples <= self.stream.total:
            raise ValueError(f"data state {state}: samples must be in [0, {self.stream.total}] (the split's size)")
        if samples > 0 and "order" in state:
            now = self.stream.order_identity()
            diff = {k: (v, now.get(k)) for k, v in state["order"].items() if now.get(k) != v}
            if diff:
                raise ValueError(f"cannot resume mid-epoch ({samples} samples into epoch {epoch}) under another data "
                                 f"order: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in diff.items())}; use the "
                                 f"checkpoint's data settings or resume from an epoch boundary")
        self.epoch, self.samples = epoch, samples

    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch; then epoch += 1 and position 0."""
        self.stream.set_epoch(self.epoch)
        steps = self._steps(self.samples)
        plan = Plan(self.batch_size, self.drop_last, self.num_workers, self.samples)
        for t, parts in enumerate(self._partials(plan, steps.count)):
            batch = assemble(parts, self.pin_memory, self._fallback)
            for msg in batch.pop("__skipped__"):
                self.stream.corrupt.record(msg)  # counted here only: workers just mark stand-ins
            if self.stream.config.on_corrupt == "skip" or self.stream.config.stages:
                self._keep_fallback(batch)
            self.samples = min(steps.bounds(t)[1], self.stream.total)
            yield batch
        self.epoch += 1
        self.samples = 0

    def _partials(self, plan: Plan, count: int) -> Iterator[list[dict]]:
        """Per step, the partials of every consumer of this rank (one in-process, or one per worker)."""
        if count == 0:
            return
        if self.num_workers == 0:
            for part in self.stream.iter_partials(plan, 0, 1):
                yield [part]
            return
        # each item: one worker's shares of nw steps, so one item per step arrives, as with a batch per item
        nw = self.num_workers
        source: Any = start_workers(DataLoader(_PartialView(self.stream, plan, nw), batch_size=None,
                                               num_workers=nw, collate_fn=_as_is,
                                               worker_init_fn=ignore_stop_signals))
        for first in range(0, count, nw):
            shares = [unpack(next(source)) for _ in range(nw)]  # round-robin: worker w's share of these steps
            for j in range(min(nw, count - first)):
                parts = [share[j] for share in shares]
                if any(p["step"] != first + j for p in parts):
                    raise RuntimeError(f"loader workers out of step: expected step {first + j}, "
                                       f"got {[p['step'] for p in parts]}")
                yield parts
        for extra in source:  # let the DataLoader see its workers end (and shut them down)
            raise RuntimeError(f"loader worker delivered more than {count} steps (step {extra['parts'][0]['step']})")

    def _keep_fallback(self, batch: dict) -> None:
        """Keep a copy of the batch's last good sample: the stand-in if a later step has none."""
        good = batch["__valid__"].nonzero()
        if len(good):
            i = int(good[-1])
            self._fallback = {k: (v[i:i + 1].clone() if isinstance(v, torch.Tensor) else [v[i]])
                              for k, v in batch.items() if k != "__skipped__"}


def build_loader(stream: ShardStream, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                 pin_memory: bool = False) -> ResumableLoader:
    """A resumable batch loader over ``stream`` (every rank yields ``batches_per_epoch`` batches).

    ``pin_memory`` assembles batches in pinned memory for faster host-to-GPU copies (ignored without CUDA)."""
    return ResumableLoader(stream, batch_size, num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory)
