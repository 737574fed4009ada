"""Experiment tracking: MLflow on the logging rank, with an offline spool; node system metrics.

The only module in geoprime that imports ``mlflow``. The training loop calls
:func:`create_tracker` and the :class:`Tracker` methods; the study launcher and the
comparison use :class:`TrackingStore`. Everything goes through MLflow's client API with
batched calls (one ``log_batch`` per step, never one request per metric).

Where runs go: ``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else an embedded sqlite
store ``<parent of out_dir>/mlflow/mlflow.db`` with artifacts beside it in ``artifacts/``.
If the server cannot be reached, training goes on: each operation is appended to
``<out_dir>/tracking/spool.jsonl`` (fsync'd) and replayed, in order, as soon as the server
answers again, at the latest when the run closes; what is still pending then is named in a
warning together with the command that replays it (``python -m trainer.tracking replay``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from trainer.spool import Spool, SpoolError

log = logging.getLogger(__name__)

#: MLflow's HTTP client retries for minutes by default; an unreachable server must fail fast
#: so that training continues and the spool takes over (a user's own setting wins).
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
#: Seconds between reconnection attempts while the server is unreachable.
RETRY_INTERVAL_S = 30.0
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
MAX_PARAM_VALUE = 6000
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


# ----------------------------------------------------------------------------- helpers


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fast_fail_http() -> None:
    """Make MLflow's HTTP requests fail fast when the server is down (user settings win)."""
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


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


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> ``{"a.b.c": "value"}`` strings, as MLflow params want them."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        if not tree and prefix:
            out[prefix] = "{}"
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}.{i}"))
    elif isinstance(tree, (list, tuple)):
        out[prefix] = json.dumps(list(tree))
    else:
        out[prefix] = "null" if tree is None else str(tree)
    return out


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


def _is_transient(exc: BaseException) -> bool:
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


def _client(uri: str):
    _fast_fail_http()
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing (sqlite: artifacts in ``<db dir>/artifacts``)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} at {uri} is deleted; restore it or pick another name")
        return exp.experiment_id
    location = None
    path = sqlite_path(uri)
    if path is not None:
        location = (path.parent / "artifacts" / name).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:  # created meanwhile by another process
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _apply(client, record: dict, run_id: str) -> None:
    """Send one tracking record to MLflow (used live and when replaying the spool)."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "metrics":
        ts, step = int(record["t"]), int(record["step"])
        metrics = [Metric(k, float(v), ts, step) for k, v in record["metrics"].items()]
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


def _create_run(client, uri: str, record: dict) -> str:
    exp_id = _experiment_id(client, uri, record["experiment"])
    run = client.create_run(exp_id, start_time=int(record["t"]), tags=record["tags"],
                            run_name=record.get("run_name"))
    return run.info.run_id


def _sanitize_params(flat: dict) -> dict[str, str]:
    out = {}
    for key, value in flat.items():
        text = "null" if value is None else str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[:MAX_PARAM_VALUE - 15] + "...[truncated]"
        out[str(key)] = text
    return out


# ----------------------------------------------------------------------------- trackers


class Tracker:
    """Tracker interface; this base class does nothing (non-logging ranks, tracking disabled)."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def log_params(self, flat: dict) -> None:
        """Log flat ``{name: value}`` params."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` in one batched request."""

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """Upload a file (or a folder's files) under ``artifact_path``."""

    def log_config(self, yaml_text: str) -> None:
        """Log the resolved config: ``config.yaml`` artifact plus flattened params."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""

    def close(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED | FAILED | KILLED."""


class MlflowTracker(Tracker):
    """MLflow run on the logging rank; spools operations while the server is unreachable."""

    def __init__(self, uri: str, experiment: str, *, run_id: str | None, run_name: str | None,
                 parent_run_id: str | None, tags: dict[str, str], spool_dir: str | os.PathLike,
                 retry_interval: float = RETRY_INTERVAL_S, announce: bool = True) -> None:
        super().__init__(run_id)
        self.uri = uri
        self.experiment = experiment
        self.retry_interval = float(retry_interval)
        self.announce = announce
        self.spool_dir = Path(spool_dir)
        self.spool = Spool(self.spool_dir / "spool.jsonl")
        self._runs_map = self.spool_dir / "spool.jsonl.runs.json"
        self._online = True
        self._next_try = 0.0
        self._target_written = False
        self._run_ref: str | None = None
        self._known_params: dict[str, str] | None = None
        self._closed = False
        self.client = _client(uri)
        if self.spool.count_pending():  # a previous attempt left records: send them first
            self._online = False
        run_tags = {"geoprime.host": socket.gethostname()}
        commit = git_commit()
        if commit:
            run_tags["mlflow.source.git.commit"] = commit
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        if run_id is None:
            record = {"op": "create_run", "experiment": experiment, "run_name": run_name,
                      "tags": run_tags, "t": _now_ms()}
            try:
                if not self._online:
                    raise ConnectionError("spooled records pending")
                self.run_id = _create_run(self.client, uri, record)
            except Exception as e:  # noqa: BLE001 - classified below
                if not _is_transient(e):
                    raise
                self._go_offline(e)
                self._run_ref = uuid.uuid4().hex
                self._spool(dict(record, run_ref=self._run_ref, uri=uri))
        else:
            self._submit({"op": "status", "status": "RUNNING", "t": _now_ms()})
            self._submit({"op": "tags", "tags": {"geoprime.resumed": "true"}, "t": _now_ms()})

    # -- transport

    def _go_offline(self, exc: BaseException) -> None:
        if self._online:
            warnings.warn(
                f"MLflow at {self.uri} unreachable ({type(exc).__name__}: {str(exc)[:200]}); training goes on, "
                f"tracking records are spooled to {self.spool.path} and replayed when it answers again",
                RuntimeWarning, stacklevel=3)
        self._online = False
        self._next_try = time.monotonic() + self.retry_interval

    def _spool(self, record: dict) -> None:
        if not self._target_written:
            self.spool.append({"op": "target", "uri": self.uri, "experiment": self.experiment, "t": _now_ms()})
            self._target_written = True
        if "run_ref" not in record:
            record = dict(record, run_id=self.run_id, run_ref=self._run_ref)
        self.spool.append(record)

    def _submit(self, record: dict) -> None:
        if not self._online and time.monotonic() >= self._next_try:
            self.replay_now()
        if self._online:
            try:
                _apply(self.client, record, self.run_id)
                return
            except Exception as e:  # noqa: BLE001
                if not _is_transient(e):
                    raise
                self._go_offline(e)
        self._spool(record)

    def replay_now(self) -> bool:
        """Try to send every spooled record now; True when nothing is pending any more."""
        try:
            sent = _replay(self.spool, self.client, self.uri, self._runs_map, default_run_id=self.run_id)
        except Exception as e:  # noqa: BLE001
            if not _is_transient(e):
                raise
            self._online = False
            self._next_try = time.monotonic() + self.retry_interval
            return False
        if self._run_ref is not None:
            created = _load_runs_map(self._runs_map).get(self._run_ref)
            if created:
                self.run_id = created
                self._run_ref = None
        if sent:
            warnings.warn(f"MLflow at {self.uri} answers again: replayed {sent} spooled tracking records "
                          f"from {self.spool.path}", RuntimeWarning, stacklevel=2)
        self._online = True
        return True

    # -- the Tracker API

    def log_params(self, flat: dict) -> None:
        params = _sanitize_params(flat)
        if self.run_id is not None and self._online:
            # A resumed run already holds params; MLflow refuses to change one, so only new keys go.
            if self._known_params is None:
                try:
                    self._known_params = dict(self.client.get_run(self.run_id).data.params)
                except Exception as e:  # noqa: BLE001
                    if not _is_transient(e):
                        raise
                    self._go_offline(e)
            known = self._known_params or {}
            changed = {k: (known[k], v) for k, v in params.items() if k in known and known[k] != v}
            if changed:
                warnings.warn(f"run {self.run_id}: params differ from the ones first logged and are kept as "
                              f"first logged (MLflow params are immutable): {changed}", RuntimeWarning, stacklevel=2)
            params = {k: v for k, v in params.items() if k not in known}
            known.update(params)
        if params:
            self._submit({"op": "params", "params": params, "t": _now_ms()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metric {key!r} at step {step} is not a number: {value!r}") from e
        if values:
            self._submit({"op": "metrics", "metrics": values, "step": int(step), "t": _now_ms()})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        self._submit({"op": "artifact", "path": str(path), "artifact_path": artifact_path, "t": _now_ms()})

    def log_config(self, yaml_text: str) -> None:
        import yaml

        self.spool_dir.mkdir(parents=True, exist_ok=True)
        target = self.spool_dir / "config.yaml"
        tmp = target.with_name(f".config.yaml.tmp{os.getpid()}")
        tmp.write_text(yaml_text, encoding="utf-8")
        os.replace(tmp, target)
        self.log_artifact(target)
        tree = yaml.safe_load(yaml_text) or {}
        self.log_params(flatten(tree))

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._submit({"op": "tags", "tags": {str(k): str(v) for k, v in tags.items()}, "t": _now_ms()})

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        self._closed = True
        self._submit({"op": "status", "status": status, "t": _now_ms()})
        if not self._online:
            self.replay_now()
        pending = self.spool.count_pending()
        if pending:
            warnings.warn(
                f"MLflow at {self.uri} still unreachable: {pending} tracking records are kept in {self.spool.path}; "
                f"nothing is lost. Replay them with: python -m trainer.tracking replay {self.spool.path}",
                RuntimeWarning, stacklevel=2)
        if self.announce:
            print(f"[tracking] run {self.run_id or '(pending)'} {status}; view with: {ui_command(self.uri)}",
                  flush=True)


def create_tracker(cfg, *, is_logging_rank: bool, run_id: str | None) -> Tracker:
    """The tracker for this process: MLflow on the logging rank, a do-nothing tracker elsewhere.

    ``cfg`` is the whole run config (``cfg.tracking`` a TrackingConfig); ``run_id`` continues an
    existing run (resume, or a run id broadcast by rank 0).
    """
    tcfg = cfg.tracking
    if not is_logging_rank or not tcfg.enabled:
        return Tracker(run_id)
    uri = resolve_uri(tcfg.uri, cfg.out_dir)
    task_name = getattr(cfg.task, "name", None) or "run"
    run_name = tcfg.run_name or f"{task_name}-{cfg.parallel.strategy}-seed{cfg.seed}"
    return MlflowTracker(uri, tcfg.experiment, run_id=run_id, run_name=run_name,
                         parent_run_id=tcfg.parent_run_id, tags=dict(tcfg.tags or {}),
                         spool_dir=Path(cfg.out_dir) / "tracking")


# ----------------------------------------------------------------------------- replay


def _load_runs_map(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _save_runs_map(path: Path, mapping: dict[str, str]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(mapping), encoding="utf-8")
    os.replace(tmp, path)


def _replay(spool: Spool, client, uri: str, runs_map_path: Path, default_run_id: str | None = None) -> int:
    """Send pending records in order, advancing the spool's offset after each; returns how many."""
    runs = _load_runs_map(runs_map_path)
    sent = 0
    for record, end in spool.pending():
        op = record["op"]
        if op == "target":
            spool.set_offset(end)
            continue
        if op == "create_run":
            ref = record["run_ref"]
            if ref not in runs:
                runs[ref] = _create_run(client, uri, record)
                _save_runs_map(runs_map_path, runs)
        else:
            run_id = record.get("run_id") or runs.get(record.get("run_ref") or "") or default_run_id
            if run_id is None:
                raise SpoolError(f"{spool.path}: record {op!r} belongs to no known run")
            try:
                _apply(client, record, run_id)
            except Exception as e:  # noqa: BLE001
                if _is_transient(e):
                    raise
                if op != "params":
                    raise SpoolError(f"{spool.path}: MLflow refused spooled {op!r} record for run {run_id}: {e}") from e
                warnings.warn(f"{spool.path}: MLflow refused spooled params for run {run_id} ({e}); "
                              f"params kept as first logged", RuntimeWarning, stacklevel=2)
        spool.set_offset(end)
        sent += 1
    return sent


def replay_spool(path: str | os.PathLike, uri: str | None = None) -> int:
    """Replay a spool file (``<out_dir>/tracking/spool.jsonl``) into MLflow; returns records sent.

    ``uri`` defaults to the tracking URI recorded in the spool itself.
    """
    spool = Spool(path)
    if not spool.path.exists():
        raise FileNotFoundError(f"no tracking spool at {spool.path}")
    if uri is None:
        targets = [r["uri"] for r in spool.all_records() if r.get("op") == "target"]
        if not targets:
            raise SpoolError(f"{spool.path}: no tracking URI recorded; pass one with --uri")
        uri = targets[-1]
    return _replay(spool, _client(uri), uri, spool.path.with_name(spool.path.name + ".runs.json"))


# ----------------------------------------------------------------------------- system metrics

_NVML_OK: bool | None = None


def _nvml():
    """pynvml, initialised once; None when NVML (or a GPU) is not there."""
    global _NVML_OK
    if _NVML_OK is False:
        return None
    try:
        import pynvml

        if not _NVML_OK:
            pynvml.nvmlInit()
            _NVML_OK = True
        return pynvml
    except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound, ImportError...: "no GPU"
        _NVML_OK = False
        return None


def sample_system_metrics() -> dict[str, float]:
    """This node's CPU %, memory and per-GPU utilisation / memory / power (NVML; skipped without a GPU)."""
    import psutil

    vm = psutil.virtual_memory()
    out = {
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "memory_used_gb": (vm.total - vm.available) / 2**30,
        "memory_percent": float(vm.percent),
        "process_rss_gb": psutil.Process().memory_info().rss / 2**30,
    }
    nvml = _nvml()
    if nvml is None:
        return out
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            util = nvml.nvmlDeviceGetUtilizationRates(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            out[f"gpu{i}_utilization_percent"] = float(util.gpu)
            out[f"gpu{i}_memory_used_gb"] = mem.used / 2**30
            out[f"gpu{i}_memory_percent"] = 100.0 * mem.used / max(mem.total, 1)
            try:
                out[f"gpu{i}_power_w"] = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            except nvml.NVMLError:
                pass  # some boards do not report power
    except nvml.NVMLError:
        pass
    return out


# ----------------------------------------------------------------------------- the study's view


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
        self.client = _client(uri)
        self.experiment_id = _experiment_id(self.client, uri, experiment)

    def find_runs(self, tags: dict[str, str] | None = None, status: str | None = None) -> list[RunRecord]:
        """Runs of the experiment whose tags equal ``tags`` (and status, if given), newest first."""
        clauses = [f"tags.`{k}` = {_filter_value(str(v))}" for k, v in (tags or {}).items()]
        if status:
            clauses.append(f"attributes.status = {_filter_value(status)}")
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], " and ".join(clauses), max_results=1000,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            for run in page:
                metrics = {k: v for k, v in run.data.metrics.items()}
                out.append(RunRecord(run.info.run_id, run.info.run_name or "", run.info.status,
                                     dict(run.data.tags), dict(run.data.params), metrics, run.info.start_time or 0))
            token = page.token
            if not token:
                return out

    def create_run(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        """A new RUNNING run; returns its id."""
        tags = {str(k): str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        commit = git_commit()
        if commit:
            tags.setdefault("mlflow.source.git.commit", commit)
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def set_status(self, run_id: str, status: str) -> None:
        """Mark a run RUNNING, FINISHED, FAILED or KILLED."""
        _apply(self.client, {"op": "status", "status": status, "t": _now_ms()}, run_id)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set tags on a run."""
        _apply(self.client, {"op": "tags", "tags": tags}, run_id)

    def log_params(self, run_id: str, params: dict) -> None:
        """Log params on a run (values stringified, long ones truncated)."""
        _apply(self.client, {"op": "params", "params": _sanitize_params(params)}, run_id)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics on a run in one batch."""
        _apply(self.client, {"op": "metrics", "metrics": metrics, "step": step, "t": _now_ms()}, run_id)

    def log_artifact(self, run_id: str, path, artifact_path: str | None = None) -> None:
        """Upload a file or folder to a run."""
        _apply(self.client, {"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path},
               run_id)

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Artifact paths of a run (one level)."""
        return [a.path for a in self.client.list_artifacts(run_id, path)]

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``[(step, value)]`` of one metric, in step order."""
        hist = self.client.get_metric_history(run_id, key)
        return sorted((m.step, m.value) for m in hist)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.tracking replay <spool> [--uri URI]`` | ``ui <uri or out_dir>``."""
    parser = argparse.ArgumentParser(prog="python -m trainer.tracking", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="send a run's spooled tracking records to MLflow")
    rp.add_argument("spool", help="path of <out_dir>/tracking/spool.jsonl")
    rp.add_argument("--uri", default=None, help="tracking URI (default: the one recorded in the spool)")
    args = parser.parse_args(argv)
    if args.cmd == "replay":
        try:
            sent = replay_spool(args.spool, args.uri)
        except (SpoolError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001
            if _is_transient(e):
                print(f"error: tracking server still unreachable ({e}); the spool is kept, try again later",
                      file=sys.stderr)
                return 1
            raise
        pending = Spool(args.spool).count_pending()
        print(f"replayed {sent} records from {args.spool}; {pending} pending")
        return 0 if pending == 0 else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
