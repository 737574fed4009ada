"""`python -m launch demo` (= `make demo`): the whole built-in study on the CPU, from a fresh clone.

1. builds the synthetic world's shards (``python -m data_shards build synthetic``; idempotent), and
   a second, different-domain world (world seed 1, palette ``gbr``: other scenes, other colours;
   train and val only) for the honest semantic baseline's classification pre-training,
2. runs the study ``configs/experiment/demo.yaml`` (depth from stereo, flow and classification
   pre-training, 4 runs each, then segmentation from each run and from random init with the encoder
   frozen, two jobs at a time) with ``launch.study``,
3. prints the comparison table (also in ``outputs/demo/comparison/``) and how long it all took.

Re-running skips what is done (shards, finished jobs), so an interrupted demo continues.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.grid import study_root, study_uri
from launch.study import REPO, run_study, stop_on_signal
from launch.study_config import load_study
from trainer import tracking

SPLITS = ("train", "val", "test")
#: The demo's own copy of the synthetic world, at a resolution a 2-core CPU trains in minutes
#: (64x192 keeps every ResNet stage an integer size; the world's default is 96x320).
#: 15 test sequences (270 frames; the world's default is 5): rendering is cheap, stable scores are not.
DEMO_DATA = "data/synthetic_demo"
BUILD_ARGS = ["--height", "64", "--width", "192", "--sequences", "test=15"]
#: The different-domain world of the ``classification_other_domain`` pre-training: the value of its
#: ``data.root=`` override in demo.yaml, re-pointed at ``--data-other``.
OTHER_DATA = "data/synthetic_demo_gbr"
OTHER_SPLITS = ("train", "val")
OTHER_BUILD_ARGS = ["--height", "64", "--width", "192", "--seed", "1", "--palette", "gbr",
                    "--splits", *OTHER_SPLITS]
#: What the manifests of existing shards must record (``source.config``) to be reused: shards of an
#: older demo (5 test sequences) or of the other world are an error naming the difference.
DEMO_WORLD = {"seed": 0, "palette": "default", "height": 64, "width": 192, "sequences": {"test": 15}}
OTHER_WORLD = {"seed": 1, "palette": "gbr", "height": 64, "width": 192}


def shards_ready(root: Path, splits=SPLITS) -> bool:
    """True when every split of the synthetic shards has its manifest (the builder writes it last)."""
    return all((root / split / "manifest.json").exists() for split in splits)


def check_world(root: Path, splits, expect: dict) -> None:
    """Raise when the shards in ``root`` were rendered with another world config than ``expect``
    (each manifest's ``source.config``; a manifest without ``palette`` is the default palette)."""
    for split in splits:
        manifest = root / split / "manifest.json"
        config = {"palette": "default", **json.loads(manifest.read_text()).get("source", {}).get("config", {})}
        for key, want in expect.items():
            have = config.get(key)
            if isinstance(want, dict):
                have = {k: (have or {}).get(k) for k in want}
            if have != want:
                raise RuntimeError(f"{manifest}: built with {key}={have!r}, the demo needs {key}={want!r}; "
                                   f"remove {root} to rebuild it (or pass another folder)")


def build_shards(root: Path, verbose: bool, build_args: list[str] | None = None, splits=SPLITS,
                 expect: dict | None = None) -> float:
    """Build the synthetic shards into ``root`` unless they are there (and, with ``expect``, of that
    world config: :func:`check_world`); returns the seconds spent."""
    if shards_ready(root, splits):
        if expect:
            check_world(root, splits, expect)
        print(f"[demo] synthetic shards already in {root}", flush=True)
        return 0.0
    print(f"[demo] building the synthetic world's shards into {root} ...", flush=True)
    start = time.monotonic()
    args = BUILD_ARGS if build_args is None else build_args
    cmd = [sys.executable, "-m", "data_shards", "build", "synthetic", "--out", str(root), *args]
    if not verbose:
        cmd.append("--no-progress")
    res = subprocess.run(cmd, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"building the shards failed (exit code {res.returncode}): {' '.join(cmd)}")
    if not shards_ready(root, splits):
        raise RuntimeError(f"the shard builder finished but {root}/<split>/manifest.json is missing")
    return time.monotonic() - start


def _absolute(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def point_at_data(study, data: Path, other: Path) -> None:
    """Every job reads ``data`` (study.common's data.root); a pre-training whose overrides read the
    other-domain world (``data.root=data/synthetic_demo_gbr``, :data:`OTHER_DATA`) reads ``other``."""
    root = f"data.root='{data}'"  # in place: the order of overrides is part of a job's fingerprint
    study.common = ([root if o.startswith("data.root=") else o for o in study.common]
                    if any(o.startswith("data.root=") for o in study.common) else [*study.common, root])
    for pre in study.pretrainings.values():
        pre.overrides = [f"data.root='{other}'" if o == f"data.root={OTHER_DATA}" else o for o in pre.overrides]


def main(argv: list[str]) -> int:
    """CLI: ``python -m launch demo [--data DIR] [--out DIR] [study overrides...]``."""
    p = argparse.ArgumentParser(prog="python -m launch demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEMO_DATA, help="folder of the demo's synthetic shards (built at 64x192 if missing)")
    p.add_argument("--data-other", default=OTHER_DATA,
                   help="folder of the different-domain world's shards (seed 1, palette gbr; built if missing)")
    p.add_argument("--out", default=None, help="output folder (default: the study's, outputs/demo in the repository)")
    p.add_argument("--verbose", action="store_true", help="show every job's output")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the demo study, e.g. study.seeds=[0,1,2]")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_signal)  # a killed demo also ends the job it is running
    start = time.monotonic()
    data, other = _absolute(args.data), _absolute(args.data_other)
    try:
        study = load_study(["+experiment=demo", *args.overrides])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        study.out_dir = str(Path(args.out).resolve())  # a command-line folder: from the working directory
    point_at_data(study, data, other)
    try:
        build_s = build_shards(data, args.verbose, BUILD_ARGS, SPLITS, DEMO_WORLD)
        build_s += build_shards(other, args.verbose, OTHER_BUILD_ARGS, OTHER_SPLITS, OTHER_WORLD)
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
