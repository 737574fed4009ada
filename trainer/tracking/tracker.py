"""The run tracker: one MLflow run on the logging rank, spooling while the server is unreachable.

The training loop calls :func:`create_tracker` and the :class:`Tracker` methods only. Each call
becomes one record (:func:`trainer.tracking.client.apply`) sent at once, or appended to
``<out_dir>/tracking/spool.jsonl`` while the server does not answer; the spool is replayed, in
order, as soon as the server answers again (tried every ``retry_interval`` s), when the run closes
(retried for up to ``close_retry_s``), and at the next start in the same run folder.
:meth:`Tracker.close` ends the run FINISHED, FAILED or KILLED (e.g. on SIGTERM) and says in one
line when records are still spooled.
"""
from __future__ import annotations

import getpass
import os
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Optional, Protocol

from data_shards.atomic import atomic_write_text
from trainer.config import DataConfig, TrackingConfig
from trainer.tracking.client import (RUN_COLOR_TAG, RUN_STATUSES, apply, connect, create_run, git_commit,
                                     is_transient, now_ms, resolve_uri, run_color, ui_command)
from trainer.tracking.datasets import manifest_inputs
from trainer.tracking.params import flatten, sanitize_params, split_settings
from trainer.tracking.replay import load_runs_map, replay, runs_map_path
from trainer.tracking.spool import Spool

#: Seconds between reconnection attempts while the server is unreachable.
RETRY_INTERVAL_S = 30.0
#: Seconds the end of a run retries an unreachable server (``tracking.close_retry_s``).
CLOSE_RETRY_S = 60.0
#: What MLflow shows as a training run's source ("Source" column).
SOURCE_NAME = "python -m trainer"
#: Description of an experiment the trainer creates (a study describes its own experiments).
EXPERIMENT_NOTE = """geoprime training runs: one run per `python -m trainer` (run name: task-strategy-seed).

- **Params** are the training settings (the resolved config); per-run values that are not settings
  (output folder, tracking set-up, weights and data paths) are tags `config.*`.
- **Metrics**: `train/*` every `train.log_every` steps, `val/*` and `test/*` evaluations, and the node's
  CPU / memory / GPU use under *System metrics* (`system/node_<N>/*`).
- **Datasets**: the shard manifests of the splits read, with their digests.
- **Artifacts**: `config.yaml`, `metrics.json` and, under `qualitative/`, labelled pictures of the
  first evaluation batch (depth colour maps, segmentation overlays with a class legend, flow).
"""


def current_user() -> str:
    """The OS user name (MLflow's "Created by"), or "unknown" where there is none (some containers)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class RunTracker(Protocol):
    """What the training loop calls on a tracker: :class:`Tracker` below, or a stand-in. It also calls
    ``last_step()`` where a tracker has it (a resumed run then skips logging steps already logged)."""

    run_id: Optional[str]

    def log_params(self, flat: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path, artifact_path: Optional[str] = None) -> None: ...

    def log_config(self, yaml_text: str) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


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

    def last_step(self, key: str = "train/loss") -> int:
        """The highest step at which ``key`` was logged in this run (0: none or unknown). A resumed
        run re-does the steps after its checkpoint and skips logging those already logged."""
        return 0

    def log_inputs(self, datasets: list[dict]) -> None:
        """Log dataset inputs (dicts as :func:`trainer.tracking.datasets.manifest_input` builds)."""

    def close(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED | FAILED | KILLED (a second call does nothing)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")


class MlflowTracker(Tracker):
    """MLflow run on the logging rank; spools operations while the server is unreachable."""

    def __init__(self, uri: str, experiment: str, *, run_id: str | None, run_name: str | None,
                 parent_run_id: str | None, tags: dict[str, str], spool_dir: str | os.PathLike,
                 retry_interval: float = RETRY_INTERVAL_S, announce: bool = True,
                 close_retry_s: float = CLOSE_RETRY_S) -> None:
        super().__init__(run_id)
        self.uri = uri
        self.experiment = experiment
        self.retry_interval = float(retry_interval)
        self.close_retry_s = float(close_retry_s)
        self.announce = announce
        self.spool_dir = Path(spool_dir)
        self.spool = Spool(self.spool_dir / "spool.jsonl")
        self._runs_map = runs_map_path(self.spool.path)
        self._online = True
        self._next_try = 0.0
        self._target_written = False
        self._run_ref: str | None = None
        self._known_params: dict[str, str] | None = None
        self._closed = False
        self.client = connect(uri)
        if self.spool.count_pending():  # an earlier run in this folder left records: send them first
            self.replay_now()
        if run_id is None:
            self._start_run(run_name, self._run_tags(parent_run_id, tags))
        else:
            self._submit({"op": "status", "status": "RUNNING", "t": now_ms()})
            self._submit({"op": "tags", "tags": {"geoprime.resumed": "true"}, "t": now_ms()})

    @staticmethod
    def _run_tags(parent_run_id: str | None, tags: dict[str, str] | None) -> dict[str, str]:
        run_tags = {"geoprime.host": socket.gethostname(), "mlflow.source.name": SOURCE_NAME,
                    "mlflow.source.type": "LOCAL", "mlflow.user": current_user()}
        commit = git_commit()
        if commit:
            run_tags["mlflow.source.git.commit"] = commit
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        return run_tags

    def _start_run(self, run_name: str | None, run_tags: dict[str, str]) -> None:
        """Create the run now, or spool its creation (with a local reference) when MLflow is away."""
        record = {"op": "create_run", "experiment": self.experiment, "run_name": run_name,
                  "tags": run_tags, "experiment_description": EXPERIMENT_NOTE, "t": now_ms()}
        try:
            if not self._online:
                raise ConnectionError("spooled records pending")
            self.run_id = create_run(self.client, self.uri, record)
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e):
                raise
            self._go_offline(e)
            self._run_ref = uuid.uuid4().hex
            self._spool(dict(record, run_ref=self._run_ref, uri=self.uri))

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
            self.spool.append({"op": "target", "uri": self.uri, "experiment": self.experiment, "t": now_ms()})
            self._target_written = True
        if "run_ref" not in record:
            record = dict(record, run_id=self.run_id, run_ref=self._run_ref)
        self.spool.append(record)

    def _submit(self, record: dict) -> None:
        if not self._online and time.monotonic() >= self._next_try:
            self.replay_now()
        if self._online:
            try:
                apply(self.client, record, self.run_id)
                return
            except Exception as e:  # noqa: BLE001
                if not is_transient(e):
                    raise
                self._go_offline(e)
        self._spool(record)

    def replay_now(self) -> bool:
        """Try to send every spooled record now; True when nothing is pending any more."""
        try:
            sent = replay(self.spool, self.client, self.uri, self._runs_map, default_run_id=self.run_id)
        except Exception as e:  # noqa: BLE001
            if not is_transient(e):
                raise
            self._online = False
            self._next_try = time.monotonic() + self.retry_interval
            return False
        if self._run_ref is not None:
            created = load_runs_map(self._runs_map).get(self._run_ref)
            if created:
                self.run_id = created
                self._run_ref = None
        if sent:
            warnings.warn(f"MLflow at {self.uri} answers again: replayed {sent} spooled tracking records "
                          f"from {self.spool.path}", RuntimeWarning, stacklevel=2)
        self._online = True
        return True

    # -- the Tracker API

    def _new_params(self, params: dict[str, str]) -> dict[str, str]:
        """A resumed run already holds params and MLflow refuses to change one: only new keys go
        (a changed value is named in a warning and kept as first logged)."""
        if self.run_id is None or not self._online:
            return params
        if self._known_params is None:
            try:
                self._known_params = dict(self.client.get_run(self.run_id).data.params)
            except Exception as e:  # noqa: BLE001
                if not is_transient(e):
                    raise
                self._go_offline(e)
        known = self._known_params or {}
        changed = {k: (known[k], v) for k, v in params.items() if k in known and known[k] != v}
        if changed:
            warnings.warn(f"run {self.run_id}: params differ from the ones first logged and are kept as "
                          f"first logged (MLflow params are immutable): {changed}", RuntimeWarning, stacklevel=3)
        params = {k: v for k, v in params.items() if k not in known}
        known.update(params)
        return params

    def last_step(self, key: str = "train/loss") -> int:
        if not self.run_id or not self._online:
            return 0
        try:
            return max((int(m.step) for m in self.client.get_metric_history(self.run_id, key)), default=0)
        except Exception:  # noqa: BLE001 - unknown: at worst a re-done step is logged twice
            return 0

    def log_params(self, flat: dict) -> None:
        params = self._new_params(sanitize_params(flat))
        if params:
            self._submit({"op": "params", "params": params, "t": now_ms()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metric {key!r} at step {step} is not a number: {value!r}") from e
        if values:
            self._submit({"op": "metrics", "metrics": values, "step": int(step), "t": now_ms()})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        self._submit({"op": "artifact", "path": str(path), "artifact_path": artifact_path, "t": now_ms()})

    def log_config(self, yaml_text: str) -> None:
        import yaml

        self.spool_dir.mkdir(parents=True, exist_ok=True)
        target = self.spool_dir / "config.yaml"
        atomic_write_text(target, yaml_text)
        self.log_artifact(target)
        tree = yaml.safe_load(yaml_text) or {}
        params, tags = split_settings(flatten(tree))
        self.log_params(params)
        self.set_tags(tags)

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._submit({"op": "tags", "tags": {str(k): str(v) for k, v in tags.items()}, "t": now_ms()})

    def log_inputs(self, datasets: list[dict]) -> None:
        if datasets:
            self._submit({"op": "inputs", "datasets": list(datasets), "t": now_ms()})

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED | FAILED | KILLED), sending what is spooled; a
        second call does nothing, so a SIGTERM handler may call it after the loop already did."""
        if self._closed:
            return
        super().close(status)
        self._closed = True
        self._submit({"op": "status", "status": status, "t": now_ms()})
        self._retry_until_sent()
        pending = self.spool.count_pending()
        if pending:
            print(f"[tracking] run {self.run_id or '(not created yet)'} ended {status} here, but MLflow at {self.uri} "
                  f"did not answer for {self.close_retry_s:.0f} s: {pending} tracking records stay in {self.spool.path} "
                  f"(sent at the next start in this out_dir, by `python -m launch study`, or now with: "
                  f"python -m trainer.tracking replay {self.spool.path})", file=sys.stderr, flush=True)
        elif self.announce:
            print(f"[tracking] run {self.run_id or '(pending)'} {status}; view with: {ui_command(self.uri)}",
                  flush=True)

    def _retry_until_sent(self) -> None:
        """Replay what is spooled, retrying for up to ``close_retry_s`` (1, 2, 4... s apart, at most 10)."""
        deadline, pause = time.monotonic() + self.close_retry_s, 1.0
        while not self._online or self.spool.count_pending():
            if self.replay_now():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(pause, left))
            pause = min(2 * pause, 10.0)


def default_run_name(task: str, strategy: str, seed: int) -> str:
    """The run's name when ``tracking.run_name`` gives none: ``depth-ddp-seed0``."""
    return f"{task}-{strategy}-seed{seed}"


def create_tracker(tracking: TrackingConfig, out_dir: str, *, default_name: str, data: Optional[DataConfig] = None,
                   is_logging_rank: bool, run_id: Optional[str]) -> Tracker:
    """The tracker for this process: MLflow on the logging rank, a do-nothing tracker elsewhere.

    ``tracking`` says where and how; ``out_dir`` is the run folder (the default store beside it, the
    offline spool in it); ``default_name`` names the run unless ``tracking.run_name`` does; ``run_id``
    continues an existing run (resume, or a run id broadcast by rank 0). A new run gets the shard
    manifests of ``data`` as dataset inputs.
    """
    tcfg = tracking
    if not is_logging_rank or not tcfg.enabled:
        return Tracker(run_id)
    uri = resolve_uri(tcfg.uri, out_dir)
    tags = dict(tcfg.tags or {})
    color = getattr(tcfg, "color", None)
    if color:
        tags[RUN_COLOR_TAG] = run_color(color)
    tracker = MlflowTracker(uri, tcfg.experiment, run_id=run_id, run_name=tcfg.run_name or default_name,
                            parent_run_id=tcfg.parent_run_id, tags=tags, spool_dir=Path(out_dir) / "tracking",
                            close_retry_s=float(getattr(tcfg, "close_retry_s", CLOSE_RETRY_S)))
    if run_id is None and data is not None:
        tracker.log_inputs(manifest_inputs(data))
    return tracker
