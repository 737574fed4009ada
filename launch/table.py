"""The comparison's model: fine-tuning runs grouped into a table of cells by (pre-training, column).

Rows are pre-trainings, columns dataset x protocol x N-shot; a cell holds each counted fine-tuning's
metrics (in %) with its seeds and replicate unit (:mod:`launch.paired_stats`). Every view reads this
model: the Markdown and CSV of :mod:`launch.compare`, the sentences of :mod:`launch.compare_report`,
the chart of :mod:`launch.chart`; none of them computes a statistic of its own.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from launch.paired_stats import UNIT_PRETRAINING, UNIT_SEED, Paired, interval_note, paired_unit_diffs, unit_means
from launch.runstore import RunRecord
from launch.study_config import CONFIG_TAG, CompareConfig

METRICS = ("miou", "pixel_acc")


@dataclass
class Cell:
    """One (pre-training, column) cell: per-fine-tuning values of each metric, in %, with each one's
    fine-tuning seed, pre-training seed and replicate unit (set by :func:`build_table`)."""

    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    seeds: list[str] = field(default_factory=list)
    pretrain_seeds: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    """The MLflow run of each value."""

    def unit_values(self, metric: str) -> list[float]:
        """One value per replicate unit: the mean of its fine-tunings."""
        return list(unit_means(self.values[metric], self.units).values())

    def mean(self, metric: str) -> float:
        vals = self.unit_values(metric)
        return statistics.fmean(vals) if vals else math.nan

    def std(self, metric: str) -> float:
        vals = self.unit_values(metric)
        return statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else math.nan

    @property
    def n(self) -> int:
        """Fine-tunings in the cell."""
        return len(self.values["miou"])

    @property
    def n_units(self) -> int:
        return len(set(self.units))

    @property
    def keys(self) -> list[tuple[str, str]]:
        """(unit, fine-tuning seed) of each value: what pairs two cells."""
        return list(zip(self.units, self.seeds))


@dataclass
class Table:
    """The comparison: cells by (row, column), plus the runs that could not be used."""

    rows: list[str]
    columns: list[tuple[str, str, str]]
    cells: dict[tuple[str, tuple[str, str, str]], Cell]
    baselines: list[str]
    expected_seeds: int
    skipped: list[str] = field(default_factory=list)
    unit: str = UNIT_SEED
    """What one replicate of the intervals is (:mod:`launch.paired_stats`)."""

    def cell(self, row: str, col: tuple[str, str, str]) -> Cell | None:
        return self.cells.get((row, col))

    def delta(self, row: str, col: tuple[str, str, str], baseline: str, metric: str) -> float:
        """Mean of ``row`` minus mean of ``baseline`` in the column, in points (nan if either is missing)."""
        a, b = self.cell(row, col), self.cell(baseline, col)
        if a is None or b is None:
            return math.nan
        return a.mean(metric) - b.mean(metric)

    def paired(self, row: str, col: tuple[str, str, str], baseline: str, metric: str) -> Paired:
        """``row`` minus ``baseline`` unit by unit (the units and seeds both have), with a 95 % interval."""
        a, b = self.cell(row, col), self.cell(baseline, col)
        if a is None or b is None:
            return Paired([])
        return Paired(paired_unit_diffs(a.values[metric], a.keys, b.values[metric], b.keys))

    @property
    def unit_word(self) -> str:
        """The unit in a verdict: per-seed / per-run difference."""
        return "run" if self.unit == UNIT_PRETRAINING else "seed"

    def note(self) -> str:
        """What the cells and intervals cover (:func:`launch.paired_stats.interval_note`)."""
        cells = [c for c in self.cells.values() if c.n]
        units = max((c.n_units for c in cells), default=0)
        per_unit = max((c.n // max(c.n_units, 1) for c in cells), default=0)
        return interval_note(self.unit, units, per_unit)


def find_metric(metrics: dict[str, float], name: str, prefixes: list[str]) -> float | None:
    """The value of ``name`` in a run's metrics: exact key, else ``<prefix>/<name>`` in prefix order,
    else the only key ending in ``/<name>``."""
    if name in metrics:
        return metrics[name]
    for prefix in prefixes:
        for sep in ("/", "_", "."):
            key = f"{prefix}{sep}{name}"
            if key in metrics:
                return metrics[key]
    ends = [k for k in metrics if k.endswith("/" + name)]
    if len(ends) == 1:
        return metrics[ends[0]]
    return None


def _fingerprint_notes(other_config: list[str], unfingerprinted: list[str], not_in_study: set[str]) -> list[str]:
    """The "runs left out" lines for runs :func:`build_table` passed over because of their fingerprint."""
    notes = []
    if other_config:
        notes.append(f"{len(other_config)} FINISHED run(s) made with another configuration of their job "
                     f"(tag {CONFIG_TAG} differs from the study's current one): "
                     f"{', '.join(sorted(set(other_config)))}")
    if unfingerprinted:
        notes.append(f"{len(unfingerprinted)} FINISHED run(s) without a {CONFIG_TAG} tag (made before configuration "
                     f"fingerprints; re-run the study, or compare them as they are with --study <name> --uri ...): "
                     f"{', '.join(sorted(set(unfingerprinted)))}")
    if not_in_study:
        notes.append(f"FINISHED run(s) of {len(not_in_study)} job(s) not in the study's current grid: "
                     f"{', '.join(sorted(not_in_study))}")
    return notes


def build_table(runs: list[RunRecord], compare: CompareConfig, *, row_order: list[str] | None = None,
                expected_seeds: int = 0, fingerprints: dict[str, str] | None = None) -> Table:
    """Group FINISHED fine-tuning runs into the table (the newest run of each job counts once).

    With ``fingerprints`` (job id -> the job's current configuration fingerprint, from the study's
    plan) only runs of those jobs whose tag ``study_job_config`` equals it are used: runs of an older
    configuration, or of jobs no longer in the study, are left out (counted in ``skipped``)."""
    seen_jobs: set[str] = set()
    cells: dict = {}
    skipped: list[str] = []
    rows_found: list[str] = []
    cols_found: list[tuple[str, str, str]] = []
    other_config: list[str] = []
    unfingerprinted: list[str] = []
    not_in_study: set[str] = set()
    for run in sorted(runs, key=lambda r: -r.start_time):
        tags = run.tags
        job = tags.get("study_job", run.run_id)
        if job in seen_jobs:
            continue
        if fingerprints is not None:
            if job not in fingerprints:
                not_in_study.add(job)
                continue
            if CONFIG_TAG not in tags:
                unfingerprinted.append(job)
                continue
            if tags[CONFIG_TAG] != fingerprints[job]:
                other_config.append(job)
                continue
        seen_jobs.add(job)
        try:
            row = tags["grid_pretraining"]
            col = (tags["grid_dataset"], tags["grid_protocol"], tags["grid_shots"])
            seed = tags["grid_seed"]
            pretrain_seed = tags.get("grid_pretrain_seed", "")  # '' = run made before pre-training seeds
        except KeyError as e:
            skipped.append(f"run {run.run_id} ({job}): no grid tag {e}")
            continue
        values = _run_values(run, compare)
        if isinstance(values, str):
            skipped.append(f"run {run.run_id} ({job}): {values}")
        else:
            cell = cells.setdefault((row, col), Cell())
            for metric in METRICS:
                cell.values[metric].append(values[metric])
            cell.seeds.append(seed)
            cell.pretrain_seeds.append(pretrain_seed)
            cell.run_ids.append(run.run_id)
            if row not in rows_found:
                rows_found.append(row)
            if col not in cols_found:
                cols_found.append(col)
    skipped += _fingerprint_notes(other_config, unfingerprinted, not_in_study)
    order = [r for r in (row_order or []) if r in rows_found] + sorted(r for r in rows_found if r not in (row_order or []))
    cols = sorted(cols_found, key=lambda c: (c[0], c[1], int(c[2]) if c[2].isdigit() else 0))
    baselines = [b for b in compare.baselines if b in rows_found]
    return Table(order, cols, cells, baselines, expected_seeds, skipped, _set_units(cells))


def _run_values(run: RunRecord, compare: CompareConfig) -> dict[str, float] | str:
    """The run's table metrics in %, or why it has none."""
    values = {}
    for metric in METRICS:
        value = find_metric(run.metrics, getattr(compare, metric), compare.prefer_prefixes)
        if value is None or not math.isfinite(value):
            return (f"metric {getattr(compare, metric)!r} missing or not finite "
                    f"(has: {', '.join(sorted(run.metrics)) or 'none'})")
        values[metric] = 100.0 * value
    return values


def _set_units(cells: dict) -> str:
    """The table's unit: the pre-training run when some cell holds runs of several pre-training seeds,
    else the fine-tuning seed; each cell's ``units`` are set to match. Returns the unit."""
    several = any(len(set(c.pretrain_seeds)) > 1 for c in cells.values())
    for c in cells.values():
        c.units = list(c.pretrain_seeds if several else c.seeds)
    return UNIT_PRETRAINING if several else UNIT_SEED
