"""Comparison table: values against runs with known metrics (hand-computed means, sample stds,
differences to the baselines), the newest run of a job counting once, unusable runs listed."""
from __future__ import annotations

import csv
import math
import statistics

import pytest

from launch.compare import build_table, compare_runs, find_metric
from launch.compare_report import headline, to_markdown, verdict
from launch.runstore import RunRecord, TrackingStore
from launch.study_config import CompareConfig
from trainer import tracking


def _run(pre, seed, miou, acc, *, shots="0", protocol="full", t=0, job=None, extra=None):
    tags = {"study": "s", "study_kind": "finetune", "grid_pretraining": pre, "grid_dataset": "syn",
            "grid_protocol": protocol, "grid_shots": shots, "grid_seed": str(seed),
            "study_job": job or f"ft-{pre}-syn-{protocol}-n{shots}-s{seed}"}
    metrics = {"test/miou": miou, "test/pixel_acc": acc, "val/miou": -1.0, **(extra or {})}
    return RunRecord(run_id=f"{pre}{seed}{protocol}{shots}{t}", name="", status="FINISHED", tags=tags,
                     metrics=metrics, start_time=t)


RUNS = [
    _run("depth", 0, 0.40, 0.80), _run("depth", 1, 0.44, 0.84), _run("depth", 2, 0.45, 0.83),
    _run("imagenet", 0, 0.38, 0.82), _run("imagenet", 1, 0.39, 0.81), _run("imagenet", 2, 0.41, 0.80),
    _run("random", 0, 0.20, 0.70), _run("random", 1, 0.22, 0.71), _run("random", 2, 0.21, 0.69),
    _run("depth", 0, 0.30, 0.60, protocol="frozen"),
]


def test_find_metric_prefers_test_then_val():
    prefixes = CompareConfig().prefer_prefixes
    assert find_metric({"val/miou": 1.0, "test/miou": 2.0}, "miou", prefixes) == 2.0
    assert find_metric({"val/miou": 1.0}, "miou", prefixes) == 1.0
    assert find_metric({"foo/miou": 3.0}, "miou", prefixes) == 3.0
    assert find_metric({"a/miou": 3.0, "b/miou": 4.0}, "miou", prefixes) is None
    assert find_metric({"test/miou": 5.0}, "test/miou", prefixes) == 5.0


def test_table_values_match_hand_computation():
    table = build_table(RUNS, CompareConfig(), row_order=["random", "imagenet", "depth"], expected_seeds=3)
    assert table.rows == ["random", "imagenet", "depth"]
    assert table.columns == [("syn", "frozen", "0"), ("syn", "full", "0")]
    assert table.baselines == ["imagenet", "random"]
    full = ("syn", "full", "0")
    depth = table.cell("depth", full)
    assert depth.mean("miou") == pytest.approx(43.0)
    assert depth.std("miou") == pytest.approx(statistics.stdev([40.0, 44.0, 45.0]))
    assert depth.mean("pixel_acc") == pytest.approx(82.333333, abs=1e-5)
    assert table.delta("depth", full, "imagenet", "miou") == pytest.approx(43.0 - (38 + 39 + 41) / 3)
    assert table.delta("depth", full, "random", "pixel_acc") == pytest.approx(82.333333 - 70.0, abs=1e-5)
    assert math.isnan(table.delta("depth", ("syn", "frozen", "0"), "random", "miou"))  # no frozen baseline

    md = to_markdown(table)
    lines = md.splitlines()
    assert "### syn · full · all" in lines and "| pre-training | mIoU % | pixel acc % | seeds |" in lines
    # paired by seed: depth - imagenet = 2, 5, 4 -> mean 3.67, std 1.53, t(0.975, 2) = 4.303 -> ± 3.79;
    # depth - random = 20, 22, 24 -> ± 4.303 * 2 / sqrt(3) = 4.97
    pair = table.paired("depth", full, "imagenet", "miou")
    assert pair.diffs == pytest.approx([2.0, 5.0, 4.0]) and pair.ci95 == pytest.approx(4.3027 * 1.5275 / 3 ** 0.5, rel=1e-3)
    full_part = md[md.index("### syn · full · all"):]
    assert "| depth | 43.0 ± 2.6 | 82.3 ± 2.1 | 3 |" in full_part
    # the means differ by more than either row's std, yet 3 paired seeds do not resolve it
    to_imagenet = full_part[full_part.index("Paired differences to **imagenet**"):]
    assert "| depth | +3.7 (-0.1 .. +7.5) | +1.3 " in to_imagenet and "| not resolved |" in to_imagenet.split("\n\n")[1]
    to_random = full_part[full_part.index("Paired differences to **random**"):]
    assert "| depth | +22.0 (+17.0 .. +27.0) |" in to_random and "| better |" in to_random.split("\n\n")[1]
    assert "| random | -18.3 (-22.1 .. -14.5) |" in to_imagenet and "| imagenet |" not in to_random  # two baselines: once
    assert "| depth | 30.0 ± 0.0 (n=1) |" in md  # the frozen cell has one seed of the 3 expected
    assert "| no imagenet run in this column |" in md[:md.index("### syn · full")]
    assert max(len(line.split("|")) for line in lines) <= 6  # at most 4 columns: fits MLflow's 800-px panel
    text = to_markdown(table, text_tables=True)  # the run description's version: aligned text in code blocks
    assert "```" in text and "vs imagenet" in text and "| depth |" not in text
    assert "highest mean mIoU: depth (43.0 %)" in "\n".join(verdict(table))
    assert headline(table, [], "miou").startswith("**depth vs imagenet: not resolved: +3.7 mIoU points")  # full


def test_headline_answers_the_question_first():
    table = build_table(RUNS[:9], CompareConfig(), row_order=["depth", "imagenet", "random"], expected_seeds=3)
    assert headline(table, [], "miou_subset") == (
        "**depth vs imagenet: not resolved: +3.7 mIoU points (95 % interval -0.1 .. +7.5)** over 3 paired "
        "fine-tuning seeds (syn · full · all, mIoU = `miou_subset`).")
    assert headline(table, ["depth", "random"], "miou") == (
        "**depth transfers better than random: +22.0 mIoU points (95 % interval +17.0 .. +27.0)** over 3 paired "
        "fine-tuning seeds (syn · full · all, mIoU = `miou`).")


def test_newest_run_of_a_job_counts_and_bad_runs_are_listed():
    runs = [_run("depth", 0, 0.10, 0.5, t=1), _run("depth", 0, 0.30, 0.6, t=2),
            _run("random", 0, 0.2, 0.5), _run("random", 1, 0.2, 0.5, extra={}),
            RunRecord("x", "", "FINISHED", {"study_job": "j"}, {}, {"test/miou": 1.0}, 0)]
    runs[3].metrics.pop("test/pixel_acc")
    runs[3].metrics.pop("val/miou")
    table = build_table(runs, CompareConfig())
    assert table.cell("depth", ("syn", "full", "0")).values["miou"] == [pytest.approx(30.0)]
    assert table.cell("random", ("syn", "full", "0")).n == 1
    assert any("no grid tag" in s for s in table.skipped)
    assert any("'pixel_acc' missing" in s for s in table.skipped)
    assert "| depth | +10.0 (n<2) | +10.0 (n<2) | no spread to judge |" in to_markdown(table)


def test_compare_runs_from_mlflow_writes_and_logs(tmp_path, capsys):
    store = TrackingStore(tracking.sqlite_uri_for(tmp_path / "mlflow"), "cmp")
    parent = store.create_run("study-s", {"study": "s", "study_kind": "study"})
    for rec in RUNS[:9]:
        run_id = store.create_run(rec.tags["study_job"], rec.tags, parent_run_id=parent)
        store.log_metrics(run_id, rec.metrics, step=5)
        store.set_status(run_id, "FINISHED")
    unfinished = store.create_run("x", {**RUNS[0].tags, "study_job": "other"}, parent_run_id=parent)
    store.log_metrics(unfinished, {"test/miou": 0.99, "test/pixel_acc": 0.99})  # RUNNING: not counted

    table = compare_runs(store, "s", CompareConfig(), tmp_path / "cmp", parent_run_id=parent,
                         row_order=["depth", "imagenet", "random"], expected_seeds=3)
    assert table.cell("depth", ("syn", "full", "0")).mean("miou") == pytest.approx(43.0)
    out = capsys.readouterr().out
    assert "| depth | 43.0 ± 2.6 | 82.3 ± 2.1 |" in out
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "comparison.csv")))
    assert [r["pretraining"] for r in rows] == ["depth", "imagenet", "random"]
    assert float(rows[2]["miou_mean"]) == pytest.approx(21.0)
    assert float(rows[0]["delta_miou_vs_random"]) == pytest.approx(22.0)
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(store.list_artifacts(parent, "comparison")) == [
        "comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"]
    (p,) = [r for r in store.find_runs({"study_kind": "study"})]
    assert p.metrics["depth/syn/full/n0/miou_mean"] == pytest.approx(43.0)


def test_nothing_to_compare_is_a_clear_error(tmp_path):
    store = TrackingStore(tracking.sqlite_uri_for(tmp_path / "mlflow"), "empty")
    with pytest.raises(ValueError, match="has nothing to compare"):
        compare_runs(store, "s", CompareConfig(), tmp_path / "cmp")


@pytest.mark.timeout(60)
def test_fingerprints_pick_each_jobs_newest_run_of_its_current_config():
    def tagged(run, fp):
        run.tags["study_job_config"] = fp
        return run

    runs = [tagged(_run("depth", 0, 0.40, 0.8, t=1), "a"),   # current config, older
            tagged(_run("depth", 0, 0.10, 0.5, t=3), "b"),   # an edited config, newer: not used
            tagged(_run("depth", 0, 0.35, 0.7, t=2), "a"),   # current config, newest of it: used
            tagged(_run("depth", 1, 0.20, 0.6, t=1), "a"),
            _run("depth", 2, 0.90, 0.9, t=5),                 # no fingerprint (made before them): not used
            tagged(_run("random", 0, 0.2, 0.5, t=1), "r")]    # a job no longer in the grid
    current = {"ft-depth-syn-full-n0-s0": "a", "ft-depth-syn-full-n0-s1": "a", "ft-depth-syn-full-n0-s2": "a"}
    table = build_table(runs, CompareConfig(), fingerprints=current)
    assert table.rows == ["depth"]
    assert table.cell("depth", ("syn", "full", "0")).values["miou"] == [pytest.approx(35.0), pytest.approx(20.0)]
    assert any("1 FINISHED run(s) made with another configuration of their job (tag study_job_config differs "
               "from the study's current one): ft-depth-syn-full-n0-s0" in s for s in table.skipped)
    assert any("1 FINISHED run(s) without a study_job_config tag" in s and s.endswith("ft-depth-syn-full-n0-s2")
               for s in table.skipped)
    assert any("not in the study's current grid: ft-random-syn-full-n0-s0" in s for s in table.skipped)
    # without fingerprints (launch compare --study): every job's newest FINISHED run, whatever its config
    table = build_table(runs, CompareConfig())
    assert table.cell("depth", ("syn", "full", "0")).values["miou"] == [
        pytest.approx(90.0), pytest.approx(10.0), pytest.approx(20.0)]
    assert table.cell("random", ("syn", "full", "0")).n == 1


# ----------------------------------------------------------------------------- pre-training runs as the unit


def _nested(pre, pseed, seed, miou):
    run = _run(pre, seed, miou, miou + 0.3, job=f"ft-{pre}-syn-full-n0-p{pseed}-s{seed}")
    run.tags["grid_pretrain_seed"] = str(pseed)
    return run


def test_pretraining_runs_are_the_unit_when_rows_have_several():
    # 2 pre-training runs per row, 2 fine-tuning seeds nested in each (p0: s0, s2; p1: s1, s3)
    runs = [_nested("depth", 0, 0, 0.40), _nested("depth", 0, 2, 0.42), _nested("depth", 1, 1, 0.50),
            _nested("depth", 1, 3, 0.52), _nested("depth", 2, 4, 0.45), _nested("depth", 2, 5, 0.47),
            _nested("random", 0, 0, 0.30), _nested("random", 0, 2, 0.30), _nested("random", 1, 1, 0.31),
            _nested("random", 1, 3, 0.33), _nested("random", 2, 4, 0.29), _nested("random", 2, 5, 0.29)]
    table = build_table(runs, CompareConfig(baselines=["random"]), expected_seeds=6)
    col = ("syn", "full", "0")
    depth = table.cell("depth", col)
    assert table.unit == "pre-training run" and depth.n == 6 and depth.n_units == 3
    # run means 41, 51, 46: mean 46, std 5 (over runs, not over the 6 fine-tunings: 4.52)
    assert depth.unit_values("miou") == pytest.approx([41.0, 51.0, 46.0])
    assert depth.mean("miou") == pytest.approx(46.0) and depth.std("miou") == pytest.approx(5.0)
    # per run: depth - random seed by seed, averaged in the run: 11, 19, 17 -> 3 paired units
    pair = table.paired("depth", col, "random", "miou")
    assert pair.diffs == pytest.approx([11.0, 19.0, 17.0])
    assert pair.ci95 == pytest.approx(4.3027 * statistics.stdev([11, 19, 17]) / 3 ** 0.5, rel=1e-4)
    md = to_markdown(table)
    assert "Unit: the pre-training run. Each pre-training row ran 3 times" in md
    assert "fine-tuned with 2 seed(s) of its own" in md and "46.0 ± 5.0" in md
    assert "(n=" not in md  # 6 fine-tunings as expected
    assert "| depth | +15.7 (+5.3 .. +26.0) | " in md and "| better |" in md and "| depth | 46.0 ± 5.0 | " in md
    assert headline(table, [], "miou") == ("**depth transfers better than random: +15.7 mIoU points (95 % interval "
                                           "+5.3 .. +26.0)** over 3 paired pre-training runs (syn · full · all, mIoU = "
                                           "`miou`).")
    assert "| pre-training | mIoU % | pixel acc % | runs |" in md and "| 3 (6 fine-tunings) |" in md
    # one pre-training run per row: the fine-tuning seed is the unit, and the table says what that leaves out
    single = build_table(RUNS, CompareConfig())
    assert single.unit == "fine-tuning seed"
    assert "cover fine-tuning noise only, not the spread between pre-training runs" in to_markdown(single)


def test_pretraining_lines_give_each_rows_task_metric_beside_its_baseline():
    from launch.pretrain_report import pretraining_lines, pretraining_summary

    def pre(row, pseed, metrics, fp="a", t=0):
        tags = {"study_job": f"pre-{row}-p{pseed}", "grid_pretraining": row, "grid_pretrain_seed": str(pseed),
                "study_job_config": fp}
        return RunRecord(f"{row}{pseed}{t}", "", "FINISHED", tags, {}, metrics, t)

    runs = [pre("depth", 1, {"test/abs_rel": 0.30, "test/baseline_abs_rel": 0.50, "val/abs_rel": 0.9,
                             "val/baseline_abs_rel": 0.5}),
            pre("depth", 0, {"test/abs_rel": 0.20, "test/baseline_abs_rel": 0.52}),
            pre("depth", 0, {"test/abs_rel": 0.99, "test/baseline_abs_rel": 0.52}, fp="old", t=5),  # other config
            pre("flow", 0, {"test/epe": 1.5, "test/baseline_epe": 3.0, "test/fl_all": 0.1}),
            pre("cls", 0, {"val/map": 0.8, "val/baseline_map": 0.55}),
            pre("old", 0, {"val/abs_rel": 0.4})]
    current = {f"pre-{r}-p{p}": "a" for r in ("depth", "flow", "cls", "old") for p in (0, 1)}
    lines = pretraining_lines(runs, current, row_order=["flow", "depth"])
    assert lines == [
        "- flow: test epe 1.500 against 3.000 for zero flow (0.50x the baseline; 1 run; per run 1.500)",
        "- depth: test abs_rel 0.250 ± 0.071 against 0.510 for constant depth (median-scaled) (0.49x the baseline; "
        "2 runs; per run 0.200, 0.300)",
        "- cls: val map 0.800 against 0.550 for class frequencies (+0.250 over the baseline; 1 run; per run 0.800)",
        "- old: 1 run(s), none logged a task metric with a trivial baseline beside it (made before baselines "
        "were logged?)"]
    summary = pretraining_summary(runs, current)
    assert summary["pretraining/depth/abs_rel_mean"] == pytest.approx(0.25)
    assert summary["pretraining/depth/baseline_abs_rel_mean"] == pytest.approx(0.51)
