"""Run torchrun as a supervised child: signals forwarded, a bounded stop, no orphaned workers.

``subprocess.call`` left torchrun and its workers training under PID 1 when the launcher got
SIGTERM. Here the child runs in its own session; SIGTERM / SIGINT / SIGHUP to the launcher are
forwarded to it (torchrun then signals every worker, which checkpoints and exits); if the tree
has not exited ``stop_timeout`` seconds later, every process left in it is SIGKILLed. The
launcher is a child subreaper (Linux), so workers orphaned by a dying torchrun are re-parented
to it and still found.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the /proc walk below still finds direct descendants
        pass


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (empty where /proc is absent)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
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


def run_supervised(cmd: list[str], env: dict[str, str], stop_timeout: float = 60.0) -> int:
    """Run ``cmd`` to completion; see the module docstring. Returns its exit code (128 + signal
    number when it was stopped by a forwarded signal and reported success anyway)."""
    _become_subreaper()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
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
        orphans = descendants(os.getpid())  # re-parented to us (subreaper) when torchrun died first
        if orphans:
            print(f"[launch] killing leftover processes {orphans}", file=sys.stderr, flush=True)
            _kill(orphans, signal.SIGKILL)
            for pid in orphans:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
    code = proc.returncode
    if got["signum"] is not None and code == 0:
        return 128 + int(got["signum"])
    return code if code >= 0 else 128 - code
