"""The MLflow view as a user relies on it: experiments open as model training with a description,
settings are params and per-run values tags, metric names have no spaces, the shards are dataset
inputs with their digest; a tiny real study against a real `mlflow server` logs readable pictures."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_shards.manifest import Manifest, ShardInfo, write_manifest
from test_tracking_support import MlflowServer, run_cfg, tracker_for
from trainer import tracking as T
from trainer.tracking.client import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, NOTE_TAG

REPO = Path(__file__).resolve().parents[1]


def _manifest(root: Path, split: str) -> str:
    m = Manifest(split=split, shards=[ShardInfo(f"{split}-000000.tar", 3, 100, "ab" * 32)],
                 keys=["json", "rgb.png", "seg.png"], meta_fields=["K"], source={"dataset": "synthetic"})
    (root / split).mkdir(parents=True)
    write_manifest(str(root / split), m)
    return hashlib.sha256((root / split / "manifest.json").read_bytes()).hexdigest()[:16]


def test_run_is_model_training_with_settings_params_and_dataset_inputs(tmp_path):
    data = tmp_path / "shards"
    digests = {s: _manifest(data, s) for s in ("train", "val")}
    uri = T.sqlite_uri_for(tmp_path / "mlflow")
    cfg = run_cfg(tmp_path / "run", uri=uri)
    cfg.data.root, cfg.data.test_split = str(data), "val"  # val twice: one input
    tracker = tracker_for(cfg, is_logging_rank=True, run_id=None)
    tracker.log_config(f"out_dir: {tmp_path / 'run'}\ntrain:\n  steps: 7\n  progress: false\n"
                       f"data:\n  root: {data}\n  name: synthetic\ntracking:\n  uri: {uri}\n  run_name: x\n")
    tracker.log_metrics({"test/iou/traffic sign": 0.5, "test/miou": 0.4}, step=1)
    tracker.close()

    client = tracker.client
    exp = client.get_experiment_by_name("geoprime")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND == "custom_model_development"
    assert exp.tags[NOTE_TAG].startswith("geoprime training runs")
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"train.steps": "7", "data.name": "synthetic"}  # settings only
    assert run.data.tags["config.out_dir"] == str(tmp_path / "run")
    assert run.data.tags["config.data.root"] == str(data) and run.data.tags["config.tracking.uri"] == uri
    assert "config.tracking.run_name" not in run.data.tags  # it is the run name already
    assert run.data.tags["mlflow.source.name"] == "python -m trainer" and run.data.tags["mlflow.user"]
    assert set(run.data.metrics) == {"test/iou/traffic_sign", "test/miou"}
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"synthetic/train", "synthetic/val"}
    assert {n: d.dataset.digest for n, d in inputs.items()} == {f"synthetic/{s}": v for s, v in digests.items()}
    assert {t.key: t.value for t in inputs["synthetic/val"].tags} == {"mlflow.data.context": "validation"}
    assert '"num_samples": 3' in inputs["synthetic/train"].dataset.profile


def test_a_person_s_experiment_description_is_kept(tmp_path):
    from launch.runstore import TrackingStore

    store = TrackingStore(T.sqlite_uri_for(tmp_path / "mlflow"), "mine")
    store.client.set_experiment_tag(store.experiment_id, NOTE_TAG, "my notes")
    store.set_experiment_note("mine", "geoprime study: ...")
    assert store.client.get_experiment(store.experiment_id).tags[NOTE_TAG] == "my notes"
    store.set_experiment_note("other", "geoprime study: x")
    other = store.client.get_experiment_by_name("other")
    assert other.tags[NOTE_TAG] == "geoprime study: x" and other.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


STUDY = """\
# @package _global_
study:
  name: view
  out_dir: {out}
  tracking_uri: {uri}
  experiment: view-exp
  timeout_s: 400
  common: [data.root={data}, data.num_workers=0, model.encoder=resnet18, train.progress=false,
           train.batch_size=1, train.log_every=1, train.eval_every=0, train.ckpt_every=0,
           train.keep_checkpoints=false, train.eval_max_batches=1, tracking.system_metrics_every=0.001]
  pretrainings:
    depth: {{task: depth, init: depth, overrides: [task.supervision=mono, train.steps=1, task.photometric_impl=handwritten]}}
    random: {{init: random}}
  finetune: [train.steps=1, "data.val_split=''"]
  protocols: {{full: [task.protocol=full]}}
  datasets: {{synthetic: [data.name=synthetic]}}
  shots: [0]
  seeds: [0]
  compare: {{baselines: [random]}}
"""


def _job_logs(runs: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in runs.glob("*/job.log"))


def _png_size(client, run_id: str, folder: str) -> list[tuple[int, int]]:
    sizes = []
    for art in client.list_artifacts(run_id, folder):
        local = client.download_artifacts(run_id, art.path)
        sizes.append(Image.open(io.BytesIO(Path(local).read_bytes())).size)
    return sizes


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_study_on_a_real_server_is_readable_in_mlflow(tmp_path, monkeypatch):
    from launch import study as study_mod
    from launch.study_config import load_study
    from mlflow.tracking import MlflowClient

    data = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(data), "--height", "64",
                    "--width", "192", "--sequences", "train=1", "val=1", "test=1", "--frames-per-sequence", "3",
                    "--workers", "1", "--no-progress"], check=True, timeout=180, capture_output=True, cwd=REPO)
    server = MlflowServer(tmp_path / "server").start()
    try:
        cfg_dir = tmp_path / "configs"
        (cfg_dir / "experiment").mkdir(parents=True)
        text = STUDY.format(out=tmp_path / "out", uri=server.uri, data=data)
        (cfg_dir / "experiment" / "view.yaml").write_text(text)
        study = load_study(["+experiment=view"], cfg_dir)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        assert study_mod.run_study(study) == 0, _job_logs(tmp_path / "out" / "runs")
        _check_view(MlflowClient(server.uri), data)
    finally:
        server.stop()


def _check_view(client, data: Path) -> None:
    transfer, pre = client.get_experiment_by_name("view-exp"), client.get_experiment_by_name("view-exp-pretraining")
    for exp in (transfer, pre):
        assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
        assert "geoprime study `view`" in exp.tags[NOTE_TAG]
    assert transfer.tags[NOTE_TAG].startswith("**Result**: **depth vs random: ")  # the headline first
    assert "from 1 paired fine-tuning seed: too few for an interval" in transfer.tags[NOTE_TAG]
    by_name = {r.info.run_name: r for r in client.search_runs([transfer.experiment_id, pre.experiment_id])}
    assert set(by_name) == {"study-view", "depth", "depth·full·s0", "random·full·s0"}  # short: row and seed
    runs = {r.data.tags.get("study_job", r.info.run_name): r for r in by_name.values()}
    assert runs["pre-depth"].info.experiment_id == pre.experiment_id
    assert runs["pre-depth"].data.tags["mlflow.runColor"] == runs["ft-depth-synthetic-full-nall-s0"].data.tags[
        "mlflow.runColor"] != runs["ft-random-synthetic-full-nall-s0"].data.tags["mlflow.runColor"]
    parent = runs["study-view"]
    assert "## Latest comparison" in parent.data.tags[NOTE_TAG] and "random" in parent.data.tags[NOTE_TAG]
    assert parent.data.tags["mlflow.source.name"] == "python -m launch study"
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "comparison")] == [
        "comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"]
    digest = hashlib.sha256((data / "train" / "manifest.json").read_bytes()).hexdigest()[:16]
    for name in ("pre-depth", "ft-depth-synthetic-full-nall-s0", "ft-random-synthetic-full-nall-s0"):
        run = runs[name]
        params, tags = run.data.params, run.data.tags
        noise = [k for k in params if k == "out_dir" or k.startswith(("tracking.", "task.weights", "data.root"))]
        assert not noise and params["train.steps"] == "1", (name, noise)
        assert tags["config.out_dir"].endswith(name) and tags["mlflow.user"] and tags["mlflow.source.git.commit"]
        assert "config.tracking.color" not in tags  # the colour is the run's own attribute
        inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert inputs["synthetic/train"] == digest, inputs
        assert not [k for k in run.data.metrics if any(c.isspace() for c in k)]
        assert "system/node_0/cpu_utilization_percentage" in run.data.metrics
    assert "test/iou/traffic_sign" in runs["ft-random-synthetic-full-nall-s0"].data.metrics
    for name, prefix in (("pre-depth", "qualitative/depth_"), ("ft-depth-synthetic-full-nall-s0", "qualitative/seg_")):
        arts = [a.path for a in client.list_artifacts(runs[name].info.run_id, "qualitative")]
        assert arts and all(a.startswith(prefix) for a in arts), arts
        assert all(w >= 800 and h >= 600 for w, h in _png_size(client, runs[name].info.run_id, "qualitative"))


def test_a_dataset_inserted_by_a_concurrent_run_is_linked_on_retry(tmp_path):
    """Two jobs of a study logging the same dataset at once: MLflow looks the dataset up, then inserts it,
    and the slower insert fails on the unique key (a demo's first depth job died of it). The insert is
    tried again, finds the other run's dataset and links it; any other error is raised at once."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from trainer.tracking.client import apply

    client = MlflowClient(T.sqlite_uri_for(tmp_path / "mlflow"))
    exp = client.create_experiment("race")
    first, second = (client.create_run(exp).info.run_id for _ in range(2))
    record = {"op": "inputs", "datasets": [{"name": "synthetic/train", "digest": "cea5f95836710ee3",
                                            "source_type": "local", "source": '{"uri": "file:///x/manifest.json"}',
                                            "context": "training"}]}
    apply(client, record, first)  # the run that won the race

    class LostTheRace:
        def __init__(self, error: str) -> None:
            self.calls, self.error = 0, error

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.calls == 1:  # what MLflow's sqlite store raises for the loser
                raise MlflowException(self.error)
            client.log_inputs(run_id, datasets=datasets)

    loser = LostTheRace("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                        "datasets.name, datasets.digest")
    apply(loser, record, second)
    assert loser.calls == 2
    for run_id in (first, second):
        (d,) = client.get_run(run_id).inputs.dataset_inputs
        assert (d.dataset.name, d.dataset.digest) == ("synthetic/train", "cea5f95836710ee3")
    other = LostTheRace("(sqlite3.OperationalError) no such table: datasets")
    with pytest.raises(MlflowException, match="no such table"):
        apply(other, record, second)
    assert other.calls == 1
