"""`python -m launch study +experiment=<name>`: run a study grid, tracked in MLflow.

Each pre-training runs once per pre-training seed (``python -m trainer task=...`` as a subprocess,
or torchrun when it asks for several processes); then every fine-tuning (task=segmentation) of the
grid pre-training x dataset x protocol x N-shot x seed starts from the exported weights of the
pre-training run its seed is paired to (:func:`launch.grid.pretrain_seed_for`). A parent MLflow run holds one child run per job, tagged with its grid coordinates
(``study``, ``study_job``, ``grid_pretraining``, ``grid_dataset``, ``grid_protocol``,
``grid_shots``, ``grid_seed``) so MLflow's compare view can group them.

Every job has a configuration fingerprint (:func:`launch.grid.job_fingerprint`: its planned trainer overrides,
its process count and, for a fine-tuning, its pre-training's fingerprint), logged as the tag
``study_job_config`` and written to ``<run folder>/study_job.json`` when the job starts. Re-running
skips a job only when MLflow has a FINISHED run of it with the same fingerprint; an unfinished job
with the same fingerprint re-starts in its old run folder, where the trainer resumes from its latest
checkpoint; a run folder made with another fingerprint (or none: made before fingerprints existed) is
renamed ``<job id>.stale-<UTC time>`` (kept, never deleted) and the job runs fresh (:mod:`launch.job_state`).
``--emit k8s`` writes one Kubernetes manifest per job instead (launch.k8s renders them).
``python -m launch study replay <spool>`` sends a run's offline tracking spool to MLflow.

Stopping a study (SIGTERM, Ctrl-C) passes the signal on to its running jobs: each writes a
checkpoint within ``--grace`` seconds (then SIGKILL) and the re-run resumes it from there. Jobs
checkpoint every ``--ckpt-every-minutes`` (2) unless their overrides set a cadence: the trainer's
30-minute default would never fire in a job of a few minutes. One study per output folder: a
second one is refused, naming the first. Tracking records a job spooled while MLflow was away are
replayed before the jobs' states are read and before the comparison (:mod:`launch.spools`).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from data_shards.atomic import atomic_write_text
from launch import k8s
from launch.compare import compare_study
from launch.grid import Job, job_command, job_overrides, k8s_name, plan, study_root, study_uri, weights_path
from launch import job_runner
from launch.job_runner import run_all, run_job, thread_env
from launch.job_state import finished_configs, job_state, move_aside, write_stamp
from launch.runstore import TrackingStore
from launch.torchrun import DEFAULT_GRACE_S, STOP_MARGIN_S
from launch.study_config import StudyConfig, load_study
from launch.spools import replay_spools
from launch.study_notes import HELP_EPILOG, describe_study
from trainer import tracking
from trainer.errors import ConfigError
from trainer.checkpointing.run_lock import OutDirLock
from trainer.checkpointing.stop_record import GRACE_ENV

REPO = Path(__file__).resolve().parents[1]
#: how often a study's job checkpoints unless its own overrides say (minutes of work a kill -9 may cost)
CKPT_EVERY_MINUTES = 2.0


class StudyStopped(KeyboardInterrupt):
    """A stop signal reached the study (SIGTERM / SIGHUP; Ctrl-C is a plain KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class Stopping:
    """How the study's jobs are stopped and checkpoint: the grace after a stop signal, the cadence."""

    def __init__(self, grace_s: int = DEFAULT_GRACE_S, ckpt_every_minutes: float = CKPT_EVERY_MINUTES) -> None:
        self.grace_s, self.ckpt_every_minutes = int(grace_s), float(ckpt_every_minutes)

    def env(self) -> dict[str, str]:
        """What a job is started with: its ranks know the grace; torchrun gives them that long."""
        return {GRACE_ENV: str(self.grace_s), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(self.grace_s)}

    def cadence(self, overrides: list[str]) -> list[str]:
        """The study's checkpoint cadence for a job whose overrides set none."""
        if any(o.split("=", 1)[0].lstrip("+~") == "train.ckpt_every_minutes" for o in overrides):
            return []
        return [f"train.ckpt_every_minutes={self.ckpt_every_minutes:g}"]


# ----------------------------------------------------------------------------- local run


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _parent_run(store: TrackingStore, study: StudyConfig) -> str:
    """The study's parent run: the newest existing one (a re-run continues it), else a new one."""
    found = store.find_runs({"study": study.name, "study_kind": "study"})
    if found:
        store.set_status(found[0].run_id, "RUNNING")
        return found[0].run_id
    run_id = store.create_run(f"study-{study.name}", {"study": study.name, "study_kind": "study"})
    store.log_params(run_id, {
        "pretrainings": ",".join(study.pretrainings), "datasets": ",".join(study.datasets),
        "protocols": ",".join(study.protocols), "shots": ",".join(map(str, study.shots)),
        "seeds": ",".join(map(str, study.seeds)), "pretrain_seeds": ",".join(map(str, study.pretrain_seeds)),
        "nproc_per_job": study.nproc_per_job})
    return run_id


def run_study(study: StudyConfig, *, dry_run: bool = False, compare: bool = True, verbose: bool = False,
              only: list[str] | None = None, stopping: Stopping | None = None) -> int:
    """Run (or resume) the whole grid locally, one job after another; 0 when every job finished."""
    stopping = stopping or Stopping()
    jobs = plan(study)
    by_id = {j.job_id: j for j in jobs}
    if only:
        unknown = [o for o in only if o not in by_id]
        if unknown:
            raise ValueError(f"--only: no such job(s) {unknown}; jobs: {', '.join(by_id)}")
        jobs = [j for j in jobs if j.job_id in only]
    uri = study_uri(study)
    if dry_run:
        configs, note = _dry_run_configs(study, uri)
        if note:
            print(f"# {note}")
        for job in jobs:
            cmd = job_command(job_overrides(study, job, by_id, uri=uri, parent_run_id="<parent>",
                                            out_dir=str(job.out_dir)), job.nproc)
            if configs is not None:
                state = job_state(study, job, configs)
                print(f"# {job.job_id} [{job.fingerprint}]: {_DRY_WORDS[state.action]} ({state.reason})")
            print(" ".join(cmd))
        return 0
    with OutDirLock(study_root(study)):  # one study per folder: a second one is refused, naming this one
        replay_spools(jobs, "before reading the jobs' states")
        store = TrackingStore(uri, study.experiment)
        parent = _parent_run(store, study)
        describe_study(store, study, parent)
        configs = finished_configs(store, study)
        print(f"[study] {study.name}: {len(jobs)} jobs, tracking {uri} (experiment {study.experiment!r}, "
              f"parent run {parent})", flush=True)
        try:
            return _run_jobs(study, jobs, by_id, store, parent, configs, uri, compare, verbose, stopping)
        except KeyboardInterrupt:
            store.set_status(parent, "KILLED")
            print("[study] interrupted; re-run the same command to continue (jobs finished with the same config "
                  "are skipped, stopped ones resume from their checkpoints)", flush=True)
            raise


_DRY_WORDS = {"skip": "would be skipped", "resume": "would resume", "fresh": "would run fresh",
              "stale": "would move its folder aside and re-run"}


def _dry_run_configs(study: StudyConfig, uri: str) -> tuple[dict[str, list[str]] | None, str]:
    """FINISHED runs' fingerprints for --dry-run, without creating a store that does not exist yet."""
    path = tracking.sqlite_path(uri)
    if path is not None and not path.exists():
        return {}, ""
    try:
        return finished_configs(TrackingStore(uri, study.experiment), study), ""
    except Exception as e:  # noqa: BLE001 - a dry run still prints the commands
        return None, f"MLflow at {uri} not readable ({type(e).__name__}: {e}); what each job would do is unknown"


def _blocked(study: StudyConfig, job: Job, by_id: dict[str, Job], failed: dict[str, str]) -> str:
    """Why ``job`` cannot run ('' when it can): its pre-training failed or left no weights."""
    if job.needs and job.needs in failed:
        return f"its pre-training {job.needs} failed"
    if job.needs and not weights_path(study, by_id[job.needs]).exists():
        return f"pre-training weights {weights_path(study, by_id[job.needs])} missing"
    return ""


def _run_one(study: StudyConfig, job: Job, prefix: str, by_id: dict[str, Job], configs: dict[str, list[str]],
             uri: str, parent: str, verbose: bool, failed: dict[str, str], stopping: Stopping) -> None:
    """Skip, resume or run one job and print its outcome; a failure is recorded in ``failed``."""
    state = job_state(study, job, configs)
    if state.action == "skip":
        print(f"{prefix}: already finished, skipped", flush=True)
        return
    blocked = _blocked(study, job, by_id, failed)
    if blocked:
        failed[job.job_id] = blocked
        print(f"{prefix}: skipped, {blocked}", flush=True)
        return
    if state.action == "stale":
        moved = move_aside(job)
        print(f"{prefix}: {state.reason}: old run folder kept as {moved}, running fresh", flush=True)
    elif state.action == "fresh" and state.old is not None:
        print(f"{prefix}: {state.reason}, running fresh", flush=True)
    write_stamp(job)
    resumed = " (resuming)" if state.action == "resume" else ""
    print(f"{prefix}: running{resumed} ...", flush=True)
    overrides = job_overrides(study, job, by_id, uri=uri, parent_run_id=parent, out_dir=str(job.out_dir))
    cmd = job_command(overrides + stopping.cadence(overrides), job.nproc)
    rc, secs = run_job(cmd, job.out_dir / "job.log", study.timeout_s, verbose,
                       env={**thread_env(study.parallel_jobs), **stopping.env()})
    if rc != 0 and job_runner.stopping():
        failed[job.job_id] = "stopped"
        saved = "checkpointed, the re-run resumes it" if rc == 143 else f"exit code {rc}"
        print(f"{prefix}: stopped after {secs:.0f} s ({saved}; log {job.out_dir / 'job.log'})", flush=True)
        return
    if rc == 0 and job.kind == "pretrain" and not weights_path(study, job).exists():
        failed[job.job_id] = f"exited 0 but wrote no {weights_path(study, job)}"
    elif rc != 0:
        failed[job.job_id] = f"exit code {rc}; log {job.out_dir / 'job.log'}"
    if job.job_id in failed:
        print(f"{prefix}: FAILED after {secs:.0f} s ({failed[job.job_id]})\n{_tail(job.out_dir / 'job.log')}",
              flush=True)
    else:
        print(f"{prefix}: done in {secs:.0f} s", flush=True)


def _run_jobs(study: StudyConfig, jobs: list[Job], by_id: dict[str, Job], store: TrackingStore,
              parent: str, configs: dict[str, list[str]], uri: str, compare: bool, verbose: bool,
              stopping: Stopping) -> int:
    """The jobs of :func:`run_study` (``study.parallel_jobs`` at a time), then the comparison; the exit code.

    ``configs`` (:func:`finished_configs`) says which fingerprints each job FINISHED with in MLflow."""
    failed: dict[str, str] = {}
    t_start = time.monotonic()
    number = {job.job_id: i for i, job in enumerate(jobs, 1)}
    run_all(jobs, lambda job: by_id.get(job.needs) if job.needs else None,
            lambda job: _run_one(study, job, f"[study] {number[job.job_id]:>3}/{len(jobs)} {job.job_id}", by_id,
                                 configs, uri, parent, verbose, failed, stopping),
            study.parallel_jobs, stop_grace_s=stopping.grace_s + STOP_MARGIN_S)
    elapsed = time.monotonic() - t_start
    store.log_metrics(parent, {"jobs_failed": float(len(failed)), "grid_seconds": elapsed})
    replay_spools(jobs, "before the comparison")
    if compare:
        try:
            compare_study(study, store=store, parent_run_id=parent)
        except ValueError as e:
            print(f"[study] comparison not possible: {e}", flush=True)
    store.set_status(parent, "FAILED" if failed else "FINISHED")
    if failed:
        print(f"[study] {len(failed)} job(s) did not finish: " + "; ".join(f"{k}: {v}" for k, v in failed.items()),
              flush=True)
        print("[study] re-run the same command to retry them (jobs finished with the same config are skipped, "
              "interrupted ones resume)")
        return 1
    print(f"[study] all {len(jobs)} jobs finished in {elapsed:.0f} s; view with: {tracking.ui_command(uri)}")
    return 0


# ----------------------------------------------------------------------------- k8s


def emit_k8s(study: StudyConfig, args: argparse.Namespace) -> int:
    """Write one manifest per grid job (pre-trainings must complete before their fine-tunings)."""
    jobs = plan(study)
    by_id = {j.job_id: j for j in jobs}
    out = Path(args.out or study_root(study) / "k8s")
    out.mkdir(parents=True, exist_ok=True)
    roots = set()
    written = []
    for job in jobs:
        overrides = job_overrides(study, job, by_id, uri=None, parent_run_id=None, out_dir=None)
        kept = []
        for o in overrides:
            if o.split("=", 1)[0].lstrip("+~") == "data.root":
                roots.add(o.split("=", 1)[1])
            else:
                kept.append(o)
        if len(roots) > 1:
            raise ValueError(f"--emit k8s: the study reads several shard locations {sorted(roots)}, but a manifest "
                             f"takes one (--shards-url / --shards-pvc); emit one dataset at a time with "
                             f"study.datasets=...")
        name = k8s_name(study, job)
        spec = k8s.job_from_args(args, name, kept, labels={"geoprime/study": study.name[:63],
                                                         "geoprime/kind": job.kind})
        path = out / f"{'0' if job.kind == 'pretrain' else '1'}-{name}.yaml"
        atomic_write_text(path, k8s.to_yaml(k8s.render(args.kind, spec)))
        written.append(path)
    print(f"[study] wrote {len(written)} manifests to {out}: apply 0-*.yaml (pre-trainings) first, "
          f"then 1-*.yaml once they completed; then: python -m launch compare --experiment {study.experiment} "
          f"--uri <your MLflow URI> --study {study.name}")
    return 0


# ----------------------------------------------------------------------------- CLI


def stop_on_signal(signum, frame) -> None:
    """SIGTERM / SIGHUP -> :class:`StudyStopped`: the running jobs get the signal and checkpoint, the parent
    run is marked KILLED."""
    raise StudyStopped(signum)


def main(argv: list[str]) -> int:
    """CLI: ``study +experiment=<name> [overrides] [--dry-run] [--emit k8s ...]`` | ``study replay <spool>``."""
    if argv and argv[0] == "replay":
        return tracking.main(argv)
    emit = "--emit" in argv
    p = argparse.ArgumentParser(prog="python -m launch study", description="Run a study grid (see configs/experiment/).",
                                epilog=HELP_EPILOG,  # flags before overrides, quoting, examples
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="+experiment=<name> and Hydra overrides of the study, after the flags "
                                                "('study.seeds=[0,1]')")
    p.add_argument("--dry-run", action="store_true", help="print every job's command and stop")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison table at the end")
    p.add_argument("--verbose", action="store_true", help="show the jobs' output (always kept in <run>/job.log)")
    p.add_argument("--only", nargs="+", default=None, help="run only these job ids (end the list with --)")
    p.add_argument("--emit", choices=["k8s"], default=None, help="write Kubernetes manifests instead of running")
    if emit:  # --grace is the manifests' (torchrun --shutdown-timeout, terminationGracePeriodSeconds)
        p.add_argument("--out", default=None, help="folder for the manifests (default <study out_dir>/k8s)")
        k8s.add_job_arguments(p)
    else:
        p.add_argument("--grace", type=int, default=DEFAULT_GRACE_S,
                       help="seconds a stopped study's running jobs get to checkpoint before SIGKILL")
        p.add_argument("--ckpt-every-minutes", type=float, default=CKPT_EVERY_MINUTES,
                       help="checkpoint cadence of every job whose overrides set none")
    args = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a stopped study stops its jobs, which checkpoint
        signal.signal(sig, stop_on_signal)
    try:
        study = load_study(args.overrides)
        if args.emit == "k8s":
            return emit_k8s(study, args)
        return run_study(study, dry_run=args.dry_run, compare=not args.no_compare, verbose=args.verbose,
                         only=args.only, stopping=Stopping(args.grace, args.ckpt_every_minutes))
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return 128 + getattr(e, "signum", signal.SIGINT)
