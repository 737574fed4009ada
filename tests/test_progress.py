"""Long phases say what they do and how far they are: the first step (compilation), evaluation,
the run's fixed start-up costs in the log, and a rate / ETA that leave the first step out."""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
import torch

from test_loop import RecordingTracker, _train_single
from trainer.tracking.progress import Phase, StartupTimes, counted
from trainer.tracking.train_log import TrainLog


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "geoprime.progress"]


def test_phase_reports_while_it_runs_and_its_time(caplog):
    caplog.set_level(logging.INFO, logger="geoprime")
    with Phase("compiling", every_s=0.01, detail="one-off") as phase:
        deadline = time.monotonic() + 30
        while not any(m.startswith("still compiling (") for m in _messages(caplog)) and time.monotonic() < deadline:
            time.sleep(0.01)  # a step that cannot report itself: the timer thread does
    msgs = _messages(caplog)
    assert msgs[0] == "compiling... (one-off)" and any(m.startswith("still compiling (") for m in msgs)
    assert msgs[-1] == f"compiling: {phase.seconds:.1f} s" and phase.seconds > 0
    caplog.clear()
    with Phase("quiet", enabled=False, every_s=0.01):  # ranks other than the logging one
        time.sleep(0.05)
    assert _messages(caplog) == []


def test_counted_reports_batches_and_the_end_when_stopped_early(caplog):
    caplog.set_level(logging.INFO, logger="geoprime")
    for i, _ in enumerate(counted(range(5), "test evaluation", total=5, every_s=0.0)):
        if i == 2:
            break  # evaluate() stops at train.eval_max_batches
    msgs = _messages(caplog)
    assert msgs[0] == "test evaluation: 5 batches..."
    assert msgs[1].startswith("test evaluation: batch 1/5 (") and "ETA" in msgs[1]
    assert msgs[-1].startswith("test evaluation: 3 batches in ")


def test_startup_times_line():
    t = StartupTimes()
    t.mark("preflight")
    t.mark("process group")
    assert list(t.seconds) == ["preflight", "process group"] and t.line().startswith("preflight 0.")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_and_eta_leave_the_first_step_out(monkeypatch, caplog):
    """A first step of 100 s (compilation) and then 1 s steps: 2 samples/s and the ETA of 1 s
    steps, not the 34 s average the first window would otherwise give."""
    clock = _Clock()
    monkeypatch.setattr("trainer.tracking.train_log.time.perf_counter", clock)
    engine = SimpleNamespace(all_reduce_sum=lambda v: v, world_size=1, is_logging_rank=True, lr=1e-4,
                             env=SimpleNamespace(is_local_leader=True, node_rank=0))
    tracker = RecordingTracker()
    log = TrainLog(engine, tracker, total=33, log_every=3, samples_per_step=2, sys_every_s=0.0)
    loader = SimpleNamespace(epoch=0, corrupt_count=0)
    caplog.set_level(logging.INFO, logger="geoprime")
    for step in range(1, 4):
        clock.now += 100.0 if step == 1 else 1.0
        log.add(torch.tensor(1.0), {}, 1)
        log.end_step(torch.tensor(0.5))
        if step == 1:
            log.restart_clock()  # what the loop does after the first step
        log.maybe_flush(step, loader, 0.0)
    (step, metrics), = tracker.metrics
    assert step == 3 and metrics["train/samples_per_s"] == pytest.approx(2.0)
    assert caplog.records[-1].getMessage().endswith("2.0 samples/s, ETA 30 s")


@pytest.mark.timeout(120)
def test_run_logs_startup_costs_first_step_and_evaluation_progress(tmp_path):
    _train_single(tmp_path, "train.steps=4")
    text = (tmp_path / "logs" / "rank0.log").read_text()
    assert "start-up: preflight " in text and ", process group " in text and ", tracking " in text
    assert "step 1, the first of this process: " in text and "waiting for data " in text
    assert "final validation: 7 batches in " in text and "test evaluation: 7 batches in " in text


def test_window_logs_its_log_steps_grad_norm_and_asks_for_it_only_there():
    """The engine computes the grad norm only where :meth:`TrainLog.logs_at` says the window is logged
    (every ``log_every`` steps and the last); the window logs that step's norm, not a mean."""
    engine = SimpleNamespace(all_reduce_sum=lambda v: v, world_size=1, is_logging_rank=True, lr=1e-4,
                             env=SimpleNamespace(is_local_leader=True, node_rank=0))
    tracker = RecordingTracker()
    log = TrainLog(engine, tracker, total=7, log_every=3, samples_per_step=2, sys_every_s=0.0)
    loader = SimpleNamespace(epoch=0, corrupt_count=0)
    assert [s for s in range(1, 8) if log.logs_at(s)] == [3, 6, 7]
    for step in range(1, 8):
        log.add(torch.tensor(float(step)), {}, 1)
        log.end_step(10.0 * step if log.logs_at(step) else None)
        log.maybe_flush(step, loader, 0.0)
    assert [s for s, _ in tracker.metrics] == [3, 6, 7]
    assert [m["train/grad_norm"] for _, m in tracker.metrics] == [30.0, 60.0, 70.0]
    assert [m["train/loss"] for _, m in tracker.metrics] == [2.0, 5.0, 7.0]  # the loss stays the window's mean
