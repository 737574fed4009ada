"""When the loop's checkpoints are written, and how: the loop calls :meth:`CheckpointManager.maybe_save`
after every step and :meth:`~CheckpointManager.finish` after the last; this decides.

A checkpoint is due after a step when a stop signal arrived on any rank (saved synchronously, then
:class:`~trainer.checkpointing.interrupts.Preempted` is raised), when ``train.ckpt_every`` steps or
``train.ckpt_every_minutes`` of rank 0's wall clock have passed (written in the background with
``train.ckpt_async``: the loop waits only for the copy to host memory, and a save still in flight is
finished before the next one begins), and after the last step unless that step was just saved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from trainer.checkpointing.checkpoint import Checkpointer, step_dir_name
from trainer.checkpointing.interrupts import Preempted, StepControl, StopSignals
from trainer.checkpointing.run_state import Progress


class CheckpointManager:
    """Save cadence and policy of one run over its :class:`Checkpointer`. Collective: every rank
    calls the same methods after the same steps.

    ``train`` is the run's ``train`` config (``steps``, ``ckpt_every``, ``ckpt_every_minutes``,
    ``ckpt_async``); ``state()`` returns the Stateful objects rank 0 saves by name, ``per_rank``
    those every rank saves; ``on_whole()`` runs after each checkpoint that became whole."""

    def __init__(self, train: Any, checkpointer: Checkpointer, engine: Any, signals: StopSignals, *,
                 progress: Progress, state: Callable[[], dict[str, Any]], per_rank: dict[str, Any],
                 on_whole: Optional[Callable[[], None]] = None) -> None:
        self.checkpointer, self.progress = checkpointer, progress
        self.total, self.every = int(train.steps), int(train.ckpt_every)
        self.background = bool(train.ckpt_async)
        self.control = StepControl(engine, signals, float(train.ckpt_every_minutes), checkpointer.root)
        self._state, self._per_rank, self._on_whole = state, per_rank, on_whole
        self.last_saved = progress.step if progress.step else -1

    def maybe_save(self, step: int) -> None:
        """After ``step``: report a background save that became whole, then save if one is due.
        Raises :class:`Preempted` once a stop signal's checkpoint is whole."""
        self.reap()
        stop, due = self.control.poll(step)
        periodic = step < self.total and (due or (self.every and step % self.every == 0))
        if stop or periodic:
            # the stop's save is whole before the exit; a periodic one is written in the background
            self.save(step, stopping=stop, background=self.background and not stop)
        if stop:
            raise Preempted(self.control.signum, step, str(self.checkpointer.root / step_dir_name(step)))

    def finish(self) -> None:
        """After the last step: the save in flight is whole, and the last step is saved."""
        self.reap(wait=True)
        if self.last_saved != self.total:
            self.save(self.total)

    def save(self, step: int, stopping: bool = False, background: bool = False) -> Path:
        """Checkpoint ``step`` (a save in flight is finished first); ``background``: return once it is
        staged (:meth:`reap` reports it when it is whole)."""
        self.reap(wait=True)
        self.progress.step = step
        path = self.checkpointer.save(step, self._state(), self._per_rank, stopping=stopping, background=background)
        self.last_saved = step
        if background:
            self.control.saved(None)  # the wall-clock cadence counts from the start of a save
        else:
            self._saved(self.checkpointer.last_save, stopping)
        return path

    def reap(self, wait: bool = False) -> None:
        """Report a background save once it is whole on every rank (collective while one is in
        flight); its failure is raised here."""
        done = self.checkpointer.poll(wait=wait)
        if done is not None:
            self._saved(done, False, restart_clock=False)

    def _saved(self, times: dict[str, float], stopping: bool, restart_clock: bool = True) -> None:
        self.control.saved(times.get("total_s"), stopping=stopping, restart_clock=restart_clock)
        if self._on_whole is not None:
            self._on_whole()
