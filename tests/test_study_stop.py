"""Stopping a study through `python -m launch study` with real trainer jobs: SIGTERM is passed on to the
running job, which checkpoints; the re-run resumes it from that checkpoint (not from step 1); a second
study on the same folder is refused, naming the first. Before, the study SIGKILLed its jobs, so the
re-run printed "running (resuming)" and started again at step 1."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import child_env, signal_and_wait, survivors, wait_for_text

from launch.runstore import TrackingStore
from trainer import tracking

REPO = Path(__file__).resolve().parents[1]

STUDY = """\
# @package _global_
study:
  name: stopme
  out_dir: {out}
  tracking_uri: {uri}
  experiment: stop-exp
  common: [data.root={shards}, train.batch_size=1, train.log_every=1, train.progress=false, data.num_workers=1,
           tracking.system_metrics_every=0]
  pretrainings:
    depth: {{task: depth, init: depth, overrides: [train.steps=40, task.photometric_impl=handwritten, "data.test_split=''"]}}
    random: {{init: random}}
  finetune: [train.steps=2, "data.val_split=''"]
  protocols: {{frozen: [task.protocol=frozen]}}
  datasets: {{syn: [data.name=synthetic]}}
  shots: [0]
  seeds: [0]
"""

#: `python -m launch study ...` reading its study from the test's config folder (argv[1])
STUDY_CLI = """
import sys
from pathlib import Path
import launch.study_config as study_config
study_config.load_study.__defaults__ = (Path(sys.argv[1]),)
from launch.__main__ import main
sys.exit(main(["study", *sys.argv[2:]]))
"""


def _study_config(tmp_path: Path, shards: Path) -> tuple[Path, Path, str]:
    """(study out_dir, config folder holding experiment/stopme.yaml, tracking URI)."""
    out, cfg = tmp_path / "out", tmp_path / "configs"
    uri = tracking.sqlite_uri_for(tmp_path / "mlflow")
    (cfg / "experiment").mkdir(parents=True)
    (cfg / "experiment" / "stopme.yaml").write_text(STUDY.format(out=out, uri=uri, shards=shards))
    return out, cfg, uri


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_stopped_study_lets_its_job_checkpoint_and_the_rerun_resumes_it(small_synthetic, tmp_path):
    out, cfg, uri = _study_config(tmp_path, small_synthetic)
    cmd = [sys.executable, "-c", STUDY_CLI, str(cfg), "+experiment=stopme", "--grace", "60"]
    study = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    log = out / "runs" / "pre-depth" / "logs" / "rank0.log"
    try:
        wait_for_text(log, "step 3/40", study, timeout=300)
        second = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"is in use by pid {study.pid} " in second.stderr, second.stderr[-2000:]
    except BaseException:
        study.kill()
        raise
    output = signal_and_wait(study, signal.SIGTERM, 150)
    assert study.returncode == 143, output[-3000:]
    assert re.search(r"pre-depth: stopped after \d+ s \(checkpointed, the re-run resumes it", output), output[-3000:]
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", log.read_text())
    assert stopped and int(stopped.group(1)) >= 3
    assert not survivors(str(out))
    store = TrackingStore(uri, "stop-exp")
    assert [r.status for r in store.find_runs({"study": "stopme", "study_kind": "study"})] == ["KILLED"]

    rerun = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    assert "pre-depth: running (resuming)" in rerun.stdout
    step = int(stopped.group(1))
    ckpt = out / "runs" / "pre-depth" / "checkpoints" / f"step_{step:08d}"
    assert f"resumed from {ckpt} (step {step})" in log.read_text()
    assert json.loads((out / "runs" / "pre-depth" / "metrics.json").read_text())["step"] == 40
    assert [r.status for r in store.find_runs({"study": "stopme", "study_kind": "study"})] == ["FINISHED"]


@pytest.mark.timeout(120)
def test_emitted_manifests_take_the_grace(tmp_path):
    """`--grace` of `study --emit k8s` is the manifests' (it used to clash with the study's own option)."""
    _, cfg, _ = _study_config(tmp_path, tmp_path / "shards")
    res = subprocess.run([sys.executable, "-c", STUDY_CLI, str(cfg), "--emit", "k8s", "--image", "img:1",
                          "--shards-pvc", "shards", "--grace", "600", "--out", str(tmp_path / "k8s"),
                          "+experiment=stopme"], env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stderr[-2000:]
    manifests = sorted((tmp_path / "k8s").glob("*.yaml"))
    assert manifests and all("terminationGracePeriodSeconds: 630" in m.read_text() for m in manifests)
