"""The checkpoint manager's decisions, one process, no files: which steps it saves, how, and the stop."""
from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer.checkpointing.interrupts import Preempted, StopSignals
from trainer.checkpointing.manager import CheckpointManager


class _Engine:
    is_logging_rank = False  # no stop record: nothing is written

    @staticmethod
    def all_reduce_sum(vec):
        return vec


class _Checkpointer:
    """Records each save as (step, stopping, background); a background save is whole at the next poll."""

    def __init__(self) -> None:
        self.root, self.saves, self.in_flight = Path("/nonexistent/checkpoints"), [], False
        self.last_save = {"total_s": 0.1}

    def save(self, step, state, per_rank, stopping=False, background=False):
        self.saves.append((step, stopping, background))
        self.in_flight = background
        return self.root / f"step_{step:08d}"

    def poll(self, wait=False):
        done, self.in_flight = self.in_flight, False
        return {"total_s": 0.1} if done else None


def _manager(steps=7, every=2, background=True, start=0):
    ckpt, whole = _Checkpointer(), []
    train = SimpleNamespace(steps=steps, ckpt_every=every, ckpt_every_minutes=0.0, ckpt_async=background)
    progress = SimpleNamespace(step=start)
    manager = CheckpointManager(train, ckpt, _Engine(), StopSignals(), progress=progress, state=dict,
                                per_rank={}, on_whole=lambda: whole.append(progress.step))
    return manager, ckpt, whole


def test_step_cadence_in_the_background_and_the_last_step_once():
    manager, ckpt, whole = _manager()
    for step in range(1, 8):
        manager.maybe_save(step)
    manager.finish()
    assert ckpt.saves == [(2, False, True), (4, False, True), (6, False, True), (7, False, False)]
    assert whole == [2, 4, 6, 7]  # each background save reported once it is whole, before the next one


def test_a_last_step_on_the_cadence_is_saved_once_and_synchronously():
    manager, ckpt, _ = _manager(steps=4, every=2, background=False, start=2)  # resumed at step 2
    for step in (3, 4):
        manager.maybe_save(step)
    manager.finish()
    assert ckpt.saves == [(4, False, False)]


def test_a_stop_signal_saves_synchronously_then_raises():
    manager, ckpt, _ = _manager()
    manager.maybe_save(1)
    manager.control.signals.received = signal.SIGTERM
    with pytest.raises(Preempted) as stopped:
        manager.maybe_save(3)
    assert ckpt.saves == [(3, True, False)] and stopped.value.exit_code == 143
