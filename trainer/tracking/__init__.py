"""Experiment tracking: MLflow on the logging rank, with an offline spool; node system metrics.

The only package in geoprime that imports ``mlflow``; one module a job:

- :mod:`~trainer.tracking.client`: where runs go (URIs), a fast-failing MLflow client, and
  :func:`~trainer.tracking.client.apply`, which sends one tracking record (batched).
- :mod:`~trainer.tracking.params`: config trees as MLflow params.
- :mod:`~trainer.tracking.tracker`: :func:`create_tracker` (from the ``tracking`` config slice) and the
  :class:`Tracker` the loop uses (typed by the :class:`RunTracker` Protocol).
- :mod:`~trainer.tracking.spool`: the append-only offline spool.
- :mod:`~trainer.tracking.replay`: spool replay and its CLI
  ``python -m trainer.tracking replay <spool> [--uri URI]``.
- :mod:`~trainer.tracking.datasets`: the shard manifests a run reads, as MLflow dataset inputs.
- :mod:`~trainer.tracking.system`: CPU / memory / GPU (NVML) samples, logged under ``system/``.
- :mod:`~trainer.tracking.train_log`: the training log window (loss, grad norms, throughput) sent
  to the tracker once a step.
- :mod:`~trainer.tracking.progress`: the long one-off phases of a run (start-up, evaluation) in the log.

Where runs go: ``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else an embedded sqlite
store ``<parent of out_dir>/mlflow/mlflow.db`` with artifacts beside it in ``artifacts/``.
If the server cannot be reached, training goes on: each operation is appended to
``<out_dir>/tracking/spool.jsonl`` (fsync'd) and replayed, in order, as soon as the server
answers again, at the latest when the run closes; what is still pending then is named in a
warning together with the command that replays it. The study's read side (find runs by tag,
parent runs) is ``launch.runstore``, built on :mod:`~trainer.tracking.client`.
"""
from trainer.tracking.client import (default_uri, git_commit, resolve_uri, sqlite_path, sqlite_uri_for,
                                     ui_command)
from trainer.tracking.params import flatten
from trainer.tracking.replay import main, replay_spool
from trainer.tracking.spool import Spool, SpoolError
from trainer.tracking.system import node_metrics, sample_system_metrics
from trainer.tracking.tracker import MlflowTracker, RunTracker, Tracker, create_tracker, default_run_name

__all__ = ["MlflowTracker", "RunTracker", "Spool", "SpoolError", "Tracker", "create_tracker", "default_run_name",
           "default_uri", "flatten",
           "git_commit", "main", "node_metrics", "replay_spool", "resolve_uri", "sample_system_metrics", "sqlite_path",
           "sqlite_uri_for", "ui_command"]
