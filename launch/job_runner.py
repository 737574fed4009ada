"""Run a study's job commands as child process groups, one or several at a time.

Each job runs in its own process group. A timeout SIGKILLs it and every process it started; a stop
of the study (SIGTERM / Ctrl-C) passes SIGTERM on to every running job, so that each writes a
checkpoint that the study's re-run resumes from, and SIGKILLs what is left after a bounded grace
(:func:`stop_running`). With ``parallel > 1`` up to that many jobs run at once, each limited to its share of
the cores (``GEOPRIME_THREADS``, unless the caller set it), and a job that needs another one's
output waits for it: on a 2-core machine two one-thread jobs finish sooner than the same jobs one
after another with two threads (start-up, scoring and small convolutions do not use both cores).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from launch.supervise import descendants
from trainer.threads import ENV as THREADS_ENV, available_cores

_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set by kill_running / stop_running: no job starts after it


def _copy_output(src, log, echo: bool) -> None:
    """Copy a child's output lines into its log file (and the terminal when ``echo``)."""
    for line in src:
        log.write(line)
        log.flush()
        if echo:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    """The child's exit code; 124 after killing its group at ``timeout`` (0 = no limit)."""
    try:
        return proc.wait(timeout=timeout or None)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return 124


def run_job(cmd: list[str], log_path: Path, timeout: float, verbose: bool,
            env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run one job, its output to ``log_path`` (and the terminal if verbose); (exit code, seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=env,
                                stdout=subprocess.PIPE if verbose else log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
            if _STOPPING.is_set():  # the study was stopped while this job was starting
                os.killpg(proc.pid, signal.SIGKILL)
        copier = None
        if verbose:
            copier = threading.Thread(target=_copy_output, args=(proc.stdout, log, True), daemon=True)
            copier.start()
        try:
            rc = _wait(proc, timeout)
        except BaseException:
            kill_running()
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
            if copier is not None:
                copier.join(timeout=10)
        if rc == 124:
            log.write(f"\n[study] killed after {timeout:.0f} s (study.timeout_s)\n".encode())
    return rc, time.monotonic() - start


def stopping() -> bool:
    """Whether the study is stopping its jobs (a job that ends now was stopped, not failed)."""
    return _STOPPING.is_set()


def _signal_jobs(procs: list[subprocess.Popen], sig: int) -> None:
    """``sig`` to each job's process group and to every process below it (torchrun's ranks run in
    sessions of their own)."""
    for proc in procs:
        targets = [proc.pid, *descendants(proc.pid)]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass


def kill_running() -> None:
    """SIGKILL every running job's processes; start no more."""
    with _RUNNING_LOCK:
        _STOPPING.set()
        procs = list(_RUNNING)
    _signal_jobs(procs, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def stop_running(grace_s: float) -> None:
    """Pass SIGTERM on to every running job (trainers checkpoint and exit 143; torchrun forwards it to its
    ranks), wait up to ``grace_s`` s for them, SIGKILL what is left; start no more. A second
    interrupt meanwhile SIGKILLs at once."""
    with _RUNNING_LOCK:
        _STOPPING.set()
        procs = list(_RUNNING)
    _signal_jobs(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        left = [p for p in procs if p.poll() is None]
        if left:
            _signal_jobs(left, signal.SIGKILL)
            for proc in left:
                proc.wait()


def thread_env(parallel: int) -> dict[str, str]:
    """Each of ``parallel`` concurrent jobs gets its share of the cores (a caller's setting wins)."""
    if parallel <= 1 or THREADS_ENV in os.environ or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {THREADS_ENV: str(max(1, available_cores() // parallel))}


def run_all(items: Sequence, needs: Callable[[object], object | None], work: Callable[[object], None],
            parallel: int, stop_grace_s: float = 0.0) -> None:
    """``work(item)`` for every item, up to ``parallel`` at once; an item whose ``needs(item)`` is
    another item of the list starts only after that one ended. A free slot takes the first item,
    in list order, that is ready (so a long pre-training does not hold back unrelated jobs).
    Ctrl-C / SIGTERM (KeyboardInterrupt here) stops every running job (:func:`stop_running` with
    ``stop_grace_s``) and starts no more."""
    _STOPPING.clear()
    pending, ids = list(items), {id(i) for i in items}
    ended: set[int] = set()
    running: dict[int, threading.Thread] = {}
    errors: list[BaseException] = []
    cond = threading.Condition()

    def one(item) -> None:
        try:
            work(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)
        finally:
            with cond:
                ended.add(id(item))
                running.pop(id(item), None)
                cond.notify_all()

    def ready(item) -> bool:
        need = needs(item)
        return need is None or id(need) not in ids or id(need) in ended

    try:
        with cond:
            while pending or running:
                if errors:
                    raise errors[0]
                nxt = next((i for i in pending if ready(i)), None) if len(running) < max(1, parallel) else None
                if nxt is None:
                    cond.wait(timeout=1.0)
                    continue
                pending.remove(nxt)
                running[id(nxt)] = threading.Thread(target=one, args=(nxt,), name="study-job", daemon=True)
                running[id(nxt)].start()
    except BaseException:
        stop_running(stop_grace_s)
        for t in list(running.values()):
            t.join(timeout=30)
        raise
