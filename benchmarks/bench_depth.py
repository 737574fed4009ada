"""Depth pre-training throughput (forward + backward + optimizer step) per parallel strategy,
and the two reference baselines the acceptance compares a trained model with.

``throughput`` (default): samples/s of the depth task's training step through the real
``trainer.engine.Engine`` on in-memory batches (data loading is measured by bench_stream.py).
``single`` runs in this process; ddp / fsdp / deepspeed run under torchrun with ``--nproc``
ranks (gloo on CPU) and report the global rate (samples of all ranks / wall time).

``baselines --data ROOT``: abs_rel & co on a split for (a) the untrained network and (b) a
constant-depth predictor, both with per-image median scaling (as the trained mono model).

    .venv/bin/python benchmarks/bench_depth.py --strategies single,ddp,fsdp,deepspeed
    .venv/bin/python benchmarks/bench_depth.py baselines --data data/synthetic --split test
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import ModelConfig, OptimConfig, ParallelConfig, ScheduleConfig  # noqa: E402
from trainer.tasks.depth import DepthTask, DepthTaskConfig  # noqa: E402


def fake_batch(batch: int, height: int, width: int, seed: int = 0) -> dict:
    """A collated batch with every key the depth task may read (random frames, KITTI-like K)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=g)
           for k in ("rgb", "rgb_prev", "rgb_next", "rgb_right")}
    K = torch.tensor([[0.58 * width, 0, width / 2], [0, 1.92 * height, height / 2], [0, 0, 1]])
    out["K"] = K.repeat(batch, 1, 1)
    out["baseline"] = torch.full((batch,), 0.54)
    out["depth"] = 1 + 50 * torch.rand(batch, 1, height, width, generator=g)
    out["__valid__"] = torch.ones(batch, dtype=torch.bool)
    return out


def run_worker(args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps after ``args.warmup`` under one strategy (this rank)."""
    from trainer.engine import Engine

    torch.manual_seed(0)
    pcfg = ParallelConfig(strategy=args.strategy, zero_stage=args.zero_stage)
    engine = Engine(pcfg, OptimConfig(lr=1e-4), ScheduleConfig(name="constant"), args.warmup + args.steps,
                    micro_batch_size=args.batch)
    task = DepthTask(DepthTaskConfig(supervision=args.mode), ModelConfig(encoder=args.encoder))
    engine.setup(task.build_model(), task.parameter_groups)
    engine.train(True)
    batch = engine.to_device(fake_batch(args.batch, args.height, args.width, seed=engine.rank))

    def step() -> None:
        loss, _ = engine.forward(task.training_step, batch)
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    engine.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    engine.barrier()
    elapsed = time.perf_counter() - t0
    result = {"strategy": args.strategy + (f"-zero{args.zero_stage}" if args.strategy == "deepspeed" else ""),
              "world_size": engine.world_size, "mode": args.mode, "encoder": args.encoder,
              "batch_per_rank": args.batch, "hw": [args.height, args.width], "device": str(engine.device),
              "samples_per_s": args.steps * args.batch * engine.world_size / elapsed,
              "s_per_step": elapsed / args.steps}
    engine.close()
    return result


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(args: argparse.Namespace) -> None:
    """Run each strategy (single in-process, others under torchrun) and print one JSON line each."""
    for strategy in args.strategies.split(","):
        port = args.port or _free_port()
        if strategy == "single":
            args.strategy = strategy
            print(json.dumps(run_worker(args)), flush=True)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={port}", __file__, "worker",
               "--strategy", strategy, "--zero-stage", str(args.zero_stage), "--mode", args.mode,
               "--encoder", args.encoder, "--batch", str(args.batch), "--height", str(args.height),
               "--width", str(args.width), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda"),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc))))
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(json.dumps({"strategy": strategy, "error": f"timed out after {args.timeout} s"}), flush=True)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(json.dumps({"strategy": strategy, "error": proc.stderr.strip().splitlines()[-3:]}), flush=True)
        else:
            print(lines[0], flush=True)


def baselines(args: argparse.Namespace) -> None:
    """abs_rel etc. of the untrained network and of a constant depth, median scaled, on a split."""
    from data_shards.loader import build_loader
    from data_shards.stream import ShardStream, StreamConfig

    task = DepthTask(DepthTaskConfig(supervision="mono"), ModelConfig(encoder=args.encoder))
    torch.manual_seed(args.seed)
    model = task.build_model().eval()
    stream = ShardStream(StreamConfig(args.data, args.split, shuffle=False, tail="pad", keys=("rgb", "depth")))
    metrics = {"untrained_network": task.new_metric(), "constant_depth": task.new_metric()}
    with torch.no_grad():
        for batch in build_loader(stream, args.batch):
            metrics["untrained_network"].update(batch, task.eval_step(model, batch))
            metrics["constant_depth"].update(batch, torch.full_like(batch["depth"], 10.0))
    for name, m in metrics.items():
        print(json.dumps({"predictor": name, "split": args.split, **m.compute(m.state())}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="throughput", choices=["throughput", "worker", "baselines"])
    p.add_argument("--strategies", default="single,ddp,fsdp,deepspeed")
    p.add_argument("--strategy", default="single")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--port", type=int, default=0, help="torchrun master port (0: a free one)")
    p.add_argument("--mode", default="mono", choices=["mono", "stereo", "mono_stereo", "supervised"])
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.command == "worker":
        result = run_worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
    elif args.command == "baselines":
        baselines(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
