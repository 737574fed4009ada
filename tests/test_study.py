"""Study grid: planning, Hydra loading and validation, k8s emission, and a local run against a
stand-in trainer (a script honouring the trainer's override contract and logging through
trainer.tracking): finished jobs are skipped on re-run, the interrupted one runs again."""
from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import launch.study as study_mod
from launch.study import job_overrides, k8s_name, plan
from launch.study_config import from_dict, load_study
from trainer import tracking

TESTS = Path(__file__).resolve().parent

MINI = """\
# @package _global_
study:
  name: mini
  out_dir: {out}
  tracking_uri: {uri}
  experiment: mini-exp
  common: [data.root=data/synthetic]
  pretrainings:
    depth: {{task: depth, init: depth, overrides: [train.steps=3]}}
    random: {{init: random}}
  finetune: [train.steps=2]
  protocols: {{full: [task.protocol=full]}}
  datasets: {{syn: [data.name=synthetic]}}
  shots: [0]
  seeds: [0, 1]
"""

FAKE_TRAINER = textwrap.dedent('''
    """Stand-in for `python -m trainer`: parses the overrides with Hydra's parser, logs a run
    through trainer.tracking exactly as the loop does, exports weights for pre-trainings."""
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from test_tracking_support import run_cfg
    from trainer.tracking import create_tracker

    vals = {{o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(sys.argv[1:])}}
    out = Path(vals["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    name = vals["tracking.run_name"]
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(name + "\\n")
    tags = {{k.split(".")[-1]: str(v) for k, v in vals.items() if k.startswith("tracking.tags.")}}
    cfg = run_cfg(out, uri=vals["tracking.uri"], experiment=vals["tracking.experiment"], run_name=name,
                  parent_run_id=vals["tracking.parent_run_id"], tags=tags)
    cfg.task = {{"name": vals["task"]}}
    tracker = create_tracker(cfg, is_logging_rank=True, run_id=None)
    tracker.announce = False
    if os.environ.get("FAKE_FAIL") == name and not (out / "failed_once").exists():
        (out / "failed_once").touch()
        tracker.close("FAILED")
        sys.exit(3)
    if vals["task"] == "segmentation":
        init, seed = vals["task.init"], int(vals["seed"])
        if init != "random":
            assert Path(vals["task.weights"]).read_bytes() == b"weights of " + init.encode()
        base = {{"depth": 0.5, "random": 0.3}}[init]
        tracker.log_metrics({{"test/miou": base + 0.01 * seed, "test/pixel_acc": base + 0.4 - 0.02 * seed,
                             "val/miou": 0.0}}, step=2)
    else:
        (out / "weights.pt").write_bytes(b"weights of " + vals["task"].encode())
    tracker.close()
''')


def _mini(tmp_path: Path) -> Path:
    cfg_dir = tmp_path / "configs"
    (cfg_dir / "experiment").mkdir(parents=True)
    uri = tracking.sqlite_uri_for(tmp_path / "mlflow")
    (cfg_dir / "experiment" / "mini.yaml").write_text(MINI.format(out=tmp_path / "out", uri=uri))
    return cfg_dir


def test_plan_covers_the_grid_in_order(tmp_path):
    study = load_study(["+experiment=mini", "study.shots=[0,8]"], _mini(tmp_path))
    jobs = plan(study)
    assert [j.job_id for j in jobs] == [
        "pre-depth",
        "ft-depth-syn-full-nall-s0", "ft-depth-syn-full-nall-s1", "ft-depth-syn-full-n8-s0", "ft-depth-syn-full-n8-s1",
        "ft-random-syn-full-nall-s0", "ft-random-syn-full-nall-s1", "ft-random-syn-full-n8-s0",
        "ft-random-syn-full-n8-s1"]
    by_id = {j.job_id: j for j in jobs}
    ft = by_id["ft-depth-syn-full-n8-s1"]
    ov = job_overrides(study, ft, by_id, uri="sqlite:////m.db", parent_run_id="P", out_dir=str(ft.out_dir))
    assert ov[:8] == ["task=segmentation", "data.root=data/synthetic", "train.steps=2", "data.name=synthetic",
                      "task.protocol=full", "task.init=depth", "seed=1", "data.subset=8"]
    assert f"task.weights='{tmp_path / 'out' / 'runs' / 'pre-depth' / 'weights.pt'}'" in ov
    assert "tracking.parent_run_id='P'" in ov and "++tracking.tags.grid_shots='8'" in ov
    assert not any(o.startswith("task.weights") for o in job_overrides(
        study, by_id["ft-random-syn-full-n8-s0"], by_id, uri=None, parent_run_id=None, out_dir="x"))
    assert study_mod.job_command(["a=1"], 2)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node=2", "-m"]


def test_bad_studies_name_the_problem(tmp_path):
    base = {"name": "s", "pretrainings": {"d": {"task": "depth", "init": "depth"}}, "datasets": {"x": []}}
    with pytest.raises(ValueError, match="pretrainings.f: init='flow' needs a pre-training run"):
        from_dict({**base, "pretrainings": {"f": {"init": "flow"}}})
    with pytest.raises(ValueError, match="'seed=3': seed is set by the study"):
        from_dict({**base, "common": ["seed=3"]})
    with pytest.raises(ValueError, match="datasets is empty"):
        from_dict({**base, "datasets": {}})
    with pytest.raises(ValueError, match="bogus"):
        from_dict({**base, "bogus": 1})
    cfg_dir = _mini(tmp_path)
    (cfg_dir / "experiment" / "preset.yaml").write_text("# @package _global_\ntrain:\n  steps: 3\n")
    with pytest.raises(ValueError, match="is not a study"):
        load_study(["+experiment=preset"], cfg_dir)
    with pytest.raises(FileNotFoundError, match="known: mini, preset"):
        load_study(["+experiment=nope"], cfg_dir)


def test_demo_study_is_valid():
    study = load_study(["+experiment=demo"])
    assert set(study.pretrainings) >= {"depth_mono", "flow", "classification", "random"}
    assert len(study.seeds) >= 2


def test_emit_k8s_one_manifest_per_job(tmp_path):
    pytest.importorskip("launch.k8s")
    study = load_study(["+experiment=mini"], _mini(tmp_path))
    out = tmp_path / "k8s"
    assert study_mod.main(["--dry-run"]) == 2  # no +experiment=...: a clear error, not a crash
    import argparse

    from launch import k8s

    p = argparse.ArgumentParser()
    p.add_argument("--out")
    k8s.add_job_arguments(p)
    args = p.parse_args(["--image", "geoprime:1", "--shards-url", "s3://b/synthetic", "--out", str(out),
                         "--gpus-per-node", "2"])
    assert study_mod.emit_k8s(study, args) == 0
    files = sorted(out.glob("*.yaml"))
    assert len(files) == len(plan(study)) == 5
    assert files[0].name == f"0-{k8s_name(study, plan(study)[0])}.yaml"
    pre_name = k8s_name(study, plan(study)[0])
    ft_docs = list(yaml.safe_load_all((out / f"1-{k8s_name(study, plan(study)[1])}.yaml").read_text()))
    command = " ".join(c for d in ft_docs if d["kind"] == "Job"
                       for c in d["spec"]["template"]["spec"]["containers"][0]["command"])
    assert f"task.weights='/checkpoints/{pre_name}/weights.pt'" in command
    assert "data.root=s3://b/synthetic" in command and "data.root=data/synthetic" not in command
    assert all(len(k8s_name(study, j)) <= 40 for j in plan(study))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_study_runs_grid_skips_finished_and_reruns_interrupted(tmp_path, monkeypatch, capsys):
    cfg_dir = _mini(tmp_path)
    study = load_study(["+experiment=mini"], cfg_dir)
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER.format(tests=str(TESTS)))
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_FAIL", "ft-random-syn-full-nall-s1")
    monkeypatch.setattr(study_mod, "job_command", lambda overrides, nproc: [sys.executable, str(fake), *overrides])

    assert study_mod.run_study(study) == 1
    first = calls.read_text().split()
    assert first == [j.job_id for j in plan(study)]
    out = capsys.readouterr().out
    assert "ft-random-syn-full-nall-s1: FAILED" in out and "(n=1)" in out  # the table still shows what finished

    assert study_mod.run_study(study) == 0
    second = calls.read_text().split()[len(first):]
    assert second == ["ft-random-syn-full-nall-s1"]  # everything else was found FINISHED in MLflow
    out = capsys.readouterr().out
    assert out.count("already finished, skipped") == 4

    store = tracking.TrackingStore(study.tracking_uri, "mini-exp")
    (parent,) = store.find_runs({"study": "mini", "study_kind": "study"})
    assert parent.status == "FINISHED"
    children = store.find_runs({"study": "mini", "study_kind": "finetune"})
    assert all(c.tags["mlflow.parentRunId"] == parent.run_id for c in children)
    assert sorted(c.status for c in children) == ["FAILED"] + ["FINISHED"] * 4
    assert "comparison" in store.list_artifacts(parent.run_id)
    rows = {r["pretraining"]: r for r in csv.DictReader(open(tmp_path / "out" / "comparison" / "comparison.csv"))}
    assert float(rows["depth"]["miou_mean"]) == pytest.approx(50.5)
    assert float(rows["depth"]["miou_std"]) == pytest.approx(0.7071, abs=1e-3)
    assert float(rows["random"]["miou_mean"]) == pytest.approx(30.5)
    assert float(rows["depth"]["delta_miou_vs_random"]) == pytest.approx(20.0)
    assert float(rows["depth"]["pixel_acc_mean"]) == pytest.approx(89.0)
