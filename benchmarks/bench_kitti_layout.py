"""KITTI shards, compact vs plain layout: shard bytes per triplet and stream decode throughput.

Writes the fake KITTI raw tree of ``bench_vs_reference.py`` (1242x375 textured JPEGs, both
cameras), converts it with ``python -m data_shards build kitti --resize H W`` in both layouts,
for targets on the left camera only and on both cameras (the Eigen-Zhou split uses both), and
streams the depth pre-training keys (4 RGB frames, K, baseline) once per layout. Prints JSON
lines; nothing is asserted (numbers go in docs/data.md and docs/real-datasets.md).

    .venv/bin/python benchmarks/bench_kitti_layout.py --frames 40 --height 96 --width 320
    .venv/bin/python benchmarks/bench_kitti_layout.py --frames 200 --lanes 10 --height 192 --width 640
      (lanes of ~40 samples, as 960 lanes give on the Eigen-Zhou split: read amplification and frames held)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_vs_reference import _env, write_fake_kitti  # noqa: E402
from data_shards.loader import build_loader  # noqa: E402
from data_shards.stream import ShardStream, StreamConfig  # noqa: E402

KEYS = ("rgb", "rgb_prev", "rgb_next", "rgb_right", "K", "baseline")


def convert(raw: Path, split: Path, out: Path, hw: tuple[int, int], layout: str) -> float:
    """Run the CLI build; returns its wall seconds."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data_shards", "build", "kitti", "--root", str(raw), "--out", str(out),
                    "--split", f"train={split}", "--resize", str(hw[0]), str(hw[1]), "--layout", layout,
                    "--no-progress"], check=True, cwd=ROOT, env=_env(), capture_output=True)
    return time.perf_counter() - t


def _cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def stream_rate(root: Path, epochs: int, lanes: int) -> tuple[int, float, dict]:
    """(samples, samples per CPU-second, what the last epoch read) streaming the depth pre-training
    keys, 0 workers, batch 8."""
    loader = build_loader(ShardStream(StreamConfig(str(root), "train", keys=KEYS, lanes=lanes)), 8)
    n, c = 0, _cpu()
    for _ in range(epochs):
        for b in loader:
            n += len(b["__key__"])
    st = loader.stream.read_stats
    m = loader.stream.manifest
    frames = sum(len(s.frames) for s in m.shards)
    read = {"frames_read_per_stored": round(st.frames_read / frames, 3) if frames else None,
            "peak_held_frames": st.peak_held_frames, "peak_held_MiB": round(st.peak_held_bytes / 2**20, 2),
            "MiB_read_per_epoch": round(st.bytes_read / 2**20, 2)}
    return n, n / max(_cpu() - c, 1e-9), read


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=40, help="frames per camera in the fake drive")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--epochs", type=int, default=2, help="stream epochs per layout")
    p.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (as bench_stream.py)")
    p.add_argument("--lanes", type=int, default=960, help="data.lanes of the stream (lanes of N/lanes samples)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_kitti_layout_"))
    raw = work / "raw"
    left = write_fake_kitti(raw, a.frames)
    both = work / "train_lr.txt"
    both.write_text("".join(f"{line} {side}\n" for line in (x.rsplit(" ", 1)[0] for x in left.read_text().split("\n")
                                                            if x) for side in "lr"))
    for targets, split in (("left", left), ("both", both)):
        sizes = {}
        for layout in ("plain", "compact"):
            out = work / f"{targets}_{layout}"
            secs = convert(raw, split, out, (a.height, a.width), layout)
            m = json.loads((out / "train" / "manifest.json").read_text())
            sizes[layout] = sum(s["bytes"] for s in m["shards"]) / m["num_samples"]
            n, rate, read = stream_rate(out, a.epochs, a.lanes)  # best of 3 (a loaded machine)
            rate = max([rate] + [stream_rate(out, a.epochs, a.lanes)[1] for _ in range(2)])
            print(json.dumps({"targets": targets, "layout": layout, "samples": m["num_samples"],
                              "MiB": round(sum(s["bytes"] for s in m["shards"]) / 2**20, 2),
                              "KiB_per_triplet": round(sizes[layout] / 1024, 1), "build_s": round(secs, 1),
                              "stream_samples_per_cpu_s": round(rate, 1), "streamed": n, "lanes": a.lanes, **read,
                              "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
        print(json.dumps({"targets": targets, "compact_over_plain": round(sizes["compact"] / sizes["plain"], 3)}))


if __name__ == "__main__":
    main()
