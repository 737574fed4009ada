"""Step throughput (samples/s) of the training engine per parallel strategy.

A ResNet encoder + 1x1 head regressing a per-pixel target, trained with AdamW through the
engine verbs the loop uses (accumulate / forward / backward / step). Each strategy runs under
torchrun with ``--nproc`` ranks (gloo on CPU, NCCL on GPU); ``single`` runs one process.

    python benchmarks/bench_engine.py                              # CPU: resnet18, 64x64, 2 ranks
    python benchmarks/bench_engine.py --nproc 1 --precision bf16 --size 224 --batch 32   # one GPU

Prints one line per strategy: global samples/s over the timed steps (after warm-up steps).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {"single": ("single", 0, False), "ddp": ("ddp", 0, False), "fsdp": ("fsdp", 0, False),
              "zero1": ("deepspeed", 1, False), "zero2": ("deepspeed", 2, False),
              "zero3": ("deepspeed", 3, False), "zero3_offload": ("deepspeed", 3, True)}


def worker(a: argparse.Namespace) -> None:
    """One rank: time ``a.steps`` optimizer steps after ``a.warmup`` untimed ones."""
    sys.path.insert(0, str(REPO))
    import torch
    from torch import nn

    from trainer.engine import Engine
    from trainer.models.encoders import ResNetEncoder

    strategy, stage, offload = STRATEGIES[a.strategy]
    p = NS(strategy=strategy, zero_stage=stage, offload=offload, precision=a.precision, channels_last=a.channels_last,
           compile=False, backend="auto", find_unused_parameters=False)
    o = NS(name="adamw", lr=1e-4, weight_decay=0.0, momentum=0.9, betas=(0.9, 0.999), grad_accum=a.accum,
           clip_grad_norm=1.0)
    s = NS(name="cosine", warmup_steps=0, min_lr_ratio=0.0, poly_power=0.9, step_size=1000, gamma=0.1)
    eng = Engine(p, o, s, a.warmup + a.steps, micro_batch_size=a.batch)
    torch.manual_seed(0)
    enc = ResNetEncoder(a.model)
    model = nn.ModuleDict({"encoder": enc, "head": nn.Conv2d(enc.num_ch[-1], 1, 1)})
    eng.setup(model)
    x = torch.rand(a.batch, 3, a.size, a.size)
    batch = eng.to_device({"rgb": x, "target": torch.rand(a.batch, 1, a.size // 32, a.size // 32)})

    def step_fn(parts, b):
        return (parts["head"](parts["encoder"](b["rgb"])[-1]).float() - b["target"]).pow(2).mean()

    def one_step() -> None:
        for m in range(eng.grad_accum):
            with eng.accumulate(m):
                eng.backward(eng.forward(step_fn, batch))
        eng.step()

    for _ in range(a.warmup):
        one_step()
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    eng.barrier()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        one_step()
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    eng.barrier()
    dt = time.perf_counter() - t0
    if eng.rank == 0:
        samples = a.steps * a.batch * a.accum * eng.world_size
        mem = torch.cuda.max_memory_allocated() / 2**30 if eng.device.type == "cuda" else float("nan")
        print("RESULT " + json.dumps({"strategy": a.strategy, "world": eng.world_size, "device": str(eng.device),
                                      "samples_per_s": samples / dt, "step_s": dt / a.steps,
                                      "max_gpu_mem_gib": mem}), flush=True)
    eng.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strategies", nargs="+", default=["single", "ddp", "fsdp", "zero1", "zero2", "zero3"],
                    choices=list(STRATEGIES))
    ap.add_argument("--nproc", type=int, default=2, help="ranks per strategy (single always uses 1)")
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    ap.add_argument("--size", type=int, default=64, help="square image size")
    ap.add_argument("--batch", type=int, default=4, help="per-rank micro-batch")
    ap.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-steps")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.strategy = a.worker
        worker(a)
        return 0
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // a.nproc)))
    common = [f"--model={a.model}", f"--size={a.size}", f"--batch={a.batch}", f"--accum={a.accum}",
              f"--steps={a.steps}", f"--warmup={a.warmup}", f"--precision={a.precision}"]
    if a.channels_last:
        common.append("--channels-last")
    print(f"# bench_engine: {a.model} {a.size}x{a.size}, batch {a.batch}/rank x accum {a.accum}, {a.precision}, "
          f"{a.steps} timed steps, torch {torch.__version__}, "
          f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else f'CPU ({os.cpu_count()} cores)'}")
    print(f"{'strategy':<14}{'ranks':>6}{'samples/s':>12}{'s/step':>9}{'GPU GiB':>9}")
    for name in a.strategies:
        n = 1 if name == "single" else a.nproc
        if a.precision == "fp16" and name.startswith("zero"):
            print(f"{name:<14}{n:>6}  skipped: DeepSpeed takes bf16, not fp16 (see trainer.engine)", flush=True)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", __file__, f"--worker={name}", *common]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            print(f"{name:<14}{n:>6}  timed out after {a.timeout:.0f} s", flush=True)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name:<14}{n:>6}  FAILED (rc={proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
                  flush=True)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        print(f"{name:<14}{r['world']:>6}{r['samples_per_s']:>12.1f}{r['step_s']:>9.3f}{r['max_gpu_mem_gib']:>9.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
