"""What a checkpoint holds besides the engine's model / optimizer state, as ``Stateful`` objects
(``state_dict()`` / ``load_state_dict()``) the checkpointer saves and restores by name.

Shared (written once, by rank 0): :class:`Progress` — step count, tracking run id, resolved
config, and the data position (epoch, positions of its global order consumed by all ranks), which
resumes the stream exactly on another world size. Per rank: :class:`RNGState`, the data loader (its exact position), and
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
    """The run's shared progress: step, tracking run id, resolved config (YAML), and the data
    position (the loader's state: the same on every rank, whatever the world size)."""

    def __init__(self, loader: Any, config_yaml: str, batch_size: int, world_size: int) -> None:
        self.loader, self.config_yaml = loader, config_yaml
        self.batch_size, self.world_size = int(batch_size), int(world_size)
        self.step = 0
        self.run_id: Optional[str] = None
        self.saved: dict[str, Any] = {}
        """What :meth:`load_state_dict` read (the checkpoint's config, batch size, world size...)."""

    def state_dict(self) -> dict[str, Any]:
        data = self.loader.state_dict()
        return {"step": self.step, "run_id": self.run_id, "config": self.config_yaml, "epoch": int(data["epoch"]),
                "data": data, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = dict(state)
        self.step, self.run_id = int(state["step"]), state.get("run_id")

    def reposition(self) -> dict[str, Any]:
        """After a change of world size: put the loader at the checkpoint's data position (the global
        order does not depend on the world size, so this is exact). Returns the position loaded.
        Checkpoints from before the global order hold only ``epoch`` and ``samples``: they resume at
        an epoch boundary, and the loader refuses them mid-epoch with one line saying why."""
        data = self.saved.get("data")
        if data is None:
            per_step = int(self.saved["batch_size"]) * int(self.saved["world_size"])
            data = {"epoch": int(self.saved["epoch"]), "batches": int(self.saved["samples"]) // per_step}
        self.loader.load_state_dict(data)
        return data
