"""Streaming throughput of ShardStream + ResumableLoader (decode included), in samples/s per core.

Uses the synthetic shards at ``--root`` (build them with ``python -m data_shards build synthetic``),
or, without ``--root``, renders a small synthetic train split into a temporary folder first.
Prints one line per configuration; nothing is asserted (numbers go in docs/data.md).

    .venv/bin/python benchmarks/bench_stream.py [--root data/synthetic] [--workers 0 2] [--epochs 2]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data_shards.assemble import assemble  # noqa: E402
from data_shards.loader import build_loader  # noqa: E402
from data_shards.stream import Plan, ShardStream, StreamConfig  # noqa: E402

KEYSETS = {
    "all": None,
    "depth-pretrain": ("rgb", "rgb_prev", "rgb_next", "rgb_right", "K", "baseline"),
    "segmentation": ("rgb", "seg"),
}


def ensure_shards(root: str | None, sequences: int) -> str:
    """``root``, or a fresh temporary synthetic train split of ``sequences`` sequences."""
    if root:
        return root
    from data_shards.__main__ import main

    root = os.path.join(tempfile.mkdtemp(prefix="bench_stream_"), "synthetic")
    t = time.perf_counter()
    main(["build", "synthetic", "--out", root, "--splits", "train", "--sequences", f"train={sequences}",
          "--workers", "2", "--no-progress"])
    print(f"# rendered {root} in {time.perf_counter() - t:.1f} s")
    return root


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(root: str, split: str, keys, workers: int, batch: int, epochs: int) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds) for ``epochs`` full epochs, worker start-up included."""
    loader = build_loader(ShardStream(StreamConfig(root, split, keys=keys)), batch, num_workers=workers)
    n, t, c = 0, time.perf_counter(), _cpu_seconds()
    for _ in range(epochs):
        for b in loader:
            n += len(b["__key__"])
    return n, time.perf_counter() - t, _cpu_seconds() - c


def assembly_cost(root: str, split: str, batch: int, workers: int = 2) -> tuple[float, float]:
    """(CPU ms, MiB) of putting one batch (all keys) together from ``workers`` workers' shares: the
    one copy per batch that makes batches independent of the worker count (measured in-process)."""
    stream = ShardStream(StreamConfig(root, split))
    shares = [list(stream.iter_partials(Plan(batch, False, workers), w, workers)) for w in range(workers)]
    steps = [[share[t] for share in shares] for t in range(len(shares[0]))]
    t = time.process_time()
    out = [assemble(parts) for parts in steps]
    ms = (time.process_time() - t) * 1e3 / len(steps)
    mib = sum(v.numel() * v.element_size() for v in out[0].values() if isinstance(v, torch.Tensor)) / 2**20
    return ms, mib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="shard root holding <split>/manifest.json")
    p.add_argument("--split", default="train")
    p.add_argument("--sequences", type=int, default=4, help="sequences to render when --root is not given")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process (workers use 1)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    root = ensure_shards(a.root, a.sequences)
    stream = ShardStream(StreamConfig(root, a.split))
    m = stream.manifest
    print(f"# {root}/{a.split}: {m.num_samples} samples, {len(m.shards)} shards, "
          f"{sum(s.bytes for s in m.shards) / 2**20:.1f} MiB, source resolution {m.source.get('resolution')}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print("# samples/s: wall clock; per core: samples per CPU-second (this process + DataLoader workers),")
    print("# which stays meaningful on a shared, loaded machine")
    print(f"{'keys':<16} {'workers':>7} {'samples':>8} {'wall s':>7} {'cpu s':>7} {'samples/s':>10} {'per core':>9}")
    for name, keys in KEYSETS.items():
        for w in a.workers:
            n, wall, cpu = measure(root, a.split, keys, w, a.batch_size, a.epochs)
            print(f"{name:<16} {w:>7} {n:>8} {wall:>7.2f} {cpu:>7.2f} {n / wall:>10.1f} {n / cpu:>9.1f}")
    ms, mib = assembly_cost(root, a.split, a.batch_size)
    print(f"# a batch of {a.batch_size} (all keys) put together from 2 workers' shares: {ms:.2f} ms CPU, {mib:.1f} MiB copied")


if __name__ == "__main__":
    main()
