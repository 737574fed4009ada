"""The one palette and the colour maps every picture of the project uses.

- :data:`CITYSCAPES_PALETTE`, :func:`label_lut`, :func:`label_colors`: train id -> colour (Cityscapes'
  official colours for 0..18, fixed distinct colours for other ids or black, 255 = ignore always black);
- :func:`colormap`: values in [0, 1] -> uint8 RGB through a matplotlib colour map (magma by default);
- :func:`inverse_depth_colors`: depth -> magma map of inverse depth (near = bright, Monodepth2's
  display), pixels without a measurement in :data:`NO_DEPTH_COLOR` (teal: magma has no such colour,
  so "no measurement" never reads as "far", which is black);
- :func:`flow_to_color`: optical flow -> hue = direction, brightness = magnitude; pixels without a
  measurement in :data:`NO_FLOW_COLOR` (grey: the flow map's colours are all saturated);
- :data:`SERIES_COLORS`, :func:`series_color`: one distinct colour per compared series (a study's
  pre-training rows), shared by MLflow's run colours and the comparison chart.

It lives in ``data_shards`` because the shard inspector's contact sheet draws with it and
``data_shards`` never imports ``trainer``; ``trainer.tasks.visuals`` imports it from here, so a class has
the same colour in a contact sheet, a segmentation overlay and a legend. matplotlib is imported
only when a colour map is drawn.
"""
from __future__ import annotations

import numpy as np

#: Cityscapes colours per train id (for overlays); 255 (ignore) is drawn black.
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)
#: Colour of depth pixels without a measurement: far from every colour of the magma map (whose dark
#: end, black, means "far").
NO_DEPTH_COLOR = (0, 170, 170)
#: Colour of flow pixels without a measurement (zero flow is black in :func:`flow_to_color`).
NO_FLOW_COLOR = (128, 128, 128)
#: Distinct colours for compared series, in order (matplotlib's ``tab10``): a study's pre-training
#: rows get them in config order, as MLflow run colours (tag ``mlflow.runColor``) and in its chart.
SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
#: What ids past the palette (19..254) are drawn as: a fixed distinct colour each, or black.
UNKNOWN_IDS = ("distinct", "black")


def label_lut(unknown: str = "distinct") -> np.ndarray:
    """(256, 3) uint8 table: the palette for 0..18, ``unknown`` ids 19..254 (``distinct``: a fixed
    colour each; ``black``), 255 (ignore) black."""
    if unknown not in UNKNOWN_IDS:
        raise ValueError(f"label colours: unknown={unknown!r}, expected one of {', '.join(UNKNOWN_IDS)}")
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE
    if unknown == "distinct":
        extra = np.arange(len(CITYSCAPES_PALETTE), 255)
        pal[extra] = np.stack([(extra * 53) % 256, (extra * 97) % 256, (extra * 151) % 256], 1)
    return pal


#: :func:`label_lut` with distinct colours for unknown ids (what overlays and legends use).
LABEL_LUT = label_lut()
_LUTS = {"distinct": LABEL_LUT, "black": label_lut("black")}


def label_colors(labels: np.ndarray, unknown: str = "distinct") -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 colours (Cityscapes' for 0..18, see :func:`label_lut`; 255 black)."""
    if unknown not in _LUTS:
        label_lut(unknown)  # raises, naming the choices
    return _LUTS[unknown][np.asarray(labels).astype(np.int64) & 255]


def colormap(values: np.ndarray, name: str = "magma") -> np.ndarray:
    """Values in [0, 1] (clipped) -> uint8 (..., 3) RGB through matplotlib's colour map ``name``."""
    from matplotlib import colormaps

    return (colormaps[name](np.clip(values, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def series_color(index: int) -> str:
    """``#rrggbb`` of the ``index``-th series (:data:`SERIES_COLORS`, repeating after 10)."""
    return SERIES_COLORS[index % len(SERIES_COLORS)]


def inverse_depth_colors(depth: np.ndarray, valid: np.ndarray | None = None, vmax: float | None = None,
                         vmin: float = 0.0, invalid=NO_DEPTH_COLOR) -> np.ndarray:
    """(H, W) depth -> uint8 (H, W, 3) magma map of inverse depth, ``vmin`` .. ``vmax`` stretched to the
    whole map (``vmax`` default: the 95th percentile of the valid pixels); pixels not ``valid`` are drawn
    in ``invalid`` (:data:`NO_DEPTH_COLOR`)."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.ones(depth.shape, bool) if valid is None else np.asarray(valid, bool)
    inv = 1.0 / np.clip(depth, 1e-6, None)
    if vmax is None:
        vmax = float(np.percentile(inv[valid], 95)) if valid.any() else 1.0
    rgb = colormap((inv - vmin) / max(vmax - vmin, 1e-12))
    rgb[~valid] = invalid
    return rgb


def flow_to_color(flow: np.ndarray, max_mag: float | None = None, valid: np.ndarray | None = None) -> np.ndarray:
    """(2, H, W) flow -> (H, W, 3) uint8: hue = direction, value = magnitude / max; pixels not ``valid``
    in :data:`NO_FLOW_COLOR`."""
    from matplotlib.colors import hsv_to_rgb

    u, v = flow[0], flow[1]
    mag = np.hypot(u, v)
    top = max_mag if max_mag else max(float(mag.max()), 1e-6)
    hsv = np.stack([(np.arctan2(-v, -u) / np.pi + 1) / 2, np.ones_like(u), np.clip(mag / top, 0, 1)], -1)
    rgb = (hsv_to_rgb(hsv) * 255).round().astype(np.uint8)
    if valid is not None:
        rgb[~np.asarray(valid, bool)] = NO_FLOW_COLOR
    return rgb
