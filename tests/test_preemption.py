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

from dist_helpers import EAGER_LOSS, child_env, processes_naming, signal_and_wait, survivors, wait_for_text

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture
def shards(small_synthetic) -> Path:
    return small_synthetic


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["task=depth", EAGER_LOSS, f"data.root={shards}", f"out_dir={out}", "train.batch_size=1", "train.log_every=1",
            "train.progress=false", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "tracking.system_metrics_every=0",
            *extra]


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int = 2, timeout: float = 180) -> None:
    wait_for_text(out / "logs" / "rank0.log", f"step {step}/", proc, timeout)


def _status(out: Path) -> list[str]:
    return [r[0] for r in sqlite3.connect(out / "mlflow.db").execute("select status from runs")]


def _latest_whole(out: Path) -> int:
    from trainer.checkpointing.checkpoint import find_latest_whole
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
    except BaseException:
        proc.kill()
        raise
    t0 = time.monotonic()
    output = signal_and_wait(proc, signal.SIGTERM, 120)
    took = time.monotonic() - t0
    assert proc.returncode != 0 and took < 90, (proc.returncode, took, output[-3000:])
    assert not survivors(str(out))
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
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *_args(shards, out, "train.steps=500", "data.num_workers=2")],
                            env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(out, proc)
    output = signal_and_wait(proc, signal.SIGTERM, 90)
    assert proc.returncode == 143, output[-3000:]
    assert _latest_whole(out) >= 2 and _status(out) == ["KILLED"]
    assert not survivors(str(out))  # its loader workers ended with it


@pytest.mark.timeout(120)
def test_a_lock_left_by_a_killed_job_is_taken_over_naming_it(tmp_path):
    from trainer.checkpointing.run_lock import OutDirBusy, OutDirLock, is_locked, read_holder

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.checkpointing.run_lock import OutDirLock; "
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


@pytest.mark.timeout(400)
def test_kill_9_of_launch_run_stops_the_whole_tree_which_checkpoints(shards, tmp_path):
    """The launcher cannot forward a SIGKILL: torchrun gets SIGTERM from the kernel when it dies
    (PR_SET_PDEATHSIG), forwards it, the ranks checkpoint within the grace, the loader workers die with
    their ranks, and the out_dir lock is free. Before, torchrun, the ranks and their workers trained on."""
    from trainer.checkpointing.run_lock import is_locked

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch", "run", "--gpus-per-node", "2", "--grace", "60",
                             *_args(shards, out, "parallel=ddp", "train.steps=500", "data.num_workers=1")],
                            env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(out, proc)
        assert len(processes_naming(str(out))) >= 4  # launcher, torchrun, 2 ranks (+ their loader workers)
        signal_and_wait(proc, signal.SIGKILL, 30)
        left = survivors(str(out), wait=90)  # within the grace (60 s) and torchrun's exit
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_naming(str(out)):
            os.kill(pid, signal.SIGKILL)
    assert not left, left
    assert is_locked(out) is None
    assert _latest_whole(out) >= 2
    assert "stopped by SIGTERM after step" in (out / "logs" / "rank0.log").read_text()


@pytest.mark.timeout(400)
def test_a_grace_shorter_than_the_save_keeps_the_last_checkpoint_and_the_next_start_says_so(shards, tmp_path):
    """torchrun SIGKILLs the rank 2 s after forwarding SIGTERM, in the middle of the stop's save (made slow
    by the documented test hook): the periodic checkpoint before it stays whole, and the next start says in
    one line what happened and where it resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", "run", "--grace", "2",
           *_args(shards, out, "train.steps=500", "train.ckpt_every=2", "data.num_workers=1")]
    proc = subprocess.Popen(cmd, env=child_env({"GEOPRIME_TEST_STOP_SAVE_DELAY_S": "120"}), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "logs" / "rank0.log"
    wait_for_text(log, "checkpoint saved: ", proc)
    output = signal_and_wait(proc, signal.SIGTERM, 120)
    assert proc.returncode != 0 and not survivors(str(out)), output[-3000:]
    whole = _latest_whole(out)
    stopped_after = json.loads((out / "checkpoints" / ".stopping.json").read_text())["after_step"]
    assert whole % 2 == 0 and whole <= stopped_after, (whole, stopped_after)
    assert list((out / "checkpoints").glob(".step_*.partial"))  # the stop's save, cut short
    res = subprocess.run(cmd[:-3] + ["train.steps=" + str(stopped_after + 2), "train.ckpt_every=0",
                                     "data.num_workers=1"], env=child_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    said = [line for line in res.stderr.splitlines() if "was killed before its checkpoint was whole" in line]
    assert len(said) == 1, res.stderr[-3000:]
    assert (f"got SIGTERM at " in said[0] and f"after step {stopped_after} " in said[0]
            and "the stop grace was 2 s" in said[0] and f"step_{whole:08d} (step {whole})" in said[0]), said[0]
    assert f"resumed from {out / 'checkpoints' / f'step_{whole:08d}'}" in log.read_text()
    assert not (out / "checkpoints" / ".stopping.json").exists()
    assert not list((out / "checkpoints").glob(".step_*.partial"))
