"""What a compared study shows first in MLflow (issue 30, items 1, 3, 5): the scores in %, each row's
colour on its runs and in the chart, short run names, saved views, the headline first in the
descriptions. Against a real sqlite store; the browser check is tests/test_mlflow_browser.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from launch.compare import compare_runs
from launch.grid import row_colors
from launch.runstore import TrackingStore
from launch.study_config import CompareConfig
from launch.study_notes import COMPARE_TAG, HEADLINE_MARKER, compare_settings
from launch.study_view import SCORE_KEYS, VIEW_TAG_PREFIX, view_id
from trainer import tracking
from trainer.tracking.client import NOTE_TAG, RUN_COLOR_TAG

ROWS = ["depth", "flow", "random"]
MIOU = {"depth": [0.50, 0.54, 0.52], "flow": [0.47, 0.49, 0.47], "random": [0.30, 0.33, 0.31]}


def _study(tmp_path):
    store = TrackingStore(tracking.sqlite_uri_for(tmp_path / "mlflow"), "sv")
    parent = store.create_run("study-s", {"study": "s", "study_kind": "study"})
    store.set_experiment_note("sv", "geoprime study `s`: the transfer grid.\n\n- more")
    for row in ROWS:
        for seed, miou in enumerate(MIOU[row]):
            tags = {"study": "s", "study_kind": "finetune", "grid_pretraining": row, "grid_dataset": "syn",
                    "grid_protocol": "frozen", "grid_shots": "0", "grid_seed": str(seed),
                    "study_job": f"ft-{row}-syn-frozen-nall-s{seed}"}
            run_id = store.create_run(tags["study_job"], tags, parent_run_id=parent)
            store.log_metrics(run_id, {"test/miou_subset": miou, "test/pixel_acc": miou + 0.3}, step=100)
            store.set_status(run_id, "FINISHED")
    return store, parent


def test_compare_writes_what_the_first_view_needs(tmp_path):
    store, parent = _study(tmp_path)
    compare = CompareConfig(miou="miou_subset", baselines=["flow", "random"])
    compare_runs(store, "s", compare, tmp_path / "cmp", parent_run_id=parent, row_order=ROWS, expected_seeds=3,
                 echo=False)
    colors = row_colors(ROWS)
    runs = {r.name: r for r in store.find_runs({"study": "s", "study_kind": "finetune"})}
    assert sorted(runs) == sorted(f"{row}·frozen·s{s}" for row in ROWS for s in range(3))  # short, row and seed kept
    for name, run in runs.items():
        row, _, seed = name.split("·")
        assert run.tags[RUN_COLOR_TAG] == colors[row]
        assert run.metrics[SCORE_KEYS["miou"]] == pytest.approx(round(100 * MIOU[row][int(seed[1:])], 1))
        assert run.metrics[SCORE_KEYS["pixel_acc"]] == pytest.approx(round(100 * MIOU[row][int(seed[1:])] + 30, 1))
    assert len(set(colors.values())) == 3  # distinct

    # the chart draws each row in the colour MLflow shows its runs in
    pixels = np.asarray(Image.open(tmp_path / "cmp" / "comparison.png").convert("RGB")).reshape(-1, 3).astype(int)
    for color in colors.values():
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).sum(1) < 8).sum() > 200, color

    exp = store.client.get_experiment(store.experiment_id)
    view = json.loads(exp.tags[VIEW_TAG_PREFIX + view_id("s")])
    state = json.loads(view["state"])
    assert view["name"] == "study s: score by pre-training"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "grid_pretraining"}]
    assert state["orderByKey"] == "metrics.`score/miou_percent`" and state["orderByAsc"] is False
    assert "metrics.`score/miou_percent`" in state["selectedColumns"] and state["runsHiddenMode"] == "SHOW_ALL"
    assert [c["metricKey"] for c in state["compareRunCharts"]] == list(SCORE_KEYS.values())
    assert state["useGroupedValuesInCharts"] is False  # MLflow colours groups by a hash: chart runs, in row colours

    note = exp.tags[NOTE_TAG]
    first, rest = note.split("\n\n", 1)
    assert first.startswith(HEADLINE_MARKER + "**depth transfers better than flow: +4.3 mIoU points (95 % interval")
    assert f"viewStateShareKey={view_id('s')}" in first and rest.startswith("geoprime study `s`")
    parent_note = store.run_note(parent)
    assert parent_note.startswith(HEADLINE_MARKER + "**depth transfers better than flow")
    assert parent_note.count(HEADLINE_MARKER) == 1
    compare_runs(store, "s", compare, tmp_path / "cmp", parent_run_id=parent, row_order=ROWS, echo=False)
    assert store.run_note(parent).count(HEADLINE_MARKER) == 1  # replaced, not stacked
    assert store.client.get_experiment(store.experiment_id).tags[NOTE_TAG].count(HEADLINE_MARKER) == 1


def test_compare_settings_round_trip_through_the_parent_tag():
    from dataclasses import asdict

    compare = CompareConfig(miou="miou_subset", baselines=["flow"], headline=["depth", "flow"])
    tags = {COMPARE_TAG: json.dumps({"compare": asdict(compare), "rows": ROWS, "seeds": 4})}
    assert compare_settings(tags) == (compare, ROWS, 4)
    assert compare_settings({}) is None and compare_settings({COMPARE_TAG: "{"}) is None
