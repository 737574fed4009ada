"""The depth task's self-supervised loss part (warps + min-reprojection, forward + backward), per
implementation, on the CPU: what trainer/kernels/photometric_cpu.py and the multi-depth warp buy.

Cases (B frames at H x W, 2 source frames, 4 scales upsampled to full size, auto-masking):

* ``per_scale_reference``: the previous training path: per scale and source ``warp_frame``, then
  ``min_reprojection`` over [2 identity, 2 warped] (identity errors and target statistics
  recomputed at every scale; avg_pool2d windows; autograd backward);
* ``multi_warp_reference``: one ``warp_scales`` per source for all scales, the same reference loss;
* ``multi_warp_cpu``: one padded warp per source + ``multiscale_min_reprojection`` (the task's
  path now), eager or compiled (``--impl``), per chunk size (``--chunks``).

Prints process CPU seconds per forward + backward (median of ``--iters``; CPU time is less noisy
than wall time on a shared machine) with ``--threads`` intra-op threads.

    .venv/bin/python benchmarks/bench_depth_loss.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trainer.kernels.photometric_cpu as cpu_loss  # noqa: E402
from trainer.geometry import pose_vec_to_mat, warp_frame, warp_scales  # noqa: E402
from trainer.kernels.dispatch import depth_functions  # noqa: E402
from trainer.losses.photometric import min_reprojection  # noqa: E402


def inputs(b: int, h: int, w: int, scales: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    K = torch.tensor([[0.58 * w, 0, w / 2], [0, 1.92 * h, h / 2], [0, 0, 1]]).repeat(b, 1, 1)
    poses = [pose_vec_to_mat(0.02 * torch.randn(b, 3, generator=g), 0.1 * torch.randn(b, 3, generator=g))
             for _ in range(2)]
    return {"target": torch.rand(b, 3, h, w, generator=g), "K": K, "poses": poses,
            "sources": [torch.rand(b, 3, h, w, generator=g) for _ in range(2)],
            "depth": (1 + 30 * torch.rand(b, scales, h, w, generator=g)).requires_grad_(True)}


def per_scale_reference(d: dict) -> torch.Tensor:
    losses = []
    for s in range(d["depth"].shape[1]):
        warped = [warp_frame(img, d["depth"][:, s:s + 1], T, d["K"])[0] for img, T in zip(d["sources"], d["poses"])]
        losses.append(min_reprojection(d["target"], warped, d["sources"])[0].mean())
    return torch.stack(losses).mean()


def _multi_warp(d: dict, pad: int = 0, grid_fns=None) -> list[torch.Tensor]:
    return [warp_scales(img, d["depth"], T, d["K"], pad=pad, grid_fns=grid_fns)
            for img, T in zip(d["sources"], d["poses"])]


def multi_warp_reference(d: dict) -> torch.Tensor:
    warped = _multi_warp(d)
    return torch.stack([min_reprojection(d["target"], [x[:, :, s] for x in warped], d["sources"])[0].mean()
                        for s in range(d["depth"].shape[1])]).mean()


def multi_warp_cpu(d: dict, impl: str, chunk: int = 0) -> torch.Tensor:
    fns = None
    if impl == "compiled":
        from trainer.kernels.compiled_cpu import chunk_functions

        fns = chunk_functions(True)
    warped = _multi_warp(d, cpu_loss.PAD, depth_functions(impl, d["target"]).grid)
    return cpu_loss.multiscale_min_reprojection(d["target"], warped, d["sources"], fns=fns, chunk=chunk)[0].mean()


def cpu_seconds(fn, d: dict, iters: int) -> float:
    times = []
    for _ in range(iters + 1):
        d["depth"].grad = None
        c0 = time.process_time()
        fn(d).backward()
        times.append(time.process_time() - c0)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunks", default="1,2,8", help="images per chunk to try in photometric_cpu")
    p.add_argument("--impl", default="compiled", choices=("compiled", "handwritten"), help="the CPU path's kernels")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d = inputs(args.batch, args.height, args.width)
    cases = [("per_scale_reference", per_scale_reference), ("multi_warp_reference", multi_warp_reference)]
    for chunk in (int(c) for c in args.chunks.split(",")):
        cases.append((f"multi_warp_cpu_{args.impl}_chunk{chunk}",
                      lambda d, c=chunk: multi_warp_cpu(d, args.impl, c)))
    for name, fn in cases:
        print(json.dumps({"case": name, "cpu_s": round(cpu_seconds(fn, d, args.iters), 3), "threads": args.threads,
                          "batch": args.batch, "hw": [args.height, args.width]}), flush=True)


if __name__ == "__main__":
    main()
