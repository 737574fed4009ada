"""Each pre-training's own task metric beside a trivial predictor's, for the comparison's notes.

A comparison of pre-trainings says little when they have not learned their task, so the table's
notes give, per pre-training row, its task metric (the trainer logs ``<split>/<metric>``) and the
same metric of a trivial predictor (``<split>/baseline_<metric>``, logged beside it by the task's
metric): constant depth (median-scaled), zero flow, class frequencies. The test split's value is
used where the run has one, else the validation split's.
"""
from __future__ import annotations

import math
import statistics

from launch.runstore import RunRecord
from launch.study_config import CONFIG_TAG

#: (metric, what its baseline is, lower is better), tried in order: the first one a run logged counts.
TASK_METRICS = (
    ("abs_rel", "constant depth (median-scaled)", True),
    ("epe", "zero flow", True),
    ("map", "class frequencies", False),
    ("top1", "the most frequent class", False),
)
SPLITS = ("test", "val")


def task_metric(metrics: dict[str, float]) -> tuple[str, str, float, float, str, bool] | None:
    """(split, metric, value, baseline value, baseline name, lower is better) of a pre-training run,
    or None when it logged no metric with a baseline beside it."""
    for split in SPLITS:
        for name, baseline, lower in TASK_METRICS:
            value, base = metrics.get(f"{split}/{name}"), metrics.get(f"{split}/baseline_{name}")
            if value is not None and base is not None and math.isfinite(value) and math.isfinite(base):
                return split, name, value, base, baseline, lower
    return None


def newest_runs(runs: list[RunRecord], fingerprints: dict[str, str] | None) -> list[RunRecord]:
    """Each pre-training job's newest FINISHED run (of its current fingerprint, when given)."""
    seen, out = set(), []
    for run in sorted(runs, key=lambda r: -r.start_time):
        job = run.tags.get("study_job", run.run_id)
        if job in seen or (fingerprints is not None and fingerprints.get(job) != run.tags.get(CONFIG_TAG)):
            continue
        seen.add(job)
        out.append(run)
    return out


def _pretrain_seed(run: RunRecord) -> int:
    seed = run.tags.get("grid_pretrain_seed", "")
    return int(seed) if seed.lstrip("-").isdigit() else 0


def _row_line(row: str, found: list[tuple], missing: int) -> str:
    split, name, _, _, baseline, lower = found[0]
    values = [f[2] for f in found]
    bases = [f[3] for f in found]
    mean, base = statistics.fmean(values), statistics.fmean(bases)
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    versus = f"{mean / base:.2f}x the baseline" if lower and base > 0 else f"{mean - base:+.3f} over the baseline"
    runs = f"{len(values)} run{'s' if len(values) > 1 else ''}" + (f", {missing} without it" if missing else "")
    return (f"- {row}: {split} {name} {mean:.3f}{spread} against {base:.3f} for {baseline} ({versus}; {runs}; "
            f"per run {', '.join(f'{v:.3f}' for v in values)})")


def pretraining_lines(runs: list[RunRecord], fingerprints: dict[str, str] | None = None,
                      row_order: list[str] | None = None) -> list[str]:
    """The notes' lines: one per pre-training row, its task metric against the trivial predictor's."""
    by_row: dict[str, list] = {}
    missing: dict[str, int] = {}
    for run in sorted(newest_runs(runs, fingerprints), key=_pretrain_seed):
        row = run.tags.get("grid_pretraining", run.name or run.run_id)
        found = task_metric(run.metrics)
        if found is None:
            missing[row] = missing.get(row, 0) + 1
        else:
            by_row.setdefault(row, []).append(found)
    rows = [r for r in (row_order or []) if r in by_row or r in missing]
    rows += sorted(r for r in {*by_row, *missing} if r not in rows)
    lines = []
    for row in rows:
        if row in by_row:
            lines.append(_row_line(row, by_row[row], missing.get(row, 0)))
        else:
            lines.append(f"- {row}: {missing[row]} run(s), none logged a task metric with a trivial baseline "
                         f"beside it (made before baselines were logged?)")
    return lines


def pretraining_summary(runs: list[RunRecord], fingerprints: dict[str, str] | None = None) -> dict[str, float]:
    """``pretraining/<row>/<metric>_mean`` and ``.../baseline_<metric>_mean``: parent-run metrics."""
    out: dict[str, list[float]] = {}
    for run in newest_runs(runs, fingerprints):
        found = task_metric(run.metrics)
        if found is not None:
            row = run.tags.get("grid_pretraining", run.run_id)
            out.setdefault(f"pretraining/{row}/{found[1]}_mean", []).append(found[2])
            out.setdefault(f"pretraining/{row}/baseline_{found[1]}_mean", []).append(found[3])
    return {k: statistics.fmean(v) for k, v in out.items()}
