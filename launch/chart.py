"""The comparison chart: the table's mIoU, drawn to be read at the size MLflow's artifact viewer shows it.

Per table column (dataset · protocol · N), two panels one above the other, each the figure's width:

- each pre-training's mean mIoU as a horizontal bar in its row's colour (MLflow's run colour of its
  runs: :func:`launch.grid.row_colors`), the error bar its std over the table's units;
- each (row, baseline) pair's paired mean difference with its 95 % Student-t interval (the interval
  :func:`launch.compare_report.judged` calls better / worse only when it excludes 0, the dashed line),
  filled when resolved, hollow when not; a pair of two baselines is drawn once.

The numbers are written at the right of each line, labels are on the axes (no legend covers a bar);
pixel accuracy stays in the table. 1000 px wide and ~800 px high for the demo's four rows.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from data_shards.atomic import atomic_write

if TYPE_CHECKING:  # launch.compare imports this module
    from launch.compare import Table

#: Figure width (inches) and resolution: 1000 px (MLflow's artifact viewer scales it to its ~700-px panel).
WIDTH_IN, DPI = 10.0, 100
#: Height per bar, per pair (two label lines), and the fixed part of a panel (title, axis), in inches.
LINE_IN, PAIR_IN, PANEL_BASE_IN = 0.42, 0.6, 1.1
FONT = 12


def column_name(col: tuple[str, str, str]) -> str:
    """``dataset · protocol · N=<shots>`` (``all`` for 0 shots): a column of the table."""
    dataset, protocol, shots = col
    return f"{dataset} · {protocol} · {'all' if shots == '0' else 'N=' + shots}"


def _numbers(ax, ys: list[int], texts: list[str]) -> None:
    """``texts`` in a column right of the axes, one per bar / line."""
    for y, text in zip(ys, texts):
        ax.text(1.01, y, text, transform=ax.get_yaxis_transform(), va="center", fontsize=FONT)


def _means_panel(ax, table: "Table", col, colors: dict[str, str]) -> None:
    rows = [r for r in table.rows if table.cell(r, col)]
    means = [table.cell(r, col).mean("miou") for r in rows]
    stds = [table.cell(r, col).std("miou") for r in rows]
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, means, xerr=stds, color=[colors.get(r, "#7f7f7f") for r in rows], capsize=4, height=0.6)
    ax.set_yticks(ys, rows, fontsize=FONT)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, max((m + s for m, s in zip(means, stds)), default=1.0) * 1.05)
    _numbers(ax, ys, [f"{m:.1f} ± {s:.1f}" for m, s in zip(means, stds)])
    ax.set_xlabel(f"mIoU (%): mean ± std over {table.unit}s", fontsize=FONT)
    ax.set_title(f"{column_name(col)}: mIoU", fontsize=FONT + 1, loc="left")


def pairs(table: "Table", col) -> list[tuple[str, str]]:
    """(row, baseline) pairs with paired units in ``col``, by baseline; two baselines' pair once."""
    out = []
    for j, base in enumerate(table.baselines):
        if table.cell(base, col) is None:
            continue
        for row in table.rows:
            if row == base or table.cell(row, col) is None or row in table.baselines[:j]:
                continue
            if table.paired(row, col, base, "miou").n:
                out.append((row, base))
    return out


def _differences_panel(ax, table: "Table", col, colors: dict[str, str]) -> None:
    shown = pairs(table, col)
    ys = list(range(len(shown)))[::-1]
    texts, ends = [], []
    for y, (row, base) in zip(ys, shown):
        pair = table.paired(row, col, base, "miou")
        ci = pair.ci95
        lo, hi = (pair.mean - ci, pair.mean + ci) if not math.isnan(ci) else (pair.mean, pair.mean)
        resolved = not math.isnan(ci) and (lo > 0 or hi < 0)
        color = colors.get(row, "#7f7f7f")
        ax.errorbar(pair.mean, y, xerr=None if math.isnan(ci) else ci, fmt="o", color=color, capsize=5,
                    markersize=9, markerfacecolor=color if resolved else "white", markeredgewidth=2, elinewidth=2)
        texts.append(f"{pair.mean:+.1f}" + (f"  ({lo:+.1f} .. {hi:+.1f})" if not math.isnan(ci) else "  (n<2)"))
        ends += [lo, hi]
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    low, high = min(ends + [0.0]), max(ends + [0.0])
    pad = 0.05 * ((high - low) or 1.0)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(-0.6, len(shown) - 0.4)
    ax.set_yticks(ys, [f"{r}\n− {b}" for r, b in shown], fontsize=FONT - 1)
    _numbers(ax, ys, texts)
    ax.set_xlabel(f"Δ mIoU (points): paired mean per {table.unit_word} and 95 % interval", fontsize=FONT)
    ax.set_title("differences (filled: the interval excludes 0)", fontsize=FONT + 1, loc="left")


def bar_chart(table: "Table", path: Path, title: str, colors: dict[str, str]) -> Path:
    """Draw the chart (see the module docstring) into ``path`` (PNG, written atomically); ``colors``
    maps each row to its ``#rrggbb``; ``title`` heads the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = []
    for col in table.columns:
        panels.append((col, _means_panel, LINE_IN * len([r for r in table.rows if table.cell(r, col)])))
        if table.baselines and pairs(table, col):
            panels.append((col, _differences_panel, PAIR_IN * len(pairs(table, col))))
    heights = [PANEL_BASE_IN + h for _, _, h in panels]
    fig = plt.figure(figsize=(WIDTH_IN, 0.4 + sum(heights)), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=FONT + 2)
    grid = fig.add_gridspec(len(panels), 1, height_ratios=heights)
    for k, (col, draw, _) in enumerate(panels):
        ax = fig.add_subplot(grid[k, 0])
        draw(ax, table, col, colors)
        ax.grid(axis="x", alpha=0.3)
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI), mkdir=True)
    finally:
        plt.close(fig)
