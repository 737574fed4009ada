"""`launch compare` on an unfinished study names the fine-tunings it leaves out (issue 30.14)."""
from __future__ import annotations

from launch.compare import compare_runs, unfinished_note
from launch.runstore import RunRecord, TrackingStore
from launch.study_config import CONFIG_TAG, CompareConfig
from trainer import tracking


def _run(job: str, pre: str, seed: int, fp: str = "a") -> RunRecord:
    tags = {"study": "s", "study_kind": "finetune", "grid_pretraining": pre, "grid_dataset": "syn",
            "grid_protocol": "frozen", "grid_shots": "0", "grid_seed": str(seed), "study_job": job, CONFIG_TAG: fp}
    return RunRecord(run_id=job, name=job, status="FINISHED", tags=tags,
                     metrics={"test/miou": 0.4 + seed / 100, "test/pixel_acc": 0.8}, start_time=seed)


def test_unfinished_study_names_the_missing_jobs(tmp_path, capsys):
    plan = {f"ft-{pre}-s{s}": "a" for pre in ("depth", "random") for s in (0, 1)}
    store = TrackingStore(tracking.sqlite_uri_for(tmp_path / "mlflow"), "cmp")
    for rec in [_run("ft-depth-s0", "depth", 0), _run("ft-depth-s1", "depth", 1),
                _run("ft-random-s0", "random", 0, fp="old")]:  # made with an older configuration: not counted
        run_id = store.create_run(rec.name, rec.tags)
        store.log_metrics(run_id, rec.metrics, step=1)
        store.set_status(run_id, "FINISHED")
    compare_runs(store, "s", CompareConfig(), tmp_path / "cmp", fingerprints=plan)
    out = capsys.readouterr().out
    assert ("**Unfinished study**: 2 of 4 fine-tunings have no FINISHED run of their current configuration yet, "
            "so the table below leaves them out: ft-random-s0, ft-random-s1.") in out
    assert "Unfinished study" in (tmp_path / "cmp" / "comparison.md").read_text()
    # a finished study (or one whose plan is not known: --study mode) says nothing of the kind
    runs = [_run(job, job.split("-")[1], int(job[-1])) for job in plan]
    assert unfinished_note(runs, plan, "s") == "" and unfinished_note(runs, None, "s") == ""
