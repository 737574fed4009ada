"""Batches for training and evaluation: :class:`ResumableLoader` over a :class:`ShardStream`.

Its ``state_dict()`` is the number of batches handed out in the current epoch; after
``load_state_dict`` the rest of the epoch is exactly the unseen batches, in the uninterrupted
order, for any number of DataLoader workers (each worker runs the stream under the same
:class:`~data_shards.stream.Plan`).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from data_shards import split as layout
from data_shards.collate import collate
from data_shards.stream import Plan, ShardStream
from data_shards.workers import ignore_stop_signals, start_workers


class _BatchView(IterableDataset):
    """Yields collated batches from a ShardStream under a plan; what the DataLoader workers iterate."""

    def __init__(self, stream: ShardStream, plan: Plan):
        super().__init__()
        self.stream, self.plan = stream, plan

    def __iter__(self) -> Iterator[dict]:
        for batch in self.stream.iter_batches(self.plan):
            yield collate(batch)


def _as_is(batch: dict) -> dict:
    return batch


class ResumableLoader:
    """Batches of a ShardStream with an exact, tiny resume state ``{"epoch", "batches"}``."""

    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                 pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.stream, self.batch_size, self.num_workers, self.drop_last = stream, batch_size, num_workers, drop_last
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.batches_per_epoch = layout.num_batches(stream.num_samples(), batch_size, drop_last)
        if self.batches_per_epoch == 0:
            raise ValueError(f"split {stream.split!r}: {stream.num_samples()} samples per rank give no full batch "
                             f"of {batch_size} with drop_last=True")
        self.epoch = stream.epoch
        self.batches = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def corrupt_count(self) -> int:
        """Corrupt samples skipped so far (the stream's one count)."""
        return self.stream.corrupt_count

    @property
    def skipped(self) -> list[str]:
        return self.stream.skipped

    def layout(self) -> dict:
        """What fixes the order of an epoch's batches besides the epoch number."""
        s = self.stream
        return {"world_size": s.world_size, "rank": s.rank, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "drop_last": self.drop_last, "seed": s.seed,
                "samples": s.total, "shuffle_buffer": s.shuffle_buffer, "tail": s.tail}

    def state_dict(self) -> dict:
        """The data position: epoch and batches handed out in it, plus the layout (JSON-able)."""
        return {"epoch": self.epoch, "batches": self.batches, "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position from :meth:`state_dict`.

        Mid-epoch (``batches > 0``) the layout must be the checkpoint's: with another world
        size, worker count or batch size the consumed batches would be other samples, and
        exactly-once would silently break. At an epoch boundary any layout may resume.
        """
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if epoch < 0 or not 0 <= batches <= self.batches_per_epoch:
            raise ValueError(f"data state {state}: batches must be in [0, {self.batches_per_epoch}] "
                             f"(the run's world size, batch size and split must match the checkpoint's)")
        if batches > 0 and "layout" in state:
            now = self.layout()
            diff = {k: (v, now.get(k)) for k, v in state["layout"].items() if now.get(k) != v}
            if diff:
                raise ValueError(f"cannot resume mid-epoch ({batches} batches into epoch {epoch}) with a different "
                                 f"data layout: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in diff.items())}; "
                                 f"use the checkpoint's settings or resume from an epoch boundary")
        self.epoch, self.batches = epoch, batches

    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch; then epoch += 1 and position 0."""
        stream = self.stream
        stream.set_epoch(self.epoch)
        plan = Plan(self.batch_size, self.drop_last, self.num_workers, self.batches)
        if self.batches < self.batches_per_epoch:
            if self.num_workers == 0 and not self.pin_memory:
                source: Any = (collate(b) for b in stream.iter_batches(plan, 0, 1))
            else:
                source = start_workers(DataLoader(_BatchView(stream, plan), batch_size=None, num_workers=self.num_workers,
                                           collate_fn=_as_is, pin_memory=self.pin_memory,
                                           worker_init_fn=ignore_stop_signals))
            for batch in source:
                for msg in batch.pop("__skipped__"):
                    stream.corrupt.record(msg)  # counted here only: workers just mark stand-ins
                self.batches += 1
                yield batch
        self.epoch += 1
        self.batches = 0


def build_loader(stream: ShardStream, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                 pin_memory: bool = False) -> ResumableLoader:
    """A resumable batch loader over ``stream`` (every rank yields ``batches_per_epoch`` batches).

    ``pin_memory`` pins batches for faster host-to-GPU copies (ignored without CUDA)."""
    return ResumableLoader(stream, batch_size, num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory)
