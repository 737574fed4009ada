"""Process environment from torchrun (RANK, LOCAL_RANK, WORLD_SIZE...), per-rank seeding and
rank-prefixed logging. Knows nothing of the parallel strategies (that is ``trainer.engine``).
"""
from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as torchrun describes it (defaults: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    restart_count: int = 0

    @property
    def distributed(self) -> bool:
        """True when launched by torchrun (even with one process)."""
        return "MASTER_ADDR" in os.environ and "RANK" in os.environ

    @property
    def is_logging_rank(self) -> bool:
        """Only global rank 0 writes summaries, metrics and the progress bar."""
        return self.rank == 0

    @property
    def is_local_leader(self) -> bool:
        """Local rank 0: one process per node (for per-node system metrics)."""
        return self.local_rank == 0


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def dist_env() -> DistEnv:
    """Read the torchrun environment; one process (rank 0 of 1) when it is not set."""
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", 0)
    local_world = _int_env("LOCAL_WORLD_SIZE", 1)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    node = _int_env("GROUP_RANK", rank // max(1, local_world))
    return DistEnv(rank, world, local_rank, local_world, node, _int_env("TORCHELASTIC_RESTART_COUNT", 0))


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed derived from the run seed (distinct per rank, stable across restarts)."""
    return (int(seed) * 1_000_003 + rank * 7919) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG this process uses, in a form ``torch.load(weights_only=True)`` accepts."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _RankFilter(logging.Filter):
    def __init__(self, env: DistEnv) -> None:
        super().__init__()
        self.prefix = f"[rank {env.rank}/{env.world_size} node {env.node_rank}]"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = self.prefix
        return True


def _not_file_only(record: logging.LogRecord) -> bool:
    """Records logged with ``extra={"file_only": True}`` go to the rank's log file, not to stderr
    (e.g. a failure the entry point reports on the terminal itself, once)."""
    return not getattr(record, "file_only", False)


def setup_logging(env: DistEnv, log_dir: Optional[str] = None, level: int = logging.INFO) -> logging.Logger:
    """Rank-prefixed logs: stderr on every rank (warnings only off rank 0) + ``<log_dir>/rank<N>.log``;
    records marked ``file_only`` skip stderr."""
    logger = logging.getLogger("geoprime")
    logger.setLevel(level)
    teardown_logging()
    fmt = logging.Formatter("%(asctime)s %(rank_prefix)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(level if env.is_logging_rank else logging.WARNING)
    stream.addFilter(_not_file_only)
    handlers.append(stream)
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir) / f"rank{env.rank}.log"))
    for h in handlers:
        h._geoprime = True  # type: ignore[attr-defined]
        h.addFilter(_RankFilter(env))
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def teardown_logging() -> None:
    """Remove (and close) the handlers :func:`setup_logging` added."""
    logger = logging.getLogger("geoprime")
    for h in list(logger.handlers):
        if getattr(h, "_geoprime", False):
            logger.removeHandler(h)
            h.close()
