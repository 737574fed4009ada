"""The study's read (and bookkeeping) side of MLflow: find runs by tags, create parent runs, attach files.

Used by the study launcher and the comparison only; built on ``trainer.tracking.client`` (so
``mlflow`` is still imported in one package) and sending the same records as the run tracker.
A study's runs live in two experiments, ``<experiment>`` (parent run + fine-tunings) and
``<experiment>-pretraining`` (:func:`pretraining_experiment`); a store of ``<experiment>`` finds
runs in both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.tracking.client import NOTE_TAG, apply, connect, experiment_id, git_commit, now_ms
from trainer.tracking.params import sanitize_params
from trainer.tracking.tracker import current_user

#: What MLflow shows as the source of the runs the study itself creates (its parent run).
SOURCE_NAME = "python -m launch study"
#: Suffix of the experiment that holds a study's pre-training runs.
PRETRAINING_SUFFIX = "-pretraining"


def pretraining_experiment(experiment: str) -> str:
    """The experiment of a study's pre-trainings, beside its transfer experiment ``experiment``."""
    return experiment + PRETRAINING_SUFFIX


@dataclass
class RunRecord:
    """One MLflow run as the study launcher and the comparison see it."""

    run_id: str
    name: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    start_time: int = 0


def _filter_value(value: str) -> str:
    if "'" in value:
        raise ValueError(f"tag value {value!r} contains a single quote, which MLflow filters cannot hold")
    return f"'{value}'"


class TrackingStore:
    """Study-level access to one MLflow experiment: find runs by tags, create parents, attach files."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self.client = connect(uri)
        self.experiment_id = experiment_id(self.client, uri, experiment)

    def _experiment_ids(self) -> list[str]:
        """The experiment's id, and its pre-training companion's when that exists."""
        companion = self.client.get_experiment_by_name(pretraining_experiment(self.experiment))
        if companion is None or companion.lifecycle_stage == "deleted":
            return [self.experiment_id]
        return [self.experiment_id, companion.experiment_id]

    def find_runs(self, tags: dict[str, str] | None = None, status: str | None = None) -> list[RunRecord]:
        """Runs of the experiment (and its pre-training companion) whose tags equal ``tags`` (and status,
        if given), newest first."""
        clauses = [f"tags.`{k}` = {_filter_value(str(v))}" for k, v in (tags or {}).items()]
        if status:
            clauses.append(f"attributes.status = {_filter_value(status)}")
        out, token = [], None
        while True:
            page = self.client.search_runs(self._experiment_ids(), " and ".join(clauses), max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            for run in page:
                out.append(RunRecord(run.info.run_id, run.info.run_name or "", run.info.status,
                                     dict(run.data.tags), dict(run.data.params), dict(run.data.metrics),
                                     run.info.start_time or 0))
            token = page.token
            if not token:
                return out

    def create_run(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        """A new RUNNING run; returns its id."""
        tags = {"mlflow.source.name": SOURCE_NAME, "mlflow.source.type": "LOCAL", "mlflow.user": current_user(),
                **{str(k): str(v) for k, v in tags.items()}}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        commit = git_commit()
        if commit:
            tags.setdefault("mlflow.source.git.commit", commit)
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def set_status(self, run_id: str, status: str) -> None:
        """Mark a run RUNNING, FINISHED, FAILED or KILLED."""
        apply(self.client, {"op": "status", "status": status, "t": now_ms()}, run_id)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set tags on a run."""
        apply(self.client, {"op": "tags", "tags": tags}, run_id)

    def log_params(self, run_id: str, params: dict) -> None:
        """Log params on a run (values stringified, long ones truncated)."""
        apply(self.client, {"op": "params", "params": sanitize_params(params)}, run_id)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics on a run in one batch."""
        apply(self.client, {"op": "metrics", "metrics": metrics, "step": step, "t": now_ms()}, run_id)

    def log_artifact(self, run_id: str, path, artifact_path: str | None = None) -> None:
        """Upload a file or folder to a run."""
        apply(self.client, {"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path},
              run_id)

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Artifact paths of a run (one level)."""
        return [a.path for a in self.client.list_artifacts(run_id, path)]

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``[(step, value)]`` of one metric, in step order."""
        hist = self.client.get_metric_history(run_id, key)
        return sorted((m.step, m.value) for m in hist)

    def set_experiment_note(self, experiment: str, text: str) -> None:
        """Describe ``experiment`` (created, marked as model training, if missing); a description a
        person wrote (one not starting with "geoprime" or the comparison's headline) is kept."""
        exp_id = experiment_id(self.client, self.uri, experiment)
        current = self.client.get_experiment(exp_id).tags.get(NOTE_TAG, "")
        if not current or current.startswith(("geoprime", "**Result**: ")):
            self.client.set_experiment_tag(exp_id, NOTE_TAG, text)

    def experiment_note(self, experiment: str) -> str:
        """An experiment's description ('' when none or no such experiment)."""
        exp = self.client.get_experiment_by_name(experiment)
        return exp.tags.get(NOTE_TAG, "") if exp is not None else ""

    def run_note(self, run_id: str) -> str:
        """A run's description ('' when none)."""
        return self.client.get_run(run_id).data.tags.get(NOTE_TAG, "")

    def set_run_note(self, run_id: str, text: str) -> None:
        """Set a run's description (Markdown)."""
        self.set_tags(run_id, {NOTE_TAG: text})
