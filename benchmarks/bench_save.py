"""How long a stop signal's checkpoint takes for the depth model, and what the time goes to.

Builds the depth task (ResNet-18 encoder + U-Net decoder + pose network, Adam) in one process, runs
one real training step at ``--height x --width`` (the step in flight when a signal arrives: the loop
finishes it before saving) and times ``--rounds`` saves through the real ``Checkpointer``, phase by
phase: check (free space), write (DCP + rank / train state files), seal (the marker's sizes and
sha256, several threads), commit (rename, ``latest``), prune (old checkpoints; skipped by a stop's
save). For comparison it also times one sequential whole-file sha256 pass (the marker before pieces)
and a plain ``torch.save`` of the same state (the bytes alone).

    .venv/bin/python benchmarks/bench_save.py                     # 192x640, 3 rounds, under /tmp
    .venv/bin/python benchmarks/bench_save.py --dir /mnt/pvc/x    # where your checkpoints live
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_depth import fake_batch  # noqa: E402
from trainer.checkpointing.checkpoint import Checkpointer  # noqa: E402
from trainer.config import ModelConfig, OptimConfig, ParallelConfig, ScheduleConfig  # noqa: E402
from trainer.engine import Engine  # noqa: E402
from trainer.tasks.depth import DepthTask, DepthTaskConfig  # noqa: E402


class _Counter:
    """A stand-in for the run's small Stateful pieces (step, RNG, data position)."""

    def state_dict(self) -> dict:
        return {"step": 1}


def _sequential_sha256(folder: Path) -> float:
    t = time.perf_counter()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="folder for the checkpoints (default: a temporary one under /tmp)")
    args = p.parse_args()
    torch.manual_seed(0)
    engine = Engine(ParallelConfig(strategy="single"), OptimConfig(lr=1e-4), ScheduleConfig(name="constant"), 10,
                    micro_batch_size=1)
    task = DepthTask(DepthTaskConfig(supervision="mono"), ModelConfig(encoder="resnet18"))
    engine.setup(task.build_model(), task.parameter_groups)
    engine.train(True)
    batch = engine.to_device(fake_batch(1, args.height, args.width))
    steps = []
    for _ in range(2):  # the first one pays one-time set-up (compilation, allocation)
        t = time.perf_counter()
        loss, _ = engine.forward(task.training_step, batch)
        engine.backward(loss)
        engine.step()
        steps.append(time.perf_counter() - t)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_save_"))
    ck = Checkpointer(root / "checkpoints", engine, keep_last=1)
    try:
        for i in range(args.rounds):
            for stopping in (False, True):
                ck.save(2 * i + int(stopping) + 1, {"progress": _Counter()}, {"rng": _Counter()}, stopping=stopping)
                print(json.dumps({"save": "stop" if stopping else "periodic", "hw": [args.height, args.width],
                                  "step_s": round(steps[-1], 3), **{k: round(v, 3) for k, v in ck.last_save.items()}}),
                      flush=True)
        newest = sorted(ck.root.glob("step_*"))[-1]
        sha = _sequential_sha256(newest)
        state = {"model": engine.model.state_dict(), "optim": engine.optimizer.state_dict()}
        t = time.perf_counter()
        torch.save(state, root / "plain.pt")
        plain = time.perf_counter() - t
        print(json.dumps({"sequential_sha256_s": round(sha, 3), "plain_torch_save_s": round(plain, 3),
                          "plain_bytes": (root / "plain.pt").stat().st_size, "first_step_s": round(steps[0], 3)}))
    finally:
        engine.close()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
