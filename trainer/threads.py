"""Intra-op thread defaults for a training process: do not oversubscribe the cores.

torch starts one intra-op (OpenMP) thread per core in every process. A training rank with N
DataLoader workers is 1 + N processes, and with torchrun several ranks share a machine: with the
defaults they run more busy threads than there are cores. Every op that runs in parallel ends at
a barrier that waits for its slowest thread, so as soon as one thread loses its core (to a
loader worker, another rank, or another job on the machine) each op waits a scheduler time
slice. On the 2-core machine this repository is developed on, with another process busy, the
depth step went from ~2 s to ~16 s; the same tiny-op test went from 12 s to 0.7 s with one
thread (docs/kernels.md, "Threads").

Default: ``max(1, cores // (ranks_on_this_node * (1 + loader_workers)))`` intra-op threads, where
``cores`` is what this process may run on (``os.sched_getaffinity``). Precedence:

1. ``GEOPRIME_THREADS=<n>`` (this variable, read here), then
2. ``OMP_NUM_THREADS`` if set (torch already honours it; torchrun sets it to 1 for several ranks),
3. the default above.
"""
from __future__ import annotations

import logging
import os

import torch

ENV = "GEOPRIME_THREADS"
"""Environment variable that overrides the intra-op thread count of a training process."""

log = logging.getLogger("geoprime.threads")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(loader_workers: int, ranks_per_node: int = 1, cores: int | None = None) -> int:
    """Intra-op threads that leave one core per loader worker and share the rest between ranks."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // (max(1, ranks_per_node) * (1 + max(0, loader_workers))))


def configure_threads(loader_workers: int, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Set torch's intra-op thread count for this process; returns (threads, where it came from).

    ``env`` defaults to ``os.environ``; ``LOCAL_WORLD_SIZE`` (set by torchrun) counts the ranks
    on this node. A bad ``GEOPRIME_THREADS`` value is an error naming it."""
    env = os.environ if env is None else env
    if env.get(ENV):
        value = env[ENV]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{ENV}={value!r}: expected a positive integer (intra-op threads)")
        threads, source = int(value), ENV
    elif env.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        ranks = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
        threads, source = default_threads(loader_workers, ranks), "default"
    torch.set_num_threads(threads)
    log.info("intra-op threads: %d (%s; %d cores, %d loader workers)", threads, source, available_cores(),
             loader_workers)
    return threads, source
