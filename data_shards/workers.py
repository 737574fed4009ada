"""DataLoader worker processes: how they are started and which signals they take.

Loader workers must outlive a rank's save (torchrun signals a rank's whole process group), so they
ignore the stop signals; they are forked with those signals blocked so that none arrives before
they ignore it.
"""
from __future__ import annotations

import signal
from typing import Iterator

from torch.utils.data import DataLoader

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM / SIGINT / SIGHUP: torchrun signals a rank's whole process group
    on shutdown, and the rank must outlive its save (workers exit when the loader closes or the
    rank dies). They were forked with these signals blocked (:func:`start_workers`); unblocked once ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_workers(loader: DataLoader) -> Iterator[dict]:
    """``iter(loader)`` (which forks its workers) with the stop signals blocked. Between a worker's
    fork and :func:`ignore_stop_signals`, torch's worker SIGTERM handler lets a SIGTERM from anyone
    but the parent kill it, and torchrun's process-group SIGTERM then made the rank fail with
    "DataLoader worker exited unexpectedly" instead of checkpointing (workers are forked every
    epoch). The rank gets any signal that came meanwhile when its mask is restored."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
