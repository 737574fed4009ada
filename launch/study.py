"""`python -m launch study +experiment=<name>`: run a study grid, tracked in MLflow.

Each pre-training runs once (``python -m trainer task=...`` as a subprocess, or torchrun when
it asks for several processes); then every fine-tuning (task=segmentation) of the grid
pre-training x dataset x protocol x N-shot x seed starts from that pre-training's exported
weights. A parent MLflow run holds one child run per job, tagged with its grid coordinates
(``study``, ``study_job``, ``grid_pretraining``, ``grid_dataset``, ``grid_protocol``,
``grid_shots``, ``grid_seed``) so MLflow's compare view can group them.

Every job has a configuration fingerprint (:func:`job_fingerprint`: its planned trainer overrides,
its process count and, for a fine-tuning, its pre-training's fingerprint), logged as the tag
``study_job_config`` and written to ``<run folder>/study_job.json`` when the job starts. Re-running
skips a job only when MLflow has a FINISHED run of it with the same fingerprint; an unfinished job
with the same fingerprint re-starts in its old run folder, where the trainer resumes from its latest
checkpoint; a run folder made with another fingerprint (or none: made before fingerprints existed) is
renamed ``<job id>.stale-<UTC time>`` (kept, never deleted) and the job runs fresh.
``--emit k8s`` writes one Kubernetes manifest per job instead (launch.k8s renders them).
``python -m launch study replay <spool>`` sends a run's offline tracking spool to MLflow.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.runstore import TrackingStore, pretraining_experiment
from launch.study_config import CONFIG_TAG, StudyConfig, load_study
from launch.study_notes import HELP_EPILOG, describe_study
from trainer import tracking

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    """One run of the grid."""

    job_id: str
    """Unique within the study: pre-<name> or ft-<pretraining>-<dataset>-<protocol>-n<shots>-s<seed>."""
    kind: str
    """pretrain | finetune."""
    overrides: list[str]
    """Trainer Hydra overrides, without the tracking ones (added at launch)."""
    out_dir: Path
    """The job's run folder."""
    nproc: int
    """Processes (torchrun when > 1)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Grid coordinates (MLflow tags)."""
    needs: str | None = None
    """Job id of the pre-training this job starts from."""
    weights_override: str | None = None
    """'task.weights' override template for the pre-training's weights ('{weights}' is replaced)."""
    fingerprint: str = ""
    """Configuration fingerprint (:func:`job_fingerprint`); also the tag ``study_job_config``."""


#: File in a job's run folder recording the fingerprint the folder was made with.
STAMP_FILE = "study_job.json"


def job_fingerprint(overrides: list[str], nproc: int, needs_fingerprint: str | None = None) -> str:
    """16 hex digits of sha256 over what decides a job's training: its planned trainer overrides (not
    the output folder / tracking ones added at launch), its process count and, for a fine-tuning, the
    fingerprint of the pre-training it starts from (a re-trained pre-training re-runs its fine-tunings)."""
    payload = json.dumps({"overrides": list(overrides), "nproc": int(nproc), "needs": needs_fingerprint},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _q(value) -> str:
    """Quote a value for a Hydra override (paths and URIs hold ':' '/' and maybe spaces)."""
    text = str(value)
    if "'" in text:
        raise ValueError(f"value {text!r} contains a single quote, which this launcher does not pass to Hydra")
    return f"'{text}'"


def study_root(study: StudyConfig) -> Path:
    """Absolute output folder of the study."""
    root = Path(study.out_dir)
    return root if root.is_absolute() else (Path.cwd() / root)


def study_uri(study: StudyConfig) -> str:
    """Tracking URI of the study: the config's, else $MLFLOW_TRACKING_URI, else sqlite in <out_dir>/mlflow."""
    return study.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.sqlite_uri_for(
        study_root(study) / "mlflow")


def plan(study: StudyConfig) -> list[Job]:
    """Every job of the grid, pre-trainings first, in a fixed order."""
    root = study_root(study) / "runs"
    jobs: list[Job] = []
    base_tags = {"study": study.name}
    for name, pre in study.pretrainings.items():
        if pre.task is None:
            continue
        job_id = f"pre-{name}"
        overrides = [f"task={pre.task}", *study.common, *pre.overrides, f"seed={study.pretrain_seed}",
                     "train.export=true"]
        jobs.append(Job(job_id, "pretrain", overrides, root / job_id, pre.nproc or study.nproc_per_job,
                        {**base_tags, "study_job": job_id, "study_kind": "pretrain", "grid_pretraining": name}))
    for name, pre in study.pretrainings.items():
        for dataset, data_overrides in study.datasets.items():
            for protocol, protocol_overrides in study.protocols.items():
                for shots in study.protocol_shots.get(protocol, study.shots):
                    for seed in study.seeds:
                        job_id = f"ft-{name}-{dataset}-{protocol}-n{shots or 'all'}-s{seed}"
                        overrides = ["task=segmentation", *study.common, *study.finetune, *data_overrides,
                                     *protocol_overrides, *pre.finetune_overrides, f"task.init={pre.init}",
                                     f"seed={seed}"]
                        if shots:
                            overrides += [f"data.subset={shots}", f"data.subset_seed={seed}"]
                        tags = {**base_tags, "study_job": job_id, "study_kind": "finetune",
                                "grid_pretraining": name, "grid_dataset": dataset, "grid_protocol": protocol,
                                "grid_shots": str(shots), "grid_seed": str(seed)}
                        run = pre.weights_from or (name if pre.task else None)  # whose weights
                        jobs.append(Job(job_id, "finetune", overrides, root / job_id, study.nproc_per_job, tags,
                                        needs=f"pre-{run}" if run else None,
                                        weights_override="task.weights={weights}" if run else None))
    ids = [j.job_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"study {study.name}: job ids collide: {sorted({i for i in ids if ids.count(i) > 1})}")
    by_id = {j.job_id: j for j in jobs}
    for job in jobs:  # pre-trainings come first, so a fine-tuning's `needs` is already fingerprinted
        job.fingerprint = job_fingerprint(job.overrides, job.nproc,
                                          by_id[job.needs].fingerprint if job.needs else None)
        job.tags[CONFIG_TAG] = job.fingerprint
    return jobs


def weights_path(study: StudyConfig, job: Job) -> Path:
    """Where a pre-training job's exported weights land."""
    return job.out_dir / study.weights_file


def job_overrides(study: StudyConfig, job: Job, by_id: dict[str, Job], *, uri: str | None,
                  parent_run_id: str | None, out_dir: str | None) -> list[str]:
    """The job's full trainer overrides: grid + weights + output folder + tracking."""
    out = list(job.overrides)
    if job.needs:
        if out_dir is None:  # k8s: the pre-training wrote to the checkpoint volume
            from launch.k8s import CHECKPOINT_MOUNT

            weights = f"{CHECKPOINT_MOUNT}/{k8s_name(study, by_id[job.needs])}/{study.weights_file}"
        else:
            weights = str(weights_path(study, by_id[job.needs]))
        out.append(job.weights_override.format(weights=_q(weights)))
    if out_dir is not None:
        out.append(f"out_dir={_q(out_dir)}")
    experiment = pretraining_experiment(study.experiment) if job.kind == "pretrain" else study.experiment
    out += ["tracking.enabled=true", f"tracking.experiment={_q(experiment)}", f"tracking.run_name={_q(job.job_id)}"]
    if uri:
        out.append(f"tracking.uri={_q(uri)}")
    if parent_run_id:
        out.append(f"tracking.parent_run_id={_q(parent_run_id)}")
    out += [f"++tracking.tags.{k}={_q(v)}" for k, v in job.tags.items()]
    return out


def job_command(overrides: list[str], nproc: int) -> list[str]:
    """``python -m trainer ...``, or torchrun --standalone when the job asks for several processes."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "trainer", *overrides]
    return [sys.executable, "-m", "trainer", *overrides]


def k8s_name(study: StudyConfig, job: Job) -> str:
    """A DNS-1123 name of at most 40 characters for the job (short hash when shortened)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{study.name}-{job.job_id}".lower()).strip("-")
    if len(name) > 40:
        digest = hashlib.sha1(name.encode()).hexdigest()[:6]
        name = f"{name[:33].rstrip('-')}-{digest}"
    return name


# ----------------------------------------------------------------------------- local run


def _copy_output(src, log, echo: bool) -> None:
    """Copy a child's output lines into its log file (and the terminal when ``echo``)."""
    for line in src:
        log.write(line)
        log.flush()
        if echo:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _run_job(cmd: list[str], log_path: Path, timeout: float, verbose: bool) -> tuple[int, float]:
    """Run one job, its output to ``log_path`` (and the terminal if verbose); (exit code, seconds).

    The job runs in its own process group: a timeout or Ctrl-C ends it and every process it started.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE if verbose else log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        copier = None
        if verbose:
            copier = threading.Thread(target=_copy_output, args=(proc.stdout, log, True), daemon=True)
            copier.start()
        try:
            rc = proc.wait(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            if copier is not None:
                copier.join(timeout=10)
        if rc == 124:
            log.write(f"\n[study] killed after {timeout:.0f} s (study.timeout_s)\n".encode())
    return rc, time.monotonic() - start


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
        "seeds": ",".join(map(str, study.seeds)), "nproc_per_job": study.nproc_per_job})
    return run_id


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
    job.out_dir.mkdir(parents=True, exist_ok=True)
    path = job.out_dir / STAMP_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"job_id": job.job_id, "fingerprint": job.fingerprint, "overrides": job.overrides,
                               "nproc": job.nproc, "needs": job.needs,
                               "last_started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
    tmp.replace(path)


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


def run_study(study: StudyConfig, *, dry_run: bool = False, compare: bool = True, verbose: bool = False,
              only: list[str] | None = None) -> int:
    """Run (or resume) the whole grid locally, one job after another; 0 when every job finished."""
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
    store = TrackingStore(uri, study.experiment)
    parent = _parent_run(store, study)
    describe_study(store, study, parent)
    configs = finished_configs(store, study)
    print(f"[study] {study.name}: {len(jobs)} jobs, tracking {uri} (experiment {study.experiment!r}, "
          f"parent run {parent})", flush=True)
    try:
        return _run_jobs(study, jobs, by_id, store, parent, configs, uri, compare, verbose)
    except KeyboardInterrupt:
        store.set_status(parent, "KILLED")
        print("[study] interrupted; re-run the same command to continue (jobs finished with the same config are "
              "skipped)", flush=True)
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


def _run_jobs(study: StudyConfig, jobs: list[Job], by_id: dict[str, Job], store: TrackingStore,
              parent: str, configs: dict[str, list[str]], uri: str, compare: bool, verbose: bool) -> int:
    """The loop of :func:`run_study` over jobs, then the comparison; returns the exit code.

    ``configs`` (:func:`finished_configs`) says which fingerprints each job FINISHED with in MLflow."""
    failed: dict[str, str] = {}
    t_start = time.monotonic()
    for i, job in enumerate(jobs, 1):
        prefix = f"[study] {i:>3}/{len(jobs)} {job.job_id}"
        state = job_state(study, job, configs)
        if state.action == "skip":
            print(f"{prefix}: already finished, skipped", flush=True)
            continue
        if job.needs and job.needs in failed:
            failed[job.job_id] = f"its pre-training {job.needs} failed"
            print(f"{prefix}: skipped, {failed[job.job_id]}", flush=True)
            continue
        if job.needs and not weights_path(study, by_id[job.needs]).exists():
            failed[job.job_id] = f"pre-training weights {weights_path(study, by_id[job.needs])} missing"
            print(f"{prefix}: skipped, {failed[job.job_id]}", flush=True)
            continue
        if state.action == "stale":
            moved = move_aside(job)
            print(f"{prefix}: {state.reason}: old run folder kept as {moved}, running fresh", flush=True)
        elif state.action == "fresh" and state.old is not None:
            print(f"{prefix}: {state.reason}, running fresh", flush=True)
        write_stamp(job)
        resumed = " (resuming)" if state.action == "resume" else ""
        print(f"{prefix}: running{resumed} ...", flush=True)
        cmd = job_command(job_overrides(study, job, by_id, uri=uri, parent_run_id=parent,
                                        out_dir=str(job.out_dir)), job.nproc)
        rc, secs = _run_job(cmd, job.out_dir / "job.log", study.timeout_s, verbose)
        if rc == 0 and job.kind == "pretrain" and not weights_path(study, job).exists():
            rc = -1
            failed[job.job_id] = f"exited 0 but wrote no {weights_path(study, job)}"
        elif rc != 0:
            failed[job.job_id] = f"exit code {rc}; log {job.out_dir / 'job.log'}"
        if job.job_id in failed:
            print(f"{prefix}: FAILED after {secs:.0f} s ({failed[job.job_id]})\n{_tail(job.out_dir / 'job.log')}",
                  flush=True)
        else:
            print(f"{prefix}: done in {secs:.0f} s", flush=True)
    elapsed = time.monotonic() - t_start
    store.log_metrics(parent, {"jobs_failed": float(len(failed)), "grid_seconds": elapsed})
    if compare:
        from launch.compare import compare_study

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
    try:
        from launch import k8s
    except ImportError as e:  # pragma: no cover - launch.k8s is part of the package
        raise RuntimeError(f"--emit k8s needs launch/k8s.py (the manifest renderer): {e}") from e
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(k8s.to_yaml(k8s.render(args.kind, spec)))
        tmp.replace(path)
        written.append(path)
    print(f"[study] wrote {len(written)} manifests to {out}: apply 0-*.yaml (pre-trainings) first, "
          f"then 1-*.yaml once they completed; then: python -m launch compare --experiment {study.experiment} "
          f"--uri <your MLflow URI> --study {study.name}")
    return 0


# ----------------------------------------------------------------------------- CLI


def _terminate(signum, frame) -> None:
    """SIGTERM -> KeyboardInterrupt: the running job's process group is killed, the parent run marked KILLED."""
    raise KeyboardInterrupt(f"signal {signum}")


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
    if emit:
        from launch import k8s

        p.add_argument("--out", default=None, help="folder for the manifests (default <study out_dir>/k8s)")
        k8s.add_job_arguments(p)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # a killed study also ends the job it is running
    try:
        study = load_study(args.overrides)
        if args.emit == "k8s":
            return emit_k8s(study, args)
        return run_study(study, dry_run=args.dry_run, compare=not args.no_compare, verbose=args.verbose,
                         only=args.only)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
