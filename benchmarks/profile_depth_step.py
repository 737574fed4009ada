"""Profile the depth task's training step (forward + backward + Adam) on the CPU.

``time`` (default): per-step wall and process-CPU seconds of the step on a fixed fake batch,
median over ``--steps`` after ``--warmup`` (process CPU time is what a step costs the machine;
on a shared machine it is less noisy than wall time). ``profile``: torch.profiler's table of
the ops with the most self CPU time over ``--steps`` steps, and the model-free loss part alone.

    .venv/bin/python benchmarks/profile_depth_step.py time --threads 1
    .venv/bin/python benchmarks/profile_depth_step.py profile --threads 1 --steps 3 --rows 30
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

from benchmarks.bench_depth import fake_batch  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.tasks.depth import DepthTask, DepthTaskConfig  # noqa: E402


def build(args: argparse.Namespace):
    """(task, model, optimizer, batch) as the trainer would have them for one rank."""
    torch.manual_seed(0)
    task = DepthTask(DepthTaskConfig(supervision=args.mode, pose_encoder=args.pose), ModelConfig(encoder=args.encoder))
    model = task.build_model().train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = fake_batch(args.batch, args.height, args.width)
    for k in ("rgb", "rgb_prev", "rgb_next", "rgb_right"):
        batch["aug_" + k] = batch[k]
    return task, model, opt, batch


def step(task, model, opt, batch) -> None:
    opt.zero_grad(set_to_none=True)
    loss, _ = task.training_step(model, batch)
    loss.backward()
    opt.step()


def time_steps(args: argparse.Namespace) -> dict:
    task, model, opt, batch = build(args)
    wall, cpu = [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(task, model, opt, batch)
        if i >= args.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"threads": torch.get_num_threads(), "batch": args.batch, "hw": [args.height, args.width],
            "channels_last": args.channels_last, "wall_s": round(statistics.median(wall), 4),
            "cpu_s": round(statistics.median(cpu), 4), "samples_per_s": round(args.batch / statistics.median(wall), 3)}


def profile(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    task, model, opt, batch = build(args)
    for _ in range(args.warmup):
        step(task, model, opt, batch)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(args.steps):
            with record_function("depth_step"):
                step(task, model, opt, batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="time", choices=["time", "profile"])
    p.add_argument("--mode", default="mono")
    p.add_argument("--pose", default="separate")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--rows", type=int, default=30)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "profile":
        profile(args)
    else:
        print(json.dumps(time_steps(args)), flush=True)


if __name__ == "__main__":
    main()
