"""Preemption: SIGTERM / SIGINT / SIGHUP are recorded, not fatal, so the loop can stop cleanly.

Kubernetes eviction, SLURM preemption and torchrun's shutdown send SIGTERM; Ctrl-C sends SIGINT.
Inside :class:`StopSignals` the first one only sets :attr:`StopSignals.received`; the loop checks it
after every optimizer step (all ranks agree through one small all-reduce), writes a whole
checkpoint, marks the tracking run KILLED and raises :class:`Preempted`. A second signal of the
same kind restores the previous handler and re-delivers it (a user pressing Ctrl-C twice gets out).
While the stop's checkpoint is being made, ``<checkpoints>/.stopping.json`` says so
(:mod:`trainer.checkpointing.stop_record`): a process killed before it finished is reported at the next start.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

from data_shards.lifetime import die_with_parent
from trainer.checkpointing import stop_record

log = logging.getLogger("geoprime.loop")

#: the signals a run stops cleanly on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preempted(Exception):
    """The run stopped on a signal after saving a whole checkpoint at :attr:`step`."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]) -> None:
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        name = signal.Signals(self.signum).name if self.signum in signal.Signals._value2member_map_ else self.signum
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint or '(none)'}: "
                         "run the same command again to resume")

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal (143 for SIGTERM)."""
        return 128 + self.signum


class StopSignals:
    """Context manager recording the first stop signal; a no-op outside the main thread."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.on_first: Optional[Callable[[int], None]] = None
        """Called with the first signal's number, from the handler (main thread)."""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is not None:  # the second one: give the user what they ask for
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
        if self.on_first is not None:
            self.on_first(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StepControl:
    """Decisions every rank must take together after a step: stop on a signal (any rank got it),
    checkpoint on the wall clock (rank 0's clock decides). One all-reduce of two numbers. On the
    logging rank it also keeps the stop record (:mod:`trainer.checkpointing.stop_record`) under ``ckpt_root``."""

    def __init__(self, engine: Any, signals: StopSignals, every_minutes: float,
                 ckpt_root: Optional[Path] = None) -> None:
        self.engine, self.signals = engine, signals
        self.every_s = max(0.0, float(every_minutes)) * 60.0
        self.last = time.monotonic()
        self.step = 0
        self.last_save_s: Optional[float] = None
        self._root = ckpt_root if engine.is_logging_rank else None
        self._warned_grace = False
        signals.on_first = self._signalled

    @property
    def signum(self) -> int:
        """The signal to report (SIGTERM on ranks that only heard of it from a peer)."""
        return int(self.signals.received or signal.SIGTERM)

    def poll(self, step: int) -> tuple[bool, bool]:
        """(stop now, checkpoint due) after ``step``. Collective."""
        import torch

        self.step = int(step)
        due = self.engine.is_logging_rank and self.every_s > 0 and time.monotonic() - self.last >= self.every_s
        vec = torch.tensor([float(self.signals.received is not None), float(due)], dtype=torch.float64)
        vec = self.engine.all_reduce_sum(vec)
        return bool(vec[0] > 0), bool(vec[1] > 0)

    def saved(self, seconds: Optional[float] = None, stopping: bool = False, restart_clock: bool = True) -> None:
        """A whole checkpoint was written (in ``seconds``), the stop's own when ``stopping``.
        ``restart_clock=False``: a background save that became whole (the clock restarted when it began)."""
        if restart_clock:
            self.last = time.monotonic()
        self.last_save_s = seconds if seconds is not None else self.last_save_s
        if self._root is None:
            return
        if stopping:
            stop_record.end(self._root)
        grace = stop_record.stop_grace_s()
        if seconds is not None and grace is not None and seconds > grace / 2 and not self._warned_grace:
            self._warned_grace = True
            log.warning("a checkpoint took %.0f s and the stop grace is %.0f s: a stop signal's save (after the step "
                        "in flight) may not fit; raise it (python -m launch run --grace, Kubernetes "
                        "terminationGracePeriodSeconds)", seconds, grace)

    def _signalled(self, signum: int) -> None:
        if self._root is not None:
            stop_record.begin(self._root, signum, self.step, self.last_save_s)


def stop_with_launcher() -> bool:
    """Under torchrun, SIGTERM this rank when torchrun dies, however it dies (a SIGKILLed agent left
    its ranks training in their own sessions): the rank then checkpoints and exits as on any stop
    signal. Not for a plain ``python -m trainer``, which must survive its shell (``nohup``)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    return die_with_parent(signal.SIGTERM)
