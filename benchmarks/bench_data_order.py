"""Batch diversity, read amplification and memory of the data order on the Eigen-Zhou KITTI split.

Simulates one epoch of Monodepth2's Eigen-Zhou train split (39,810 targets, 32 drives; the
structure is embedded in ``benchmarks/eigen_zhou.py``, no download) cut into 256-sample shards the
way ``python -m data_shards build kitti`` cuts them: compact (sorted by drive, frame, side: each
shard holds runs of consecutive frames) and plain (the split file's shuffled order). The epoch's
batches come from the project's own plan code (``data_shards.epoch_order`` + ``data_shards.deal``;
``tests/test_stream_order.py`` checks they are exactly the loader's batches on fake KITTI), and
the reads from the project's own lane reader (``data_shards.lanes``) over a byte source that
serves every record and frame without storage, so frames read and frames held are counted as
the stream counts them. Prints:

* drives per batch, % of batches from a single drive, share of the batch from its top drive,
  for Monodepth2's random sampler and for plain and compact shards at each world size (batches do
  not depend on the worker count);
* per (world size, workers): frames read per frame needed (read amplification) and the peak
  frames held per consumer, in MiB at 96x320 and 192x640 (PNG size of a textured frame).

    .venv/bin/python benchmarks/bench_data_order.py                 # 0.5-7 min on 2 shared cores
    .venv/bin/python benchmarks/bench_data_order.py --world 1 64 --workers 0 8
"""
from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.eigen_zhou import samples as eigen_zhou_samples  # noqa: E402
from data_shards import schema  # noqa: E402
from data_shards.deal import deal, epoch_steps  # noqa: E402
from data_shards.epoch_order import DEFAULT_LANES, epoch_order  # noqa: E402
from data_shards.handles import HandlePool  # noqa: E402
from data_shards.lanes import LaneReader  # noqa: E402
from data_shards.manifest import COMPACT_FORMAT, FrameInfo, Manifest, ShardInfo  # noqa: E402
from data_shards.stream import group_positions  # noqa: E402

SHARD = 256
CAMERA = {"l": 2, "r": 3}


def cut_shards(samples: list[tuple[str, int, str]], layout: str, seed: int = 0) -> list[list[int]]:
    """Sample ids per shard: compact = sorted order, plain = the split file's (shuffled) order."""
    ids = np.arange(len(samples)) if layout == "compact" else np.random.default_rng(seed).permutation(len(samples))
    return [ids[i:i + SHARD].tolist() for i in range(0, len(ids), SHARD)]


def frames_of(sample: tuple[str, int, str]) -> list[tuple[str, int, int]]:
    """The frames a depth pre-training sample uses: t-1, t, t+1 of its camera and t of the other."""
    drive, f, side = sample
    other = "r" if side == "l" else "l"
    return [(drive, f, CAMERA[side]), (drive, f - 1, CAMERA[side]), (drive, f + 1, CAMERA[side]),
            (drive, f, CAMERA[other])]


def _record() -> bytes:
    """One sample record as a shard holds it (a tar member), served for every record read."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("x.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return buf.getvalue()[:1024]


RECORD = _record()


def manifest_of(samples: list, shards: list[list[int]], compact: bool) -> Manifest:
    """A manifest of the simulated shards: 1 KiB records, frames of 1 byte (counted, not sized)."""
    infos = []
    for k, ids in enumerate(shards):
        offsets = tuple(len(RECORD) * j for j in range(len(ids)))
        frames: tuple = ()
        refs: tuple = ()
        if compact:
            names = sorted({fr for i in ids for fr in frames_of(samples[i])})
            index = {fr: n for n, fr in enumerate(names)}
            start = len(RECORD) * len(ids) + 512
            frames = tuple(FrameInfo(f"f{n}.png", start + 1024 * n, 1, "0") for n in range(len(names)))
            refs = tuple(tuple(index[fr] for fr in frames_of(samples[i])) for i in ids)
        end = frames[-1].offset + 1024 if frames else len(RECORD) * len(ids) + 1024
        infos.append(ShardInfo(f"s{k:06d}.tar", len(ids), end, "", offsets, (), frames, refs))
    slots = ["rgb.png", "rgb_prev.png", "rgb_next.png", "rgb_right.png"] if compact else []
    return Manifest("train", infos, list(schema.IMAGE_KEYS), [], {}, format=COMPACT_FORMAT if compact else
                    "geoprime-shards/1", frame_slots=slots)


class ServedPool(HandlePool):
    """A handle pool whose bytes come from memory: each shard's records region holds :data:`RECORD`
    once per sample (``records_end``: url -> its end), everything after it zeros (frames)."""

    def __init__(self, records_end: dict[str, int]):
        super().__init__()
        self.records_end = records_end
        self.records = 0

    def read(self, url, key, start, size, shard_bytes, end=None) -> bytes:
        self.stats.bytes_read += size
        stop = min(start + size, self.records_end[url])
        if stop <= start:
            return bytes(size)
        self.records += start % len(RECORD) == 0  # a record's first header
        first = start - start % len(RECORD)
        data = RECORD * ((stop - first) // len(RECORD) + 1)
        return data[start - first:stop - first] + bytes(size - (stop - start))


def drive_stats(drive: np.ndarray, batches: list[np.ndarray]) -> tuple[float, float, float]:
    """(mean drives per batch, % batches from one drive, mean share of the batch's top drive)."""
    n, single, top = [], 0, []
    for b in batches:
        c = Counter(drive[b].tolist())
        n.append(len(c))
        single += len(c) == 1
        top.append(max(c.values()) / len(b))
    return float(np.mean(n)), 100.0 * single / len(batches), float(np.mean(top))


def plan_batches(order, world: int, batch: int) -> list[np.ndarray]:
    """Every rank's batch of every step of a training epoch (drop_last, tail drop), as base ids."""
    dealt = deal(order, epoch_steps(order.n, 0, world, batch, True, "drop"), 0)
    out = []
    for r in range(world):
        out += [order.base_index(p) for p in dealt.positions(r)]
    return out


def read_epoch(manifest: Manifest, order, world: int, workers: int, batch: int) -> dict[str, float]:
    """Frames read and held per consumer when every (rank, worker) reads its share of one epoch."""
    dealt = deal(order, epoch_steps(order.n, 0, world, batch, True, "drop"), workers)
    urls = [s.name for s in manifest.shards]
    exts = frozenset(manifest.keys) | {"json"}
    read, records, peaks = 0, 0, []
    for r in range(world):
        for w in range(max(1, workers)):
            per_step = dealt.positions(r, w)
            groups, keys = group_positions(order, per_step)
            pool = ServedPool({s.name: len(RECORD) * s.count for s in manifest.shards})
            reader = LaneReader(manifest, urls, exts, "raise", pool, groups)
            for key in keys:
                reader.next(key)
            reader.close()
            read += pool.stats.frames_read
            records += pool.records
            peaks.append(pool.stats.peak_held_frames)
    if not manifest.compact:  # a plain sample holds its images: each sample read once is no amplification
        return {"amplification": records / len(dealt.pos), "peak_frames": 0, "mean_peak": 0.0}
    used = {(int(s), i) for s, m in zip(*order.samples(dealt.pos)) for i in manifest.shards[s].refs[m]}
    return {"amplification": read / len(used), "peak_frames": max(peaks), "mean_peak": float(np.mean(peaks))}


def frame_png_bytes(h: int, w: int) -> int:
    """PNG bytes of one textured frame at h x w (the fake KITTI frames of bench_vs_reference)."""
    from PIL import Image

    from benchmarks.bench_vs_reference import _texture

    img = _texture(np.random.default_rng(0), 375, 1242)
    small = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    return len(schema.encode_rgb(small, "frame", "rgb"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 8, 64])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8])
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--lanes", type=int, default=DEFAULT_LANES)
    p.add_argument("--epoch", type=int, default=0)
    a = p.parse_args()
    samples = eigen_zhou_samples()
    names = sorted({d for d, _, _ in samples})
    drive = np.array([names.index(d) for d, _, _ in samples])
    t0 = time.perf_counter()
    print(f"# Eigen-Zhou train: {len(samples)} samples, {len({d for d, _, _ in samples})} drives; batch {a.batch}, "
          f"lanes {a.lanes}, epoch {a.epoch}; {SHARD}-sample shards")
    print(f"{'sampler':<34} {'W':>3} {'drives/batch':>12} {'single-drive %':>14} {'top-drive share':>15}")
    rand = np.random.default_rng(a.epoch).permutation(len(samples))
    mono = [rand[i:i + a.batch] for i in range(0, len(rand) - a.batch + 1, a.batch)]
    print(f"{'Monodepth2 (random over the split)':<34} {'any':>3} {'%12.2f %14.1f %15.2f' % drive_stats(drive, mono)}")
    sims = {}
    for layout in ("plain", "compact"):
        shards = cut_shards(samples, layout)
        ids = np.concatenate([np.array(s) for s in shards])
        order = epoch_order([len(s) for s in shards], seed=0, epoch=a.epoch, shuffle=True, lanes=a.lanes)
        base_ids = ids[np.cumsum([0] + [len(s) for s in shards])[order.shard] + order.member]
        sims[layout] = (shards, order)
        for w in a.world:
            batches = [base_ids[b] for b in plan_batches(order, w, a.batch)]
            print(f"{layout + ' shards, lanes ' + str(a.lanes):<34} {w:>3} "
                  f"{'%12.2f %14.1f %15.2f' % drive_stats(drive, batches)}")
    sizes = {hw: frame_png_bytes(*hw) for hw in ((96, 320), (192, 640))}
    print(f"# frame PNG bytes: {', '.join(f'{h}x{w} {b / 1024:.0f} KiB' for (h, w), b in sizes.items())}")
    print(f"{'layout':<8} {'W':>3} {'workers':>7} {'read ampl.':>10} {'peak frames/consumer':>20} "
          f"{'MiB 96x320':>10} {'MiB 192x640':>11}")
    for layout, (shards, order) in sims.items():
        m = manifest_of(samples, shards, layout == "compact")
        for w in a.world:
            for nw in a.workers:
                r = read_epoch(m, order, w, nw, a.batch)
                mib = [r["peak_frames"] * b / 2**20 for b in sizes.values()]
                print(f"{layout:<8} {w:>3} {nw:>7} {r['amplification']:>10.3f} {r['peak_frames']:>20d} "
                      f"{mib[0]:>10.1f} {mib[1]:>11.1f}", flush=True)
    print(f"# {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
