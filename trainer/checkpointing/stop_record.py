"""What a stop signal leaves behind when its checkpoint never became whole, for the next start to say.

The logging rank writes ``<checkpoints>/.stopping.json`` the moment it receives a stop signal (signal,
time, the last completed step, the stop grace, the last save's duration) and removes it once the stop's
checkpoint is whole. A process killed in between (the step in flight plus the save took longer than
the grace torchrun / Kubernetes / SLURM gave it) leaves the record, and the next start reports it in
one line with the checkpoint it resumes from instead.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

from data_shards.atomic import atomic_write_json

RECORD = ".stopping.json"
#: seconds the process that sent the stop signal waits before SIGKILL, as `launch run` / the manifests set it
GRACE_ENV = "GEOPRIME_STOP_GRACE_S"


def stop_grace_s() -> Optional[float]:
    """The stop grace this process was started with (``$GEOPRIME_STOP_GRACE_S``), None when unknown."""
    try:
        return float(os.environ[GRACE_ENV])
    except (KeyError, ValueError):
        return None


def begin(root: Path, signum: int, step: int, last_save_s: Optional[float]) -> None:
    """Record that a stop began after ``step`` (logging rank; called from the signal handler)."""
    try:
        atomic_write_json(root / RECORD, {"signal": signal.Signals(signum).name, "after_step": int(step),
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "grace_s": stop_grace_s(), "last_save_s": last_save_s, "pid": os.getpid()},
                          mkdir=True, indent=1)
    except OSError:  # a full or read-only disk must not turn a stop into a crash
        pass


def end(root: Path) -> None:
    """The stop's checkpoint is whole: nothing to report."""
    (root / RECORD).unlink(missing_ok=True)


def _explain(rec: dict[str, Any]) -> str:
    grace, last = rec.get("grace_s"), rec.get("last_save_s")
    parts = [f"the stop grace was {grace:.0f} s" if grace is not None else "the stop grace is unknown"]
    if last is not None:
        parts.append(f"the last save took {last:.1f} s")
    return ", ".join(parts)


def report(root: Path, resume_from: Optional[Path], resumed_step: Optional[int]) -> Optional[str]:
    """One line on a previous stop whose checkpoint never became whole (None when there was none);
    the record is removed. Logging rank, at start."""
    path = root / RECORD
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    path.unlink(missing_ok=True)
    after = int(rec.get("after_step", -1))
    if resumed_step is not None and resumed_step > after:  # killed after the checkpoint became whole
        return None
    where = f"resuming from {resume_from} (step {resumed_step})" if resume_from else "starting at step 1"
    return (f"the previous run got {rec.get('signal', 'a stop signal')} at {rec.get('time', '?')} after step {after} "
            f"and was killed before its checkpoint was whole ({_explain(rec)}): {where}; give the stop more time "
            f"(python -m launch run --grace, Kubernetes terminationGracePeriodSeconds)")
