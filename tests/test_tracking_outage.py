"""An MLflow outage at the end of a run, through `python -m trainer` with a real `mlflow server`: the run
ends FINISHED locally and says in one line that records stay spooled (after retrying for
tracking.close_retry_s); the next start in the same out_dir sends them first, so the MLflow run ends with
every point and FINISHED; `launch study` replays its jobs' spools the same way. Before, such a run stayed
RUNNING in MLflow with the points logged before the outage, until someone ran the replay by hand."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import EAGER_LOSS, child_env, wait_for_text
from test_tracking_support import MlflowServer, run_cfg, tracker_for

from launch.runstore import TrackingStore
from launch.spools import replay_spools, spool_of
from trainer import tracking as T

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]


def _trainer(shards: Path, out: Path, uri: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "trainer", "task=depth", EAGER_LOSS, f"data.root={shards}", f"out_dir={out}",
            "train.batch_size=1", "train.log_every=1", "train.progress=false", f"train.steps={steps}",
            "data.num_workers=1", f"tracking.uri={uri}", "tracking.experiment=outage",
            "tracking.system_metrics_every=0", "tracking.close_retry_s=2"]


@pytest.mark.timeout(600)
def test_records_spooled_at_the_end_are_sent_at_the_next_start(small_synthetic, tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    out = tmp_path / "run"
    try:
        proc = subprocess.Popen(_trainer(small_synthetic, out, server.uri, 8), env=child_env(), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_text(out / "logs" / "rank0.log", "step 3/8", proc, timeout=240)
        server.stop()  # the outage: the rest of the run, its end and its retries
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        said = [line for line in stderr.splitlines() if "tracking records stay in" in line]
        assert len(said) == 1 and "ended FINISHED here, but MLflow at" in said[0], stderr[-3000:]
        assert "did not answer for 2 s" in said[0] and str(spool_of(out)) in said[0]

        server.start()
        store = TrackingStore(server.uri, "outage")
        (run,) = store.find_runs()
        logged = [s for s, _ in store.metric_history(run.run_id, "train/loss")]
        assert run.status == "RUNNING" and len(logged) < 8  # what the outage left in MLflow

        # the next start in the same out_dir (a longer run resumes) sends the spool before anything else
        res = subprocess.run(_trainer(small_synthetic, out, server.uri, 10), env=child_env(), cwd=REPO, capture_output=True,
                             text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        (run,) = store.find_runs()
        assert run.status == "FINISHED"
        assert [s for s, _ in store.metric_history(run.run_id, "train/loss")] == list(range(1, 11))
        assert T.Spool(spool_of(out)).count_pending() == 0
    finally:
        server.stop()


class _Job:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.job_id = out_dir, out_dir.name


@pytest.mark.timeout(300)
def test_the_study_replays_its_jobs_spools(tmp_path, capsys):
    server = MlflowServer(tmp_path / "server")
    job = _Job(tmp_path / "ft-x")
    tracker = tracker_for(run_cfg(job.out_dir, uri=server.uri, experiment="st", close_retry_s=0.0),
                          is_logging_rank=True, run_id=None)
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    tracker.close()  # the server never answered: everything is spooled
    assert replay_spools([job], "before the comparison") > 0
    assert "MLflow still unreachable" in capsys.readouterr().out
    server.start()
    try:
        assert replay_spools([job], "before the comparison") == 0
        assert "ft-x: replayed" in capsys.readouterr().out
        (run,) = TrackingStore(server.uri, "st").find_runs()
        assert run.status == "FINISHED"
        assert [s for s, _ in TrackingStore(server.uri, "st").metric_history(run.run_id, "loss")] == list(range(5))
    finally:
        server.stop()
