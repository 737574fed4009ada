"""What MLflow costs a study job at start-up, in CPU-seconds, step by step (issue 30: "~4 CPU-s per job").

Each step runs in fresh processes (the median over ``--runs``), CPU = user + system time of the
process and its children, after ``import torch`` (every job pays that anyway):

1. ``import mlflow``;
2. + an ``MlflowClient`` on the study's sqlite store and an experiment lookup (SQLAlchemy, alembic and
   MLflow's store modules are imported here);
3. + a whole tracked run as a job makes it (trainer.tracking: create the run with its tags and the git
   commit, dataset inputs, config params and tags, metrics, an artifact, close).

With ``--job``, also a 1-step frozen fine-tuning (64x192 synthetic shards, built once into a temporary
folder) with ``tracking=mlflow`` against ``tracking=none``: the difference is MLflow's share of a job.

    .venv/bin/python benchmarks/bench_tracking_startup.py            # ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_tracking_startup.py --job      # + the A/B of a real job, ~3 min

Prints the CPU model and the load average beside the numbers: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]

RUN = """
import sys
from trainer.tracking.tracker import MlflowTracker
t = MlflowTracker(sys.argv[1], "bench", run_id=None, run_name="bench", parent_run_id=None,
                  tags={"study": "bench"}, spool_dir=sys.argv[2], announce=False)
t.log_inputs([{"name": "synthetic/train", "digest": "0" * 16, "source_type": "local", "source": "/x",
               "schema": "{}", "profile": "{}", "context": "training"}])
t.log_config("train:\\n  steps: 1\\n" + "".join(f"  k{i}: {i}\\n" for i in range(120)))
t.log_metrics({f"test/m{i}": 0.5 for i in range(40)}, step=1)
t.log_artifact(sys.argv[3])
t.close()
"""

STEPS = [
    ("import torch (anchor, every job pays it)", "import torch"),
    ("+ import mlflow", "import torch, mlflow"),
    ("+ MlflowClient on the sqlite store, experiment lookup",
     "import torch, sys; from trainer.tracking.client import connect, experiment_id; "
     "experiment_id(connect(sys.argv[1]), sys.argv[1], 'bench')"),
    ("+ a whole tracked run (trainer.tracking)", "import torch\n" + RUN),
]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def cpu_of(cmd: list[str]) -> float:
    """CPU-seconds (user + system, children included) of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed: {res.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_cpu(cmd: list[str], runs: int) -> float:
    return statistics.median(cpu_of(cmd) for _ in range(runs))


def job(tmp: Path, tracking: str, index: int) -> list[str]:
    return [sys.executable, "-m", "trainer", "task=segmentation", f"data.root={tmp / 'data'}", "data.num_workers=0",
            "model.encoder=resnet18", "train.progress=false", "train.steps=1", "train.batch_size=2",
            "train.eval_every=0", "train.ckpt_every=0", "train.keep_checkpoints=false", "data.val_split=''",
            "task.protocol=frozen", f"out_dir={tmp / 'runs' / f'{tracking}{index}'}", f"tracking={tracking}",
            "tracking.system_metrics_every=30"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="fresh processes per step (median)")
    p.add_argument("--job", action="store_true", help="also a 1-step fine-tuning with tracking=mlflow vs none")
    args = p.parse_args(argv)
    print(f"# {cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp_name:
        tmp = Path(tmp_name)
        uri = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
        (tmp / "artifact.txt").write_text("x")
        cpu_of([sys.executable, "-c", "import sys\n" + RUN, uri, str(tmp / "spool"), str(tmp / "artifact.txt")])
        previous = None
        print("| step | CPU-s | this step |\n|---|---:|---:|")
        for name, code in STEPS:
            value = median_cpu([sys.executable, "-c", code, uri, str(tmp / "spool"), str(tmp / "artifact.txt")],
                               args.runs)
            step = "" if previous is None else f"{value - previous:+.2f}"
            print(f"| {name} | {value:.2f} | {step} |", flush=True)
            previous = value
        if args.job:
            subprocess.run([sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(tmp / "data"),
                            "--height", "64", "--width", "192", "--sequences", "train=1", "val=1", "test=1",
                            "--frames-per-sequence", "4", "--workers", "1", "--no-progress"], check=True,
                           capture_output=True, env=env(), cwd=REPO, timeout=600)
            cpu = {t: statistics.median(cpu_of(job(tmp, t, i)) for i in range(args.runs)) for t in ("none", "mlflow")}
            print(f"| 1-step frozen fine-tuning, tracking=none | {cpu['none']:.2f} | |")
            print(f"| the same, tracking=mlflow | {cpu['mlflow']:.2f} | {cpu['mlflow'] - cpu['none']:+.2f} |")
    print(f"# load {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
