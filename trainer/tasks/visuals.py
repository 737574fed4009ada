"""Pictures that explain themselves: the palette, the colour maps and the qualitative figures.

One home for what the tasks' ``visualize`` hooks draw, so every run's qualitative PNGs look alike:

- :data:`CITYSCAPES_PALETTE`, :func:`label_colors`, :func:`inverse_depth_colors`, :func:`flow_to_color`:
  the palette and colour maps, from :mod:`data_shards.palette` (the one home of the project's colours,
  shared with the shard inspector's contact sheet), re-exported here;
- :func:`depth_figure`, :func:`segmentation_figure`, :func:`flow_figure`: panels with titles, and a
  colour bar (depth) or a class legend (segmentation: only the classes in the picture), laid out one
  panel per row for wide images, side by side otherwise; :func:`depth_panel`, the untitled
  input | prediction | ground-truth strip on one colour scale;
- :func:`save_figure`: PNG under a temporary name, then renamed (a reader never sees half a file).

Small inputs (a 64x192 synthetic frame) are drawn at :data:`PANEL_WIDTH_IN` inches a panel and
:data:`DPI`, so the figure is readable in MLflow's artifact view (800 px wide or more), with
nearest-neighbour scaling: the pixels shown are the pixels the model saw.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from data_shards.atomic import atomic_write
from data_shards.palette import (CITYSCAPES_PALETTE, LABEL_LUT, NO_DEPTH_COLOR,  # noqa: F401 - re-exported
                                 NO_FLOW_COLOR, flow_to_color, inverse_depth_colors, label_colors)

#: Width of a panel in inches when panels are stacked (wide images) / side by side, and the
#: resolution figures are saved at: 800 px / 500 px a panel.
PANEL_WIDTH_IN = 8.0
SIDE_PANEL_WIDTH_IN = 5.0
DPI = 100
#: Class names per legend line.
LEGEND_COLUMNS = 4
#: Images at least this many times wider than high are stacked one panel per row.
WIDE_ASPECT = 2.0
#: Share of the label colour in a segmentation overlay (the rest is the image).
OVERLAY_ALPHA = 0.55


def as_hwc_uint8(image) -> np.ndarray:
    """A (3, H, W) tensor/array, uint8 or float in [0, 1], -> (H, W, 3) uint8 numpy."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(arr, 3, -1) if arr.shape[-1] == 1 else arr


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W[, C]) array (predictions at another scale than the input)."""
    h, w = array.shape[:2]
    if (h, w) == (height, width):
        return array
    rows = (np.arange(height) * h // height).clip(0, h - 1)
    cols = (np.arange(width) * w // width).clip(0, w - 1)
    return array[rows][:, cols]


@dataclass
class Legend:
    """Colour patches with names, drawn under the panels."""

    title: str
    entries: list[tuple[str, tuple[int, int, int]]]


@dataclass
class ColorBar:
    """A colour bar under the panels: ``cmap`` from ``low`` to ``high`` (labels of the ends)."""

    label: str
    cmap: str
    low: str
    high: str
    missing: tuple[str, tuple[int, int, int]] | None = None
    """(name, colour) of a value outside the map (no measurement), drawn as a patch beside the bar."""


def save_figure(panels: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike, *, title: str | None = None,
                legend: Legend | None = None, colorbar: ColorBar | None = None) -> Path:
    """Draw ``panels`` ((title, (H, W, 3) uint8) pairs) with an optional suptitle, legend or colour
    bar, and write the PNG atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = _draw(panels, title, legend, colorbar, plt)
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI), mkdir=True)
    finally:
        plt.close(fig)


def _footer_height(legend: Legend | None, colorbar: ColorBar | None) -> float:
    if legend is not None:
        return 0.75 + 0.3 * ((len(legend.entries) + LEGEND_COLUMNS - 1) // LEGEND_COLUMNS)
    return 1.3 if colorbar is not None else 0.1


def _draw(panels, title, legend, colorbar, plt):
    """Lay the figure out in inches: suptitle, then per panel a title line and the image, then the footer."""
    h, w = panels[0][1].shape[:2]
    stacked = w >= WIDE_ASPECT * h
    rows, cols = (len(panels), 1) if stacked else (1, len(panels))
    panel_w = PANEL_WIDTH_IN if stacked else SIDE_PANEL_WIDTH_IN
    panel_h = panel_w * h / w
    head, line, margin = (0.5 if title else 0.15), 0.4, 0.15
    foot = _footer_height(legend, colorbar)
    fig_w = cols * panel_w + (cols + 1) * margin
    fig_h = head + rows * (line + panel_h) + foot
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI)
    for i, (name, image) in enumerate(panels):
        r, c = divmod(i, cols)
        left = margin + c * (panel_w + margin)
        top = head + r * (line + panel_h) + line
        ax = fig.add_axes((left / fig_w, 1 - (top + panel_h) / fig_h, panel_w / fig_w, panel_h / fig_h))
        ax.imshow(image, interpolation="nearest", aspect="auto")
        ax.set_title(name, fontsize=13)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=14, y=1 - 0.12 / fig_h, va="top")
    if legend is not None:
        _draw_legend(fig, legend)
    if colorbar is not None:
        _draw_colorbar(fig, colorbar, foot / fig_h)
    return fig


def _draw_legend(fig, legend: Legend) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.array(c) / 255.0, edgecolor="black", linewidth=0.5, label=name)
               for name, c in legend.entries]
    fig.legend(handles=handles, loc="lower center", ncol=min(LEGEND_COLUMNS, max(1, len(handles))), fontsize=11,
               title=legend.title, title_fontsize=12, frameon=False, bbox_to_anchor=(0.5, 0.0))


def _draw_colorbar(fig, bar: ColorBar, foot: float) -> None:
    import matplotlib as mpl

    ax = fig.add_axes((0.25, foot * 0.62, 0.5, foot * 0.2))
    cb = fig.colorbar(mpl.cm.ScalarMappable(cmap=bar.cmap), cax=ax, orientation="horizontal", ticks=[0, 1])
    cb.ax.set_xticklabels([bar.low, bar.high], fontsize=11)
    ax.set_title(bar.label, fontsize=12)
    if bar.missing is not None:
        from matplotlib.patches import Patch

        name, color = bar.missing
        fig.legend(handles=[Patch(facecolor=np.array(color) / 255.0, edgecolor="black", linewidth=0.5, label=name)],
                   loc="center left", bbox_to_anchor=(0.77, foot * 0.72), fontsize=11, frameon=False)


def depth_figure(image, pred, gt=None, *, path: str | os.PathLike, title: str | None = None) -> Path:
    """Input | predicted depth | ground-truth depth (when given; 0 = no measurement, drawn in
    :data:`NO_DEPTH_COLOR`, a colour the map does not use), with a colour bar. Each depth panel is scaled to its own 95th percentile of inverse depth (Monodepth2's
    display): a self-supervised prediction has no metric scale, so one shared scale would paint
    one of the two flat."""
    rgb = as_hwc_uint8(image)
    h, w = rgb.shape[:2]
    pred = resize_nearest(np.asarray(pred, dtype=np.float64), h, w)
    panels = [("input", rgb), ("predicted depth", inverse_depth_colors(pred))]
    if gt is not None:
        gt = resize_nearest(np.asarray(gt, dtype=np.float64), h, w)
        panels.append(("ground-truth depth (teal: no measurement)", inverse_depth_colors(gt, gt > 0)))
    bar = ColorBar("inverse depth, each panel scaled to its 95th percentile", "magma", "far", "near",
                   missing=("no measurement", NO_DEPTH_COLOR) if gt is not None else None)
    return save_figure(panels, path, title=title, colorbar=bar)


def segmentation_figure(image, pred, gt, class_names: Sequence[str], ignore_index: int, *,
                        path: str | os.PathLike, title: str | None = None) -> Path:
    """Input | prediction overlay | ground-truth overlay (ignored pixels show the image), with a
    legend of the classes present in either."""
    rgb = as_hwc_uint8(image)
    h, w = rgb.shape[:2]
    pred = resize_nearest(np.asarray(pred), h, w)
    gt = resize_nearest(np.asarray(gt), h, w)
    img = rgb.astype(np.float64)

    def overlay(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
        mixed = (1 - OVERLAY_ALPHA) * img + OVERLAY_ALPHA * label_colors(labels)
        return np.where(keep[..., None], mixed, img).round().clip(0, 255).astype(np.uint8)

    scored = gt != ignore_index
    panels = [("input", rgb), ("prediction", overlay(pred, np.ones_like(scored))),
              ("ground truth (no overlay: not scored)", overlay(gt, scored))]
    return save_figure(panels, path, title=title, legend=class_legend(pred, gt[scored], class_names))


def class_legend(pred: np.ndarray, gt_scored: np.ndarray, class_names: Sequence[str]) -> Legend:
    """Legend of the classes in the prediction or the scored ground truth, in train-id order."""
    present = sorted(set(np.unique(pred).tolist()) | set(np.unique(gt_scored).tolist()))
    entries = [(class_names[k] if 0 <= k < len(class_names) else str(k), tuple(int(c) for c in LABEL_LUT[k & 255]))
               for k in present]
    return Legend("classes", entries)


def flow_figure(image, pred_rgb: np.ndarray, gt_rgb: np.ndarray | None = None, *, path: str | os.PathLike,
                title: str | None = None) -> Path:
    """Frame t | predicted flow | ground-truth flow (when given), flows already colour-coded
    (hue = direction, brightness = magnitude, on one scale; no measurement: :data:`NO_FLOW_COLOR`)."""
    panels = [("frame t", as_hwc_uint8(image)), ("predicted flow", pred_rgb)]
    if gt_rgb is not None:
        panels.append(("ground-truth flow (grey: no measurement; black: no motion)", gt_rgb))
    return save_figure(panels, path, title=title)


def depth_panel(image, pred, gt=None):
    """PIL image: input (3, H, W) uint8 | predicted depth | ground truth (if given, on the same
    colour scale as the prediction), side by side, no titles; the prediction is resized (bilinear)
    to the input. :func:`depth_figure` is the titled figure the depth task writes."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    h, w = image.shape[-2:]
    if pred.shape != (h, w):
        pred = F.interpolate(pred[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    inv = 1.0 / pred.double().clamp(min=1e-6)
    vmax = float(torch.quantile(inv.flatten(), 0.95))
    rgb = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
    tiles = [rgb.permute(1, 2, 0).cpu().numpy(), inverse_depth_colors(pred.double().cpu().numpy(), vmax=vmax)]
    if gt is not None:
        gt = gt.double().cpu().numpy()
        tiles.append(inverse_depth_colors(gt, gt > 0, vmax=vmax))
    return Image.fromarray(np.concatenate(tiles, axis=1))
