"""Regenerate the MLflow screenshots of docs/img/ from the code: a tiny real study, a real `mlflow server`,
headless Chromium clicking as a user does (tests/browser.py).

The study has the demo's shape at a tiny budget (pre-trainings depth from stereo, flow and
classification, 2 runs each, and random init; one frozen fine-tuning per pre-training run; a few
steps on a 64x192 synthetic world), so the pictures show the views, not trained models. Needs
Debian's ``chromium``. ~5 min of CPU on 2 cores.

    .venv/bin/python docs/screenshots.py                 # writes docs/img/mlflow-*.png
    .venv/bin/python docs/screenshots.py --out /tmp/shots --keep /tmp/shots/study
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

STUDY = """\
# @package _global_
study:
  name: shots
  out_dir: {out}
  experiment: geoprime-shots
  parallel_jobs: 2
  common: [data.root={data}, data.num_workers=0, model.encoder=resnet18, train.progress=false, train.log_every=1,
           train.eval_every=0, train.ckpt_every=0, train.keep_checkpoints=false, train.batch_size=2,
           tracking.system_metrics_every=1]
  pretrain_seeds: [0, 1]
  pretrainings:
    depth_stereo_full: {{task: depth, init: depth_full, overrides: [task.supervision=stereo, train.steps=3,
                        "data.val_split=''"]}}
    flow: {{task: flow, init: flow, overrides: [train.steps=3, "data.val_split=''"]}}
    classification: {{task: classification, init: classification, overrides: [train.steps=3,
                     "task.crop=[32,48]", task.eval_crop=true, "data.test_split=''"]}}
    random: {{init: random}}
  finetune: [train.steps=3, "data.val_split=''", "task.eval_subset=[0,1,2,5,8,9,10,13]"]
  protocols: {{frozen: [task.protocol=frozen]}}
  datasets: {{synthetic: [data.name=synthetic]}}
  seeds: [0, 1]
  compare: {{miou: miou_subset, baselines: [classification, flow, random]}}
"""


def run_study(work: Path) -> tuple[str, Path]:
    """Build the shards, run the tiny study; (its tracking URI, its sqlite folder)."""
    from launch.study import run_study as run
    from launch.study_config import load_study

    data = work / "data"
    if not (data / "test" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(data), "--height", "64",
                        "--width", "192", "--sequences", "train=2", "val=1", "test=2", "--frames-per-sequence", "6",
                        "--workers", "1", "--no-progress"], check=True, cwd=REPO)
    configs = work / "configs"
    (configs / "experiment").mkdir(parents=True, exist_ok=True)
    (configs / "experiment" / "shots.yaml").write_text(STUDY.format(out=work / "out", data=data))
    study = load_study(["+experiment=shots"], configs)
    if run(study) != 0:
        raise RuntimeError(f"the tiny study failed; logs in {work / 'out' / 'runs'}")
    folder = work / "out" / "mlflow"
    return f"sqlite:///{folder / 'mlflow.db'}", folder


def shoot(url: str, uri: str, out: Path) -> list[Path]:
    """Every view of the docs, clicked to as a user does; the files written."""
    from browser import Browser
    from launch.runstore import TrackingStore

    store = TrackingStore(uri, "geoprime-shots")
    exp = store.experiment_id
    runs = {r.name: r for r in store.find_runs({"study": "shots"})}
    parent = runs["study-shots"].run_id
    ft = runs["depth_stereo_full·frozen·s0"].run_id
    depth = runs["depth_stereo_full·p0"]
    base = f"{url}/#/experiments/{exp}"
    shots = []
    with Browser(1200, 900) as page:
        page.open(f"{base}/runs?workflowType=machine_learning")
        page.wait_for_text("Result:", "study-shots")
        page.click_label("Close")  # the MLflow Assistant panel
        time.sleep(1)
        shots.append(page.screenshot(out / "mlflow-runs.png"))
        page.click_text("Views")
        page.click_text("study shots: score by pre-training")
        page.wait_for_text("Group: depth_stereo_full", "score/miou_percent")
        time.sleep(1)
        shots.append(page.screenshot(out / "mlflow-study-view.png"))
        page.click_where("e.tagName === 'LABEL' && e.querySelector('input[value=CHART]')", "chart view switch")
        page.wait_for_text("Add chart")
        time.sleep(3)
        shots.append(page.screenshot(out / "mlflow-study-charts.png"))
        page.open(f"{base}/runs/{parent}?workflowType=machine_learning")
        page.wait_for_text("Result:")
        time.sleep(1)
        page.click_text("Show more")
        page.wait_for_text("Latest comparison")
        page.js("[...document.querySelectorAll('h3')].find(e => e.innerText.includes('frozen')).scrollIntoView()")
        time.sleep(1)
        shots.append(page.screenshot(out / "mlflow-parent-description.png"))
        for name, file in (("comparison.md", "mlflow-comparison-md.png"), ("comparison.png", "mlflow-comparison-png.png")):
            page.open(f"{base}/runs/{parent}/artifacts?workflowType=machine_learning")
            page.click_text("comparison")
            page.click_text(name)
            time.sleep(3)
            shots.append(page.screenshot(out / file))
        for run_id, exp_id, folder, file in ((depth.run_id, depth_experiment(store), "qualitative", "mlflow-depth-artifact.png"),
                                             (ft, exp, "qualitative", "mlflow-seg-artifact.png")):
            page.open(f"{url}/#/experiments/{exp_id}/runs/{run_id}/artifacts?workflowType=machine_learning")
            page.click_text(folder)
            first = sorted(store.list_artifacts(run_id, folder))[0].rsplit("/", 1)[-1]
            page.click_text(first)
            time.sleep(3)
            shots.append(page.screenshot(out / file))
        page.open(f"{base}/runs/{ft}?workflowType=machine_learning")
        page.click_text("System metrics")
        time.sleep(4)
        shots.append(page.screenshot(out / "mlflow-system-metrics.png"))
        pair = json.dumps([ft, runs["random·frozen·s0"].run_id])
        page.open(f"{url}/#/compare-runs?runs={pair}&experiments={json.dumps([exp])}")
        page.wait_for_text("Comparing 2 Runs")
        time.sleep(3)
        shots.append(page.screenshot(out / "mlflow-compare.png"))
    return shots


def depth_experiment(store) -> str:
    from launch.runstore import pretraining_experiment

    return store.client.get_experiment_by_name(pretraining_experiment(store.experiment)).experiment_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "img"), help="folder for the PNGs (default docs/img)")
    p.add_argument("--keep", default=None, help="run the study in this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    from test_tracking_support import MlflowServer

    work = Path(args.keep or tempfile.mkdtemp(prefix="geoprime-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    uri, folder = run_study(work)
    server = MlflowServer(work / "server", db=folder / "mlflow.db").start(timeout=120)
    try:
        for path in shoot(server.uri, uri, Path(args.out)):
            print(f"[screenshots] wrote {path}")
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
