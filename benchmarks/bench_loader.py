"""Training-data loading per CPU core: geoprime's loader, Monodepth2's data set, a plain webdataset pipeline.

The issue's setting: the fake KITTI drive of ``bench_vs_reference.py`` (``write_fake_kitti``: textured
1242x375 JPEG frames, both cameras), every frame with both neighbours a target on both cameras (mono
+ stereo samples: t, t-1, t+1 and the other view), one torch thread, 0 workers, batch 8, samples per
CPU-second of this process. Converted once into ``--work`` with ``python -m data_shards build kitti
--resize H W`` four ways: ``--layout compact|plain`` x ``--image-format png|jpeg`` (JPEG: quality
``--jpeg-quality``, 4:4:4). Then, ``--rounds`` times (best and median printed):

* ours: ``ShardStream`` + ``build_loader`` reading the depth pre-training keys (``--lanes`` lanes),
  decode only; with the depth task's ``train_transform`` (mono_stereo: flip + colour jitter of the
  networks' frames, ``jitter_on=loader``); and with ``jitter_on=step`` (the loader flips and draws, the
  step jitters on its device: on a GPU nearly free; its CPU cost per batch is printed too); and, on the
  compact shards, with ``data.decode_on=device`` (the loader reads, header-checks and flips the geometry;
  the step decodes the batch, nvjpeg on a GPU, and jitters it);
* Monodepth2: ``monodepth2_reference.KittiRawJpegs`` (a port of its ``MonoDataset.__getitem__``:
  4 JPEGs at 1242x375 with PIL, flip, 4-scale LANCZOS chain, one ColorJitter draw on every scale and
  on the full-resolution frames, ``to_tensor``, K / inv_K per scale, stereo_T) in a DataLoader,
  shuffled, on ``--md2-samples`` samples;
* webdataset: ``webdataset.WebDataset`` over the same plain tars, ``.decode("torchrgb8")``, batched;
  decode only and with the same ``train_transform``.

Prints JSON lines, then a table with the CPU model, cores and load, and how many such cores feed a
GPU at ``--gpu-rate`` samples/s (issue 29's H100 target: 166); then the CPU ms per frame of the two
decoders (PIL, torchvision.io) and of the step-side jitter.

    .venv/bin/python benchmarks/bench_loader.py --work /tmp/bench_loader      # ~6 min on 2 shared cores
    .venv/bin/python benchmarks/bench_loader.py --work /tmp/bench_loader --rounds 1 --md2-samples 32
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_vs_reference import child_env, write_fake_kitti  # noqa: E402
from benchmarks.machine import cpu_model  # noqa: E402
from data_shards.loader import build_loader  # noqa: E402
from data_shards.stream import ShardStream, StreamConfig  # noqa: E402
from trainer.tasks.depth import DepthTask  # noqa: E402
from trainer.tasks.depth_config import DepthTaskConfig  # noqa: E402

KEYS = ("rgb", "rgb_prev", "rgb_next", "rgb_right", "K", "baseline")
FRAMES = ("rgb", "rgb_prev", "rgb_next", "rgb_right")


def cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


# --------------------------------------------------------------------------- data


def prepare(work: Path, frames: int, hw: tuple[int, int], quality: int) -> tuple[Path, list[str], dict]:
    """The raw tree, its mono+stereo split lines, and the four converted roots (built once)."""
    raw = work / "raw"
    left = write_fake_kitti(raw, frames)
    split = work / "train_lr.txt"
    lines = [f"{line.rsplit(' ', 1)[0]} {side}" for line in left.read_text().split("\n") if line for side in "lr"]
    split.write_text("\n".join(lines) + "\n")
    roots = {}
    for layout in ("compact", "plain"):
        for fmt in ("png", "jpeg"):
            # PNG folders name their rows' filter: shards of the older writer (Pillow's filters) are not reused
            out = work / (f"{layout}_{fmt}_{hw[0]}x{hw[1]}" + (f"_q{quality}" if fmt == "jpeg" else "_uprows"))
            if not (out / "train" / "manifest.json").exists():
                subprocess.run([sys.executable, "-m", "data_shards", "build", "kitti", "--root", str(raw), "--out",
                                str(out), "--split", f"train={split}", "--resize", str(hw[0]), str(hw[1]), "--layout",
                                layout, "--image-format", fmt, "--jpeg-quality", str(quality), "--no-progress"],
                               check=True, cwd=ROOT, env=child_env(), capture_output=True)
            m = json.loads((out / "train" / "manifest.json").read_text())
            roots[(layout, fmt)] = (out, sum(s["bytes"] for s in m["shards"]) / m["num_samples"])
    return raw, lines, roots


def depth_task(jitter_on: str) -> DepthTask:
    return DepthTask(DepthTaskConfig(supervision="mono_stereo", jitter_on=jitter_on), None)


# --------------------------------------------------------------------------- the three loaders


def ours(root: Path, transform, lanes: int, batch: int, decode_on: str = "loader") -> float:
    """Samples per CPU-second of one epoch of our loader (0 workers)."""
    loader = build_loader(ShardStream(StreamConfig(str(root), "train", keys=KEYS, lanes=lanes, decode_on=decode_on,
                                                   transform=transform)), batch)
    n, c = 0, cpu_seconds()
    for b in loader:
        n += len(b["__key__"])
    return n / max(cpu_seconds() - c, 1e-9)


def step_jitter_ms(root: Path, lanes: int, batch: int, batches: int = 8, decode_on: str = "loader") -> float:
    """CPU ms per batch of ``DepthTask.augmented`` (the step-side jitter; ``decode_on=device``: decode and
    jitter), over the first batches."""
    task = depth_task("step")
    loader = build_loader(ShardStream(StreamConfig(str(root), "train", keys=KEYS, lanes=lanes, decode_on=decode_on,
                                                   transform=task.train_transform)), batch)
    got = []
    for b in loader:
        got.append(b)
        if len(got) == batches:
            break
    c = cpu_seconds()
    for b in got:
        task.augmented(b)
    return (cpu_seconds() - c) * 1e3 / len(got)


def monodepth2(raw: Path, lines: list[str], hw: tuple[int, int], batch: int, samples: int) -> float:
    """Samples per CPU-second of the port of Monodepth2's KITTI data set (mono + stereo frames)."""
    from benchmarks.monodepth2_reference import KittiRawJpegs

    dataset = KittiRawJpegs(str(raw), lines[:samples], hw[0], hw[1], frame_ids=(0, -1, 1, "s"), full_res=True)
    loader = torch.utils.data.DataLoader(dataset, batch, shuffle=True, num_workers=0, drop_last=False)
    n, c = 0, cpu_seconds()
    for b in loader:
        n += b[("color", 0, 0)].shape[0]
    return n / max(cpu_seconds() - c, 1e-9)


def webdataset_rate(root: Path, ext: str, transform, batch: int) -> float:
    """Samples per CPU-second of a plain webdataset pipeline over the plain tars, decoding the same members."""
    import webdataset as wds

    def to_sample(s: dict) -> dict:
        out = {"__key__": s["__key__"], **{k: s[f"{k}.{ext}"] for k in FRAMES},
               "K": torch.tensor(s["json"]["K"], dtype=torch.float32),
               "baseline": torch.tensor(float(s["json"]["baseline_m"]), dtype=torch.float32)}
        if transform is not None:
            g = torch.Generator().manual_seed(hash(s["__key__"]) & 0xFFFFFFFF)
            out = transform(out, g)
        return out

    urls = sorted(glob.glob(str(root / "train" / "*.tar")))
    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("torchrgb8").map(to_sample)
    n, c = 0, cpu_seconds()
    for b in pipeline.batched(batch):
        n += len(b["__key__"]) if isinstance(b, dict) else len(b[0])
    return n / max(cpu_seconds() - c, 1e-9)


def frame_bytes(root: Path, n: int = 40) -> list[bytes]:
    """The first ``n`` stored frames of a compact split (their members' bytes, by the manifest's offsets)."""
    m = json.loads((root / "train" / "manifest.json").read_text())
    out = []
    for shard in m["shards"]:
        with open(root / "train" / shard["name"], "rb") as f:
            for _name, offset, size, _crc in shard["frames"]:
                f.seek(offset)
                out.append(f.read(size))
                if len(out) == n:
                    return out
    return out


def decoder_ms(root: Path, jpeg: bool) -> dict[str, float]:
    """CPU ms per frame (best of 3 passes over 40 frames): PIL (to a (3, H, W) tensor) vs ours (torchvision.io)."""
    import io

    import numpy as np
    from PIL import Image

    from data_shards.schema import decode_rgb

    data = frame_bytes(root)
    pil = lambda d: torch.from_numpy(np.ascontiguousarray(np.array(Image.open(io.BytesIO(d)).convert("RGB"))  # noqa: E731
                                                          .transpose(2, 0, 1)))
    out = {}
    for name, fn in (("PIL", pil), ("torchvision.io", lambda d: decode_rgb(d, jpeg=jpeg))):
        best = float("inf")
        for _ in range(3):
            c = cpu_seconds()
            for d in data:
                fn(d)
            best = min(best, (cpu_seconds() - c) * 1e3 / len(data))
        out[name] = best
    return out


# --------------------------------------------------------------------------- main


def measurements(a, raw, lines, roots) -> dict[str, callable]:
    """name -> zero-argument measurement (samples per CPU-second)."""
    hw = (a.height, a.width)
    loader_jitter, step_jitter = depth_task("loader").train_transform, depth_task("step").train_transform
    out = {}
    for (layout, fmt), (root, _) in roots.items():
        tag = f"{layout} {fmt}"
        out[f"ours {tag}: decode"] = lambda r=root: ours(r, None, a.lanes, a.batch)
        out[f"ours {tag}: + flip, jitter in loader"] = lambda r=root: ours(r, loader_jitter, a.lanes, a.batch)
        out[f"ours {tag}: + flip, jitter in step"] = lambda r=root: ours(r, step_jitter, a.lanes, a.batch)
        if layout == "compact":
            out[f"ours {tag}: read, flip; decode, jitter on device"] = \
                lambda r=root: ours(r, step_jitter, a.lanes, a.batch, "device")
        if layout == "plain":
            ext = "png" if fmt == "png" else "jpg"
            out[f"webdataset {tag}: decode"] = lambda r=root, e=ext: webdataset_rate(r, e, None, a.batch)
            out[f"webdataset {tag}: + flip, jitter"] = lambda r=root, e=ext: webdataset_rate(r, e, loader_jitter, a.batch)
    out["monodepth2 jpeg files: its __getitem__"] = lambda: monodepth2(raw, lines, hw, a.batch, a.md2_samples)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bench_loader", help="work folder (raw tree and shards, reused)")
    p.add_argument("--frames", type=int, default=182, help="frames per camera (182: 360 mono+stereo samples)")
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--lanes", type=int, default=10, help="data.lanes (10: lanes of ~36 samples, as on Eigen-Zhou)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--md2-samples", type=int, default=96, help="samples Monodepth2's data set loads per round")
    p.add_argument("--gpu-rate", type=float, default=166.0, help="samples/s a GPU trains at (cores needed)")
    p.add_argument("--json", help="also write the best rate of each loader here (samples per CPU-s)")
    a = p.parse_args()
    torch.set_num_threads(1)
    raw, lines, roots = prepare(Path(a.work), a.frames, (a.height, a.width), a.jpeg_quality)
    for (layout, fmt), (root, per_sample) in roots.items():
        print(json.dumps({"shards": str(root), "layout": layout, "image_format": fmt,
                          "KiB_per_sample": round(per_sample / 1024, 1)}), flush=True)
    runs = measurements(a, raw, lines, roots)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(a.rounds):
        for name, fn in (runs.items() if r % 2 == 0 else reversed(runs.items())):  # ABBA against drift
            rates[name].append(fn())
            print(json.dumps({"round": r, "what": name, "samples_per_cpu_s": round(rates[name][-1], 1),
                              "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
    jitter_ms = step_jitter_ms(roots[("compact", "png")][0], a.lanes, a.batch)
    decode_ms = {fmt: step_jitter_ms(roots[("compact", fmt)][0], a.lanes, a.batch, decode_on="device") - jitter_ms
                 for fmt in ("png", "jpeg")}
    md2 = max(rates["monodepth2 jpeg files: its __getitem__"])
    print(f"\n# {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (shared machine), "
          f"torch threads 1, batch {a.batch}, {len(lines)} mono+stereo samples at {a.height}x{a.width}")
    print(f"{'loader':<48} {'best':>7} {'median':>7} {'x md2':>6} {'cores for ' + str(int(a.gpu_rate)) + '/s':>14}")
    for name, got in rates.items():
        best = max(got)
        print(f"{name:<48} {best:>7.1f} {statistics.median(got):>7.1f} {best / md2:>6.1f} {a.gpu_rate / best:>14.2f}")
    for fmt in ("png", "jpeg"):
        ms = decoder_ms(roots[("compact", fmt)][0], jpeg=fmt == "jpeg")
        print(f"# decoding one {a.height}x{a.width} {fmt} frame: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    print(f"# jitter in step on this CPU (1 thread): {jitter_ms:.1f} ms per batch of {a.batch} "
          f"({jitter_ms / a.batch:.2f} ms per sample); on a GPU it is a few kernels per batch")
    print(f"# decode in step on this CPU (1 thread, data.decode_on=device): " + ", ".join(
        f"{fmt} {ms:.1f} ms per batch" for fmt, ms in decode_ms.items()) + "; on a GPU JPEG is one nvjpeg call per key")
    if a.json:
        Path(a.json).write_text(json.dumps({"best_samples_per_cpu_s": {k: max(v) for k, v in rates.items()},
                                            "rounds": a.rounds, "load_avg_1min": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
