"""A task's loaders: its shard streams in the seeded global order, batched, one per split.

Read by the loop (training and evaluation) and by the preflight (which builds the training loader on
the meta device before the process group starts).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import torch

from trainer.config import DataConfig


class BatchLoader(Protocol):
    """A split's batches, resumable (a ``data_shards.loader.ResumableLoader``: its state is the same on
    every rank and loads under another world size, see ``trainer.checkpointing.run_state.Progress.reposition``).
    Where it has ``batches_per_epoch``, the loop shows progress against it."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: ``make_loader(split, train) -> loader`` (training: seeded order, full batches; evaluation: in order, padded)
LoaderFactory = Callable[[str, bool], BatchLoader]


class SampleTask(Protocol):
    """What the loaders need of a task: the keys it reads and its per-sample transforms."""

    def stream_keys(self, train: bool) -> tuple[str, ...]: ...

    def train_transform(self, sample: dict, generator: torch.Generator) -> dict: ...

    def eval_transform(self, sample: dict) -> dict: ...


class RankPlace(Protocol):
    """Where this process reads: its rank among ``world_size`` (an Engine, or a stand-in)."""

    rank: int
    world_size: int


def shard_loader_factory(data: DataConfig, task: SampleTask, place: RankPlace, *, batch_size: int,
                         seed: int) -> LoaderFactory:
    """Loaders over ``data_shards`` streams from the run's ``data`` settings: training in the seeded
    global order with ``data.tail_policy``; evaluation in order with ``tail="pad"`` so every sample
    counts exactly once."""
    from data_shards.loader import build_loader
    from data_shards.stream import ShardStream, StreamConfig

    d = data

    def make(split: str, train: bool) -> BatchLoader:
        if train:
            transform = task.train_transform
        else:
            def transform(sample: dict, generator: torch.Generator) -> dict:
                return task.eval_transform(sample)
        stream = ShardStream(StreamConfig(
            d.root, split, rank=place.rank, world_size=place.world_size, seed=int(seed), shuffle=train,
            lanes=int(d.lanes), tail=d.tail_policy if train else "pad", resampled=bool(d.resampled) and train,
            on_corrupt=d.on_corrupt, keys=task.stream_keys(train), subset=d.subset if train else 0,
            subset_seed=d.subset_seed, transform=transform))
        return build_loader(stream, int(batch_size), num_workers=int(d.num_workers), drop_last=train)

    return make
