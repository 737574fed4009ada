"""`python -m launch compare --experiment <name>`: the study's comparison table, from MLflow.

Rows are pre-trainings, columns dataset x protocol x N-shot; each cell is mIoU and pixel
accuracy (in %) as mean ± sample std over the replicate units (pre-training runs when each row was
pre-trained with several seeds, else fine-tuning seeds: :mod:`launch.paired_stats`), plus the
difference of the means to the baselines (ImageNet, random init) when the study has them, ± the 95 %
interval of the per-unit (paired) difference; the table says which unit its intervals count. Below
it, each pre-training's own task metric beside a trivial predictor's (:mod:`launch.pretrain_report`).
Writes
``comparison.md``, ``comparison.csv`` and a chart ``comparison.png`` (means ± std, and the paired
differences with their 95 % intervals: :mod:`launch.chart`) into ``<study out_dir>/comparison/``,
logs them to the study's parent run (the table also under its description) and prints the table
followed by a plain statement of what came out (a difference smaller than the seed spread is
reported as such, not as a win).

Which runs count: with a study config, each fine-tuning job of its grid once, with its newest
FINISHED run whose tag ``study_job_config`` equals the job's current configuration fingerprint
(runs of an edited job's older configuration are left out). In MLflow-experiment mode (``--study``,
no config to compute fingerprints from) each ``study_job`` once, with its newest FINISHED run.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.atomic import atomic_write_text
from launch import provenance, study_view
from launch.chart import bar_chart
from launch.compare_report import headline, to_markdown, verdict
from launch.grid import plan, row_colors, study_root, study_uri
from launch.paired_stats import UNIT_PRETRAINING, UNIT_SEED, Paired, interval_note, paired_unit_diffs, unit_means
from launch.pretrain_report import pretraining_lines, pretraining_summary
from launch.runstore import RunRecord, TrackingStore
from launch.study_config import CONFIG_DIR, CONFIG_TAG, CompareConfig, StudyConfig, load_study
from launch.study_notes import compare_settings, note_with_comparison, scored_metrics

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


def to_csv(table: Table) -> str:
    """Long format: one line per (pre-training, column), means/stds in %, deltas in points."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["pretraining", "dataset", "protocol", "shots", "n_seeds", "seeds", "unit", "n_units", "units",
              "miou_mean", "miou_std", "pixel_acc_mean", "pixel_acc_std"]
    header += [f"delta_{m}_vs_{b}" for b in table.baselines for m in METRICS]
    header += [f"paired_{m}_vs_{b}_{k}" for b in table.baselines for m in METRICS for k in ("n", "std", "ci95")]
    writer.writerow(header)
    for row in table.rows:
        for col in table.columns:
            c = table.cell(row, col)
            if c is None:
                continue
            line = [row, *col, c.n, " ".join(c.seeds), table.unit, c.n_units, " ".join(dict.fromkeys(c.units))]
            line += [f"{c.mean(m):.4f}" if i == 0 else f"{c.std(m):.4f}" for m in METRICS for i in (0, 1)]
            line += [f"{table.delta(row, col, b, m):.4f}" for b in table.baselines for m in METRICS]
            for b in table.baselines:
                for m in METRICS:
                    pair = table.paired(row, col, b, m)
                    line += [pair.n, f"{pair.std:.4f}", f"{pair.ci95:.4f}"]
            writer.writerow(line)
    return buf.getvalue()


def _write(path: Path, text: str) -> Path:
    return atomic_write_text(path, text, mkdir=True)


def unfinished_note(runs: list[RunRecord], fingerprints: dict[str, str] | None, study_name: str) -> str:
    """A paragraph naming the study's fine-tunings without a FINISHED run of their current
    configuration (empty when none is missing or the study's plan is not known)."""
    if not fingerprints:
        return ""
    done = {r.tags.get("study_job") for r in runs
            if fingerprints.get(r.tags.get("study_job", "")) == r.tags.get(CONFIG_TAG)}
    missing = sorted(set(fingerprints) - done)
    if not missing:
        return ""
    return (f"**Unfinished study**: {len(missing)} of {len(fingerprints)} fine-tunings have no FINISHED run of their "
            f"current configuration yet, so the table below leaves them out: {', '.join(missing)}. Running the "
            f"study again (`python -m launch study`, the same arguments) runs or resumes just these.\n\n")


def _markdown(study_name: str, table: Table, compare: CompareConfig, top: str, runs: list[RunRecord],
              fingerprints: dict[str, str] | None, pre_lines: list[str], text_tables: bool = False) -> str:
    """comparison.md: the headline, the per-column tables, what the intervals cover, the notes
    (``text_tables``: the tables as aligned text, for MLflow's run description)."""
    md = (f"# Study {study_name}: segmentation after each pre-training\n\n" + (f"{top}\n\n" if top else "")
          + unfinished_note(runs, fingerprints, study_name)
          + f"Scored: {scored_metrics(compare)}; mIoU and pixel accuracy in %, Δ in points; ± and the intervals "
            f"count the unit named under the tables.\n\n"
          + to_markdown(table, text_tables) + "\n" + "\n".join(verdict(table)) + "\n"
          + provenance.notes(runs, table.rows, compare))
    if pre_lines:
        md += ("\nPre-trainings on their own task, against a trivial predictor (has each learned its task?):\n\n"
               + "\n".join(pre_lines) + "\n")
    if table.skipped:
        md += "\nRuns left out:\n\n" + "\n".join(f"- {s}" for s in table.skipped) + "\n"
    return md


def _log_to_parent(store: TrackingStore, study_name: str, parent_run_id: str, table: Table, files: list[Path],
                   md: str, top: str, extra_metrics: dict[str, float], rows: list[str]) -> None:
    """The files as artifacts, the table under the parent's description, each cell's means as parent
    metrics, and what MLflow's UI shows first (:mod:`launch.study_view`)."""
    for f in files:
        store.log_artifact(parent_run_id, f, "comparison")
    note_with_comparison(store, parent_run_id, md, top)
    summary = {}
    used: dict[str, dict[str, float]] = {}
    for (row, col), c in table.cells.items():
        key = f"{row}/{col[0]}/{col[1]}/n{col[2]}"
        summary[f"{key}/miou_mean"] = round(c.mean("miou"), 2)  # % (MLflow shows every digit)
        summary[f"{key}/pixel_acc_mean"] = round(c.mean("pixel_acc"), 2)
        for i, run_id in enumerate(c.run_ids):
            used[run_id] = {m: c.values[m][i] for m in METRICS}
    store.log_metrics(parent_run_id, summary | extra_metrics)
    study_view.publish(store, study_name, rows, used, store.find_runs({"study": study_name}), top)


def compare_runs(store: TrackingStore, study_name: str, compare: CompareConfig, out_dir: Path, *,
                 parent_run_id: str | None = None, row_order: list[str] | None = None,
                 expected_seeds: int = 0, echo: bool = True, fingerprints: dict[str, str] | None = None,
                 pretrain_fingerprints: dict[str, str] | None = None) -> Table:
    """Build the table from MLflow, write md/csv/png to ``out_dir``, log them to the parent run, print it.

    Each job counts once, with its newest FINISHED run; with ``fingerprints`` (fine-tuning job id ->
    current configuration fingerprint) its newest FINISHED run of that configuration (see
    :func:`build_table`); ``pretrain_fingerprints`` does the same for the pre-trainings in the notes.
    Rows are drawn in their colours (:func:`launch.grid.row_colors` of ``row_order``), as in MLflow."""
    runs = store.find_runs({"study": study_name, "study_kind": "finetune"}, status="FINISHED")
    table = build_table(runs, compare, row_order=row_order, expected_seeds=expected_seeds, fingerprints=fingerprints)
    if not table.rows:
        reasons = "; ".join(table.skipped[:5]) or "no FINISHED fine-tuning run"
        raise ValueError(f"study {study_name!r} in {store.uri} (experiment {store.experiment!r}) has nothing to "
                         f"compare: {reasons}")
    pre_runs = store.find_runs({"study": study_name, "study_kind": "pretrain"}, status="FINISHED")
    rows = [r for r in (row_order or []) if r] or table.rows
    rows += [r for r in table.rows if r not in rows]
    top = headline(table, compare.headline, compare.miou)
    pre_lines = pretraining_lines(pre_runs, pretrain_fingerprints, row_order)
    md = _markdown(study_name, table, compare, top, runs, fingerprints, pre_lines)
    files = [_write(out_dir / "comparison.md", md), _write(out_dir / "comparison.csv", to_csv(table)),
             bar_chart(table, out_dir / "comparison.png",
                       f"study {study_name}: segmentation after each pre-training (mIoU = {compare.miou})",
                       row_colors(rows))]
    if parent_run_id:
        note = _markdown(study_name, table, compare, top, runs, fingerprints, pre_lines, text_tables=True)
        _log_to_parent(store, study_name, parent_run_id, table, files, note, top,
                       pretraining_summary(pre_runs, pretrain_fingerprints), rows)
    if echo:
        print(md, flush=True)
        print(f"[compare] wrote {', '.join(str(f) for f in files)}", flush=True)
    return table


def compare_study(study: StudyConfig, *, store: TrackingStore | None = None,
                  parent_run_id: str | None = None, echo: bool = True, out: Path | None = None) -> Table:
    """The comparison of a study config (its tracking URI, experiment and out_dir): each fine-tuning of
    the study's grid with its newest FINISHED run made with the job's current configuration fingerprint.
    Files go to ``out`` (default ``<study out_dir>/comparison``)."""
    store = store or TrackingStore(study_uri(study), study.experiment)
    if parent_run_id is None:
        parents = store.find_runs({"study": study.name, "study_kind": "study"})
        parent_run_id = parents[0].run_id if parents else None
    jobs = plan(study)
    return compare_runs(store, study.name, study.compare, out or study_root(study) / "comparison",
                        parent_run_id=parent_run_id, row_order=list(study.pretrainings),
                        expected_seeds=len(study.seeds), echo=echo,
                        fingerprints={j.job_id: j.fingerprint for j in jobs if j.kind == "finetune"},
                        pretrain_fingerprints={j.job_id: j.fingerprint for j in jobs if j.kind == "pretrain"})


def _compare_tagged(store: TrackingStore, study_name: str, out: Path) -> None:
    """``--study`` mode: the runs tagged ``study=<study_name>``, read as the study's parent run says
    (its tag written by ``launch study``: metric names, baselines, row order), else with defaults."""
    parents = store.find_runs({"study": study_name, "study_kind": "study"})
    settings = compare_settings(parents[0].tags) if parents else None
    if settings is None:
        print(f"[compare] no study settings on a parent run of study {study_name!r} (made before they were "
              f"recorded): metric {CompareConfig().miou!r}, baselines {CompareConfig().baselines}", flush=True)
        compare_runs(store, study_name, CompareConfig(), out)
        return
    compare, rows, seeds = settings
    compare_runs(store, study_name, compare, out, row_order=rows, expected_seeds=seeds)


def main(argv: list[str]) -> int:
    """CLI: ``--experiment <study config name>`` (or an MLflow experiment with --uri and --study)."""
    p = argparse.ArgumentParser(prog="python -m launch compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True,
                   help="study name (configs/experiment/<name>.yaml), or an MLflow experiment name with --study")
    p.add_argument("--study", default=None, help="study tag to compare (MLflow experiment mode: each job's newest "
                                                   "FINISHED run, whatever its configuration)")
    p.add_argument("--uri", default=None, help="tracking URI (default: the study's)")
    p.add_argument("--out", default=None, help="output folder (default: <study out_dir>/comparison)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the study config")
    args = p.parse_args(argv)
    out = Path(args.out).resolve() if args.out else None
    try:
        if args.study is None and (CONFIG_DIR / "experiment" / f"{args.experiment}.yaml").exists():
            study = load_study([f"+experiment={args.experiment}", *args.overrides])
            if args.uri:
                study.tracking_uri = args.uri
            compare_study(study, out=out)
            return 0
        if not args.study:
            raise ValueError(f"no study config configs/experiment/{args.experiment}.yaml; to compare an MLflow "
                             f"experiment directly pass --study <tag> and --uri")
        uri = args.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError("--uri (or MLFLOW_TRACKING_URI) is needed without a study config")
        _compare_tagged(TrackingStore(uri, args.experiment), args.study, out or Path(f"outputs/{args.study}/comparison"))
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
