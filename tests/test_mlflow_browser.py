"""The study as a user meets it in MLflow's UI (issue 30, items 1, 3, 5), in headless Chromium against a
real `mlflow server`: the headline on the experiment page, the saved view opened from the *Views*
menu (scores in %, grouped by pre-training, short run names, rows in their colours in the charts),
the parent run's description and the comparison artifacts. Fails when a page does not render what
it should. Needs Debian's `chromium` (`apt-get install chromium`); skipped without it."""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import Browser, chromium_path
from launch.compare import compare_runs
from launch.grid import plan, row_colors
from launch.runstore import TrackingStore, pretraining_experiment
from launch.study_config import load_study
from launch.study_notes import describe_study
from launch.study_view import view_id
from test_tracking_support import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.skipif(chromium_path() is None,
                                                   reason="needs chromium (Debian: apt-get install chromium)")]
MEANS = {"depth_stereo_full": 0.55, "flow": 0.49, "classification_other_domain": 0.48, "random": 0.35}


def _demo_study(uri: str):
    """The demo's grid (jobs, tags, fingerprints) with made-up metrics, logged as the study logs them,
    then compared: what `make demo` leaves in MLflow, without training."""
    study = load_study(["+experiment=demo"])
    store = TrackingStore(uri, study.experiment)
    parent = store.create_run("study-demo", {"study": "demo", "study_kind": "study"})
    describe_study(store, study, parent)
    pre = TrackingStore(uri, pretraining_experiment(study.experiment))
    rng = random.Random(0)
    for job in plan(study):
        target = pre if job.kind == "pretrain" else store
        run_id = target.create_run(job.job_id, job.tags, parent_run_id=parent)  # names as before: compare renames
        if job.kind == "finetune":
            v = MEANS[job.tags["grid_pretraining"]] + rng.gauss(0, 0.01)
            target.log_metrics(run_id, {"test/miou_subset": v, "test/miou": v, "test/pixel_acc": v + 0.3}, step=100)
        else:
            target.log_metrics(run_id, {"test/abs_rel": 0.26, "test/baseline_abs_rel": 0.52}, step=150)
        target.set_status(run_id, "FINISHED")
    jobs = plan(study)
    compare_runs(store, "demo", study.compare, Path(study.out_dir), parent_run_id=parent,
                 row_order=list(study.pretrainings), expected_seeds=4, echo=False,
                 fingerprints={j.job_id: j.fingerprint for j in jobs if j.kind == "finetune"})
    store.set_status(parent, "FINISHED")
    return study, store, parent


def _has_colors(png: Path, colors: list[str], min_pixels: int = 30) -> list[str]:
    """The colours of ``colors`` with fewer than ``min_pixels`` pixels in the screenshot."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    missing = []
    for color in colors:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        if (np.abs(pixels - rgb).sum(1) < 10).sum() < min_pixels:
            missing.append(color)
    return missing


@pytest.mark.timeout(600)
def test_the_study_reads_in_mlflow_in_a_browser(tmp_path, monkeypatch):
    server = MlflowServer(tmp_path / "server").start()
    monkeypatch.chdir(tmp_path)
    try:
        study, store, parent = _demo_study(server.uri)
        exp = store.experiment_id
        base = f"{server.uri}/#/experiments/{exp}"
        with Browser(1200, 900) as page:
            # 1. the experiment as it opens: the headline is the description's first line
            page.open(f"{base}/runs?workflowType=machine_learning")
            page.wait_for_text("Result: depth_stereo_full transfers better than classification_other_domain",
                               "study-demo", "Views")
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
            assert _has_colors(page.screenshot(tmp_path / "charts.png"), list(colors.values())) == []
            # 4. the parent run: headline first, the tables as aligned text after "Show more"
            page.open(f"{base}/runs/{parent}?workflowType=machine_learning")
            page.wait_for_text("Result: depth_stereo_full transfers better than classification_other_domain")
            page.click_text("Show more")
            text = page.wait_for_text("vs classification_other_domain", "Δ pixel acc", "Latest comparison")
            assert text.index("Result:") < text.index("Latest comparison")
            # 5. the comparison artifacts: the Markdown as tables, the chart whole in the viewer
            page.click_text("Artifacts")
            page.click_text("comparison")
            page.click_text("comparison.md")
            page.wait_for_text("Paired differences to classification_other_domain")
            assert page.js("document.querySelectorAll('[role=table]').length") == 4  # means + 3 baselines' differences
            page.click_text("comparison.png")
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
            natural, shown, bottom, height = box
            assert natural == 1000 and shown >= 600 and bottom <= height, box  # legible, and all of it in view
    finally:
        server.stop()
