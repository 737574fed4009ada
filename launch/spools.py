"""Replay the tracking records a study's jobs spooled while MLflow was unreachable.

A job whose MLflow server went away keeps its records in ``<run folder>/tracking/spool.jsonl`` and
ends with its run still RUNNING in MLflow (27 of 180 points, say) although it finished. The study
sends every job's pending records before it reads the jobs' states (a FINISHED status still in a
spool would re-run a finished job) and before it compares (the table must see every point), and
names in one line each spool that still cannot be sent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from trainer.tracking import Spool, SpoolError, replay_spool
from trainer.tracking.client import is_transient


def spool_of(out_dir: Path) -> Path:
    """Where a run folder's tracking spool lives."""
    return Path(out_dir) / "tracking" / "spool.jsonl"


def replay_spools(jobs: Iterable, when: str) -> int:
    """Send the pending records of each job's spool (``job.out_dir``); returns how many are left
    in all. A spool that cannot be sent (server still away, a record refused) is named in one line."""
    left = 0
    for job in jobs:
        path = spool_of(job.out_dir)
        if not path.is_file() or not Spool(path).count_pending():
            continue
        try:
            sent = replay_spool(path)
            print(f"[study] {job.job_id}: replayed {sent} spooled tracking records ({when})", flush=True)
        except (SpoolError, FileNotFoundError) as e:
            print(f"[study] {job.job_id}: spooled tracking records not replayed: {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - classified: unreachable is expected, anything else is not
            if not is_transient(e):
                raise
            print(f"[study] {job.job_id}: MLflow still unreachable ({type(e).__name__}); "
                  f"{Spool(path).count_pending()} tracking records stay in {path} (replayed at the next study "
                  f"run, or: python -m trainer.tracking replay {path})", flush=True)
        left += Spool(path).count_pending()
    return left
