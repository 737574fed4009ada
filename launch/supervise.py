"""Run torchrun as a supervised child: signals forwarded, a bounded stop, no orphaned workers.

``subprocess.call`` left torchrun and its workers training under PID 1 when the launcher got
SIGTERM. Here the child runs in its own session; SIGTERM / SIGINT / SIGHUP to the launcher are
forwarded to it (torchrun then signals every worker, which checkpoints and exits); if the tree
has not exited ``stop_timeout`` seconds later, every process left in it is SIGKILLed. The
launcher is a child subreaper (Linux), so workers orphaned by a dying torchrun are re-parented
to it and still found. A launcher that cannot forward anything (SIGKILL) still stops its job:
torchrun gets SIGTERM from the kernel when the launcher dies (``PR_SET_PDEATHSIG``), forwards it,
and its ranks (which die with torchrun the same way) checkpoint within torchrun's grace.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from data_shards.lifetime import become_subreaper, die_with_parent

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def stop_with_me() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when this process dies, however it dies (or exits at
    once if this process died before the request was made)."""
    me = os.getpid()

    def request() -> None:
        die_with_parent(signal.SIGTERM)
        if os.getppid() != me:
            os._exit(1)

    return request


def _children() -> dict[int, list[int]]:
    """parent pid -> live child pids (zombies left out: they are dead and have no children), from
    /proc (empty where /proc is absent)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            tree.setdefault(int(ppid), []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _end_orphans(timeout: float) -> None:
    """Processes of the job left after torchrun ended are orphans re-parented to us (subreaper): torchrun
    died abruptly, and its ranks, told by the kernel (SIGTERM), are saving. They get ``timeout`` s to
    finish (SIGTERM once more in case they were not told), then SIGKILL; every one is reaped."""
    _reap()
    orphans = descendants(os.getpid())
    if not orphans:
        return
    print(f"[launch] torchrun is gone; its processes {orphans} get {timeout:.0f} s to checkpoint and exit",
          file=sys.stderr, flush=True)
    _kill(orphans, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (left := descendants(os.getpid())) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.2)
    if left:
        print(f"[launch] killing leftover processes {left}", file=sys.stderr, flush=True)
        _kill(left, signal.SIGKILL)
    deadline = time.monotonic() + 10.0  # SIGKILLed processes are gone at once, unless stuck in the kernel
    while descendants(os.getpid()) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
    _reap()


def _reap() -> None:
    """Collect every child of ours that has exited (orphans re-parented to us become our zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_supervised(cmd: list[str], env: dict[str, str], stop_timeout: float = 60.0) -> int:
    """Run ``cmd`` to completion; see the module docstring. Returns its exit code (128 + signal
    number when it was stopped by a forwarded signal and reported success anyway)."""
    become_subreaper()  # not Linux: the /proc walk below still finds direct descendants
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=stop_with_me())
    got: dict[str, Optional[float]] = {"signum": None, "deadline": None}

    def forward(signum: int, frame: object) -> None:
        if got["signum"] is None:
            got["signum"], got["deadline"] = signum, time.monotonic() + stop_timeout
            print(f"[launch] {signal.Signals(signum).name}: stopping the job (workers checkpoint; "
                  f"SIGKILL after {stop_timeout:.0f} s)", file=sys.stderr, flush=True)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while proc.poll() is None:
            deadline = got["deadline"]
            if deadline is not None and time.monotonic() > deadline:
                left = [proc.pid, *descendants(proc.pid)]
                print(f"[launch] still running after {stop_timeout:.0f} s: SIGKILL to {left}", file=sys.stderr, flush=True)
                _kill(left, signal.SIGKILL)
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _end_orphans(stop_timeout)
    code = proc.returncode
    if got["signum"] is not None and code == 0:
        return 128 + int(got["signum"])
    return code if code >= 0 else 128 - code
