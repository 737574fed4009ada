"""What a checkpoint holds besides the engine's model / optimizer state, as ``Stateful`` objects
(``state_dict()`` / ``load_state_dict()``) the checkpointer saves and restores by name.

Shared (written once, by rank 0): :class:`Progress` — step count, tracking run id, resolved
config, the global data position (epoch, samples consumed) used to reposition the stream on
another world size. Per rank: :class:`RNGState`, the data loader (its exact position), and
:class:`RankBuffers` (BatchNorm running statistics: each rank keeps its own).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

from trainer.distributed import rng_state, set_rng_state


class Stateful(Protocol):
    """Anything resumable."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """This rank's python / numpy / torch (/ CUDA) generators."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class RankBuffers:
    """This rank's own module buffers, through the engine (see ``Engine.rank_buffers``)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        return self.engine.rank_buffers()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_rank_buffers(state)


class Progress:
    """The run's shared progress: step, tracking run id, resolved config (YAML), and the global
    data position (epoch and samples consumed in it, over all ranks)."""

    def __init__(self, loader: Any, config_yaml: str, batch_size: int, world_size: int) -> None:
        self.loader, self.config_yaml = loader, config_yaml
        self.batch_size, self.world_size = int(batch_size), int(world_size)
        self.step = 0
        self.run_id: Optional[str] = None
        self.saved: dict[str, Any] = {}
        """What :meth:`load_state_dict` read (the checkpoint's config, batch size, world size...)."""

    def state_dict(self) -> dict[str, Any]:
        pos = self.loader.state_dict()
        return {"step": self.step, "run_id": self.run_id, "config": self.config_yaml, "epoch": int(pos["epoch"]),
                "samples": int(pos["batches"]) * self.batch_size * self.world_size, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = dict(state)
        self.step, self.run_id = int(state["step"]), state.get("run_id")

    def reposition(self) -> int:
        """After a world-size or batch-size change: keep the epoch and skip the batches that the
        samples already consumed cover (the order within that epoch is not the original run's).
        Returns the batch the loader resumes at."""
        per_batch = self.batch_size * self.world_size
        batches = min(self.loader.batches_per_epoch, int(self.saved["samples"]) // per_batch)
        self.loader.load_state_dict({"epoch": int(self.saved["epoch"]), "batches": batches})
        return batches
