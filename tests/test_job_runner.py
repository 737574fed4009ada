"""launch/job_runner.py: jobs as process groups, several at a time; an interrupt leaves none behind."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from launch import job_runner


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_interrupt_kills_every_running_job_group_and_starts_no_more(tmp_path):
    """Two jobs run (each with a grandchild of its own), a third waits; Ctrl-C in the study's main
    thread kills both groups, grandchildren included, and the third never starts."""
    script = ("import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(f'{os.getpid()} {p.pid}'); "
              "time.sleep(60)")
    items = ["a", "b", "c"]
    started: list[str] = []

    def work(item: str) -> None:
        started.append(item)
        job_runner.run_job([sys.executable, "-c", script, str(tmp_path / item)], tmp_path / f"{item}.log", 0, False)

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not all((tmp_path / i).exists() and (tmp_path / i).read_text() for i in "ab"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's Ctrl-C handler, whatever the launcher left: a shell starts background jobs (`make
    # test &`, nohup) with SIGINT ignored, and then no KeyboardInterrupt would ever come
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            job_runner.run_all(items, lambda item: None, work, parallel=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    pids = [int(p) for i in "ab" for p in (tmp_path / i).read_text().split()]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]
    assert started == ["a", "b"] and not (tmp_path / "c").exists()


def test_a_job_waits_for_the_one_it_needs_and_threads_are_shared(monkeypatch):
    ended: list[str] = []
    order: list[tuple[str, list[str]]] = []

    def work(item: str) -> None:
        order.append((item, list(ended)))
        time.sleep(0.2 if item == "pre" else 0.01)
        ended.append(item)

    job_runner.run_all(["pre", "other", "ft"], lambda item: "pre" if item == "ft" else None, work, parallel=2)
    seen = dict(order)
    assert "pre" in seen["ft"]  # started only after "pre" ended, though a worker was free
    assert seen["other"] == []  # ran alongside "pre"

    monkeypatch.delenv("GEOPRIME_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(job_runner, "available_cores", lambda: 16)
    assert job_runner.thread_env(1) == {} and job_runner.thread_env(2) == {"GEOPRIME_THREADS": "8"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the caller's setting wins
    assert job_runner.thread_env(2) == {}
