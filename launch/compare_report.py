"""The comparison as people read it (Markdown): the headline sentence, then per column a table of the
rows' means and a table of the paired differences with their 95 % intervals and verdicts.

Narrow on purpose: MLflow shows a run's description and ``comparison.md`` in a panel about 800 px
wide, so each table has at most five columns (one row per pre-training, one per compared pair)
instead of one column per baseline and metric. The numbers come from :class:`launch.compare.Table`
(the statistics: :mod:`launch.paired_stats`); nothing here computes a statistic.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from launch.chart import column_name, pairs

if TYPE_CHECKING:  # launch.compare imports this module
    from launch.compare import Table
    from launch.paired_stats import Paired

METRICS = ("miou", "pixel_acc")


def _fmt(mean: float, std: float, n: int, expected: int) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean:.1f} ± {std:.1f}"
    return text + (f" (n={n})" if expected and n != expected else "")


def interval(pair: "Paired") -> str:
    """``+1.7 .. +10.7`` (the 95 % interval of the paired mean difference), '' below 2 units."""
    if pair.n < 2:
        return ""
    return f"{pair.mean - pair.ci95:+.1f} .. {pair.mean + pair.ci95:+.1f}"


def judged(pair: "Paired") -> str:
    """better / worse when the 95 % interval excludes 0, else not resolved; '' below 2 units."""
    if pair.n < 2:
        return ""
    lo, hi = pair.mean - pair.ci95, pair.mean + pair.ci95
    return "better" if lo > 0 else "worse" if hi < 0 else "not resolved"


def _delta(pair: "Paired") -> str:
    if pair.n == 0:
        return "–"
    span = interval(pair)
    return f"{pair.mean:+.1f} ({span})" if span else f"{pair.mean:+.1f} (n<2)"


def headline_pair(table: "Table", wanted: list[str]) -> tuple[str, str] | None:
    """(row, baseline) the headline reports: ``wanted`` when both are in the table, else the first row
    that is not a baseline against the first baseline (None when there is no such pair)."""
    if len(wanted) == 2 and all(w in table.rows for w in wanted):
        return wanted[0], wanted[1]
    others = [r for r in table.rows if r not in table.baselines]
    if not table.baselines or not (others or len(table.baselines) > 1):
        return None
    base = table.baselines[0]
    return (others or [b for b in table.baselines if b != base])[0], base


def headline(table: "Table", wanted: list[str], metric_name: str) -> str:
    """One sentence: the question's answer (``row`` against ``baseline`` in the first column that has
    both, their paired mIoU difference with its 95 % interval and what that allows one to say)."""
    if not table.columns:
        return ""
    pair_names = headline_pair(table, wanted)
    both = [c for c in table.columns if pair_names and all(table.cell(r, c) for r in pair_names)]
    col = (both or table.columns)[0]
    where = f"{column_name(col)}, mIoU = `{metric_name}`"
    if pair_names is None:
        present = [r for r in table.rows if table.cell(r, col)]
        best = max(present, key=lambda r: table.cell(r, col).mean("miou"))
        return f"**Highest mean mIoU: {best} ({table.cell(best, col).mean('miou'):.1f} %)** ({where}; no baseline to pair)."
    row, base = pair_names
    pair = table.paired(row, col, base, "miou")
    units = f"{pair.n} paired {table.unit}s"
    if pair.n == 0:
        return f"**{row} vs {base}: no paired {table.unit}s** ({where})."
    if pair.n < 2:
        return (f"**{row} vs {base}: {pair.mean:+.1f} mIoU points** from 1 paired {table.unit}: too few for an "
                f"interval ({where}).")
    verdict_word = judged(pair)
    claim = {"better": f"{row} transfers better than {base}", "worse": f"{row} transfers worse than {base}",
             "not resolved": f"{row} vs {base}: not resolved"}[verdict_word]
    return (f"**{claim}: {pair.mean:+.1f} mIoU points (95 % interval {interval(pair)})** over {units} "
            f"({where}).")


def _means_rows(table: "Table", col: tuple[str, str, str]) -> tuple[list[str], list[list[str]]]:
    """Header and lines of a column's means table: each row's mean ± std over the table's units."""
    unit = "runs" if table.unit_word == "run" else "seeds"
    lines = []
    for row in table.rows:
        c = table.cell(row, col)
        if c is not None:
            count = f"{c.n_units}" + (f" ({c.n} fine-tunings)" if c.n != c.n_units else "")
            lines.append([row, _fmt(c.mean("miou"), c.std("miou"), c.n, table.expected_seeds),
                          _fmt(c.mean("pixel_acc"), c.std("pixel_acc"), c.n, table.expected_seeds), count])
    return ["pre-training", "mIoU %", "pixel acc %", unit], lines


def _difference_rows(table: "Table", col: tuple[str, str, str]) -> list[tuple[str, list[list[str]]]]:
    """Per baseline: (its name, lines of pre-training | Δ mIoU | Δ pixel acc | verdict), the pairs of
    :func:`launch.chart.pairs` (two baselines' pair once); a baseline missing from the column says so."""
    out = []
    shown = pairs(table, col)
    for base in table.baselines:
        if table.cell(base, col) is None:
            out.append((base, [[f"no {base} run in this column", "", "", ""]]))
            continue
        lines = []
        for row, b in shown:
            if b == base:
                miou, acc = table.paired(row, col, base, "miou"), table.paired(row, col, base, "pixel_acc")
                lines.append([row, _delta(miou), _delta(acc), judged(miou) or "no spread to judge"])
        if lines:
            out.append((base, lines))
    return out


DIFF_HEADER = ["pre-training", "Δ mIoU", "Δ pixel acc", "verdict"]


def _md_table(header: list[str], lines: list[list[str]], right: int) -> list[str]:
    """A Markdown table whose columns 1..``right`` are right-aligned."""
    align = ["---"] + ["---:"] * right + ["---"] * (len(header) - 1 - right)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
            *["| " + " | ".join(line) + " |" for line in lines]]


def _text_table(header: list[str], lines: list[list[str]]) -> list[str]:
    """The same table as aligned plain text (for a code block: MLflow's run description draws Markdown
    tables without cell padding)."""
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    return ["   ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *lines]]


#: Said once above a column's difference tables.
DIFF_NOTE = "Δ: paired difference in points, its 95 % interval in parentheses; the verdict is on mIoU."


def to_markdown(table: "Table", text_tables: bool = False) -> str:
    """Per column: its means table, then per baseline the paired differences to it with the verdict;
    then what the intervals cover. ``text_tables``: the tables as aligned text in one code block per
    column instead of Markdown tables."""
    out = []
    for col in table.columns:
        out += [f"### {column_name(col)}", ""]
        means = _means_rows(table, col)
        diffs = _difference_rows(table, col)
        if diffs:
            out += [DIFF_NOTE, ""]
        if text_tables:
            block = _text_table(*means)
            for base, rows in diffs:
                block += ["", *_text_table([f"vs {base}", *DIFF_HEADER[1:]], rows)]
            out += ["```", *block, "```", ""]
            continue
        out += [*_md_table(*means, right=3), ""]
        for base, rows in diffs:
            out += [f"Paired differences to **{base}**:", "", *_md_table(DIFF_HEADER, rows, right=2), ""]
    return "\n".join(out) + "\n" + table.note() + "\n"


def verdict(table: "Table") -> list[str]:
    """Markdown list items: per column, the row with the highest mean mIoU. A difference is called
    better / worse only when the 95 % interval of its paired differences excludes 0 (the differences
    table's verdict column)."""
    out = []
    for col in table.columns:
        present = [r for r in table.rows if table.cell(r, col)]
        if present:
            best = max(present, key=lambda r: table.cell(r, col).mean("miou"))
            out.append(f"- {column_name(col)}: highest mean mIoU: {best} ({table.cell(best, col).mean('miou'):.1f} %); "
                       f"whether it is ahead of a baseline is the differences table's verdict.")
    return out
