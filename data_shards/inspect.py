"""Look at a split: counts, keys, sizes, and a PNG contact sheet of a few samples.

The sheet has one row per sample: the RGB frame, depth through a colour map (teal where
invalid: ``palette.NO_DEPTH_COLOR``), and the segmentation in the Cityscapes colours (black = ignore). Also ``verify``:
checksums plus a full decode of every sample, naming the first bad shard and member.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from data_shards import palette, schema
from data_shards.frames import attach_frames, layout_problems
from data_shards.manifest import MANIFEST_NAME, Manifest
from data_shards.openers import OpenError, is_remote, join, open_stream
from data_shards.reader import ShardError, iter_members
from data_shards.stages import check_members
from data_shards.stream import load_manifest

def split_location(path: str) -> tuple[str, str]:
    """``DIR/SPLIT`` (or ``URL/SPLIT``) -> (root, split)."""
    p = path.rstrip("/")
    if "/" not in p:
        raise ValueError(f"{path!r}: expected DIR/SPLIT, e.g. data/synthetic/train")
    root, split = p.rsplit("/", 1)
    return root or "/", split


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) metres -> uint8 RGB with the magma map on inverse depth, its 1st..99th percentiles
    stretched to the whole map; invalid (0) is teal (``palette.NO_DEPTH_COLOR``, not a magma colour)."""
    valid = depth > 0
    lo, hi = np.percentile(1.0 / depth[valid].astype(np.float64), [1, 99]) if valid.any() else (0.0, 1.0)
    return palette.inverse_depth_colors(depth, valid, vmax=float(hi), vmin=float(lo))


def colorize_seg(seg: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> uint8 RGB in the Cityscapes colours; ignore (255) and unknown ids black."""
    return palette.label_colors(seg, unknown="black")


def contact_sheet(samples: list[dict[str, Any]]) -> np.ndarray:
    """One row per decoded sample: rgb | depth | seg (the panels it has), uint8 (H', W', 3)."""
    rows = []
    for s in samples:
        panels = [s["rgb"].permute(1, 2, 0).numpy()]
        if "depth" in s:
            panels.append(colorize_depth(s["depth"][0].numpy()))
        if "seg" in s:
            panels.append(colorize_seg(s["seg"].numpy()))
        h = panels[0].shape[0]
        sep = np.full((h, 4, 3), 255, np.uint8)
        row = np.concatenate([x for p in panels for x in (p, sep)][:-1], axis=1)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def summarize(m: Manifest) -> dict[str, Any]:
    """Counts, keys and sizes of a split, from its manifest."""
    info = {"split": m.split, "samples": m.num_samples, "shards": len(m.shards),
            "bytes": sum(s.bytes for s in m.shards), "keys": m.keys, "meta_fields": m.meta_fields,
            "min_shard": min(s.count for s in m.shards), "max_shard": max(s.count for s in m.shards),
            "source": m.source, "layout": "compact" if m.compact else "plain"}
    if m.compact:  # frames stored vs the images the samples hold (what a plain layout would store)
        info["frames_stored"] = sum(len(s.frames) for s in m.shards)
        info["images_referenced"] = sum(i >= 0 for s in m.shards for r in s.refs for i in r)
    return info


def inspect_split(path: str, out_png: str | None, n: int = 4) -> dict[str, Any]:
    """Summary of ``DIR/SPLIT``; with ``out_png``, also write a contact sheet of ``n`` samples."""
    from data_shards.stream import ShardStream, StreamConfig

    root, split = split_location(path)
    m = load_manifest(root, split)
    info = summarize(m)
    if out_png and n > 0 and not {"rgb.png", "rgb.jpg"} & set(m.keys):
        info["contact_sheet"] = None  # nothing to show without an RGB frame in every sample
    elif out_png and n > 0:
        stream = ShardStream(StreamConfig(root, split, shuffle=False, keys=[k for k in ("rgb", "depth", "seg")
                                                                 if {f"{k}.png", f"{k}.jpg"} & set(m.keys)]))
        picked = []
        for s in stream:
            picked.append(s)
            if len(picked) == n:
                break
        Image.fromarray(contact_sheet(picked)).save(out_png)
        info["contact_sheet"] = out_png
    return info


@dataclass
class VerifyReport:
    """Result of :func:`verify_split`: counts and one line per problem found."""

    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Things worth knowing that are not problems (e.g. a manifest without member checksums)."""
    adaptive_png_rows: str = ""
    """The first sample whose RGB PNG rows are not all Up-filtered (older writer), if any."""

    @property
    def ok(self) -> bool:
        return not self.problems


def _digest(url: str) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    f = open_stream(url)
    try:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    finally:
        f.close()
    return size, h.hexdigest()


def verify_split(path: str, on_shard: Optional[Callable[[Manifest, VerifyReport], None]] = None) -> VerifyReport:
    """Check every shard's size and sha256 against the manifest and decode every sample;
    ``on_shard(manifest, report)`` after each shard (progress)."""
    root, split = split_location(path)
    m = load_manifest(root, split)
    rep = VerifyReport()
    for s in m.shards:
        _verify_shard(join(root, split, s.name), s, m, rep)
        if on_shard is not None:
            on_shard(m, rep)
    if m.num_samples == 0:
        rep.problems.append(f"{join(root, split, MANIFEST_NAME)}: the split is empty (no samples)")
    if m.shards and not any(s.crc32 for s in m.shards):
        rep.notes.append("the manifest has no member checksums (built before they existed): "
                         "rebuild the shards so that readers can detect corrupt members")
    if rep.adaptive_png_rows:
        rep.notes.append(f"{rep.adaptive_png_rows}: RGB PNGs with Pillow's adaptive row filters (written before "
                         "the Up-filter writer of 2026-12): the same pixels, ~2x slower to decode than the PNGs "
                         "`data_shards build` writes now; delete the split's folder and build it again for a "
                         "faster loader (docs/data.md)")
    extra = _unlisted_shards(root, split, m)
    rep.problems += [f"{p}: shard not listed in the manifest (left over from another build?)" for p in extra]
    return rep


def _verify_shard(url: str, s: Any, m: Manifest, rep: VerifyReport) -> None:
    """One shard: its bytes against the manifest, then every sample (see :func:`_verify_sample`)."""
    rep.shards += 1
    try:
        size, digest = _digest(url)
    except (OpenError, OSError) as e:
        rep.problems.append(f"{url}: cannot read ({e})")
        return
    if size != s.bytes or digest != s.sha256:
        rep.problems.append(f"{url}: checksum mismatch (size {size}, manifest {s.bytes}; "
                            f"sha256 {digest[:12]}..., manifest {s.sha256[:12]}...)")
    try:
        # one index past the manifest's count: a shard holding more samples than it says is found
        # (compact shards: what follows the records is checked against the frame list instead)
        records = iter_members(url, range(s.count + (0 if m.compact else 1)), s.count)
        if m.compact:
            records = attach_frames(url, s, m.frame_slots, range(s.count), records)
        for j, raw in records:
            if j >= s.count:
                rep.problems.append(f"{url}: holds more samples than the manifest's count {s.count} "
                                    f"(sample {raw['__key__']} is never read)")
                break
            _verify_sample(url, raw, s.crc32[j] if s.crc32 else None, m, rep)
    except ShardError as e:  # the tar itself is broken: the rest of the shard is unreadable
        rep.problems.append(str(e))
    if m.compact and s.count:
        rep.problems += layout_problems(url, s)


def _verify_sample(url: str, raw: dict, crc32: dict | None, m: Manifest, rep: VerifyReport) -> None:
    """Members present, checksums equal, sample decodes; a bad sample is reported, the shard goes on."""
    missing = sorted(set(m.keys) - raw.keys())
    try:
        if missing:
            raise schema.SchemaError(f"{url}: sample {raw['__key__']}: members {missing} missing")
        if crc32:
            check_members({**raw, "__crc32__": crc32})
        schema.decode_sample({k: v for k, v in raw.items() if k != "__url__"}, where=url,
                             image_hw=schema.declared_image_hw(m.source))
        rep.samples += 1
        if rep.samples == 1 and "rgb.png" in raw and schema.rgb_png_row_filters(raw["rgb.png"]) - {2}:
            rep.adaptive_png_rows = f"{url}: sample {raw['__key__']}"  # the first sample tells the writer
    except (schema.SchemaError, ShardError) as e:
        rep.problems.append(str(e))


def _unlisted_shards(root: str, split: str, m: Manifest) -> list[str]:
    """Local ``.tar`` files in the split folder that the manifest does not list."""
    if is_remote(root):
        return []
    d = os.path.join(root, split)
    listed = {s.name for s in m.shards}
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".tar") and f not in listed)

