"""The comparison's statistics: values grouped by replicate unit, paired differences, 95 % intervals.

The *unit* is what an interval counts as one independent replicate. When a study pre-trains each
row with several seeds (``study.pretrain_seeds``), the unit is the pre-training run: its fine-tunings
(seeds nested in it) are averaged into one value, and row r of a pre-training is compared with row r
of a baseline (the same fine-tuning seeds), so the interval covers the spread between pre-training
runs as well as fine-tuning noise. With one pre-training run per row the unit is the fine-tuning
seed, and the intervals cover fine-tuning noise only. Pure functions of numbers: no MLflow, no table.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

#: Table.unit values: what one replicate of an interval is.
UNIT_PRETRAINING = "pre-training run"
UNIT_SEED = "fine-tuning seed"


def unit_means(values: list[float], units: list[str]) -> dict[str, float]:
    """Mean of the values of each unit, in the order units first appear."""
    groups: dict[str, list[float]] = {}
    for value, unit in zip(values, units):
        groups.setdefault(unit, []).append(value)
    return {unit: statistics.fmean(vals) for unit, vals in groups.items()}


def paired_unit_diffs(a: list[float], a_keys: list[tuple[str, str]], b: list[float],
                      b_keys: list[tuple[str, str]]) -> list[float]:
    """Per unit, the mean of ``a - b`` over the fine-tuning seeds both have in that unit.

    ``*_keys`` are (unit, seed) per value; units with no seed in common are left out."""
    base = dict(zip(b_keys, b))
    per_unit: dict[str, list[float]] = {}
    for value, key in zip(a, a_keys):
        if key in base:
            per_unit.setdefault(key[0], []).append(value - base[key])
    return [statistics.fmean(d) for d in per_unit.values()]


def t_half_width(values: list[float]) -> float:
    """Half-width of the 95 % Student-t interval of the mean of ``values`` (nan below 2 values)."""
    if len(values) < 2:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class Paired:
    """Per-unit differences of two rows in one column. Units with the same fine-tuning seeds share the
    data order, the head's initialisation and the N-shot subset, so the spread those cause cancels in
    the difference (the spread of unconverged fine-tunings does not: see docs/tracking-and-study.md)."""

    diffs: list[float]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs) if self.diffs else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.diffs) if self.n > 1 else math.nan

    @property
    def ci95(self) -> float:
        """Half-width of the 95 % Student-t interval of the mean difference (nan below 2 units)."""
        return t_half_width(self.diffs)


def interval_note(unit: str, units_per_row: int, finetunes_per_unit: int) -> str:
    """One paragraph saying what the cells and intervals of a table with this unit cover."""
    if unit == UNIT_PRETRAINING:
        return (f"Unit: the pre-training run. Each pre-training row ran {units_per_row} times (pre-training seeds); "
                f"each run was fine-tuned with {finetunes_per_unit} seed(s) of its own (nested) and counts once, as "
                f"the mean of its fine-tunings. Cells: mean ± std over the {units_per_row} runs. Δ: the mean paired "
                f"difference and its 95 % Student-t interval over the {units_per_row} paired runs (run r of a row against "
                f"run r of the baseline, the same fine-tuning seeds): it covers the spread between pre-training "
                f"runs and fine-tuning noise. Rows without a pre-training run (random init) are grouped by the "
                f"same fine-tuning seeds.")
    return ("Unit: the fine-tuning seed. Every fine-tuning of a row starts from the same pre-training run (one "
            "pre-training seed), so cells (mean ± std over seeds) and intervals (Δ: the mean per-seed paired difference "
            "and its 95 % interval) cover fine-tuning noise only, not the spread "
            "between pre-training runs; study.pretrain_seeds adds it.")
