"""Start-up of the command-line tools (issue 31.4): how long a user waits for --help, --cfg job or a
config error, against the interpreter's own start and `import torch` (what a config error no longer
pays), and a tiny run's fixed costs as its log reports them (preflight, process group, model,
tracking, the first step split into data start-up and compute).

    .venv/bin/python benchmarks/bench_startup.py               # ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_startup.py --runs 5 --no-train

Each command runs ``--runs`` times in a fresh process; the median wall time is printed. Prints
the CPU model and the load average beside the numbers: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]

COMMANDS = [
    ("interpreter start (anchor)", ["-c", "pass"]),
    ("import torch (anchor: what the rows below no longer pay)", ["-c", "import torch"]),
    ("python -m trainer --help", ["-m", "trainer", "--help"]),
    ("python -m trainer --cfg job", ["-m", "trainer", "--cfg", "job"]),
    ("python -m trainer train.step=3 (typo: exit 2)", ["-m", "trainer", "train.step=3"]),
    ("python -m trainer task=nope (no such task: exit 2)", ["-m", "trainer", "task=nope"]),
    ("python -m launch run train.step=3 (typo: exit 2)", ["-m", "launch", "run", "train.step=3"]),
]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "DS_ACCELERATOR": "cpu"}


def wall(args: list[str], runs: int) -> tuple[float, int]:
    """Median wall seconds of ``python <args>`` over ``runs`` fresh processes, and its exit code."""
    times, code = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        code = subprocess.run([sys.executable, *args], capture_output=True, env=env(), cwd=REPO, timeout=600).returncode
        times.append(time.perf_counter() - t)
    return statistics.median(times), code


def tiny_run_costs() -> list[str]:
    """A 2-step depth run on tiny synthetic shards; its log's start-up and first-step lines."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "syn", Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(data), "--height", "64",
                        "--width", "96", "--sequences", "train=2", "val=1", "test=1", "--frames-per-sequence", "6",
                        "--workers", "1", "--no-progress"], check=True, capture_output=True, env=env(), cwd=REPO)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainer", f"data.root={data}", f"out_dir={out}", "train.steps=2",
                        "train.batch_size=2", "train.progress=false", "data.num_workers=1",
                        f"tracking.uri=sqlite:///{tmp}/mlflow.db"], check=True, capture_output=True, env=env(), cwd=REPO)
        total = time.perf_counter() - t
        log = (out / "logs" / "rank0.log").read_text()
    lines = [m.group(1) for m in re.finditer(r"INFO geoprime\.\w+: ((?:start-up|step 1, the first of this "
                                             r"process:).*?)$", log, re.M)]
    return lines + [f"whole command (2 steps, evaluation, export): {total:.1f} s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="fresh processes per command (median)")
    p.add_argument("--no-train", action="store_true", help="skip the tiny run's fixed costs")
    p.add_argument("--json", help="also write each command's median seconds and exit code here")
    a = p.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} (1 min) at the start")
    print(f"{'command':<58} {'median s':>9} {'exit':>5}")
    results = {}
    for name, args in COMMANDS:
        seconds, code = wall(args, a.runs)
        results[name] = {"seconds": seconds, "exit": code}
        print(f"{name:<58} {seconds:>9.2f} {code:>5}")
    if a.json:
        Path(a.json).write_text(json.dumps({"commands": results, "runs": a.runs}, indent=1))
    if not a.no_train:
        print("tiny depth run (64x96, 2 steps, 1 loader worker, sqlite MLflow), from its log:")
        for line in tiny_run_costs():
            print(f"  {line}")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")


if __name__ == "__main__":
    main()
