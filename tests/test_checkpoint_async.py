"""Checkpoints written in the background (issue 31.3): the staged copy is a snapshot, every guarantee
of a synchronous save still holds (whole or partial, never pruned before a commit, a full disk named),
and a stop signal during a save in flight. Elsewhere: every strategy's staged copy is a snapshot
(``test_engine.py::test_strategies_agree_with_single_process_and_reshard``); kill -9 while a save is in
flight (the previous checkpoint is taken) and right after a commit (the new one), each with exact resume
(``test_checkpoint.py::test_exact_resume_with_batchnorm``).
"""
from __future__ import annotations

import errno
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine import (ACCUM, MICRO, STEPS, global_batches, ocfg, pcfg, scfg,  # noqa: E402
                         staged_round_trip, tiny_model, train_steps)

from trainer.checkpointing.checkpoint import Checkpointer, CheckpointError, find_latest_whole, verify  # noqa: E402
from trainer.engine import Engine  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "test_loop.py")


# ------------------------------------------------------------------ the engine's staged copy
def test_the_staged_copy_is_a_snapshot_single_process(tmp_path):
    """Staged after STEPS steps, written after one more: what loads back is the staged state (weights and
    Adam moments: the same step again ends where it did). Every strategy: ``test_engine.py``."""
    eng = Engine(pcfg(), ocfg(accum=1), scfg(), 10, micro_batch_size=MICRO * ACCUM)
    try:
        eng.setup(tiny_model())
        data = global_batches(1)
        train_steps(eng, data, range(STEPS), 1)
        at_stage = eng.full_state_dict()
        rt = staged_round_trip(eng, tmp_path / "ck", data, 1)
    finally:
        eng.close()
    assert rt["staged_only"]  # staging wrote no state file
    assert any(not torch.equal(v, rt["after"][k]) for k, v in at_stage.items())  # the step moved the state
    assert all(torch.equal(rt["loaded"][k], v) for k, v in at_stage.items())  # what was written: the snapshot
    assert all(torch.equal(rt["again"][k], v) for k, v in rt["after"].items())


# ------------------------------------------------------------------ the checkpointer, one process
class _Counter:
    """A Stateful whose state keeps changing (a step count, a data position)."""

    def __init__(self) -> None:
        self.n, self.seen = 0, [0]

    def state_dict(self) -> dict:
        return {"n": self.n, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.n, self.seen = int(state["n"]), list(state["seen"])


@pytest.fixture
def gated():
    """An engine whose staged writes wait for ``gate`` (a save held in flight as long as a test needs)."""
    eng = Engine(pcfg(), ocfg(accum=1), scfg(), 10, micro_batch_size=MICRO * ACCUM)
    eng.setup(tiny_model())
    gate = threading.Event()
    stage = eng.stage_state

    def held_stage(directory):
        write = stage(directory)
        return lambda: (gate.wait(60), write())

    eng.stage_state = held_stage
    yield eng, gate
    gate.set()
    eng.close()


def test_a_background_save_is_a_snapshot_and_whole_only_after_its_commit(tmp_path, gated):
    eng, gate = gated
    data = global_batches(1)
    ck = Checkpointer(tmp_path, eng, keep_last=1)
    counter = _Counter()
    ck.save(1, {"progress": counter}, {"rng": counter})
    train_steps(eng, data, range(1), 1)
    counter.n, counter.seen = 2, [0, 1]
    weights = eng.full_state_dict()
    ck.save(2, {"progress": counter}, {"rng": counter}, background=True)
    assert ck.in_flight
    train_steps(eng, data, range(1, 2), 1)  # the run goes on while step 2 is written
    counter.n = 3
    counter.seen.append(2)
    assert ck.poll() is None  # not done: the write waits at the gate
    # in flight: a partial folder, the previous checkpoint whole and not pruned, `latest` unchanged
    assert (tmp_path / ".step_00000002.partial").is_dir() and not (tmp_path / "step_00000002").exists()
    assert find_latest_whole(tmp_path) == tmp_path / "step_00000001"
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    gate.set()
    times = ck.wait()
    assert not ck.in_flight and times["stall_s"] < times["total_s"] and times["bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]  # pruned after the commit
    verify(tmp_path / "step_00000002")
    rank = torch.load(tmp_path / "step_00000002" / "rank_00000.pt", weights_only=True)
    train = torch.load(tmp_path / "step_00000002" / "train_state.pt", weights_only=True)
    assert rank["rng"] == {"n": 2, "seen": [0, 1]} and train["progress"] == {"n": 2, "seen": [0, 1]}
    eng.load_state(tmp_path / "step_00000002")
    assert all(torch.equal(v, weights[k]) for k, v in eng.full_state_dict().items())


def test_a_full_disk_during_a_background_save_is_raised_on_the_next_poll(tmp_path, gated, monkeypatch):
    from trainer.checkpointing import slow_storage

    eng, gate = gated
    ck = Checkpointer(tmp_path, eng, keep_last=2)
    ck.save(1, {}, {})
    real = slow_storage.torch_save

    def full(obj, path, **kw):
        if ".step_00000002.partial" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, **kw)

    monkeypatch.setattr(slow_storage, "torch_save", full)
    ck.save(2, {}, {}, background=True)
    gate.set()
    with pytest.raises(CheckpointError, match=rf"no space left on {tmp_path}: .* needed, .* free \(checkpoint "
                                              r"step_00000002 not written; the previous ones are kept\)"):
        while ck.poll() is None:
            threading.Event().wait(0.05)
    assert not ck.in_flight and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    verify(tmp_path / "step_00000001")


# ------------------------------------------------------------------ faults through the real loop
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stop_signal_during_a_save_in_flight_waits_for_it_then_saves_whole(tmp_path):
    """SIGTERM while checkpoint 300 is being written (~70 kB at 20 kB/s: ~3 s; the tiny steps go on meanwhile):
    the stop's save waits for it, then writes its own; both are whole and nothing is left partial."""
    from dist_helpers import REPO_ROOT, child_env, signal_and_wait, wait_for_text

    base = ["train.steps=600", "train.ckpt_every=300", "train.keep_last=3", "train.log_every=100"]

    def direct(out: Path, env: dict | None = None) -> subprocess.Popen:  # one plain process, no torchrun
        return subprocess.Popen([sys.executable, WORKER, f"out_dir={out}", *base], env=child_env(env), cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    run = tmp_path / "run"
    proc = direct(run, {"GEOPRIME_TEST_WRITE_MB_S": "0.02"})
    log, ck = run / "logs" / "rank0.log", run / "checkpoints"
    wait_for_text(log, "checkpoint step_00000300 staged", proc, timeout=120)
    output = signal_and_wait(proc, signal.SIGTERM, 120)
    assert proc.returncode != 0 and "stopped by SIGTERM after step" in output, output[-3000:]
    text = log.read_text()
    stopped = int(text.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 300 < stopped < 600, stopped
    # the signal came while 300 was in flight; the stop's save waited for it, then made its own
    order = [text.index(s) for s in ("checkpoint step_00000300 staged", "received SIGTERM",
                                     f"checkpoint saved: {ck / 'step_00000300'}",
                                     f"checkpoint saved: {ck / f'step_{stopped:08d}'}")]
    assert order == sorted(order), order
    assert not list(ck.glob(".step_*")) and not (ck / ".stopping.json").exists()  # nothing left partial
    verify(ck / "step_00000300")
    verify(ck / f"step_{stopped:08d}")
