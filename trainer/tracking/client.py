"""MLflow client helpers: where runs go, a fast-failing client, and one function that sends a record.

Everything that talks to MLflow goes through :func:`connect` and :func:`apply`, so the live tracker,
the spool replay and the study's run store send the same records the same way (batched: one
``log_batch`` per record, never one request per metric). :func:`is_transient` decides whether an
error means "server unreachable, spool and retry later" or "refused, retrying cannot help".
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterable

from trainer.errors import ConfigError
from trainer.tracking.spool import SpoolError

#: MLflow 3 sends usage telemetry to its own servers (a config fetch, then batches of events) unless
#: told not to: geoprime reaches no network it was not pointed at, so it is off unless the user sets it.
#: Set here, before anything imports mlflow (its import creates the telemetry client).
TELEMETRY_ENV = "MLFLOW_DISABLE_TELEMETRY"
os.environ.setdefault(TELEMETRY_ENV, "true")
#: MLflow's HTTP client retries for minutes by default; an unreachable server must fail fast
#: so that training continues and the spool takes over (a user's own setting wins).
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
#: Errors the server answers with that retrying cannot fix (anything else counts as "unreachable").
PERMANENT_ERROR_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "NOT_FOUND",
}
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
#: MLflow 3's UI opens an experiment by this tag: without it, on the empty GenAI traces overview;
#: with "custom_model_development" (checked in the UI of the pinned mlflow 3.17.2), on the
#: model-training runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: The description MLflow shows for an experiment or a run (Markdown).
NOTE_TAG = "mlflow.note.content"
#: A run's colour in MLflow's UI (runs table dot, chart series), ``#rrggbb``.
RUN_COLOR_TAG = "mlflow.runColor"


def now_ms() -> int:
    """Wall-clock time in milliseconds (MLflow's timestamps)."""
    return int(time.time() * 1000)


def default_uri(out_dir: str | os.PathLike) -> str:
    """The embedded store for a run folder: ``sqlite:///<parent of out_dir>/mlflow/mlflow.db``."""
    root = Path(out_dir).resolve().parent / "mlflow"
    return f"sqlite:///{root / 'mlflow.db'}"


def sqlite_uri_for(folder: str | os.PathLike) -> str:
    """The sqlite store kept in ``folder`` (``<folder>/mlflow.db``, artifacts in ``<folder>/artifacts``)."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def resolve_uri(uri: str | None, out_dir: str | os.PathLike) -> str:
    """Tracking URI from the config, else ``$MLFLOW_TRACKING_URI``, else the embedded default."""
    if uri:
        return str(uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return default_uri(out_dir)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other URI)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def ui_command(uri: str) -> str:
    """The exact command that shows the runs of ``uri`` in MLflow's UI."""
    if sqlite_path(uri) is not None:
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri} in a browser (MLFLOW_TRACKING_URI={uri})"


def run_color(value: str) -> str:
    """``value`` as MLflow's run colour (``#rrggbb``, lower case); anything else is a ConfigError naming it."""
    text = str(value).strip().lower()
    if len(text) != 7 or text[0] != "#" or any(c not in "0123456789abcdef" for c in text[1:]):
        raise ConfigError(f"tracking.color={value!r}: expected a colour #rrggbb, e.g. #1f77b4")
    return text


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` means "server unreachable or overloaded" (spool and retry later)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in PERMANENT_ERROR_CODES
    try:
        import requests

        if isinstance(exc, requests.exceptions.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests ships with mlflow
        pass
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


def connect(uri: str):
    """An ``MlflowClient`` for ``uri`` whose HTTP requests fail fast (user settings win); a sqlite
    store's folder is created."""
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, uri: str, name: str, description: str | None = None) -> str:
    """Id of experiment ``name``, created if missing (sqlite: artifacts in ``<db dir>/artifacts``) and
    marked as model training; ``description`` is set when the experiment has none yet."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        path = sqlite_path(uri)
        if path is not None:
            location = (path.parent / "artifacts" / name).resolve().as_uri()
        try:
            exp_id = client.create_experiment(name, artifact_location=location)
        except MlflowException as e:  # created meanwhile by another process
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp_id = client.get_experiment_by_name(name).experiment_id
        exp = client.get_experiment(exp_id)
    if exp.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow experiment {name!r} at {uri} is deleted; restore it or pick another name")
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    if description and not exp.tags.get(NOTE_TAG):
        client.set_experiment_tag(exp.experiment_id, NOTE_TAG, description)
    return exp.experiment_id


def metric_key(name: str) -> str:
    """A metric name without white space (``test/iou/traffic sign`` -> ``test/iou/traffic_sign``): names
    with spaces are awkward to filter on and to read as column headers."""
    return "_".join(str(name).split())


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def apply(client, record: dict, run_id: str) -> None:
    """Send one tracking record (``{"op": metrics | params | tags | inputs | artifact | status, ...}``) to
    MLflow; used live, when replaying the spool and by the study's run store."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "metrics":
        ts, step = int(record["t"]), int(record["step"])
        metrics = [Metric(metric_key(k), float(v), ts, step) for k, v in record["metrics"].items()]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk, synchronous=True)
    elif op == "params":
        params = [Param(k, v) for k, v in record["params"].items()]
        for chunk in _chunks(params, MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=chunk, synchronous=True)
    elif op == "tags":
        tags = [RunTag(k, str(v)) for k, v in record["tags"].items()]
        for chunk in _chunks(tags, MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=chunk, synchronous=True)
    elif op == "inputs":
        log_inputs(client, run_id, [_dataset_input(d) for d in record["datasets"]])
    elif op == "artifact":
        path = Path(record["path"])
        if not path.exists():
            raise SpoolError(f"artifact {path} to log into run {run_id} no longer exists")
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif op == "status":
        status = record["status"]
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=status, end_time=int(record["t"]))
    else:
        raise SpoolError(f"unknown tracking record op {op!r}")


INPUTS_TRIES = 5
"""Tries of :func:`log_inputs` when a concurrent run inserted the same dataset first."""


def _is_dataset_race(e: Exception) -> bool:
    """MLflow's store looks a dataset up and inserts it when missing, without serialising the two: two runs
    of one experiment logging the same dataset at once (a study's parallel jobs) make the second insert
    fail on the datasets table's unique key (sqlite, PostgreSQL and MySQL wordings)."""
    msg = str(e)
    return "datasets" in msg and any(w in msg.lower() for w in ("unique constraint", "duplicate key",
                                                                "duplicate entry"))


def log_inputs(client, run_id: str, datasets: list) -> None:
    """``client.log_inputs``, tried again when another run inserted the same dataset between MLflow's
    lookup and its insert: the failed transaction was rolled back, and the retry finds the dataset and
    only links it to this run (a study's first two jobs used to fail on this at start-up)."""
    for attempt in range(INPUTS_TRIES):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except Exception as e:  # noqa: BLE001 -- MLflow wraps the database's error in its own
            if attempt == INPUTS_TRIES - 1 or not _is_dataset_race(e):
                raise
            time.sleep(0.05 * (attempt + 1))


def _dataset_input(d: dict):
    """A :class:`mlflow.entities.DatasetInput` from a plain dict (name, digest, source_type, source,
    schema, profile, context), as :mod:`trainer.tracking.datasets` builds and the spool stores them."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"), d.get("profile"))
    tags = [InputTag("mlflow.data.context", d["context"])] if d.get("context") else []
    return DatasetInput(dataset, tags)


def create_run(client, uri: str, record: dict) -> str:
    """Create the run a ``create_run`` record describes (its experiment made if missing); its id."""
    exp_id = experiment_id(client, uri, record["experiment"], record.get("experiment_description"))
    run = client.create_run(exp_id, start_time=int(record["t"]), tags=record["tags"],
                            run_name=record.get("run_name"))
    return run.info.run_id


__all__ = ["EXPERIMENT_KIND_TAG", "HTTP_ENV_DEFAULTS", "MODEL_TRAINING_KIND", "NOTE_TAG", "PERMANENT_ERROR_CODES",
           "RUN_COLOR_TAG", "RUN_STATUSES", "apply", "connect", "create_run", "run_color",
           "default_uri", "experiment_id", "git_commit", "is_transient", "metric_key", "now_ms", "resolve_uri",
           "sqlite_path", "sqlite_uri_for", "ui_command"]
