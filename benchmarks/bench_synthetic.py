"""Synthetic-world generation speed: frames/s of rendering (left + right + depth + seg + flow).

Usage: ``.venv/bin/python benchmarks/bench_synthetic.py [--sequences N] [--all-splits] [--encode]``

* per-part timings of one frame (left render, right render, flow) at the default resolution;
* samples/s of ``iter_sequence`` (each sample = one new left frame, its right view and the flow;
  every frame is rendered once per camera and reused by the triplets that contain it);
* ``--encode``: also the shard encoding cost (``schema.encode_sample``: PNG + npy + JSON);
* ``--all-splits``: wall time of generating every default split single-process (the demo data).
Prints numbers only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from data_shards import schema
from data_shards.sources.synthetic import SyntheticConfig, compute_flow, count_samples, iter_sequence, make_sequence


def _best(fn, repeat: int = 5) -> tuple[float, float]:
    """Best-of-``repeat`` wall and CPU time of ``fn()`` in seconds (robust to a busy machine)."""
    wall = cpu = np.inf
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=3, help="sequences timed for samples/s")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--encode", action="store_true", help="also time schema.encode_sample")
    ap.add_argument("--all-splits", action="store_true", help="time generating every default split")
    args = ap.parse_args()
    cfg = SyntheticConfig()
    if args.height:
        cfg = SyntheticConfig(height=args.height, width=args.width or cfg.width)
    print(f"resolution {cfg.height}x{cfg.width}, frames/sequence {cfg.frames_per_sequence}")

    world = make_sequence(cfg, "train", 0)
    left = _best(lambda: world.render_left(5))
    right = _best(lambda: world.render_right(5))
    a, b = world.render_left(5), world.render_left(6)
    flow = _best(lambda: compute_flow(a.depth, a.seg, b.depth, b.seg, world.K, world.poses[5], world.poses[6]))
    for what, i in (("wall", 0), ("CPU", 1)):
        print(f"one frame, {what} (best of 5): left render {left[i] * 1e3:.1f} ms, right render "
              f"{right[i] * 1e3:.1f} ms, flow {flow[i] * 1e3:.1f} ms -> "
              f"{1.0 / (left[i] + right[i] + flow[i]):.1f} frames/s (left+right+depth+seg+flow)")

    t, c = time.perf_counter(), time.process_time()
    n = 0
    enc = enc_cpu = 0.0
    for s in range(args.sequences):
        for sample in iter_sequence(cfg, "train", s):
            n += 1
            if args.encode:
                t0, c0 = time.perf_counter(), time.process_time()
                schema.encode_sample(sample)
                enc += time.perf_counter() - t0
                enc_cpu += time.process_time() - c0
    dt, dc = time.perf_counter() - t - enc, time.process_time() - c - enc_cpu
    print(f"iter_sequence: {n} samples in {dt:.2f} s wall ({dc:.2f} s CPU) -> {n / dt:.1f} samples/s "
          f"({n / dc:.1f} per CPU-second, single process)")
    if args.encode:
        print(f"encode_sample: {enc / n * 1e3:.1f} ms/sample wall ({enc_cpu / n * 1e3:.1f} ms CPU) -> "
              f"{n / enc:.1f} samples/s")

    if args.all_splits:
        total = sum(count_samples(sp, cfg) for sp in cfg.sequences)
        t, c = time.perf_counter(), time.process_time()
        for sp, k in cfg.sequences.items():
            for s in range(k):
                for _ in iter_sequence(cfg, sp, s):
                    pass
        dt, dc = time.perf_counter() - t, time.process_time() - c
        sizes = ", ".join(f"{sp} {count_samples(sp, cfg)}" for sp in cfg.sequences)
        print(f"all default splits ({sizes}; {total} samples): {dt:.1f} s wall, "
              f"{dc:.1f} s CPU, single process (wall > CPU means the machine was busy)")


if __name__ == "__main__":
    main()
