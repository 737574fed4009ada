"""Small hand-built samples and shard folders for the data-layer tests (no synthetic world needed).

Values are random but seeded per sample, with 16-bit depth and float flow, so a round trip
checks every bit that matters. Import as ``from shard_fixtures import ...`` (tests/ is on the path).
"""
from __future__ import annotations

from functools import partial
from typing import Iterable

import numpy as np

from data_shards.writer import write_split_parallel

K = [[20.0, 0.0, 6.0], [0.0, 20.0, 4.0], [0.0, 0.0, 1.0]]


def make_sample(i: int, h: int = 8, w: int = 12) -> dict:
    """Sample ``i``: rgb, rgb_right, depth (exactly representable at 1/256 m), seg, flow, meta."""
    g = np.random.default_rng(1000 + i)
    depth = g.integers(1, 65535, (h, w)).astype(np.float64) / 256.0
    depth[0, :3] = 0.0  # invalid pixels stay 0
    return {
        "__key__": f"seq{i // 10:03d}_f{i:06d}",
        "rgb": g.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "rgb_right": g.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "depth": depth,
        "seg": np.where(g.random((h, w)) < 0.1, 255, g.integers(0, 19, (h, w))).astype(np.uint8),
        "flow": g.normal(scale=5.0, size=(h, w, 3)).astype(np.float32),
        "meta": {"source": {"dataset": "test", "index": i}, "K": K, "baseline_m": 0.54},
    }


def samples(n: int, start: int = 0) -> Iterable[dict]:
    """``n`` consecutive samples."""
    return (make_sample(i) for i in range(start, start + n))


def build(root: str, split: str, counts: list[int]) -> str:
    """Write a split whose shards hold exactly ``counts`` samples (uneven shards allowed).

    Uses the chunked writer so each count becomes one shard; returns ``root``.
    """
    starts = np.cumsum([0] + counts)
    chunks = [partial(_chunk, int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    write_split_parallel(chunks, root, split, source={"dataset": "test", "counts": counts}, progress=False)
    return root


def _chunk(a: int, b: int) -> list[dict]:
    return [make_sample(i) for i in range(a, b)]


def all_keys(counts: list[int]) -> list[str]:
    """Every sample key of a split built by :func:`build`."""
    return [make_sample(i, 1, 1)["__key__"] for i in range(sum(counts))]

