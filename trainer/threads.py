"""Intra-op thread defaults for a training process: do not oversubscribe the cores.

torch starts one intra-op (OpenMP) thread per core in every process, and with torchrun several
ranks share a machine: with the defaults they run more busy threads than there are cores. Every
op that runs in parallel ends at a barrier that waits for its slowest thread, so as soon as one
thread loses its core each op waits a scheduler time slice.

Default: each rank gets its share of the cores, ``cores // ranks_on_this_node``, less up to a
quarter of that share for its DataLoader workers (one per worker). Loader workers run one thread
each and mostly wait (decoding a batch is a small part of a step), so leaving a whole core per
worker wastes half of a 2-core machine (measured: docs/engine.md, "Threads"). ``cores`` is what this process
may run on (``os.sched_getaffinity``). On a machine shared with other work, set the count yourself.
Precedence:

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
    """The rank's share of the cores, less one per loader worker up to a quarter of that share."""
    cores = available_cores() if cores is None else cores
    share = max(1, cores // max(1, ranks_per_node))
    return max(1, share - min(max(0, loader_workers), share // 4))


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
