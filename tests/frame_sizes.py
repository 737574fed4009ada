"""Splits whose frames come in several sizes, as KITTI's Eigen test split: its five capture dates'
sizes in file order, with the frame counts scaled down keeping the pattern (helpers for tests).

Import as ``from frame_sizes import ...`` (tests/ is on the path).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

#: The Eigen test split's five frame sizes (height, width) and frame counts, in the file's order.
EIGEN_SIZES = [(375, 1242), (370, 1224), (374, 1238), (370, 1226), (376, 1241)]
EIGEN_COUNTS = [522, 25, 25, 75, 50]
#: The counts divided by 50 (rounded, at least 1): 10 / 1 / 1 / 2 / 1, 15 frames, the big first date first.
SCALED_COUNTS = [max(1, round(c / 50)) for c in EIGEN_COUNTS]
#: Five small sizes with the same pattern: all distinct, all padded to one multiple of 32 (96x96),
#: as the five real sizes all pad to 384x1248.
SMALL_SIZES = [(75, 92), (70, 74), (74, 88), (70, 76), (76, 91)]


def frame_sizes(sizes=EIGEN_SIZES, counts=SCALED_COUNTS) -> list[tuple[int, int]]:
    """The size of every frame of the split, in file order."""
    return [size for size, n in zip(sizes, counts) for _ in range(n)]


def frame_sample(i: int, hw: tuple[int, int], seg_classes: int = 5) -> dict:
    """Sample ``i`` at size ``hw``: rgb, LiDAR-like sparse depth (0 = none), seg labels, meta."""
    g = np.random.default_rng(7000 + i)
    h, w = hw
    depth = np.where(g.random((h, w)) < 0.3, np.round(g.uniform(2.0, 79.0, (h, w)) * 256) / 256, 0.0)
    depth[: h // 3] = 0.0  # nothing above the horizon
    return {"__key__": f"date{hw[0]}x{hw[1]}_f{i:04d}",
            "rgb": g.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "depth": depth,
            "seg": g.integers(0, seg_classes, (h, w)).astype(np.uint8),
            "meta": {"source": {"dataset": "test", "index": i},
                     "K": [[0.58 * w, 0.0, w / 2], [0.0, 1.92 * h, h / 2], [0.0, 0.0, 1.0]], "baseline_m": 0.54}}


def write_frames(root: Path, split: str, sizes: list[tuple[int, int]], start: int = 0) -> Path:
    """Write ``split`` under ``root`` with one frame per entry of ``sizes`` (file order kept)."""
    from data_shards.writer import write_split

    samples = (frame_sample(start + i, hw) for i, hw in enumerate(sizes))
    write_split(samples, str(root), split, source={"dataset": "test", "sizes": [list(s) for s in sizes]},
                progress=False)
    return root
