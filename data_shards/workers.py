"""DataLoader worker processes: how they are started, which signals they take, and how they end.

Loader workers must outlive a rank's save (torchrun signals a rank's whole process group), so they
ignore the stop signals; they are forked with those signals blocked so that none arrives before
they ignore it. Ignoring SIGTERM has a price: Python's exit path (multiprocessing's ``atexit``
hook) ends daemonic children with SIGTERM and then joins them without a time limit, so a rank
leaving with its workers still up (an exception keeps the DataLoader iterator alive in its
traceback) waited for ever. Hence the two ways a worker ends besides the loader closing it:

- the rank exits normally, by an exception included: an ``atexit`` hook that runs before
  multiprocessing's SIGKILLs every worker started here that is still alive (workers hold no
  state worth saving: they only read shards);
- the rank dies (SIGKILL, a second signal): each worker asked the kernel for SIGKILL when its
  parent dies (``PR_SET_PDEATHSIG``), and torch's worker watchdog is the fallback elsewhere.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
import weakref
from typing import Iterator

from torch.utils.data import DataLoader

from data_shards.lifetime import die_with_parent

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: worker processes started by :func:`start_workers` in this process (ended at exit if still alive)
_started: "weakref.WeakSet[multiprocessing.process.BaseProcess]" = weakref.WeakSet()
_exit_hook = threading.Lock()
_exit_hook_owner = 0  # the pid that registered the hook (a forked child inherits it, not its workers)


def ignore_stop_signals(worker_id: int) -> None:
    """The loader's ``worker_init_fn``: ignore SIGTERM / SIGINT / SIGHUP (torchrun signals a rank's
    whole process group on shutdown, and the rank must outlive its save), and die with the rank.
    The worker was forked with these signals blocked (:func:`start_workers`); unblocked once ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    die_with_parent(signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid != os.getppid():  # the rank died before the request above
        os._exit(1)


def start_workers(loader: DataLoader) -> Iterator[dict]:
    """``iter(loader)`` (which forks its workers) with the stop signals blocked, its workers ended at
    this process's exit if still alive (:func:`end_workers`). Between a worker's fork and
    :func:`ignore_stop_signals`, torch's worker SIGTERM handler lets a SIGTERM from anyone but the
    parent kill it, and torchrun's process-group SIGTERM then made the rank fail with "DataLoader
    worker exited unexpectedly" instead of checkpointing (workers are forked every epoch). The rank
    gets any signal that came meanwhile when its mask is restored."""
    before = {p.pid for p in multiprocessing.active_children()}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        batches = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _started.update(p for p in multiprocessing.active_children() if p.pid not in before)
    _register_exit_hook()
    return batches


def end_workers() -> int:
    """SIGKILL and reap every worker :func:`start_workers` started that is still alive; how many.
    Runs at exit before multiprocessing's own hook, whose SIGTERM they ignore. Torch's SIGCHLD handler
    is put back to the default first: it raises on a worker killed by a signal, which stopped this
    hook after the first worker and left the next one to multiprocessing's endless join."""
    if os.getpid() != _exit_hook_owner:
        return 0
    alive = [proc for proc in list(_started) if proc.is_alive()]
    if not alive:
        return 0
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in alive:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in alive:
        try:
            proc.join(timeout=10)
        except Exception:  # noqa: BLE001 - at exit, a late handler's complaint changes nothing
            pass
    log.debug("ended %d loader worker(s) left running at exit", len(alive))
    return len(alive)


def _register_exit_hook() -> None:
    """``atexit`` runs hooks last-registered first: registered after multiprocessing's (imported with
    torch), :func:`end_workers` runs before it."""
    global _exit_hook_owner
    with _exit_hook:
        if _exit_hook_owner != os.getpid():
            atexit.register(end_workers)
            _exit_hook_owner = os.getpid()
