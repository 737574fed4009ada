"""Where the depth pre-training step's time goes: the networks' forward + backward against
everything else, at each frame size, and (``--pieces``) everything else piece by piece.

Set-up: the run ``python -m trainer`` composes for bench_vs_reference's setting (``task=depth``
mono, ResNet-18 depth net and separate pose net, batch 8, Adam, constant lr, fp32, one process,
the trainer's defaults otherwise: channels_last, fused Adam, compiled CPU loss, freed memory kept by
``trainer/allocator.py`` unless ``--default-malloc``), built with the trainer's own functions; each
step is the loop's verbs (``trainer/loop.py`` ``_run``): next batch, to_device, forward, backward,
log, optimizer step, log window.

Data: ``--data fake`` (default): one random uint8 batch with the ``aug_*`` keys, no loader (data
wait ~0). ``--data kitti``: bench_vs_reference's fake KITTI frames, converted at each size, read
by the trainer's loader with ``--workers`` workers (flip + colour jitter run in the workers).

Timing, without a profiler: forward hooks on the model's parts time the networks' forward;
gradient hooks on their outputs mark where the backward reaches the networks (autograd runs the
nodes created last first, and every non-network node was created after the networks it
depends on). networks = time inside the parts, forward and backward; everything else = step -
networks. Wall and process-CPU seconds after ``--warmup`` steps, over ``--steps`` steps in windows of
``--log-every`` (default: the trainer's ``train.log_every``, 10): each window's mean step (one log step
in every window: its grad norm and log flush are paid once per window, as in a run), the median over
windows. ``--log-every 1`` is the old setting (every step a log step: the grad norm's pass every step).

``--pieces``: one more step under torch.profiler; each op's time goes to the innermost
``record_function`` label around it (``depth/...`` in trainer/tasks/depth.py, ``net/<part>``
and ``loop/...`` here), a backward op to the label of the forward op that made its autograd
node (sequence numbers). The profiler's own overhead inflates small ops: read it for shares.

    .venv/bin/python benchmarks/bench_step_overhead.py                        # 96x320 and 192x640
    .venv/bin/python benchmarks/bench_step_overhead.py --threads 1 --steps 20 --log-every 1  # every step logged
    .venv/bin/python benchmarks/bench_step_overhead.py --sizes 96x320 --threads 1 --pieces
    .venv/bin/python benchmarks/bench_step_overhead.py --data kitti --workers 2
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.profiler import record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import TrainConfig  # noqa: E402  (dataclasses only: no Hydra, no torch import)

NETWORK_PREFIX = "net/"
"""Label prefix of the networks' forward (the model's parts), set by :class:`NetworkClock`."""


def overrides(args: argparse.Namespace, height: int, width: int, shards: Path | None) -> list[str]:
    """bench_vs_reference's ``python -m trainer`` overrides (see its ``run_ours``) at ``height x width``."""
    return ["task=depth", "task.supervision=mono", "data=kitti", f"data.root={shards or '/nonexistent'}",
            f"data.num_workers={args.workers}", "model=resnet18", f"train.batch_size={args.batch}",
            f"train.log_every={args.log_every}", "tracking=none", "optim.name=adam", "optim.lr=1e-4", "schedule.name=constant",
            *args.ours]


class FixedBatches:
    """The loader stand-in of ``--data fake``: the same collated uint8 batch every time."""

    def __init__(self, task: Any, batch: int, height: int, width: int) -> None:
        from benchmarks.bench_depth import fake_batch

        sample = fake_batch(batch, height, width)
        self.batch = {k: sample[k] for k in task.required_keys}
        for key in task.frame_keys:  # what train_transform adds (no jitter drawn: the frames as they are)
            self.batch["aug_" + key] = self.batch[key]
        self.epoch, self.corrupt_count = 0, 0

    def next(self) -> dict:
        return dict(self.batch)


class NetworkClock:
    """Wall and CPU seconds spent inside the model's parts, forward and backward (see module doc)."""

    def __init__(self, parts: torch.nn.ModuleDict) -> None:
        self._open: list = []
        for name, part in parts.items():
            part.register_forward_pre_hook(self._enter(name))
            part.register_forward_hook(self._leave)
        self.reset()

    def reset(self) -> None:
        self.forward_wall = self.forward_cpu = 0.0
        self.boundary: tuple[float, float] | None = None

    def _enter(self, name: str):
        def hook(module, inputs) -> None:
            label = record_function(NETWORK_PREFIX + name)
            label.__enter__()
            self._open.append((label, time.perf_counter(), time.process_time()))
        return hook

    def _leave(self, module, inputs, output) -> None:
        label, wall, cpu = self._open.pop()
        self.forward_wall += time.perf_counter() - wall
        self.forward_cpu += time.process_time() - cpu
        label.__exit__(None, None, None)
        for t in _tensors(output):
            if t.requires_grad:
                t.register_hook(self._reached)

    def _reached(self, grad: torch.Tensor) -> None:
        if self.boundary is None:
            self.boundary = (time.perf_counter(), time.process_time())


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class Phases:
    """Wall and CPU seconds per named phase of one step."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        with record_function("loop/" + name):
            yield
        self.wall[name] += time.perf_counter() - wall
        self.cpu[name] += time.process_time() - cpu

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] += wall
        self.cpu[name] += cpu


def build(args: argparse.Namespace, height: int, width: int, shards: Path | None):
    """(engine, task, batches, train_log) as ``python -m trainer`` builds them for one rank."""
    from trainer.compose import compose
    from trainer.distributed import seed_everything
    from trainer.engine import Engine
    from trainer.loop import Batches
    from trainer.tasks import build_task
    from trainer.tasks.loaders import shard_loader_factory
    from trainer.tracking.train_log import TrainLog

    cfg = compose(overrides(args, height, width, shards))
    task = build_task(cfg)
    seed_everything(int(cfg.seed))
    engine = Engine(cfg.parallel, cfg.optim, cfg.schedule, 10 ** 6, micro_batch_size=args.batch)
    engine.setup(task.build_model(), task.parameter_groups)
    engine.train(True)
    task.on_train_mode(engine.parts)
    if shards is None:
        batches = FixedBatches(task, args.batch, height, width)
    else:
        batches = Batches(shard_loader_factory(cfg.data, task, engine, batch_size=cfg.train.batch_size,
                                                   seed=cfg.seed)(cfg.data.train_split, True))
    train_log = TrainLog(engine, _NoTracker(), total=10 ** 6, log_every=int(cfg.train.log_every),
                         samples_per_step=args.batch, sys_every_s=0.0)
    return engine, task, batches, train_log


class _NoTracker:
    def log_metrics(self, metrics: dict, step: int) -> None:
        pass


def step(engine, task, batches, train_log, clock: NetworkClock, number: int) -> Phases:
    """One training step as the loop runs it (``trainer/loop.py`` ``_run``), timed by phase."""
    ph = Phases()
    clock.reset()
    with ph("data"):
        batch = batches.next()
    with ph("to_device"):
        batch = engine.to_device(batch)
    with engine.accumulate(0):
        with ph("forward"):
            loss, terms = engine.forward(task.training_step, batch)
        wall, cpu = time.perf_counter(), time.process_time()
        with ph("backward"):
            engine.backward(loss)
    bw, bc = clock.boundary or (time.perf_counter(), time.process_time())
    ph.add("backward_networks", ph.wall["backward"] - (bw - wall), ph.cpu["backward"] - (bc - cpu))
    ph.add("forward_networks", clock.forward_wall, clock.forward_cpu)
    with ph("log"):
        train_log.add(loss, terms, engine.grad_accum)
    with ph("optimizer"):
        norm = engine.step(want_norm=train_log.logs_at(number))
    with ph("log"):
        train_log.end_step(norm)
        train_log.maybe_flush(number, batches.loader if hasattr(batches, "loader") else batches,
                              getattr(batches, "wait_s", 0.0))
    return ph


PHASES = ("data", "to_device", "forward", "backward", "optimizer", "log")


def summarize(steps: list[Phases], clock_name: str, window: int = 1) -> dict[str, float]:
    """The phases, the networks' part and everything else, for ``wall`` or ``cpu``: each ``window``
    of consecutive steps averaged (a window holds one log step), the median over windows."""
    rows = []
    for ph in steps:
        t = getattr(ph, clock_name)
        total = sum(t[p] for p in PHASES)
        nets = t["forward_networks"] + t["backward_networks"]
        rows.append({"step": total, "networks": nets, "else": total - nets,
                     "forward_else": t["forward"] - t["forward_networks"],
                     "backward_else": t["backward"] - t["backward_networks"],
                     **{p: t[p] for p in ("data", "to_device", "optimizer", "log")}})
    rows = [{k: statistics.fmean(r[k] for r in rows[i:i + window]) for k in rows[0]}
            for i in range(0, len(rows) - window + 1, window)]
    out = {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}
    out["ratio"] = round(statistics.median(r["else"] / r["networks"] for r in rows), 4)
    return out


def attribute(prof, by_op: bool = False) -> dict[str, float]:
    """Milliseconds per label (see the module doc) from a profiled step; ``by_op``: per
    "label: op" (forward ops' self time, backward nodes' total time)."""
    events = prof.events()
    labelled = {id(e) for e in events if _is_label(e.name)}

    def label_of(e) -> str:
        while e is not None:
            if id(e) in labelled:
                return e.name
            e = e.cpu_parent
        return "unlabelled"

    out: dict[str, float] = collections.defaultdict(float)
    seq_label: dict[int, str] = {}
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            continue
        if e.sequence_nr >= 0 and not _under_backward(e):  # ops before the one that made the node peek
            # at its number: the last one wins
            seq_label[e.sequence_nr] = label_of(e)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            name = "net/(parameter gradients)" if "AccumulateGrad" in e.name else seq_label.get(e.sequence_nr, "unlabelled")
            node = e.name.split(": ")[-1]
            out[f"{name} [bwd]" + (f": {node}" if by_op else "")] += e.cpu_time_total / 1e3
        elif not _under_backward(e):
            out[label_of(e) + (f": {e.name}" if by_op else "")] += e.self_cpu_time_total / 1e3
    return dict(out)


def _is_label(name: str) -> bool:
    return name.startswith(("depth/", NETWORK_PREFIX, "loop/"))


def _under_backward(e) -> bool:
    while e is not None:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return True
        e = e.cpu_parent
    return False


def pieces_table(ms: dict[str, float]) -> list[tuple[str, float]]:
    """Pieces of everything else, forward and backward summed per label, largest first."""
    merged: dict[str, float] = collections.defaultdict(float)
    for name, v in ms.items():
        base = name.replace(" [bwd]", "")
        merged["networks" if base.startswith(NETWORK_PREFIX) else base] += v
    return sorted(merged.items(), key=lambda kv: -kv[1])


def run_size(args: argparse.Namespace, height: int, width: int) -> dict:
    shards = None
    if args.data == "kitti":
        from benchmarks.bench_vs_reference import convert, write_fake_kitti

        work = Path(args.work).resolve()
        split = write_fake_kitti(work / "raw", args.frames)
        shards = work / f"shards_{height}x{width}"
        convert(work / "raw", split, shards, height, width)
    engine, task, batches, train_log = build(args, height, width, shards)
    clock = NetworkClock(engine.parts)
    timed = []
    for i in range(args.warmup + args.steps):
        ph = step(engine, task, batches, train_log, clock, i + 1)
        if i >= args.warmup:
            timed.append(ph)
    result = {"hw": [height, width], "batch": args.batch, "threads": torch.get_num_threads(), "data": args.data,
              "workers": args.workers if args.data == "kitti" else 0, "steps": args.steps,
              "log_every": args.log_every, "wall_s": summarize(timed, "wall", args.log_every),
              "cpu_s": summarize(timed, "cpu", args.log_every),
              "malloc": "default" if args.default_malloc else "kept", "load_avg_1min": round(os.getloadavg()[0], 2)}
    if args.pieces:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(engine, task, batches, train_log, clock, args.warmup + args.steps + 1)
        table = pieces_table(attribute(prof))
        result["pieces_ms"] = {k: round(v, 1) for k, v in table}
        if args.ops:
            ops = sorted(((k, v) for k, v in attribute(prof, by_op=True).items()
                          if not k.startswith(NETWORK_PREFIX)), key=lambda kv: -kv[1])
            result["ops_ms"] = {k: round(v, 1) for k, v in ops[:args.ops]}
    return result


def print_table(r: dict) -> None:
    w, c = r["wall_s"], r["cpu_s"]
    print(f"\n{r['hw'][0]}x{r['hw'][1]}, batch {r['batch']}, {r['threads']} threads, data {r['data']}, "
          f"log every {r['log_every']} steps, load {r['load_avg_1min']}:   wall s    cpu s")
    for key in ("networks", "else", "forward_else", "backward_else", "optimizer", "data", "to_device", "log", "step"):
        print(f"  {key:28s} {w[key]:8.3f} {c[key]:8.3f}")
    print(f"  {'everything else / networks':28s} {w['ratio']:8.1%} {c['ratio']:8.1%}")
    if "pieces_ms" in r:
        total = sum(r["pieces_ms"].values())
        print("  one profiled step, ms (share):")
        for k, v in r["pieces_ms"].items():
            print(f"    {k:34s} {v:8.1f} ({v / total:5.1%})")
    for k, v in r.get("ops_ms", {}).items():
        print(f"    {k:70s} {v:8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="96x320,192x640", help="comma-separated HxW")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per size (rounded up to whole --log-every windows)")
    p.add_argument("--log-every", type=int, default=TrainConfig.log_every,
                   help="train.log_every: the grad norm and the log flush run once per window (default: the trainer's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads (0: the trainer's default for --workers, trainer/threads.py)")
    p.add_argument("--data", choices=("fake", "kitti"), default="fake")
    p.add_argument("--workers", type=int, default=2, help="loader workers (--data kitti; sizes the thread default)")
    p.add_argument("--work", default="outputs/bench_vs_reference", help="fake KITTI frames and shards (--data kitti)")
    p.add_argument("--frames", type=int, default=120, help="frames per camera in the fake drive (--data kitti)")
    p.add_argument("--pieces", action="store_true", help="one more step under torch.profiler, per piece")
    p.add_argument("--ops", type=int, default=0, help="with --pieces: also the N costliest ops outside the networks")
    p.add_argument("--ours", nargs="*", default=[], help="extra Hydra overrides, e.g. task.photometric_impl=handwritten")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc settings as they are (the trainer keeps freed memory: trainer/allocator.py)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    args.log_every = max(1, args.log_every)
    args.steps = -(-max(1, args.steps) // args.log_every) * args.log_every
    from trainer.allocator import keep_freed_memory
    from trainer.threads import configure_threads

    if not args.default_malloc:
        keep_freed_memory()  # as python -m trainer does
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        configure_threads(args.workers, env={})
    results = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        r = run_size(args, h, w)
        print(json.dumps(r), flush=True)
        print_table(r)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
