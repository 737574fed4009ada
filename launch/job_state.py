"""What a (re-)run of a study does with each job: skip, resume, run fresh, or move a stale folder aside.

A job's run folder records the fingerprint it was made with (``study_job.json``, :func:`write_stamp`);
MLflow records which fingerprints each job FINISHED with (:func:`finished_configs`). :func:`job_state`
compares the two with the job's current fingerprint (``launch.grid``) before any job runs.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from data_shards.atomic import atomic_write_json
from launch.grid import Job, weights_path
from launch.runstore import TrackingStore
from launch.study_config import CONFIG_TAG, StudyConfig

#: File in a job's run folder recording the fingerprint the folder was made with.
STAMP_FILE = "study_job.json"


def finished_configs(store: TrackingStore, study: StudyConfig) -> dict[str, list[str]]:
    """Job id -> fingerprints (tag ``study_job_config``; '' when the run has none) of its FINISHED runs,
    newest first."""
    out: dict[str, list[str]] = {}
    for r in store.find_runs({"study": study.name}, status="FINISHED"):
        job_id = r.tags.get("study_job")
        if job_id:
            out.setdefault(job_id, []).append(r.tags.get(CONFIG_TAG, ""))
    return out


def folder_fingerprint(job: Job) -> str | None:
    """The fingerprint the job's run folder was made with: None when there is no (non-empty) folder,
    '' when the folder has no readable ``study_job.json`` (made before fingerprints, or damaged)."""
    if not job.out_dir.is_dir() or not any(job.out_dir.iterdir()):
        return None
    try:
        return str(json.loads((job.out_dir / STAMP_FILE).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def write_stamp(job: Job) -> None:
    """Record the job's fingerprint (and what it covers) in its run folder, atomically."""
    atomic_write_json(job.out_dir / STAMP_FILE, {
        "job_id": job.job_id, "fingerprint": job.fingerprint, "overrides": job.overrides, "nproc": job.nproc,
        "needs": job.needs, "last_started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        mkdir=True, trailing_newline=True, indent=1)


def move_aside(job: Job) -> Path:
    """Rename the job's run folder to ``<job id>.stale-<UTC time>`` (never deleted); returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = job.out_dir.with_name(f"{job.out_dir.name}.stale-{stamp}")
    n = 1
    while target.exists():
        target = job.out_dir.with_name(f"{job.out_dir.name}.stale-{stamp}-{n}")
        n += 1
    job.out_dir.rename(target)
    return target


@dataclass
class JobState:
    """What a (re-)run does with a job before any job ran: see :func:`job_state`."""

    action: str
    """skip (FINISHED with this fingerprint) | resume (own folder, same fingerprint) | fresh (no folder) |
    stale (folder made with another fingerprint: moved aside, then fresh)."""
    reason: str
    """Human-readable why."""
    old: str | None = None
    """The other fingerprint ('' = unknown) when there is one."""


def job_state(study: StudyConfig, job: Job, configs: dict[str, list[str]]) -> JobState:
    """Decide from MLflow's FINISHED runs (``configs``: :func:`finished_configs`) and the run folder."""
    fp, folder = job.fingerprint, folder_fingerprint(job)
    runs = configs.get(job.job_id, [])
    if fp in runs:
        if job.kind != "pretrain":
            return JobState("skip", "already finished")
        if folder == fp and weights_path(study, job).exists():
            return JobState("skip", "already finished")
        if folder is None or folder == fp:
            what = "resuming in its folder" if folder else "running fresh"
            return JobState("resume" if folder else "fresh",
                            f"finished, but {weights_path(study, job)} is missing: {what}")
    if folder is None:
        other = next((r for r in runs if r != fp), None)
        if other is not None:
            return JobState("fresh", f"config changed since its FINISHED run ({other or 'unknown'} -> {fp})", other)
        return JobState("fresh", "new")
    if folder == fp:
        return JobState("resume", "resuming in its folder (same config)")
    if folder == "":
        return JobState("stale", f"its run folder has no {STAMP_FILE} (config unknown -> {fp})", "")
    return JobState("stale", f"config changed ({folder} -> {fp})", folder)
