"""`python -m launch demo` (= `make demo`): the whole built-in study on the CPU, from a fresh clone.

1. builds the synthetic world's shards (``python -m data_shards build synthetic``; idempotent),
2. runs the study ``configs/experiment/demo.yaml`` (depth, flow and classification pre-training,
   then segmentation fine-tuning from each and from random init, 2 seeds) with ``launch.study``,
3. prints the comparison table (also in ``outputs/demo/comparison/``) and how long it all took.

Re-running skips what is done (shards, finished jobs), so an interrupted demo continues.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.grid import study_root, study_uri
from launch.study import REPO, _terminate, run_study
from launch.study_config import load_study
from trainer import tracking

SPLITS = ("train", "val", "test")
#: The demo's own copy of the synthetic world, at a resolution a 2-core CPU trains in minutes
#: (64x192 keeps every ResNet stage an integer size; the world's default is 96x320).
DEMO_DATA = "data/synthetic_demo"
BUILD_ARGS = ["--height", "64", "--width", "192"]


def shards_ready(root: Path) -> bool:
    """True when every split of the synthetic shards has its manifest (the builder writes it last)."""
    return all((root / split / "manifest.json").exists() for split in SPLITS)


def build_shards(root: Path, verbose: bool) -> float:
    """Build the synthetic shards into ``root`` unless they are there; returns the seconds spent."""
    if shards_ready(root):
        print(f"[demo] synthetic shards already in {root}", flush=True)
        return 0.0
    print(f"[demo] building the synthetic world's shards into {root} ...", flush=True)
    start = time.monotonic()
    cmd = [sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(root), *BUILD_ARGS]
    if not verbose:
        cmd.append("--no-progress")
    res = subprocess.run(cmd, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"building the shards failed (exit code {res.returncode}): {' '.join(cmd)}")
    if not shards_ready(root):
        raise RuntimeError(f"the shard builder finished but {root}/<split>/manifest.json is missing")
    return time.monotonic() - start


def main(argv: list[str]) -> int:
    """CLI: ``python -m launch demo [--data DIR] [--out DIR] [study overrides...]``."""
    p = argparse.ArgumentParser(prog="python -m launch demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEMO_DATA, help="folder of the demo's synthetic shards (built at 64x192 if missing)")
    p.add_argument("--out", default=None, help="output folder (default: the study's, outputs/demo)")
    p.add_argument("--verbose", action="store_true", help="show every job's output")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the demo study, e.g. study.seeds=[0,1,2]")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # a killed demo also ends the job it is running
    start = time.monotonic()
    data = Path(args.data)
    data = data if data.is_absolute() else REPO / data
    try:
        study = load_study(["+experiment=demo", *args.overrides])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        study.out_dir = args.out
    study.common = [o for o in study.common if not o.startswith("data.root=")] + [f"data.root='{data}'"]
    try:
        build_s = build_shards(data, args.verbose)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rc = run_study(study, verbose=args.verbose)
    total = time.monotonic() - start
    out = study_root(study)
    print(f"[demo] {'done' if rc == 0 else 'finished with failures'} in {total / 60:.1f} min "
          f"(shards {build_s:.0f} s); table: {out / 'comparison' / 'comparison.md'}; "
          f"runs: {tracking.ui_command(study_uri(study))}", flush=True)
    print("[demo] note: every job here trains for a few CPU minutes on a small synthetic world; the table shows "
          "what this budget measured, not an answer to the question at the reference study's scale.", flush=True)
    return rc
