"""Faults a long run meets, through the real CLIs: SIGTERM (preemption), a second job in the same
run folder, a kill -9'd lock holder, a config error under `launch run` with restarts."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_helpers import build_synthetic, child_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("syn"), "--width", "64", "--sequences", "train=1", "val=1",
                           "test=1", "--frames-per-sequence", "6")


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["task=depth", f"data.root={shards}", f"out_dir={out}", "train.batch_size=1", "train.log_every=1",
            "train.progress=false", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "tracking.system_metrics_every=0",
            *extra]


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int = 2, timeout: float = 180) -> None:
    log = out / "logs" / "rank0.log"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "the run ended before it was signalled"
        if log.is_file() and f"step {step}/" in log.read_text():
            return
        time.sleep(0.3)
    raise AssertionError(f"no step {step} logged within {timeout} s")


def _status(out: Path) -> list[str]:
    return [r[0] for r in sqlite3.connect(out / "mlflow.db").execute("select status from runs")]


def _leftovers(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if marker in line and "ps -eo" not in line]


def _latest_whole(out: Path) -> int:
    from trainer.checkpoint import find_latest_whole
    found = find_latest_whole(out / "checkpoints")
    assert found is not None, "no whole checkpoint"
    return int(found.name.split("_")[1])


@pytest.mark.timeout(400)
def test_sigterm_to_launch_run_checkpoints_marks_killed_and_leaves_no_process(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", "run", "--gpus-per-node", "2", "--max-restarts", "2",
           *_args(shards, out, "parallel=ddp", "train.steps=500", "data.num_workers=1")]
    proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for_step(out, proc)
        # a second job in the same folder is refused before it starts, naming the holder
        second = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr[-2000:]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and took < 90, (proc.returncode, took, output[-3000:])
    assert not _leftovers(str(out)), _leftovers(str(out))
    step = _latest_whole(out)
    assert 2 <= step < 500 and not (out / "weights.pt").exists()
    assert _status(out) == ["KILLED"]
    assert "stopped by SIGTERM after step" in (out / "logs" / "rank0.log").read_text()
    # the same command resumes from that checkpoint (a shorter run is fine: steps >= checkpoint)
    res = subprocess.run([sys.executable, "-m", "launch", "run", "--gpus-per-node", "2",
                          *_args(shards, out, "parallel=ddp", f"train.steps={step + 1}", "data.num_workers=1")],
                         env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in (out / "logs" / "rank0.log").read_text()
    assert json.loads((out / "metrics.json").read_text())["step"] == step + 1


@pytest.mark.timeout(300)
def test_sigterm_to_a_single_process_run(shards, tmp_path):
    out = tmp_path / "one"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *_args(shards, out, "train.steps=500")],
                            env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(out, proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-3000:]
    assert _latest_whole(out) >= 2 and _status(out) == ["KILLED"]


@pytest.mark.timeout(120)
def test_a_lock_left_by_a_killed_job_is_taken_over_naming_it(tmp_path):
    from trainer.run_lock import OutDirBusy, OutDirLock, is_locked, read_holder

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.run_lock import OutDirLock; "
                               f"lock = OutDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              env=child_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"pid {holder.pid}" in (is_locked(tmp_path) or "")
        with pytest.raises(OutDirBusy, match=f"is in use by pid {holder.pid} on "):
            OutDirLock(tmp_path).acquire()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock, the record stays
        holder.wait()
    assert read_holder(tmp_path)["pid"] == holder.pid and is_locked(tmp_path) is None
    with OutDirLock(tmp_path):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert read_holder(tmp_path) == {}


@pytest.mark.timeout(200)
def test_config_error_under_launch_run_is_not_restarted(shards, tmp_path):
    out = tmp_path / "typo"
    res = subprocess.run([sys.executable, "-m", "launch", "run", "--gpus-per-node", "2", "--max-restarts", "3",
                          *_args(shards, out, "parallel=ddp", "train.steps=2", "+train.stepz=5")],
                         env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stderr.count("unknown key train.stepz; did you mean train.steps?") == 1 and "Traceback" not in res.stderr
    assert not (out / "logs").exists()  # torchrun never started a worker
