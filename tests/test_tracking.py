"""Tracking: runs/params/metrics/artifacts reach MLflow (embedded sqlite and a real server);
an unreachable server loses nothing; resumed runs continue; only rank 0 logs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from test_tracking_support import MlflowServer, free_port, run_cfg, tracker_for
from launch.runstore import TrackingStore
from trainer import tracking as T
from trainer.tracking import system
from trainer.tracking.spool import Spool

REPO = Path(__file__).resolve().parents[1]


def _log_steps(tracker, steps):
    for s in steps:
        tracker.log_metrics({"loss": 1.0 / (s + 1), "lr": 0.01 * s}, step=s)


def test_flatten_nested_config():
    flat = T.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}, "f": [{"g": "x"}]})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "null", "e": "{}", "f.0.g": "x"}


def test_default_uri_is_sqlite_beside_out_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert T.resolve_uri(None, tmp_path / "runs" / "a") == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert T.resolve_uri(None, tmp_path) == "http://example:5000"
    assert T.resolve_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_sqlite_default_records_everything(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = run_cfg(tmp_path / "run", tags={"grid.seed": "3"}, parent_run_id=None)
    tracker = tracker_for(cfg, is_logging_rank=True, run_id=None)
    assert tracker.uri == T.default_uri(tmp_path / "run")
    tracker.log_config("model:\n  encoder: resnet18\ntrain:\n  steps: 7\n  betas: [0.9, 0.99]\n")
    tracker.log_params({"extra": 5})
    _log_steps(tracker, range(20))
    png = tmp_path / "pred.png"
    png.write_bytes(b"\x89PNG fake")
    tracker.log_artifact(png, "qualitative")
    tracker.close()
    out = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri {tracker.uri}" in out

    store = TrackingStore(tracker.uri, "geoprime")
    (run,) = store.find_runs({"grid.seed": "3"})
    assert run.run_id == tracker.run_id and run.status == "FINISHED"
    assert run.name == "depth-single-seed0"
    assert run.params == {"model.encoder": "resnet18", "train.steps": "7", "train.betas": "[0.9, 0.99]",
                          "extra": "5"}
    assert run.metrics == {"loss": pytest.approx(1 / 20), "lr": pytest.approx(0.19)}
    assert store.metric_history(run.run_id, "loss") == [(s, pytest.approx(1 / (s + 1))) for s in range(20)]
    assert run.tags["mlflow.source.git.commit"].split("-")[0] == subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert sorted(store.list_artifacts(run.run_id)) == ["config.yaml", "qualitative"]
    assert store.list_artifacts(run.run_id, "qualitative") == ["qualitative/pred.png"]


def test_resumed_run_continues_same_run(tmp_path):
    uri = T.sqlite_uri_for(tmp_path / "mlflow")
    cfg = run_cfg(tmp_path / "run", uri=uri)
    first = tracker_for(cfg, is_logging_rank=True, run_id=None)
    first.log_params({"train.steps": 10})
    _log_steps(first, range(5))
    first.close("KILLED")
    again = tracker_for(cfg, is_logging_rank=True, run_id=first.run_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.log_params({"train.steps": 20, "new": 1})
    assert any("train.steps" in str(w.message) for w in caught)
    _log_steps(again, range(5, 10))
    again.close()
    store = TrackingStore(uri, "geoprime")
    (run,) = store.find_runs()
    assert run.status == "FINISHED" and run.tags["geoprime.resumed"] == "true"
    assert run.params == {"train.steps": "10", "new": "1"}
    assert [s for s, _ in store.metric_history(run.run_id, "loss")] == list(range(10))


def test_close_killed_ends_run_killed_once(tmp_path):
    """What a SIGTERM handler does: close(status="KILLED") ends the run KILLED; a later close (the loop's
    own) changes nothing; an unknown status is refused, by the do-nothing tracker too."""
    uri = T.sqlite_uri_for(tmp_path / "mlflow")
    tracker = tracker_for(run_cfg(tmp_path / "run", uri=uri), is_logging_rank=True, run_id=None)
    _log_steps(tracker, range(3))
    tracker.close(status="KILLED")
    tracker.close("FINISHED")
    (run,) = TrackingStore(uri, "geoprime").find_runs()
    assert run.run_id == tracker.run_id and run.status == "KILLED"
    with pytest.raises(ValueError, match="KILLED"):
        T.Tracker().close("STOPPED")


def test_non_logging_rank_and_disabled_do_nothing(tmp_path):
    uri = T.sqlite_uri_for(tmp_path / "mlflow")
    cfg = run_cfg(tmp_path / "run", uri=uri)
    quiet = tracker_for(cfg, is_logging_rank=False, run_id="abc")
    assert type(quiet) is T.Tracker and quiet.run_id == "abc"
    quiet.log_metrics({"x": 1.0}, 0)
    quiet.close()
    cfg.tracking.enabled = False
    assert type(tracker_for(cfg, is_logging_rank=True, run_id=None)) is T.Tracker
    assert not (tmp_path / "mlflow").exists()


def test_unreachable_at_start_spools_then_replays_by_command(tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = run_cfg(tmp_path / "run", uri=dead, tags={"k": "v"}, close_retry_s=0.0)
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tracker = tracker_for(cfg, is_logging_rank=True, run_id=None)
    assert tracker.run_id is None
    tracker.log_config("a: 1\n")
    _log_steps(tracker, range(6))
    tracker.close()
    spool_path = tmp_path / "run" / "tracking" / "spool.jsonl"
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and f"tracking records stay in {spool_path}" in said[0], said
    assert f"python -m trainer.tracking replay {spool_path}" in said[0]
    ops = [r["op"] for r in Spool(spool_path).all_records()]
    assert ops[:2] == ["target", "create_run"] and ops.count("metrics") == 6 and ops[-1] == "status"

    # the server is still down: the CLI says so and keeps the spool
    res = subprocess.run([sys.executable, "-m", "trainer.tracking", "replay", str(spool_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 1 and "unreachable" in res.stderr
    assert Spool(spool_path).count_pending() == len(ops) - 1  # only the target record was consumed

    # replay into a reachable store: one run with everything
    uri = T.sqlite_uri_for(tmp_path / "later")
    res = subprocess.run([sys.executable, "-m", "trainer.tracking", "replay", str(spool_path), "--uri", uri],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    store = TrackingStore(uri, "geoprime")
    (run,) = store.find_runs({"k": "v"})
    assert run.status == "FINISHED" and run.params == {"a": "1"}
    assert [s for s, _ in store.metric_history(run.run_id, "loss")] == list(range(6))
    assert store.list_artifacts(run.run_id) == ["config.yaml"]
    # replaying again sends nothing twice
    assert T.replay_spool(spool_path, uri) == 0
    assert len(store.metric_history(run.run_id, "loss")) == 6


def test_spool_ignores_torn_last_line_and_resumes_from_offset(tmp_path):
    spool = Spool(tmp_path / "s.jsonl")
    for i in range(3):
        spool.append({"op": "metrics", "i": i})
    with open(spool.path, "a") as f:
        f.write('{"op": "metr')  # a crash in the middle of a write
    pending = list(spool.pending())
    assert [r["i"] for r, _ in pending] == [0, 1, 2]
    spool.set_offset(pending[0][1])
    assert [r["i"] for r, _ in spool.pending()] == [1, 2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_server_down_and_back_loses_nothing(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        cfg = run_cfg(tmp_path / "run", uri=server.uri, experiment="srv")
        tracker = tracker_for(cfg, is_logging_rank=True, run_id=None)
        tracker.retry_interval = 0.0  # reconnect at the next call (the default waits 30 s)
        tracker.log_config("data:\n  name: synthetic\n")
        _log_steps(tracker, range(0, 5))
        server.stop()
        with pytest.warns(RuntimeWarning, match="spooled"):
            _log_steps(tracker, range(5, 12))
        art = tmp_path / "metrics.json"
        art.write_text(json.dumps({"miou": 0.5}))
        tracker.log_artifact(art)
        assert Spool(tmp_path / "run" / "tracking" / "spool.jsonl").count_pending() == 8  # 7 metrics + the artifact
        server.start()
        with pytest.warns(RuntimeWarning, match="replayed"):
            _log_steps(tracker, range(12, 15))
        tracker.close()
        store = TrackingStore(server.uri, "srv")
        (run,) = store.find_runs()
        assert run.status == "FINISHED" and run.params == {"data.name": "synthetic"}
        assert store.metric_history(run.run_id, "loss") == [(s, pytest.approx(1 / (s + 1))) for s in range(15)]
        assert sorted(store.list_artifacts(run.run_id)) == ["config.yaml", "metrics.json"]
    finally:
        server.stop()


RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch.distributed as dist
    sys.path.insert(0, {repo!r} + "/tests")
    from test_tracking_support import run_cfg, tracker_for
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = run_cfg({out!r}, uri={uri!r})
    tracker = tracker_for(cfg, is_logging_rank=rank == 0, run_id=None)
    box = [tracker.run_id]
    dist.broadcast_object_list(box, src=0)
    tracker.run_id = box[0]
    for step in range(4):
        tracker.log_metrics({{"loss": float(rank * 100 + step)}}, step)
    print("RUN", rank, tracker.run_id, flush=True)
    tracker.close()
    dist.destroy_process_group()
""")


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_two_ranks_log_into_one_run_via_rank0(tmp_path):
    uri = T.sqlite_uri_for(tmp_path / "mlflow")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), out=str(tmp_path / "run"), uri=uri))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r)), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ids = {line.split()[2] for o in outs for line in o.splitlines() if line.startswith("RUN")}
    store = TrackingStore(uri, "geoprime")
    (run,) = store.find_runs()
    assert ids == {run.run_id}
    assert store.metric_history(run.run_id, "loss") == [(s, float(s)) for s in range(4)]


def test_system_metrics_without_gpu():
    import torch

    metrics = T.sample_system_metrics()
    assert 0.0 <= metrics["system_memory_usage_percentage"] <= 100.0
    assert 0.0 <= metrics["cpu_utilization_percentage"] <= 100.0 * (os.cpu_count() or 1)
    assert metrics["process_rss_megabytes"] > 10
    if not torch.cuda.is_available():
        assert not any(k.startswith("gpu") for k in metrics)


def test_system_metrics_reads_every_gpu_through_nvml(monkeypatch):
    """NVML path with a stand-in pynvml module (this machine has no GPU): values per device, and a
    board that cannot report power just lacks that key."""
    import types

    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=40 + h),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 * 2**30, total=8 * 2**30))

    def power(h):
        if h == 1:
            raise NVMLError("not supported")
        return 250_000

    fake.nvmlDeviceGetPowerUsage = power
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(system, "_NVML_OK", None)
    metrics = T.sample_system_metrics()
    assert metrics["gpu_0_utilization_percentage"] == 40.0 and metrics["gpu_1_utilization_percentage"] == 41.0
    assert metrics["gpu_0_memory_usage_megabytes"] == 2048.0 and metrics["gpu_1_memory_usage_percentage"] == 25.0
    assert metrics["gpu_0_power_usage_watts"] == 250.0 and "gpu_1_power_usage_watts" not in metrics
    # logged per node under system/, where MLflow's UI charts them (node and GPU selectors)
    assert system.node_metrics(1, metrics)["system/node_1/gpu_0_utilization_percentage"] == 40.0

    def no_library():
        raise NVMLError("NVML Shared Library Not Found")

    fake.nvmlInit = no_library
    monkeypatch.setattr(system, "_NVML_OK", None)
    assert not any(k.startswith("gpu") for k in T.sample_system_metrics())
