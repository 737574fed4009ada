"""The comparison chart: what the table says, drawn, including the intervals the verdicts use.

Top row: mIoU and pixel accuracy per cell (one group of bars per dataset · protocol · N column,
one bar per pre-training), error bars = sample std over the table's units (pre-training runs or
fine-tuning seeds). One row below per baseline: each pre-training minus that baseline, unit by unit
(paired), the bar at the mean difference and the
error bar the 95 % Student-t interval — the interval :func:`launch.compare.verdict` calls better /
worse only when it excludes 0 (the dashed line). Cells with fewer than 2 paired seeds have no
interval and are marked "n<2".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from data_shards.atomic import atomic_write

if TYPE_CHECKING:  # launch.compare imports this module
    from launch.compare import Table

METRICS = ("miou", "pixel_acc")
LABELS = {"miou": "mIoU", "pixel_acc": "pixel acc"}


def column_name(col: tuple[str, str, str]) -> str:
    """``dataset · protocol · N=<shots>`` (``all`` for 0 shots): a column of the table."""
    dataset, protocol, shots = col
    return f"{dataset} · {protocol} · {'all' if shots == '0' else 'N=' + shots}"


def _offsets(n: int) -> tuple[float, list[float]]:
    width = 0.8 / max(n, 1)
    return width, [(i - (n - 1) / 2) * width for i in range(n)]


def _means_row(ax, table: "Table", metric: str, colors: dict[str, str]) -> None:
    width, offs = _offsets(len(table.rows))
    for row, off in zip(table.rows, offs):
        xs, means, stds = [], [], []
        for j, col in enumerate(table.columns):
            c = table.cell(row, col)
            if c is not None:
                xs.append(j + off)
                means.append(c.mean(metric))
                stds.append(c.std(metric))
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=row, color=colors[row])
    ax.set_ylabel(f"{LABELS[metric]} (%)")
    ax.set_title(f"{LABELS[metric]}\nmean ± std over {table.unit}s", fontsize=11)


def _paired_row(ax, table: "Table", metric: str, baseline: str, colors: dict[str, str]) -> None:
    rows = [r for r in table.rows if r != baseline]
    width, offs = _offsets(len(rows))
    for row, off in zip(rows, offs):
        for j, col in enumerate(table.columns):
            pair = table.paired(row, col, baseline, metric)
            if pair.n == 0:
                continue
            ci = pair.ci95
            ax.bar(j + off, pair.mean, width, color=colors[row], label=row if j == 0 else None,
                   yerr=None if math.isnan(ci) else ci, capsize=4)
            if math.isnan(ci):
                ax.annotate("n<2", (j + off, pair.mean), ha="center", va="bottom", fontsize=8)
    ax.axhline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_ylabel(f"Δ {LABELS[metric]} (points)")
    ax.set_title(f"Δ {LABELS[metric]} vs {baseline}\nper-{table.unit_word} (paired) mean, 95 % interval",
                 fontsize=11)


def bar_chart(table: "Table", path: Path, title: str) -> Path:
    """Draw the chart (see the module docstring) into ``path`` (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = 1 + len(table.baselines)
    fig, axes = plt.subplots(panels, 2, figsize=(max(10.0, 3.0 + 2.4 * len(table.columns) * 2), 4.4 * panels),
                             squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {row: cycle[i % len(cycle)] for i, row in enumerate(table.rows)}
    for k, metric in enumerate(METRICS):
        _means_row(axes[0][k], table, metric, colors)
        for b, baseline in enumerate(table.baselines, 1):
            _paired_row(axes[b][k], table, metric, baseline, colors)
    for ax in axes.flat:
        ax.set_xticks(range(len(table.columns)))
        ax.set_xticklabels([column_name(c) for c in table.columns], rotation=15, ha="right", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=9, title="pre-training")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), mkdir=True)
    finally:
        plt.close(fig)
