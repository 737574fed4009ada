"""How long a periodic checkpoint holds the training loop (the *stall*), before and after issue 31.3.

The depth model of the depth task (ResNet-18 depth + pose networks, Adam: a 309 MiB checkpoint) trains
through the real ``Engine`` and saves through the real ``Checkpointer`` under each strategy (``single``:
one process; ``ddp``, ``fsdp`` and, on request, ``zero2``: ``--nproc`` ranks under torchrun), on each
storage (``--rates``: 0 is the disk of ``--dir``; N stands in for a network volume writing N MB/s per
rank, through the ``GEOPRIME_TEST_WRITE_MB_S`` hook) and in each mode:

* ``sync``  (before): the loop waits for the whole save (write, seal, commit, prune);
* ``async`` (after, ``train.ckpt_async=true``): the loop waits while the state is staged into CPU memory,
  then trains on while a thread writes, seals, commits and prunes; the per-step check of that thread
  (one all-reduce) counts as stall too. Each step ends with a barrier, standing in for the loop's own
  per-step agreement (stop signal, wall-clock cadence), so the check's time is its own.

Each mode saves ``--saves`` times (the first async save allocates the staging buffers; later ones reuse
them). Printed per save: the stall (the slowest rank's: the save call, then each step's check), the whole
save's seconds and size, the step right before it (no save running), the mean step while it is written in
the background and how many (``k``), and ``waited``: what the benchmark waited for a save not yet whole
after ``--max-steps`` steps (a run trains on instead; not part of the stall: only a save due before the
previous one is whole would wait for it). Then each async save's stall in parts (:func:`_parts_row`): the
state dict, the staging copy, the checks, the save call's CPU seconds and the bytes each rank staged.

    python benchmarks/bench_ckpt_stall.py                                  # 96x320; single ddp fsdp; disk + 100 MB/s
    python benchmarks/bench_ckpt_stall.py --strategies single --rates 0 --dir /pvc/scratch
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: ``--strategies`` names: (parallel.strategy, parallel.zero_stage)
STRATEGIES = {"single": ("single", 0), "ddp": ("ddp", 0), "fsdp": ("fsdp", 0), "zero2": ("deepspeed", 2)}


class _Counter:
    """A stand-in for the run's small Stateful pieces (step, RNG, data position)."""

    def state_dict(self) -> dict:
        return {"step": 1}


def _build(a: argparse.Namespace):
    """The engine with the depth model set up, and one training step on a fixed batch."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))

    import torch

    from bench_depth import fake_batch
    from trainer.config import ModelConfig, OptimConfig, ParallelConfig, ScheduleConfig
    from trainer.engine import Engine
    from trainer.tasks.depth import DepthTask, DepthTaskConfig

    torch.manual_seed(0)
    strategy, stage = STRATEGIES[a.worker]
    engine = Engine(ParallelConfig(strategy=strategy, zero_stage=stage), OptimConfig(lr=1e-4),
                    ScheduleConfig(name="constant"), 1000, micro_batch_size=1)
    task = DepthTask(DepthTaskConfig(supervision="mono"), ModelConfig(encoder="resnet18"))
    engine.setup(task.build_model(), task.parameter_groups)
    engine.train(True)
    batch = engine.to_device(fake_batch(1, a.height, a.width, seed=engine.rank))

    def step() -> float:
        """One step and the loop's per-step agreement (a barrier here): a rank slowed by its writer thread
        makes the others wait there, which is step time, not the checkpoint check's."""
        t = time.perf_counter()
        loss, _ = engine.forward(task.training_step, batch)
        engine.backward(loss)
        engine.step()
        engine.barrier()
        return time.perf_counter() - t

    return engine, step


def _one_save(ck, step, n: int, background: bool, max_steps: int) -> dict:
    """Save ``n``; in the background mode train on until the save is whole. Returns what the loop paid."""
    t, cpu = time.perf_counter(), time.process_time()
    ck.save(n, {"progress": _Counter()}, {"rng": _Counter()}, background=background)
    call, cpu = time.perf_counter() - t, time.process_time() - cpu
    checks = 0.0
    during: list[float] = []
    while ck.in_flight and len(during) < max_steps:
        during.append(step())
        t = time.perf_counter()
        ck.poll()  # collective: the loop's per-step check
        checks += time.perf_counter() - t
    waited = 0.0
    if ck.in_flight:  # not whole after max_steps: the next save would wait for it
        t = time.perf_counter()
        ck.wait()
        waited = time.perf_counter() - t
    # stall: what the loop paid (the save call, then each step's check); waited: the bench stopped
    # stepping after max_steps (a run trains on; only a save due before this one is whole would wait)
    return {**ck.last_save, "stall_s": call + checks, "call_s": call, "call_cpu_s": cpu, "checks_s": checks,
            "waited_s": waited, "steps_during": during}


def worker(a: argparse.Namespace) -> None:
    """One rank: warm-up and baseline steps, then ``--saves`` saves per storage and mode."""
    from trainer.checkpointing.checkpoint import Checkpointer

    engine, step = _build(a)
    for _ in range(2):  # one-time set-up
        step()
    idle = [step() for _ in range(a.idle_steps)]
    ck = Checkpointer(Path(a.dir) / f"ckpt_{a.worker}", engine, keep_last=1)
    records, n = [], 0
    for rate in a.rates:
        if rate:
            os.environ["GEOPRIME_TEST_WRITE_MB_S"] = str(rate)
        else:
            os.environ.pop("GEOPRIME_TEST_WRITE_MB_S", None)
        for mode in ("sync", "async"):
            for i in range(a.saves):
                n += 1
                before = step()  # no save running: the step time this save is compared with
                rec = _one_save(ck, step, n, mode == "async", a.max_steps)
                records.append({"rate": rate, "mode": mode, "save": i + 1, "step_s": before, **rec})
    ranks = engine.all_gather_object(records)
    if engine.is_logging_rank:
        for i, rec in enumerate(records):
            slowest = max((r[i] for r in ranks), key=lambda x: x["stall_s"])  # the loop goes at its pace
            rec.update({k: v for k, v in slowest.items() if k.startswith(("stall", "stage", "call", "check"))})
            during = rec.pop("steps_during")
            rec["steps_during"], rec["during_s"] = len(during), sum(during) / len(during) if during else float("nan")
            print("RESULT " + json.dumps({"strategy": a.worker, "world": engine.world_size,
                                          "idle_step_s": sum(idle) / len(idle), **rec}), flush=True)
    ck.wait()
    engine.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _table_row(r: dict) -> str:
    storage = "disk" if not r["rate"] else f"{r['rate']:g} MB/s"
    during = f"{r['during_s']:.2f}" if r["mode"] == "async" else "-"
    waited = f"{r['waited_s']:.1f}" if r["mode"] == "async" else "-"
    return (f"{r['strategy']:<7}{r['world']:>3}  {storage:<9}{r['mode']:<6}{r['save']:>3}{r['stall_s']:>9.3f}"
            f"{r['total_s']:>8.2f}{r['bytes'] / 2**20:>8.0f}{r['step_s']:>8.2f}{during:>8}{during_n(r):>4}{waited:>8}")


#: the parts of an async save's stall (the slowest rank's), in the order the loop pays them
PARTS_HEADER = (f"{'strat':<7}{'n':>3}  {'storage':<9}{'#':>3}{'stall s':>9}{'check':>7}{'state':>7}{'copy':>7}"
                f"{'other':>7}{'polls':>7}{'cpu s':>7}{'staged MiB':>11}")


def _parts_row(r: dict) -> str:
    """check: the free-space check and its broadcast (+ waiting for a save in flight); state: the state dict and
    this rank's share of it; copy: the staging copy; other: the small per-rank / rank-0 state, the background
    group; polls: the per-step all-reduces until the save is whole; cpu: the save call's CPU seconds (what a rank
    with a core of its own would wait); staged: the bytes this rank copied. Planning, writing and sealing run on
    the thread: none of them is in the stall."""
    storage = "disk" if not r["rate"] else f"{r['rate']:g} MB/s"
    check, state, copy = r["wait_s"] + r["check_s"], r.get("stage_state_s", 0.0), r.get("stage_copy_s", 0.0)
    other = r["call_s"] - check - state - copy
    return (f"{r['strategy']:<7}{r['world']:>3}  {storage:<9}{r['save']:>3}{r['stall_s']:>9.3f}{check:>7.3f}"
            f"{state:>7.3f}{copy:>7.3f}{other:>7.3f}{r['checks_s']:>7.3f}{r['call_cpu_s']:>7.3f}"
            f"{r.get('stage_bytes', float('nan')) / 2**20:>11.0f}")


def during_n(r: dict) -> str:
    """How many steps were trained while the save was written (async)."""
    return str(r["steps_during"]) if r["mode"] == "async" else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", nargs="+", default=["single", "ddp", "fsdp"], choices=list(STRATEGIES))
    ap.add_argument("--nproc", type=int, default=2, help="ranks of ddp / fsdp")
    ap.add_argument("--rates", nargs="+", type=float, default=[0, 100], help="MB/s per rank; 0: the disk as it is")
    ap.add_argument("--saves", type=int, default=2, help="saves per storage and mode")
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--idle-steps", type=int, default=2, help="steps timed with no save running")
    ap.add_argument("--max-steps", type=int, default=20, help="steps trained at most while a save is written")
    ap.add_argument("--dir", default=None, help="folder for the checkpoints (default: a temporary one under /tmp)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--json", help="also write every save's row here (a list)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    import shutil

    import torch

    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench_ckpt_stall_"))
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    print(f"# bench_ckpt_stall: depth model (ResNet-18 depth + pose, Adam), {a.height}x{a.width}, batch 1/rank; "
          f"checkpoints in {root}; torch {torch.__version__}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'strat':<7}{'n':>3}  {'storage':<9}{'mode':<6}{'#':>3}{'stall s':>9}{'save s':>8}{'MiB':>8}"
          f"{'step s':>8}{'during':>8}{'k':>4}{'waited':>8}")
    every = []
    try:
        for name in a.strategies:
            n = 1 if name == "single" else a.nproc
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // n))
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master-addr=127.0.0.1",
                   f"--master-port={_free_port()}", __file__, f"--worker={name}", f"--dir={root}",
                   f"--height={a.height}", f"--width={a.width}", f"--saves={a.saves}", f"--idle-steps={a.idle_steps}",
                   f"--max-steps={a.max_steps}", "--rates", *map(str, a.rates)]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
            except subprocess.TimeoutExpired:
                print(f"{name:<7}{n:>3}  timed out after {a.timeout:.0f} s", flush=True)
                continue
            rows = [json.loads(ln[len("RESULT "):]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not rows:
                print(f"{name:<7}{n:>3}  FAILED (rc={proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}")
                continue
            every += rows
            for r in rows:
                print(_table_row(r), flush=True)
                print("# " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n# the async stall in parts (seconds; see _parts_row)\n{PARTS_HEADER}")
    for r in every:
        if r["mode"] == "async":
            print(_parts_row(r))
    if a.json:
        Path(a.json).write_text(json.dumps(every, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
