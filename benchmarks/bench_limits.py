"""Issue 31's four limits in one run, each beside its anchor and its target.

Runs the four benchmarks as child processes, each writing ``--json``, and prints one table:

1. step overhead: everything that is not the networks, as a share of the networks' forward + backward
   (``bench_step_overhead.py``, depth mono ResNet-18, batch 8, one thread, CPU seconds);
2. loader per core with the depth task's flip + colour jitter, samples per CPU-second, against
   Monodepth2's data set and a plain webdataset pipeline over the same tars (``bench_loader.py``);
3. checkpoint stall: how long a periodic save holds the step loop, synchronous against asynchronous,
   also behind a deliberately slow writer (``bench_ckpt_stall.py``);
4. start-up: a config error, ``--help`` and ``--cfg job`` in fresh processes (``bench_startup.py``).

The figures depend on the CPU and on what else runs: the table's header names both. A quick pass
(``--quick``, ~5 min idle) uses fewer steps and rounds than the full one (~15 min idle)::

    .venv/bin/python benchmarks/bench_limits.py [--quick] [--only step,loader,ckpt,startup]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import describe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ITEMS = ("step", "loader", "ckpt", "startup")

#: the figures each target is measured against (issue 31's text: AMD EPYC 2-core, and Monodepth2)
ANCHOR = {
    "step": "~27 % before the work (issue 31: ~0.3 s else per ~1.0 s of networks)",
    "loader": "Monodepth2's data set (measured in the same run); issue 31: 6.8 md2, 28.8 ours",
    "ckpt": "synchronous save of the same state (measured in the same run); issue 31: 1.4 s",
    "startup": "issue 31: 43-69 s on a loaded machine; import torch alone (same run)",
}


def run(script: str, args: list[str], out: Path, timeout: int) -> dict:
    """``python benchmarks/<script> <args> --json <out>``; its JSON, or ``{"error": ...}``."""
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 or not out.exists():
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"{script} exit {res.returncode}: {tail[0]}"}
    got = json.loads(out.read_text())
    return got if isinstance(got, dict) else {"results": got}


def step_row(quick: bool, work: Path) -> list[tuple[str, str, str, str, bool]]:
    rows = []
    sizes = "96x320" if quick else "96x320,192x640"
    got = run("bench_step_overhead.py", ["--sizes", sizes, "--threads", "1", "--warmup", "2",  # windows of the
                                         "--steps", "10" if quick else "20"], work / "step.json", 3600)  # trainer's log_every
    if "error" in got:
        return [("1. step overhead", got["error"], ANCHOR["step"], "<= 10 %", False)]
    for r in got["results"]:
        ratio = r["cpu_s"]["ratio"]
        rows.append((f"1. step overhead {r['hw'][0]}x{r['hw'][1]}",
                     f"{ratio:.1%} (networks {r['cpu_s']['networks']:.2f} s, else {r['cpu_s']['else']:.2f} s CPU, "
                     f"log every {r.get('log_every', 1)})",
                     ANCHOR["step"], "<= 10 %", ratio <= 0.10))
    return rows


def loader_row(quick: bool, work: Path) -> list[tuple[str, str, str, str, bool]]:
    args = ["--rounds", "1" if quick else "3", "--md2-samples", "32" if quick else "96"]
    got = run("bench_loader.py", args, work / "loader.json", 3600)
    if "error" in got:
        return [("2. loader per core", got["error"], ANCHOR["loader"], ">= 55/CPU-s, >= webdataset", False)]
    best = got["best_samples_per_cpu_s"]
    md2 = best["monodepth2 jpeg files: its __getitem__"]
    rows = []
    for fmt in ("png", "jpeg"):
        ours = best[f"ours compact {fmt}: + flip, jitter in loader"]
        wds = best[f"webdataset plain {fmt}: + flip, jitter"]
        rows.append((f"2. loader, {fmt} frames, jitter in loader",
                     f"{ours:.1f}/CPU-s = {ours / md2:.1f}x md2 ({md2:.1f}); webdataset {wds:.1f}",
                     ANCHOR["loader"], ">= 55/CPU-s, >= webdataset", ours >= 55 and ours >= wds))
    return rows


def ckpt_row(quick: bool, work: Path) -> list[tuple[str, str, str, str, bool]]:
    got = run("bench_ckpt_stall.py", ["--saves", "1" if quick else "2"], work / "ckpt.json", 3600)
    if "error" in got:
        return [("3. checkpoint stall", got["error"], ANCHOR["ckpt"], "<= 0.2 s", False)]
    cases: dict[tuple[str, int, float], dict[str, list[float]]] = {}
    for r in got["results"]:
        case = cases.setdefault((r["strategy"], r["world"], r["rate"]), {"sync": [], "async": [], "mib": []})
        case[r["mode"]].append(r["stall_s"])
        case["mib"].append(r["bytes"] / 2**20)
    rows = []
    for (strategy, world, rate), case in cases.items():
        stall, sync = statistics.median(case["async"]), statistics.median(case["sync"])
        storage = "disk" if not rate else f"{rate:g} MB/s writer"
        rows.append((f"3. checkpoint stall, {strategy} x{world}, {storage}",
                     f"background {stall:.2f} s (synchronous {sync:.2f} s; {max(case['mib']):.0f} MiB)",
                     ANCHOR["ckpt"], "<= 0.2 s", stall <= 0.2))
    return rows


def startup_row(quick: bool, work: Path) -> list[tuple[str, str, str, str, bool]]:
    got = run("bench_startup.py", ["--no-train", "--runs", "1" if quick else "3"], work / "startup.json", 1800)
    if "error" in got:
        return [("4. start-up", got["error"], ANCHOR["startup"], "<= 3 s", False)]
    cmds = got["commands"]
    torch_s = next(v["seconds"] for k, v in cmds.items() if k.startswith("import torch"))
    return [(f"4. start-up: {name.split(' (')[0]}", f"{v['seconds']:.2f} s, exit {v['exit']} "
             f"(import torch {torch_s:.2f} s)", ANCHOR["startup"], "<= 3 s", v["seconds"] <= 3.0)
            for name, v in cmds.items() if name.startswith("python -m")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds (~5 min idle)")
    p.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)}")
    p.add_argument("--work", help="folder for the children's JSON (default: a temporary one)")
    a = p.parse_args()
    chosen = [i.strip() for i in a.only.split(",") if i.strip()]
    unknown = sorted(set(chosen) - set(ITEMS))
    if unknown:
        p.error(f"--only: unknown item(s) {', '.join(unknown)}; known: {', '.join(ITEMS)}")
    builders = {"step": step_row, "loader": loader_row, "ckpt": ckpt_row, "startup": startup_row}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [row for item in chosen for row in builders[item](a.quick, work)]
    print(f"\n# {describe()}; load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
          f"{' (--quick)' if a.quick else ''}")
    print("| item | measured | anchor | target | met |\n|---|---|---|---|---|")
    for item, measured, anchor, target, met in rows:
        print(f"| {item} | {measured} | {anchor} | {target} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    main()
