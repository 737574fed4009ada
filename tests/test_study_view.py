"""The study as a user meets it in MLflow (issue 30, items 1, 3, 5): the demo's grid with made-up
scores, logged and compared as `make demo` leaves it, read back from its sqlite store (scores in %,
each row's colour on its runs and in the chart, short run names, the saved view, the headline first
in the descriptions) and then in headless Chromium against a real `mlflow server` on that store,
clicking as a user does. The browser check needs Debian's `chromium` (`apt-get install chromium`)
and is skipped without it."""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import Browser, chromium_path
from launch.compare import compare_runs
from launch.grid import plan, row_colors
from launch.runstore import TrackingStore, pretraining_experiment
from launch.study_config import CompareConfig, load_study
from launch.study_notes import COMPARE_TAG, HEADLINE_MARKER, compare_settings, describe_study
from launch.study_view import SCORE_KEYS, VIEW_TAG_PREFIX, view_id
from test_tracking_support import MlflowServer
from trainer import tracking
from trainer.tracking.client import NOTE_TAG, RUN_COLOR_TAG

MEANS = {"depth_stereo_full": 0.55, "flow": 0.49, "classification_other_domain": 0.48, "random": 0.35}
HEADLINE = "depth_stereo_full transfers better than classification_other_domain"


def _missing_colors(png: Path, colors, min_pixels: int) -> list[str]:
    """The colours of ``colors`` with fewer than ``min_pixels`` pixels in the picture."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    missing = []
    for color in colors:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        if (np.abs(pixels - rgb).sum(1) < 10).sum() < min_pixels:
            missing.append(color)
    return missing


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's grid (jobs, tags, fingerprints) with made-up metrics in a sqlite store, logged as the
    study logs them and compared: what `make demo` leaves in MLflow, without training. Returns
    (study, store, parent run id, {(row, seed): test/miou_subset}, comparison folder)."""
    work = tmp_path_factory.mktemp("study_view")
    study = load_study(["+experiment=demo"])
    uri = tracking.sqlite_uri_for(work / "mlflow")
    store = TrackingStore(uri, study.experiment)
    parent = store.create_run("study-demo", {"study": "demo", "study_kind": "study"})
    describe_study(store, study, parent)
    pre = TrackingStore(uri, pretraining_experiment(study.experiment))
    rng, scores = random.Random(0), {}
    jobs = plan(study)
    for job in jobs:
        target = pre if job.kind == "pretrain" else store
        run_id = target.create_run(job.job_id, job.tags, parent_run_id=parent)  # named as before: compare renames
        if job.kind == "finetune":
            v = scores[job.tags["grid_pretraining"], int(job.tags["grid_seed"])] = MEANS[
                job.tags["grid_pretraining"]] + rng.gauss(0, 0.01)
            target.log_metrics(run_id, {"test/miou_subset": v, "test/miou": v, "test/pixel_acc": v + 0.3}, step=100)
        else:
            target.log_metrics(run_id, {"test/abs_rel": 0.26, "test/baseline_abs_rel": 0.52}, step=150)
        target.set_status(run_id, "FINISHED")
    compare_runs(store, "demo", study.compare, work / "comparison", parent_run_id=parent,
                 row_order=list(study.pretrainings), expected_seeds=4, echo=False,
                 fingerprints={j.job_id: j.fingerprint for j in jobs if j.kind == "finetune"})
    store.set_status(parent, "FINISHED")
    return study, store, parent, scores, work / "comparison"


def test_compare_writes_what_the_first_view_needs(demo):
    study, store, parent, scores, out = demo
    rows = list(study.pretrainings)
    colors = row_colors(rows)
    assert len(set(colors.values())) == len(rows)  # distinct
    runs = {r.name: r for r in store.find_runs({"study": "demo", "study_kind": "finetune"})}
    assert sorted(runs) == sorted(f"{row}·frozen·s{s}" for row in rows for s in range(4))  # short, row and seed kept
    for name, run in runs.items():
        row, _, seed = name.split("·")
        v = scores[row, int(seed[1:])]
        assert run.tags[RUN_COLOR_TAG] == colors[row]
        assert run.metrics[SCORE_KEYS["miou"]] == pytest.approx(round(100 * v, 1))
        assert run.metrics[SCORE_KEYS["pixel_acc"]] == pytest.approx(round(100 * v + 30, 1))
    assert _missing_colors(out / "comparison.png", colors.values(), 200) == []  # the chart: rows in their colours

    exp = store.client.get_experiment(store.experiment_id)
    view = json.loads(exp.tags[VIEW_TAG_PREFIX + view_id("demo")])
    state = json.loads(view["state"])
    assert view["name"] == "study demo: score by pre-training"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "grid_pretraining"}]
    assert state["orderByKey"] == "metrics.`score/miou_percent`" and state["orderByAsc"] is False
    assert "metrics.`score/miou_percent`" in state["selectedColumns"] and state["runsHiddenMode"] == "SHOW_ALL"
    assert [c["metricKey"] for c in state["compareRunCharts"]] == list(SCORE_KEYS.values())
    assert state["useGroupedValuesInCharts"] is False  # MLflow colours groups by a hash: chart runs, in row colours

    diff = np.mean([100 * (scores["depth_stereo_full", s] - scores["classification_other_domain", s]) for s in range(4)])
    first, rest = exp.tags[NOTE_TAG].split("\n\n", 1)
    assert first.startswith(f"{HEADLINE_MARKER}**{HEADLINE}: {diff:+.1f} mIoU points (95 % interval")
    assert f"viewStateShareKey={view_id('demo')}" in first and rest.startswith("geoprime study `demo`")
    assert store.run_note(parent).startswith(f"{HEADLINE_MARKER}**{HEADLINE}")
    compare_runs(store, "demo", study.compare, out, parent_run_id=parent, row_order=rows, echo=False)
    assert store.run_note(parent).count(HEADLINE_MARKER) == 1  # replaced, not stacked
    assert store.client.get_experiment(store.experiment_id).tags[NOTE_TAG].count(HEADLINE_MARKER) == 1


def test_compare_settings_round_trip_through_the_parent_tag():
    compare = CompareConfig(miou="miou_subset", baselines=["flow"], headline=["depth", "flow"])
    rows = ["depth", "flow", "random"]
    tags = {COMPARE_TAG: json.dumps({"compare": asdict(compare), "rows": rows, "seeds": 4})}
    assert compare_settings(tags) == (compare, rows, 4)
    assert compare_settings({}) is None and compare_settings({COMPARE_TAG: "{"}) is None


@pytest.mark.skipif(chromium_path() is None, reason="needs chromium (Debian: apt-get install chromium)")
@pytest.mark.timeout(300)
def test_the_study_reads_in_mlflow_in_a_browser(demo, tmp_path):
    study, store, parent, _, _ = demo
    server = MlflowServer(tmp_path / "server", db=tracking.sqlite_path(store.uri)).start()
    try:
        with Browser(1200, 900) as page:
            _check_pages(page, f"{server.uri}/#/experiments/{store.experiment_id}", study, parent, tmp_path)
    finally:
        server.stop()


def _check_pages(page: Browser, base: str, study, parent: str, tmp_path: Path) -> None:
    """Every view of the study, reached by clicking; fails when a page does not render what it should."""
    # 1. the experiment as it opens: the headline is the description's first line
    page.open(f"{base}/runs?workflowType=machine_learning")
    page.wait_for_text(f"Result: {HEADLINE}", "study-demo", "Views")
    page.click_label("Close")  # the MLflow Assistant panel, as a user closes it
    # 2. the saved view, from the Views menu: scores in %, grouped by row, short names, best first
    page.click_text("Views")
    page.click_text("study demo: score by pre-training")
    text = page.wait_for_text("score/miou_percent", "Group: depth_stereo_full", "depth_stereo_full·frozen·s0",
                              "classification_other_domain·frozen·s3")
    assert f"viewStateShareKey={view_id('demo')}" in page.js("location.href")
    assert text.index("Group: depth_stereo_full") < text.index("Group: random")  # best row first
    # 3. the charts: every run in its row's colour (MLflow's own group colours collide)
    colors = row_colors(list(study.pretrainings))
    shown = page.js("[...document.querySelectorAll('input')].map(i => i.value).filter(v => /^#[0-9a-f]{6}$/.test(v))")
    assert set(shown) == set(colors.values()) and len(shown) == 16  # each run's colour: its row's
    page.click_where("e.tagName === 'LABEL' && e.querySelector('input[value=CHART]')", "chart view switch")
    page.wait_for_text("Add chart")
    time.sleep(2)  # the bar charts draw after their section
    assert _missing_colors(page.screenshot(tmp_path / "charts.png"), colors.values(), 30) == []
    # 4. the parent run: headline first, the tables as aligned text after "Show more"
    page.open(f"{base}/runs/{parent}?workflowType=machine_learning")
    page.wait_for_text(f"Result: {HEADLINE}")
    page.click_text("Show more")
    text = page.wait_for_text("vs classification_other_domain", "Δ pixel acc", "Latest comparison")
    assert text.index("Result:") < text.index("Latest comparison")
    # 5. the comparison artifacts: the Markdown as tables, the chart whole in the viewer
    page.click_text("Artifacts")
    page.click_text("comparison")
    page.click_text_until("comparison.md", "Paired differences to classification_other_domain")
    assert page.js("document.querySelectorAll('[role=table]').length") == 4  # means + 3 baselines' differences
    page.click_text_until("comparison.png", "comparison/comparison.png")
    box = None
    for _ in range(60):
        box = page.js("(() => { const i = [...document.images].find(i => i.naturalWidth > 500 &&"
                      " i.getBoundingClientRect().width > 0);"  # the artifact, a blob: URL
                      " if (!i || !i.complete) return null;"
                      " const r = i.getBoundingClientRect(); return [i.naturalWidth, r.width, r.bottom,"
                      " window.innerHeight]; })()")
        if box:
            break
        page.js("new Promise(r => setTimeout(r, 500))")
    assert box, "comparison.png never rendered"
    natural, shown_width, bottom, height = box
    assert natural == 1000 and shown_width >= 600 and bottom <= height, box  # legible, and all of it in view
