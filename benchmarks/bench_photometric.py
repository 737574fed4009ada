"""Benchmark the min-reprojection photometric loss, forward + backward: fused Triton kernels vs
the eager reference vs ``torch.compile`` of the reference, at KITTI (192x640, batch 12) and
Cityscapes-like (256x512, batch 8) sizes with 2 warped + 2 identity sources.

On a GPU it also prints the fused path's achieved memory bandwidth (from the minimum bytes its
three kernels must move) against the card's peak (spec table, ``--peak-gbps``, or a measured
device-to-device copy). On CPU only the reference paths run (the Triton interpreter is a
correctness tool, not a speed one), at a smaller batch.

    .venv/bin/python benchmarks/bench_photometric.py                 # CPU: eager vs compiled
    .venv/bin/python benchmarks/bench_photometric.py --dtype bf16     # on a GPU: all three
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.kernels.dispatch import fused_reprojection_loss  # noqa: E402
from trainer.losses.photometric import reprojection_loss  # noqa: E402

SIZES = {"kitti": (12, 192, 640), "cityscapes": (8, 256, 512)}
"""Benchmark cases: name -> (GPU batch, H, W)."""

PEAK_GBPS = {"H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0,
             "H200": 4800.0, "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0,
             "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0, "L40S": 864.0, "A10G": 600.0,
             "RTX 4090": 1008.0}
"""Spec peak DRAM bandwidth (GB/s) by a substring of torch.cuda.get_device_name()."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def spec_peak_gbps(name: str) -> float | None:
    """The spec bandwidth of the first PEAK_GBPS key found in the device name, if any."""
    for key, gbps in PEAK_GBPS.items():
        if key in name:
            return gbps
    return None


def measured_copy_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time): a practical peak."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * nbytes * reps / (time.perf_counter() - start) / 1e9


def fused_bytes(B: int, C: int, H: int, W: int, n_sources: int, n_grad: int, elt: int) -> int:
    """Minimum DRAM bytes the fused forward + backward must move: forward reads the target and
    every source, writes the uint8 argmin; the coefficient kernel reads the target, the selected
    source and the argmin and writes 4 fp32 per channel; the gradient kernel reads those
    coefficients, the argmin, the target and every source, and writes the n_grad gradients."""
    px = B * H * W
    img = px * C * elt
    fwd = (1 + n_sources) * img + px
    coef = 2 * img + px + 4 * C * 4 * px
    grad = 4 * C * 4 * px + px + (1 + n_sources) * img + n_grad * img
    return fwd + coef + grad


def set_launch_config(tile: str, num_warps: int) -> None:
    """Override the kernels' tile size / warps (tuning on a GPU; the kernels read them per call)."""
    from trainer.kernels import photometric_triton as K

    if tile:
        try:
            bh, bw = (int(v) for v in tile.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--tile {tile!r}: expected HxW, e.g. 8x32") from None
        for v in (bh, bw):
            if v < 1 or v & (v - 1):
                raise SystemExit(f"--tile {tile!r}: {v} is not a power of two")
        K.BLOCK_H, K.BLOCK_W = bh, bw
    if num_warps:
        if num_warps & (num_warps - 1) or not 1 <= num_warps <= 32:
            raise SystemExit(f"--num-warps {num_warps}: expected a power of two in 1..32")
        K.NUM_WARPS = num_warps


def make_inputs(B: int, H: int, W: int, dtype: torch.dtype, device: torch.device, n_warped: int,
                n_identity: int, seed: int = 0):
    """Target (no grad), warped sources (require grad, as they do through the depth net) and
    identity sources (no grad), float images in [0, 1]."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda: torch.rand((B, 3, H, W), generator=g, device=device).to(dtype)  # noqa: E731
    target = rand()
    warped = [rand().requires_grad_(True) for _ in range(n_warped)]
    identity = [rand() for _ in range(n_identity)]
    return target, warped, identity


def time_step(fn, target, warped, identity, device: torch.device, warmup: int, iters: int):
    """(median ms, min ms) of one forward + backward of ``fn``, and the seconds the warm-up
    steps took (torch.compile's compilation happens there)."""
    def step():
        loss = fn(target, warped, identity)
        torch.autograd.grad(loss, warped)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), warmup_s


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--sizes", default="kitti,cityscapes", help=f"comma list of {list(SIZES)}")
    parser.add_argument("--batch", type=int, default=0,
                        help="override the batch (default: the case's on GPU, 2 on CPU)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--warped", type=int, default=2, help="warped sources")
    parser.add_argument("--identity", type=int, default=2, help="identity (unwarped) sources")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impls", default="eager,compiled,fused",
                        help="comma list of eager, compiled, fused (fused only on CUDA)")
    parser.add_argument("--peak-gbps", type=float, default=0.0,
                        help="peak DRAM bandwidth of the card (default: spec table / copy test)")
    parser.add_argument("--tile", default="",
                        help="fused kernels' tile HxW, powers of two (default: the module's 8x32)")
    parser.add_argument("--num-warps", type=int, default=0,
                        help="fused kernels' warps per tile (default: the module's NUM_WARPS)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    return parser


def _measure_case(name: str, args: argparse.Namespace, device: torch.device, card: str, fns: dict,
                  impls: list[str], ref_peak: float | None) -> dict:
    """Time every implementation on one size case; fused rows also get achieved bandwidth."""
    B, H, W = SIZES[name]
    B = args.batch or (B if device.type == "cuda" else 2)
    target, warped, identity = make_inputs(B, H, W, DTYPES[args.dtype], device, args.warped, args.identity)
    row = {"case": name, "batch": B, "H": H, "W": W, "dtype": args.dtype, "device": card}
    for impl in impls:
        med, best, warmup_s = time_step(fns[impl], target, warped, identity, device, args.warmup, args.iters)
        row[f"{impl}_ms"] = med
        row[f"{impl}_min_ms"] = best
        row[f"{impl}_warmup_s"] = warmup_s
    if "fused" in impls:
        nbytes = fused_bytes(B, 3, H, W, args.warped + args.identity, args.warped, target.element_size())
        row["fused_gbps"] = nbytes / (row["fused_ms"] / 1e3) / 1e9
        row["fused_pct_peak"] = 100 * row["fused_gbps"] / ref_peak
    return row


def _format_row(row: dict, impls: list[str]) -> str:
    line = f"{row['case']:<11} B={row['batch']:<3} {row['H']}x{row['W']}"
    for impl in impls:
        line += f" | {impl} {row[f'{impl}_ms']:9.2f} ms (min {row[f'{impl}_min_ms']:.2f})"
    if "eager" in impls and "compiled" in impls:
        line += f" | compiled/eager speed-up {row['eager_ms'] / row['compiled_ms']:.2f}x"
    if "fused" in impls:
        for other in ("eager", "compiled"):
            if other in impls:
                line += f" | fused vs {other} {row[f'{other}_ms'] / row['fused_ms']:.2f}x"
        line += f" | fused {row['fused_gbps']:.0f} GB/s = {row['fused_pct_peak']:.0f}% of peak"
    return line


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.tile or args.num_warps:
        set_launch_config(args.tile, args.num_warps)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    impls = [i for i in args.impls.split(",") if i]
    if device.type != "cuda" and "fused" in impls:
        print("fused: skipped on CPU (the Triton kernels need a GPU; the interpreter is for tests)")
        impls.remove("fused")
    fns = {"eager": reprojection_loss, "compiled": torch.compile(reprojection_loss),
           "fused": lambda t, w, i: fused_reprojection_loss(t, w, i, impl="triton")}

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_gbps or (spec_peak_gbps(card) if device.type == "cuda" else None)
    copy_gbps = measured_copy_gbps(device) if device.type == "cuda" else None
    if device.type == "cuda":
        from trainer.kernels import photometric_triton as K

        print(f"fused launch: tile {K.BLOCK_H}x{K.BLOCK_W}, {K.NUM_WARPS} warps")
    print(f"device: {card}; torch {torch.__version__}; dtype {args.dtype}; "
          f"sources: {args.warped} warped + {args.identity} identity; fwd+bwd (grad to warped)")
    if device.type == "cuda":
        print(f"peak bandwidth: spec {peak or 'unknown'} GB/s, measured copy {copy_gbps:.0f} GB/s")
    else:
        print(f"cpu threads: {torch.get_num_threads()}")

    results = []
    for name in [s for s in args.sizes.split(",") if s]:
        results.append(_measure_case(name, args, device, card, fns, impls, peak or copy_gbps))
        print(_format_row(results[-1], impls), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
