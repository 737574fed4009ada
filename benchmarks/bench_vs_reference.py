"""Depth pre-training step vs Monodepth2's, side by side on the same frames, data loading included.

1. Writes a fake KITTI raw tree (``--work``/raw): 1242x375 JPEG frames of a textured scene
   that moves a few pixels per frame, left and right cameras, the release's calibration files,
   and an Eigen/Zhou-style split file (every frame with both neighbours, side l).
2. Converts it once with ``python -m data_shards build kitti --resize H W`` (``--work``/shards).
3. For ``--rounds`` rounds (order alternating, ABBA, so drift on a shared machine hits both):
   * ours: ``python -m trainer task=depth data=kitti ...`` (mono, Adam, batch, workers as given),
     per-step wall time read from the trainer's own per-step log lines (``train.log_every=1``:
     the time between consecutive ``step N/M`` lines = data wait + forward + backward + step);
   * ours in bf16 (``parallel.precision=bf16``: bf16 autocast, fp32 weights, heads, geometry and
     loss), where the CPU has bf16 instructions (``--bf16`` / ``--no-bf16`` to choose): not the same
     arithmetic as the fp32 reference, so it gets its own ratio (``ratio_bf16``);
   * reference: ``benchmarks/monodepth2_reference.py`` (Monodepth2's dataset on the raw JPEGs,
     DataLoader with the same workers, its training step and Adam), per-step wall time from
     the end of one step to the end of the next (data wait included, as for ours).
4. Drops each run's first ``--warmup`` steps, prints JSON lines per run and a summary with the
   median samples/s of each and their ratios (ours / reference; ``ratio`` is fp32 against fp32).

    .venv/bin/python benchmarks/bench_vs_reference.py                       # ~3 min on 2 idle cores
    .venv/bin/python benchmarks/bench_vs_reference.py --rounds 1 --steps 4  # a quick look
    .venv/bin/python benchmarks/bench_vs_reference.py --ours task.photometric_impl=reference
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KITTI_DATE = "2011_09_26"
DRIVE = f"{KITTI_DATE}_drive_0001_sync"
#: KITTI 2011_09_26's rectified intrinsics (P_rect_02) and the stereo rig's baseline, in metres
KITTI_K = ((721.5377, 0.0, 609.5593), (0.0, 721.5377, 172.854), (0.0, 0.0, 1.0))
KITTI_BASELINE_M = 0.54
STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*step (\d+)/(\d+) loss")


# --------------------------------------------------------------------------- fake KITTI raw


def _texture(rng, height: int, width: int):
    """A smooth multi-octave colour texture (uint8 H x W x 3) with some vertical structure."""
    import numpy as np
    from PIL import Image

    acc = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((6, 0.5), (24, 0.3), (96, 0.2)):
        coarse = rng.random((max(2, height * cells // width), cells, 3)).astype(np.float32)
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        acc += weight * np.asarray(img, np.float32)
    poles = (np.sin(np.arange(width) / 17.0) > 0.95)[None, :, None] * 60.0
    return np.clip(acc + poles, 0, 255).astype(np.uint8)


def write_fake_kitti(raw: Path, frames: int, hw: tuple[int, int] = (375, 1242), seed: int = 0) -> Path:
    """KITTI raw layout with ``frames`` JPEG frames per camera; returns the split file
    (``<date>/<drive> <frame> l`` for every frame that has both neighbours). Idempotent."""
    import numpy as np
    from PIL import Image

    from data_shards.sources.kitti_export import calib_cam_to_cam, calib_velo_to_cam

    split = raw / "train_files.txt"
    if split.exists():
        return split
    date_dir = raw / KITTI_DATE
    h, w = hw
    date_dir.mkdir(parents=True, exist_ok=True)
    (date_dir / "calib_cam_to_cam.txt").write_text(calib_cam_to_cam(np.array(KITTI_K), w, h, KITTI_BASELINE_M))
    (date_dir / "calib_velo_to_cam.txt").write_text(calib_velo_to_cam())
    rng = np.random.default_rng(seed)
    world = _texture(rng, h, w + 4 * frames + 40)
    for cam, shift in (("image_02", 0), ("image_03", 20)):  # the right view: a 20 px disparity
        out = date_dir / DRIVE / cam / "data"
        out.mkdir(parents=True, exist_ok=True)
        for f in range(frames):
            x0 = 4 * f + shift
            Image.fromarray(world[:, x0:x0 + w]).save(out / f"{f:010d}.jpg", quality=92)
    lines = [f"{KITTI_DATE}/{DRIVE} {f} l" for f in range(1, frames - 1)]
    split.write_text("\n".join(lines) + "\n")
    return split


def convert(raw: Path, split: Path, shards: Path, height: int, width: int) -> None:
    """``python -m data_shards build kitti --resize H W`` (skipped when the manifest exists)."""
    if (shards / "train" / "manifest.json").exists():
        return
    cmd = [sys.executable, "-m", "data_shards", "build", "kitti", "--root", str(raw), "--out", str(shards),
           "--split", f"train={split}", "--resize", str(height), str(width), "--no-progress"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env())


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# --------------------------------------------------------------------------- the two runs


def step_times_from_log(log: Path) -> list[float]:
    """Seconds between consecutive ``step N/M`` lines of a trainer log (step 1 is timed from
    the line before it cannot be: it is dropped with the warm-up)."""
    stamps = []
    for line in log.read_text().splitlines():
        m = STEP_LINE.match(line)
        if m:
            stamps.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _run(cmd: list[str], timeout: int, what: str) -> str:
    """Run ``cmd`` from the repository root; its stdout, or an error quoting its stderr's tail."""
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def run_ours(args: argparse.Namespace, shards: Path, out: Path, steps: int, extra: list[str]) -> list[float]:
    """The real ``python -m trainer`` on the converted shards (``extra``: more overrides, e.g. bf16);
    per-step seconds (step 2 on)."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run folder: no resume, no old log lines
    cmd = [sys.executable, "-m", "trainer", "task=depth", "task.supervision=mono", "data=kitti",
           f"data.root={shards}", "data.val_split=", "data.test_split=", f"data.num_workers={args.workers}",
           "model=resnet18", f"train.batch_size={args.batch}", f"train.steps={steps}", "train.log_every=1",
           "train.export=false", "train.progress=false", "train.resume=never", "tracking=none",
           "optim.name=adam", "optim.lr=1e-4", "schedule.name=constant", f"out_dir={out}", *args.ours, *extra]
    _run(cmd, args.timeout, "python -m trainer")
    return step_times_from_log(out / "logs" / "rank0.log")


def run_reference(args: argparse.Namespace, raw: Path, split: Path, steps: int) -> list[float]:
    """Monodepth2's step (benchmarks/monodepth2_reference.py) in its own process."""
    cmd = [sys.executable, __file__, "reference-worker", "--raw", str(raw), "--split", str(split),
           "--steps", str(steps), "--batch", str(args.batch), "--height", str(args.height),
           "--width", str(args.width), "--workers", str(args.workers), "--threads", str(args.reference_threads)]
    return json.loads(_run(cmd, args.timeout, "reference").strip().splitlines()[-1])["step_s"]


def reference_worker(args: argparse.Namespace) -> None:
    """Time ``--steps`` Monodepth2 steps; print {"step_s": [...]} (step 2 on, like ours)."""
    import torch

    from benchmarks.monodepth2_reference import KittiRawJpegs, Monodepth2Step

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [ln for ln in Path(args.split).read_text().splitlines() if ln.strip()]
    dataset = KittiRawJpegs(args.raw, lines, args.height, args.width)
    loader = torch.utils.data.DataLoader(dataset, args.batch, shuffle=True, num_workers=args.workers,
                                         pin_memory=torch.cuda.is_available(), drop_last=True)
    trainer = Monodepth2Step(args.batch, args.height, args.width)
    stamps, done = [], 0
    while done < args.steps:
        for inputs in loader:
            trainer.step(inputs)
            stamps.append(time.perf_counter())
            done += 1
            if done == args.steps:
                break
    print(json.dumps({"step_s": [b - a for a, b in zip(stamps, stamps[1:])]}), flush=True)


# --------------------------------------------------------------------------- rounds and summary


def cpu_has_bf16() -> bool:
    """True when the CPU has bf16 matrix / vector instructions (AMX-BF16 or AVX512-BF16), which
    oneDNN uses for bf16 convolutions."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def _summary(name: str, times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {"run": name, "steps": len(times), "median_s_per_step": round(med, 4),
            "samples_per_s": round(batch / med, 3), "min_s": round(min(times), 4), "max_s": round(max(times), 4)}


def bench(args: argparse.Namespace) -> dict:
    """Build data once, run the rounds, print one JSON line per run and the summary."""
    work = Path(args.work).resolve()
    raw, shards = work / "raw", work / "shards"
    t0 = time.perf_counter()
    split = write_fake_kitti(raw, args.frames)
    convert(raw, split, shards, args.height, args.width)
    print(json.dumps({"prepared_s": round(time.perf_counter() - t0, 1), "raw": str(raw), "shards": str(shards)}),
          flush=True)
    steps = 1 + args.warmup + args.steps
    names = ["reference", "ours"] + (["ours_bf16"] if args.bf16 else [])
    all_times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            if name == "reference":
                times = run_reference(args, raw, split, steps)
            else:
                extra = ["parallel.precision=bf16"] if name == "ours_bf16" else []
                times = run_ours(args, shards, work / f"{name}_round{r}", steps, extra)
            if len(times) != steps - 1:
                raise RuntimeError(f"{name} round {r}: timed {len(times)} steps, expected {steps - 1}")
            times = times[args.warmup:]
            all_times[name] += times
            print(json.dumps({"round": r, **_summary(name, times, args.batch),
                              "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
    rate = {n: _summary(n, all_times[n], args.batch)["samples_per_s"] for n in names}
    result = {"summary": True, "ours_samples_per_s": rate["ours"], "reference_samples_per_s": rate["reference"],
              "ratio": round(rate["ours"] / rate["reference"], 3)}
    if args.bf16:
        result.update(ours_bf16_samples_per_s=rate["ours_bf16"],
                      ratio_bf16=round(rate["ours_bf16"] / rate["reference"], 3))
    result["settings"] = {"batch": args.batch, "hw": [args.height, args.width], "workers": args.workers,
                          "steps_per_run": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                          "cpus": os.cpu_count(), "cpu_bf16": cpu_has_bf16(), "ours_overrides": args.ours,
                          "reference_threads": args.reference_threads or "torch default",
                          "ours_threads": os.environ.get("GEOPRIME_THREADS", "trainer default")}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="bench", choices=["bench", "reference-worker"])
    p.add_argument("--work", default="outputs/bench_vs_reference", help="fake raw data, shards and run folders")
    p.add_argument("--frames", type=int, default=120, help="frames per camera in the fake drive")
    p.add_argument("--rounds", type=int, default=2, help="runs of each, alternating order")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="steps per run not timed (after step 1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of both")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--ours", nargs="*", default=[], help="extra Hydra overrides for python -m trainer")
    p.add_argument("--reference-threads", type=int, default=0,
                   help="intra-op threads of the reference (0: torch's default, one per core, as Monodepth2 runs)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="also time ours with parallel.precision=bf16 (default: when the CPU has AMX/AVX512 bf16)")
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    p.add_argument("--split", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bf16 is None:
        args.bf16 = cpu_has_bf16()
    if args.command == "reference-worker":
        reference_worker(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
