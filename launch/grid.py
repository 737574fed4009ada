"""The study's job plan: the grid expanded into :class:`Job` s, their fingerprints and trainer commands.

Pure planning, no side effects: :func:`plan` turns a :class:`~launch.study_config.StudyConfig` into
the jobs of its grid (pre-trainings first, one per pre-training seed, then pre-training x dataset x
protocol x N-shot x seed fine-tunings, each fine-tuning seed paired to one pre-training seed:
:func:`pretrain_seed_for`), each with its configuration fingerprint (:func:`job_fingerprint`, also the MLflow tag
``study_job_config``); :func:`job_overrides` / :func:`job_command` give the full trainer command line
a job runs with. ``launch.study`` runs the plan, ``launch.compare`` reads it to know which runs count,
and neither imports the other for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.k8s import CHECKPOINT_MOUNT
from data_shards.palette import series_color
from launch.runstore import pretraining_experiment
from launch.study_config import CONFIG_TAG, StudyConfig
from trainer import tracking


#: The repository root: jobs run there, so a study's relative paths (data roots, weights, its
#: ``out_dir``) are relative to it, from whatever folder the study is launched or compared.
REPO = Path(__file__).resolve().parents[1]
#: Trainer keys whose values are paths: how a path is spelled (relative to :data:`REPO` or absolute,
#: quoted or not, with ``./`` or ``..``) does not change a job's fingerprint.
PATH_KEYS = ("data.root", "task.weights", "model.imagenet_weights")


@dataclass
class Job:
    """One run of the grid."""

    job_id: str
    """Unique within the study: pre-<name> or ft-<pretraining>-<dataset>-<protocol>-n<shots>-s<seed>;
    with several pre-training seeds pre-<name>-p<pretrain seed> and ft-...-n<shots>-p<pretrain seed>-s<seed>."""
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
    run_name: str = ""
    """The MLflow run's name: short, with the row and seed (:func:`run_name`); the job id is its tag."""
    color: str = ""
    """The MLflow run's colour (``#rrggbb``): its pre-training row's (:func:`row_colors`)."""


def canonical_path(value: str) -> str:
    """A path as the fingerprint sees it: absolute (relative ones from :data:`REPO`), normalised, then
    relative to :data:`REPO` when inside it; URLs (``s3://``, ``pipe:``) and '' as they are."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if not text or "://" in text or text.startswith("pipe:"):
        return text
    path = Path(os.path.normpath(REPO / os.path.expanduser(text)))
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.as_posix()


def canonical_override(override: str) -> str:
    """``override`` with a path value (:data:`PATH_KEYS`) in its :func:`canonical_path` spelling."""
    key, sep, value = override.partition("=")
    if sep and key.lstrip("+~") in PATH_KEYS:
        return f"{key}={canonical_path(value)}"
    return override


def job_fingerprint(overrides: list[str], nproc: int, needs_fingerprint: str | None = None,
                    pairing: str | None = None) -> str:
    """16 hex digits of sha256 over what decides a job's training: its planned trainer overrides (not
    the output folder / tracking ones added at launch), its process count and, for a fine-tuning, the
    fingerprint of the pre-training it starts from (a re-trained pre-training re-runs its fine-tunings)
    and, with several pre-training seeds, the pre-training run it is paired to (``pairing``: a random-init
    row has no pre-training, yet its runs are grouped by it in the table). Path values count by what
    they point to, not how they are spelled (:func:`canonical_override`)."""
    fields = {"overrides": [canonical_override(o) for o in overrides], "nproc": int(nproc), "needs": needs_fingerprint}
    if pairing is not None:
        fields["pairing"] = pairing
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: Separator of a run name's parts (short, and not in any grid name: those are [a-z0-9_-]).
NAME_SEP = "·"


def run_name(tags: dict[str, str], several_datasets: bool = False, several_pretrain_seeds: bool = False) -> str:
    """The MLflow run name of a study job from its grid tags, short enough for MLflow's run column:
    ``<row>·<protocol>[·<dataset>][·N=<shots>]·s<seed>`` for a fine-tuning (``depth_full·frozen·s2``),
    ``<row>[·p<seed>]`` for a pre-training (``p`` with several pre-training seeds)."""
    row = tags["grid_pretraining"]
    if tags.get("study_kind") == "pretrain":
        return row + (f"{NAME_SEP}p{tags['grid_pretrain_seed']}" if several_pretrain_seeds else "")
    parts = [row, tags["grid_protocol"]]
    if several_datasets:
        parts.append(tags["grid_dataset"])
    if tags.get("grid_shots", "0") != "0":
        parts.append(f"N={tags['grid_shots']}")
    return NAME_SEP.join(parts + [f"s{tags['grid_seed']}"])


def row_colors(rows: list[str]) -> dict[str, str]:
    """Each pre-training row's colour, by its place in the study (``data_shards.palette.SERIES_COLORS``):
    MLflow's run colour of its runs and its colour in the comparison chart."""
    return {row: series_color(i) for i, row in enumerate(rows)}


def pretrain_seed_for(study: StudyConfig, seed_index: int) -> int:
    """The pre-training seed whose run the ``seed_index``-th fine-tuning seed starts from: fine-tuning
    seeds are nested in pre-training seeds, dealt out in turn (``pretrain_seeds[i % len]``)."""
    return study.pretrain_seeds[seed_index % len(study.pretrain_seeds)]


def _replica(study: StudyConfig, pretrain_seed: int) -> str:
    """Job-id part naming the pre-training run: ``-p<seed>`` with several pre-training seeds, else ''."""
    return f"-p{pretrain_seed}" if len(study.pretrain_seeds) > 1 else ""


def _q(value) -> str:
    """Quote a value for a Hydra override (paths and URIs hold ':' '/' and maybe spaces)."""
    text = str(value)
    if "'" in text:
        raise ValueError(f"value {text!r} contains a single quote, which this launcher does not pass to Hydra")
    return f"'{text}'"


def study_root(study: StudyConfig) -> Path:
    """Absolute output folder of the study (a relative ``out_dir`` is relative to :data:`REPO`, as
    the jobs' paths are: the same folder from any working directory)."""
    root = Path(os.path.expanduser(study.out_dir))
    return root if root.is_absolute() else (REPO / root)


def study_uri(study: StudyConfig) -> str:
    """Tracking URI of the study: the config's, else $MLFLOW_TRACKING_URI, else sqlite in <out_dir>/mlflow."""
    return study.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.sqlite_uri_for(
        study_root(study) / "mlflow")


def _pretrain_jobs(study: StudyConfig, root: Path, base_tags: dict[str, str]) -> list[Job]:
    """One job per pre-training that trains (``task`` set) and pre-training seed, in config order."""
    jobs = []
    for name, pre in study.pretrainings.items():
        if pre.task is None:
            continue
        for pseed in study.pretrain_seeds:
            job_id = f"pre-{name}{_replica(study, pseed)}"
            overrides = [f"task={pre.task}", *study.common, *pre.overrides, f"seed={pseed}", "train.export=true"]
            jobs.append(Job(job_id, "pretrain", overrides, root / job_id, pre.nproc or study.nproc_per_job,
                            {**base_tags, "study_job": job_id, "study_kind": "pretrain", "grid_pretraining": name,
                             "grid_pretrain_seed": str(pseed)}))
    return jobs


def _finetune_jobs(study: StudyConfig, root: Path, base_tags: dict[str, str]) -> list[Job]:
    """pre-training x dataset x protocol x N-shot x seed, in that nesting order."""
    jobs = []
    for name, pre in study.pretrainings.items():
        for dataset, data_overrides in study.datasets.items():
            for protocol, protocol_overrides in study.protocols.items():
                for shots in study.protocol_shots.get(protocol, study.shots):
                    for i, seed in enumerate(study.seeds):
                        pseed = pretrain_seed_for(study, i)
                        replica = _replica(study, pseed)
                        job_id = f"ft-{name}-{dataset}-{protocol}-n{shots or 'all'}{replica}-s{seed}"
                        overrides = ["task=segmentation", *study.common, *study.finetune, *data_overrides,
                                     *protocol_overrides, *pre.finetune_overrides, f"task.init={pre.init}",
                                     f"seed={seed}"]
                        if shots:
                            overrides += [f"data.subset={shots}", f"data.subset_seed={seed}"]
                        tags = {**base_tags, "study_job": job_id, "study_kind": "finetune",
                                "grid_pretraining": name, "grid_dataset": dataset, "grid_protocol": protocol,
                                "grid_shots": str(shots), "grid_seed": str(seed), "grid_pretrain_seed": str(pseed)}
                        run = pre.weights_from or (name if pre.task else None)  # whose weights
                        jobs.append(Job(job_id, "finetune", overrides, root / job_id, study.nproc_per_job, tags,
                                        needs=f"pre-{run}{replica}" if run else None,
                                        weights_override="task.weights={weights}" if run else None))
    return jobs


def plan(study: StudyConfig) -> list[Job]:
    """Every job of the grid, pre-trainings first, in a fixed order."""
    root = study_root(study) / "runs"
    base_tags = {"study": study.name}
    jobs = _pretrain_jobs(study, root, base_tags) + _finetune_jobs(study, root, base_tags)
    ids = [j.job_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"study {study.name}: job ids collide: {sorted({i for i in ids if ids.count(i) > 1})}")
    by_id = {j.job_id: j for j in jobs}
    paired = len(study.pretrain_seeds) > 1
    colors = row_colors(list(study.pretrainings))
    for job in jobs:  # pre-trainings come first, so a fine-tuning's `needs` is already fingerprinted
        pairing = job.tags["grid_pretrain_seed"] if paired and job.kind == "finetune" else None
        job.fingerprint = job_fingerprint(job.overrides, job.nproc,
                                          by_id[job.needs].fingerprint if job.needs else None, pairing)
        job.tags[CONFIG_TAG] = job.fingerprint
        job.run_name = run_name(job.tags, len(study.datasets) > 1, paired)
        job.color = colors[job.tags["grid_pretraining"]]
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
            weights = f"{CHECKPOINT_MOUNT}/{k8s_name(study, by_id[job.needs])}/{study.weights_file}"
        else:
            weights = str(weights_path(study, by_id[job.needs]))
        out.append(job.weights_override.format(weights=_q(weights)))
    if out_dir is not None:
        out.append(f"out_dir={_q(out_dir)}")
    experiment = pretraining_experiment(study.experiment) if job.kind == "pretrain" else study.experiment
    out += ["tracking.enabled=true", f"tracking.experiment={_q(experiment)}",
            f"tracking.run_name={_q(job.run_name or job.job_id)}"]
    if job.color:
        out.append(f"tracking.color={_q(job.color)}")
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
