"""What a study shows first in MLflow's UI, written after each comparison.

- The scored metrics in %, as the table shows them, on every fine-tuning run the table counted
  (``score/miou_percent``, ``score/pixel_acc_percent``; the raw fractions stay in ``test/*``).
- Every run of the study in its pre-training row's colour (tag ``mlflow.runColor``, the comparison
  chart's colour too: :func:`launch.grid.row_colors`) and with a short name that keeps row and seed
  (:func:`launch.grid.run_name`), also on runs made before the study set them.
- A saved view per experiment (MLflow's *Views* menu; experiment tag ``mlflow.sharedViewState.<id>``,
  the format MLflow 3.17's UI writes): the score columns, grouped by pre-training, sorted by the
  score, every run shown in the charts with bar charts of the score first.
- The headline sentence as the first line of the transfer experiment's description, with a link
  to that view (MLflow opens an experiment on its description and an unconfigured runs table).

MLflow colours a *group* of runs by a hash of the group's name, kept per browser: two rows can share
one there. The saved view therefore charts runs one by one (``useGroupedValuesInCharts`` off), each
in its row's colour.
"""
from __future__ import annotations

import json
import time
import uuid

from launch.grid import row_colors, run_name
from launch.runstore import RunRecord, TrackingStore, pretraining_experiment
from launch.study_notes import HEADLINE_MARKER, with_headline
from trainer.tracking.client import NOTE_TAG, RUN_COLOR_TAG

#: Per-run metrics in % (the comparison table's unit), by table metric.
SCORE_KEYS = {"miou": "score/miou_percent", "pixel_acc": "score/pixel_acc_percent"}
#: Experiment tag prefix of MLflow's saved views.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
#: The pre-trainings' task metrics and their trivial baselines (launch.pretrain_report), as columns.
PRETRAIN_COLUMNS = ("test/abs_rel", "test/baseline_abs_rel", "test/epe", "test/baseline_epe", "val/map",
                    "val/baseline_map")
#: Widths of the run-name column in the views (MLflow's default, 190 px, cuts a long row name's seed)
#: and of the "Created" column (150 px by default), so that the score columns fit a 1200-px window.
NAME_WIDTH, DATE_WIDTH = 270, 115


def view_id(study_name: str, pretraining: bool = False) -> str:
    """The saved view's id (the ``viewStateShareKey`` of its link)."""
    return f"geoprime-{study_name}" + ("-pretraining" if pretraining else "")


def view_link(experiment_id: str, key: str) -> str:
    """Relative link (from MLflow's UI) that opens the runs table in the saved view ``key``."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}&workflowType=machine_learning"


def _metric(key: str) -> str:
    return f"metrics.`{key}`"


def _bar_charts(keys: list[str], runs: int) -> dict:
    """``compareRunCharts`` / ``compareRunSections``: one section holding a bar chart per metric."""
    section = uuid.uuid4().hex
    charts = [{"uuid": uuid.uuid4().hex, "type": "BAR", "runsCountToCompare": max(runs, 10), "metricSectionId": section,
               "deleted": False, "isGenerated": False, "metricKey": key, "displayName": key} for key in keys]
    return {"compareRunCharts": charts,
            "compareRunSections": [{"uuid": section, "name": "study", "display": True, "isReordered": False,
                                    "deleted": False, "isGenerated": False}]}


def view_state(columns: list[str], order_by: str | None, runs: int) -> dict:
    """The view: ``columns`` (metric keys) shown, runs grouped by pre-training row (group rows show the
    average), sorted by ``order_by`` (highest first; None: MLflow's order), every run in the charts in
    its own colour, a bar chart per column first."""
    name_col, date_col = "attributes.`Run Name`", "runDateAndNestInfo"
    order = {"orderByKey": _metric(order_by), "orderByAsc": False} if order_by else {}
    return {**order,
            "selectedColumns": [_metric(c) for c in columns] + ["tags.`grid_pretraining`"],
            "columnOrder": [name_col, date_col, *[_metric(c) for c in columns]],
            "columnWidths": {name_col: NAME_WIDTH, date_col: DATE_WIDTH},
            "groupBy": {"aggregateFunction": "average",
                        "groupByKeys": [{"mode": "tag", "groupByData": "grid_pretraining"}]},
            "groupsExpanded": {}, "useGroupedValuesInCharts": False, "runsHiddenMode": "SHOW_ALL",
            "hideEmptyCharts": True, **_bar_charts(columns, runs)}


def save_view(store: TrackingStore, experiment: str, key: str, name: str, state: dict) -> str:
    """Write (or replace) saved view ``key`` of ``experiment``; returns the experiment's id."""
    exp = store.client.get_experiment_by_name(experiment)
    now = int(time.time() * 1000)
    old = exp.tags.get(VIEW_TAG_PREFIX + key)
    created = json.loads(old).get("createdAt", now) if old and old.startswith("{") else now
    store.client.set_experiment_tag(exp.experiment_id, VIEW_TAG_PREFIX + key, json.dumps(
        {"name": name, "createdAt": created, "updatedAt": now, "state": json.dumps(state)}))
    return exp.experiment_id


def style_runs(store: TrackingStore, runs: list[RunRecord], rows: list[str]) -> None:
    """Every study run in its row's colour, with its short name (when either differs)."""
    colors = row_colors(rows)
    datasets = {r.tags.get("grid_dataset") for r in runs if r.tags.get("study_kind") == "finetune"}
    pseeds: dict[str, set] = {}
    for r in runs:
        pseeds.setdefault(r.tags.get("grid_pretraining", ""), set()).add(r.tags.get("grid_pretrain_seed"))
    for run in runs:
        row = run.tags.get("grid_pretraining")
        if row not in colors or "grid_seed" not in run.tags and run.tags.get("study_kind") != "pretrain":
            continue
        name = run_name(run.tags, len(datasets) > 1, len(pseeds.get(row, ())) > 1)
        tags = {RUN_COLOR_TAG: colors[row]} if run.tags.get(RUN_COLOR_TAG) != colors[row] else {}
        if run.name != name:
            tags["mlflow.runName"] = name
        if tags:
            store.set_tags(run.run_id, tags)


def log_scores(store: TrackingStore, used: dict[str, dict[str, float]]) -> None:
    """``score/*`` (in %, one decimal as in the table) on each counted fine-tuning run, at step 0."""
    for run_id, values in used.items():
        store.log_metrics(run_id, {SCORE_KEYS[m]: round(v, 1) for m, v in values.items()}, step=0)


def publish(store: TrackingStore, study_name: str, rows: list[str], used: dict[str, dict[str, float]],
            runs: list[RunRecord], headline: str) -> None:
    """Scores, colours, names, the two saved views and the headline (see the module docstring)."""
    log_scores(store, used)
    style_runs(store, runs, rows)
    transfer = store.experiment
    exp_id = save_view(store, transfer, view_id(study_name), f"study {study_name}: score by pre-training",
                       view_state(list(SCORE_KEYS.values()), SCORE_KEYS["miou"], len(used)))
    pre_exp = store.client.get_experiment_by_name(pretraining_experiment(transfer))
    if pre_exp is not None:
        pre_runs = [r for r in runs if r.tags.get("study_kind") == "pretrain"]
        logged = [c for c in PRETRAIN_COLUMNS if any(c in r.metrics for r in pre_runs)]
        if logged:
            save_view(store, pre_exp.name, view_id(study_name, True), f"study {study_name}: task metric vs baseline",
                      view_state(logged, None, len(pre_runs)))
    if headline:
        note = store.client.get_experiment(exp_id).tags.get(NOTE_TAG, "")
        if not note or note.startswith(("geoprime", HEADLINE_MARKER)):
            store.client.set_experiment_tag(exp_id, NOTE_TAG, with_headline(note, headline,
                                                                             view_link(exp_id, view_id(study_name))))
