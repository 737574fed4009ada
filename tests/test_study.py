"""Study grid: planning, Hydra loading and validation, k8s emission, and a local run against a
stand-in trainer (a script honouring the trainer's override contract and logging through
trainer.tracking): finished jobs are skipped on re-run, the interrupted one runs again; and, with an
in-process stand-in, configuration fingerprints: an edited job re-runs in a fresh folder (the old one kept)."""
from __future__ import annotations

import csv
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import launch.study as study_mod
from launch.runstore import TrackingStore
from launch.grid import job_overrides, k8s_name, plan
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
    from test_tracking_support import run_cfg, tracker_for

    vals = {{o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(sys.argv[1:])}}
    out = Path(vals["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    name = vals["tracking.run_name"]
    job = vals["tracking.tags.study_job"]
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(job + "\\n")
    tags = {{k.split(".")[-1]: str(v) for k, v in vals.items() if k.startswith("tracking.tags.")}}
    cfg = run_cfg(out, uri=vals["tracking.uri"], experiment=vals["tracking.experiment"], run_name=name,
                  parent_run_id=vals["tracking.parent_run_id"], tags=tags)
    cfg.task = {{"name": vals["task"]}}
    tracker = tracker_for(cfg, is_logging_rank=True, run_id=None)
    tracker.announce = False
    if os.environ.get("FAKE_FAIL") == job and not (out / "failed_once").exists():
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
    assert set(study.pretrainings) >= {"depth_stereo_full", "flow", "classification_other_domain", "random"}
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
    """Real job processes, two at a time (study.parallel_jobs=2), all logging to one sqlite MLflow."""
    cfg_dir = _mini(tmp_path)
    study = load_study(["+experiment=mini", "++study.parallel_jobs=2"], cfg_dir)
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER.format(tests=str(TESTS)))
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_FAIL", "ft-random-syn-full-nall-s1")
    monkeypatch.setattr(study_mod, "job_command", lambda overrides, nproc: [sys.executable, str(fake), *overrides])

    assert study_mod.run_study(study) == 1
    first = calls.read_text().split()
    assert sorted(first) == sorted(j.job_id for j in plan(study))
    assert all(first.index("pre-depth") < first.index(j) for j in first if j.startswith("ft-depth"))
    out = capsys.readouterr().out
    assert "ft-random-syn-full-nall-s1: FAILED" in out and "(n=1)" in out  # the table still shows what finished

    assert study_mod.run_study(study) == 0
    second = calls.read_text().split()[len(first):]
    assert second == ["ft-random-syn-full-nall-s1"]  # everything else was found FINISHED in MLflow
    out = capsys.readouterr().out
    assert out.count("already finished, skipped") == 4

    store = TrackingStore(study.tracking_uri, "mini-exp")
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


@pytest.mark.timeout(120)
def test_parallel_jobs_overlap_wait_for_their_pretraining_and_share_the_cores(tmp_path, monkeypatch):
    from trainer.threads import available_cores

    monkeypatch.delenv("GEOPRIME_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg_dir = _mini(tmp_path)
    _in_process_trainer(monkeypatch, set())
    fake, spans, envs = study_mod.run_job, {}, set()

    def timed(cmd, log_path, timeout, verbose, env=None):
        name = log_path.parent.name
        start = time.monotonic()
        time.sleep(0.3)
        rc = fake(cmd, log_path, timeout, verbose, env)
        spans[name] = (start, time.monotonic())
        envs.add(tuple(sorted((env or {}).items())))
        return rc

    monkeypatch.setattr(study_mod, "run_job", timed)
    study = load_study(["+experiment=mini", "++study.parallel_jobs=2"], cfg_dir)
    assert study_mod.run_study(study) == 0
    assert sorted(spans) == sorted(j.job_id for j in plan(study))
    for job in ("ft-depth-syn-full-nall-s0", "ft-depth-syn-full-nall-s1"):
        assert spans[job][0] >= spans["pre-depth"][1]  # a fine-tuning waits for its pre-training
    events = sorted([(a, 1) for a, _ in spans.values()] + [(b, -1) for _, b in spans.values()])
    running = [sum(d for _, d in events[:i + 1]) for i in range(len(events))]
    assert max(running) == 2  # two at a time, never more
    assert {dict(e).get("GEOPRIME_THREADS") for e in envs} == {str(max(1, available_cores() // 2))}
    assert {dict(e).get("GEOPRIME_STOP_GRACE_S") for e in envs} == {"120"}  # what a stop gives each job
    assert _depth_miou(tmp_path) == pytest.approx(50.5)  # the same table as one at a time


# ----------------------------------------------------------------------------- configuration fingerprints


def test_fingerprint_covers_the_jobs_config_only(tmp_path):
    cfg_dir = _mini(tmp_path)
    jobs = {j.job_id: j for j in plan(load_study(["+experiment=mini"], cfg_dir))}
    moved = {j.job_id: j for j in plan(load_study(["+experiment=mini", f"study.out_dir={tmp_path / 'elsewhere'}",
                                                   "study.tracking_uri=http://x:5000"], cfg_dir))}
    assert {k: j.fingerprint for k, j in jobs.items()} == {k: j.fingerprint for k, j in moved.items()}
    assert all(len(j.fingerprint) == 16 for j in jobs.values())
    assert len({j.fingerprint for j in jobs.values()}) == len(jobs)
    changed = {j.job_id: j for j in plan(load_study(
        ["+experiment=mini", "study.pretrainings.depth.overrides=['train.steps=5']"], cfg_dir))}
    differ = sorted(k for k in jobs if jobs[k].fingerprint != changed[k].fingerprint)
    assert differ == ["ft-depth-syn-full-nall-s0", "ft-depth-syn-full-nall-s1", "pre-depth"]
    ft = jobs["ft-depth-syn-full-nall-s0"]
    assert f"++tracking.tags.study_job_config='{ft.fingerprint}'" in job_overrides(
        load_study(["+experiment=mini"], cfg_dir), ft, jobs, uri=None, parent_run_id=None, out_dir="x")
    nproc = {j.job_id: j for j in plan(load_study(["+experiment=mini", "++study.nproc_per_job=2"], cfg_dir))}
    assert nproc["ft-random-syn-full-nall-s0"].fingerprint != jobs["ft-random-syn-full-nall-s0"].fingerprint


def _in_process_trainer(monkeypatch, fail_once: set[str]) -> list[str]:
    """Replace study.run_job with an in-process stand-in of the trainer: it logs a child run through
    TrackingStore with the tags it is given, resumes its MLflow run when its folder holds one (the way
    the trainer resumes from a checkpoint), and exports 'weights' naming the pre-training's train.steps
    and seed; a fine-tuning's mIoU is 0.5 (depth) / 0.3 (random) + 0.01 * seed + 0.01 * (pre-training
    steps - 3) + 0.02 * pre-training seed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    calls: list[str] = []
    stores: dict = {}

    def fake_run_job(cmd, log_path, timeout, verbose, env=None):
        ov = cmd[cmd.index("trainer") + 1:]
        vals = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(ov)}
        out = Path(vals["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "job.log").open("a").write(" ".join(cmd) + "\n")
        name = vals["tracking.run_name"]
        job = vals["tracking.tags.study_job"]
        calls.append(job)
        key = (vals["tracking.uri"], vals["tracking.experiment"])
        store = stores.get(key) or stores.setdefault(key, TrackingStore(*key))
        tags = {k.split(".")[-1]: str(v) for k, v in vals.items() if k.startswith("tracking.tags.")}
        ckpt = out / "run_id"  # stands for the checkpoint the trainer resumes from
        if ckpt.exists():
            run_id = ckpt.read_text()
            store.set_status(run_id, "RUNNING")
        else:
            run_id = store.create_run(name, tags, parent_run_id=vals["tracking.parent_run_id"])
            ckpt.write_text(run_id)
        if job in fail_once:
            fail_once.discard(job)
            store.set_status(run_id, "FAILED")
            return 3, 0.0
        if vals["task"] == "segmentation":
            init, seed, bonus = vals["task.init"], int(vals["seed"]), 0.0
            if init != "random":
                kind, steps, pseed = Path(vals["task.weights"]).read_text().split()
                assert kind == init
                bonus = 0.01 * (int(steps) - 3) + 0.02 * int(pseed)
            base = {"depth": 0.5, "random": 0.3}[init] + bonus
            store.log_metrics(run_id, {"test/miou": base + 0.01 * seed, "test/pixel_acc": base + 0.4}, step=2)
        else:
            (out / "weights.pt").write_text(f"{vals['task']} {vals['train.steps']} {vals['seed']}")
            store.log_metrics(run_id, {"val/abs_rel": 0.2 + 0.01 * int(vals["seed"]), "val/baseline_abs_rel": 0.5})
        store.set_status(run_id, "FINISHED")
        return 0, 0.0

    monkeypatch.setattr(study_mod, "run_job", fake_run_job)
    return calls


def _depth_miou(tmp_path: Path) -> float:
    rows = {r["pretraining"]: r for r in csv.DictReader(open(tmp_path / "out" / "comparison" / "comparison.csv"))}
    return float(rows["depth"]["miou_mean"])


@pytest.mark.timeout(120)
def test_changed_pretraining_reruns_it_and_its_finetunings_only(tmp_path, monkeypatch, capsys):
    from launch.compare import compare_runs, compare_study

    cfg_dir = _mini(tmp_path)
    calls = _in_process_trainer(monkeypatch, set())
    old = load_study(["+experiment=mini"], cfg_dir)
    assert study_mod.run_study(old) == 0
    assert calls == [j.job_id for j in plan(old)]
    assert _depth_miou(tmp_path) == pytest.approx(50.5)
    runs = tmp_path / "out" / "runs"
    old_fp = {j.job_id: j.fingerprint for j in plan(old)}
    assert json.loads((runs / "pre-depth" / "study_job.json").read_text())["fingerprint"] == old_fp["pre-depth"]
    store = TrackingStore(old.tracking_uri, "mini-exp")
    (pre_run,) = store.find_runs({"study_job": "pre-depth"})
    assert pre_run.tags["study_job_config"] == old_fp["pre-depth"]
    capsys.readouterr()

    new = load_study(["+experiment=mini", "study.pretrainings.depth.overrides=['train.steps=5']"], cfg_dir)
    new_fp = {j.job_id: j.fingerprint for j in plan(new)}
    assert study_mod.run_study(new, dry_run=True) == 0
    dry = capsys.readouterr().out
    assert f"# pre-depth [{new_fp['pre-depth']}]: would move its folder aside and re-run (config changed " \
           f"({old_fp['pre-depth']} -> {new_fp['pre-depth']}))" in dry
    assert dry.count("would move its folder aside and re-run") == 3
    assert dry.count("would be skipped (already finished)") == 2
    assert sorted(p.name for p in runs.iterdir()) == sorted(old_fp)  # a dry run moves nothing

    del calls[:]
    assert study_mod.run_study(new) == 0
    assert calls == ["pre-depth", "ft-depth-syn-full-nall-s0", "ft-depth-syn-full-nall-s1"]
    out = capsys.readouterr().out
    assert out.count("already finished, skipped") == 2
    assert f"pre-depth: config changed ({old_fp['pre-depth']} -> {new_fp['pre-depth']}): old run folder kept as " \
           f"{runs}/pre-depth.stale-" in out
    (stale,) = runs.glob("pre-depth.stale-*")
    assert (stale / "weights.pt").read_text() == "depth 3 0"  # the old run, kept whole
    assert json.loads((stale / "study_job.json").read_text())["fingerprint"] == old_fp["pre-depth"]
    assert (runs / "pre-depth" / "weights.pt").read_text() == "depth 5 0"
    assert len(list(runs.glob("ft-depth-syn-full-nall-s*.stale-*"))) == 2
    assert not list(runs.glob("ft-random*.stale-*"))

    # the table: the new depth runs only (51.5 would be old and new averaged, 50.5 the old ones)
    assert _depth_miou(tmp_path) == pytest.approx(52.5)
    assert len(store.find_runs({"study": "mini", "grid_pretraining": "depth", "study_kind": "finetune"},
                               status="FINISHED")) == 4
    assert compare_study(new, echo=False).cell("depth", ("syn", "full", "0")).mean("miou") == pytest.approx(52.5)
    # the old config's comparison still finds the old runs, although newer ones of the same jobs exist
    table = compare_study(old, echo=False)
    assert table.cell("depth", ("syn", "full", "0")).mean("miou") == pytest.approx(50.5)
    assert any("2 FINISHED run(s) made with another configuration" in s for s in table.skipped)
    # without a study config (launch compare --study): each job's newest FINISHED run
    table = compare_runs(store, "mini", old.compare, tmp_path / "cmp", echo=False)
    assert sorted(table.cell("depth", ("syn", "full", "0")).values["miou"]) == [pytest.approx(52.0), pytest.approx(53.0)]

    del calls[:]
    assert study_mod.run_study(new) == 0
    assert calls == []
    assert capsys.readouterr().out.count("already finished, skipped") == 5


@pytest.mark.timeout(120)
def test_unfinished_job_resumes_in_place_and_unknown_folders_are_moved_aside(tmp_path, monkeypatch, capsys):
    cfg_dir = _mini(tmp_path)
    study = load_study(["+experiment=mini"], cfg_dir)
    runs = tmp_path / "out" / "runs"
    legacy = runs / "ft-random-syn-full-nall-s0"  # a folder from before fingerprints: no study_job.json
    legacy.mkdir(parents=True)
    (legacy / "job.log").write_text("an old run\n")
    store = TrackingStore(study.tracking_uri, "mini-exp")
    old_run = store.create_run("ft-random-syn-full-nall-s0", {  # its FINISHED run carries no fingerprint
        "study": "mini", "study_kind": "finetune", "study_job": "ft-random-syn-full-nall-s0", "grid_pretraining":
        "random", "grid_dataset": "syn", "grid_protocol": "full", "grid_shots": "0", "grid_seed": "0"})
    store.log_metrics(old_run, {"test/miou": 0.99, "test/pixel_acc": 0.99})
    store.set_status(old_run, "FINISHED")

    calls = _in_process_trainer(monkeypatch, {"ft-depth-syn-full-nall-s1"})
    assert study_mod.run_study(study, dry_run=True) == 0
    dry = capsys.readouterr().out
    fp = {j.job_id: j.fingerprint for j in plan(study)}
    assert (f"# ft-random-syn-full-nall-s0 [{fp['ft-random-syn-full-nall-s0']}]: would move its folder aside and "
            f"re-run (its run folder has no study_job.json (config unknown -> {fp['ft-random-syn-full-nall-s0']}))"
            in dry)
    assert dry.count("would run fresh (new)") == 4

    assert study_mod.run_study(study) == 1
    assert calls == [j.job_id for j in plan(study)]
    out = capsys.readouterr().out
    assert "ft-random-syn-full-nall-s0: its run folder has no study_job.json (config unknown -> " in out
    (moved,) = runs.glob("ft-random-syn-full-nall-s0.stale-*")
    assert (moved / "job.log").read_text() == "an old run\n"
    rows = {r["pretraining"]: r for r in csv.DictReader(open(tmp_path / "out" / "comparison" / "comparison.csv"))}
    assert float(rows["random"]["miou_mean"]) == pytest.approx(30.5)  # not the unfingerprinted 99
    failed_run = (runs / "ft-depth-syn-full-nall-s1" / "run_id").read_text()

    assert study_mod.run_study(study, dry_run=True) == 0
    assert "# ft-depth-syn-full-nall-s1 [" in (dry := capsys.readouterr().out)
    assert "would resume (resuming in its folder (same config))" in dry and dry.count("would be skipped") == 4

    del calls[:]
    assert study_mod.run_study(study) == 0
    assert calls == ["ft-depth-syn-full-nall-s1"]
    out = capsys.readouterr().out
    assert "ft-depth-syn-full-nall-s1: running (resuming) ..." in out and "stale" not in out
    assert (runs / "ft-depth-syn-full-nall-s1" / "run_id").read_text() == failed_run  # same folder, same run
    assert len(list(runs.glob("*.stale-*"))) == 1
    assert _depth_miou(tmp_path) == pytest.approx(50.5)


# ----------------------------------------------------------------------------- pre-training seeds


def test_pretrain_seeds_pair_each_finetuning_seed_to_one_pretraining_run(tmp_path):
    cfg_dir = _mini(tmp_path)
    single = plan(load_study(["+experiment=mini"], cfg_dir))
    study = load_study(["+experiment=mini", "+study.pretrain_seeds=[0,1]", "study.seeds=[0,1,2,3]"], cfg_dir)
    jobs = {j.job_id: j for j in plan(study)}
    assert [j for j in jobs if j.startswith("pre-")] == ["pre-depth-p0", "pre-depth-p1"]
    assert "seed=1" in jobs["pre-depth-p1"].overrides and jobs["pre-depth-p1"].tags["grid_pretrain_seed"] == "1"
    # fine-tuning seeds are nested in pre-training seeds, dealt out in turn: s0, s2 <- p0; s1, s3 <- p1
    assert sorted(j for j in jobs if j.startswith("ft-depth")) == [
        "ft-depth-syn-full-nall-p0-s0", "ft-depth-syn-full-nall-p0-s2", "ft-depth-syn-full-nall-p1-s1",
        "ft-depth-syn-full-nall-p1-s3"]
    assert jobs["ft-depth-syn-full-nall-p1-s3"].needs == "pre-depth-p1"
    assert jobs["ft-random-syn-full-nall-p1-s3"].needs is None
    assert jobs["ft-random-syn-full-nall-p1-s3"].tags["grid_pretrain_seed"] == "1"
    by_id = {j.job_id: j for j in single}
    # new job ids and fingerprints: nothing of a single-seed study's runs is taken for these; a
    # random-init row's fingerprint names the run it is paired to
    assert not set(jobs) & set(by_id)
    assert jobs["ft-random-syn-full-nall-p0-s0"].fingerprint != by_id["ft-random-syn-full-nall-s0"].fingerprint
    assert jobs["ft-depth-syn-full-nall-p0-s0"].fingerprint != by_id["ft-depth-syn-full-nall-s0"].fingerprint
    # the older single-number spelling plans the same jobs as a one-element list, as before
    legacy = plan(load_study(["+experiment=mini", "+study.pretrain_seed=0"], cfg_dir))
    listed = plan(load_study(["+experiment=mini", "+study.pretrain_seeds=[0]"], cfg_dir))
    assert [(j.job_id, j.fingerprint) for j in legacy] == [(j.job_id, j.fingerprint) for j in listed] == \
        [(j.job_id, j.fingerprint) for j in single]
    assert "seed=4" in plan(load_study(["+experiment=mini", "+study.pretrain_seed=4"], cfg_dir))[0].overrides


@pytest.mark.parametrize("overrides, message", [
    (["+study.pretrain_seeds=[0,1]", "study.seeds=[0,1,2]"],
     r"3 fine-tuning seeds cannot be split evenly over the 2 pre-training runs .*give a multiple of 2"),
    (["+study.pretrain_seeds=[0,0]"], r"study.pretrain_seeds=\[0, 0\]: repeated seed"),
    (["+study.pretrain_seeds=[]"], "study.pretrain_seeds is empty"),
    (["+study.pretrain_seeds=[0,1]", "+study.pretrain_seed=0"], "pretrain_seed=0 and study.pretrain_seeds=.* both set"),
])
def test_bad_pretrain_seeds_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_study(["+experiment=mini", *overrides], _mini(tmp_path))


@pytest.mark.timeout(400)
def test_single_seed_study_rerun_with_pretrain_seeds_counts_only_the_new_runs(tmp_path, monkeypatch, capsys):
    cfg_dir = _mini(tmp_path)
    calls = _in_process_trainer(monkeypatch, set())
    assert study_mod.run_study(load_study(["+experiment=mini"], cfg_dir)) == 0
    assert "Unit: the fine-tuning seed" in (tmp_path / "out" / "comparison" / "comparison.md").read_text()
    del calls[:]
    study = load_study(["+experiment=mini", "+study.pretrain_seeds=[0,1]"], cfg_dir)
    assert study_mod.run_study(study) == 0
    assert calls == [j.job_id for j in plan(study)]  # every job runs: none of the old runs is reused
    assert "already finished" not in capsys.readouterr().out
    # depth: s0 from p0 = 50, s1 from p1 = 50 + 1 + 2 = 53; random 30, 31: per-run differences 20, 22
    rows = {r["pretraining"]: r for r in csv.DictReader(open(tmp_path / "out" / "comparison" / "comparison.csv"))}
    assert float(rows["depth"]["miou_mean"]) == pytest.approx(51.5)
    assert rows["depth"]["unit"] == "pre-training run" and rows["depth"]["n_units"] == "2"
    assert float(rows["depth"]["paired_miou_vs_random_ci95"]) == pytest.approx(12.7062 * 2 ** 0.5 / 2 ** 0.5, rel=1e-4)
    md = (tmp_path / "out" / "comparison" / "comparison.md").read_text()
    assert "Unit: the pre-training run. Each pre-training row ran 2 times" in md
    assert "**depth transfers better than random: +21.0 mIoU points (95 % interval +8.3 .. +33.7)** over 2 paired " \
           "pre-training runs" in md.split("\n\n")[1]  # the headline, first under the title
    assert "| depth | +21.0 (+8.3 .. +33.7) | " in md
    assert ("- depth: val abs_rel 0.205 ± 0.007 against 0.500 for constant depth (median-scaled) (0.41x the "
            "baseline; 2 runs; per run 0.200, 0.210)") in md
    assert "not in the study's current grid: ft-depth-syn-full-nall-s0, ft-depth-syn-full-nall-s1" in md


def test_a_paths_spelling_does_not_change_a_jobs_identity(tmp_path, monkeypatch):
    from launch.demo import DEMO_DATA, OTHER_DATA, _absolute, point_at_data
    from launch.grid import REPO, job_fingerprint, study_root

    same = [job_fingerprint([o], 1) for o in ("data.root=data/x", f"data.root='{REPO}/data/x'", "data.root=./data//x",
                                              f'data.root="{REPO}/data/../data/x"')]
    assert len(set(same)) == 1
    assert job_fingerprint(["data.root=data/y"], 1) != same[0]  # other data: another job
    assert job_fingerprint(["data.root=s3://b/x"], 1) != job_fingerprint(["data.root=s3://b/y"], 1)
    # `launch demo` points every job at absolute data folders: the jobs stay the demo config's own
    demo = load_study(["+experiment=demo"])
    pointed = load_study(["+experiment=demo"])
    point_at_data(pointed, _absolute(DEMO_DATA), _absolute(OTHER_DATA))
    assert pointed.common != demo.common
    assert [j.fingerprint for j in plan(pointed)] == [j.fingerprint for j in plan(demo)]
    # a relative out_dir is the repository's folder, from any working directory
    monkeypatch.chdir(tmp_path)
    assert study_root(demo) == REPO / "outputs" / "demo"


@pytest.mark.timeout(300)
def test_compare_works_on_a_finished_study_from_another_folder(tmp_path, monkeypatch, capsys):
    """The study runs with absolute data paths (as `launch demo` writes them); `launch compare` then runs
    from another working directory with the config's relative spelling, and finds every run."""
    from launch.compare import main as compare_main
    from launch.grid import REPO

    cfg_dir = _mini(tmp_path)
    _in_process_trainer(monkeypatch, set())
    absolute = load_study(["+experiment=mini", f"study.common=[\"data.root='{REPO}/data/synthetic'\"]"], cfg_dir)
    assert study_mod.run_study(absolute) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("launch.compare.CONFIG_DIR", cfg_dir)
    monkeypatch.setattr("launch.compare.load_study", lambda overrides: load_study(overrides, cfg_dir))
    assert compare_main(["--experiment", "mini", "--out", "cmp"]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| depth | 50.5 ± 0.7 |" in md and "| random | 30.5 ± 0.7 |" in md
    assert "another configuration" not in md and "Unfinished study" not in md
    # without the config (--study): the parent run says how the study compares (metric, baselines, rows)
    assert compare_main(["--experiment", "mini-exp", "--study", "mini", "--uri", absolute.tracking_uri,
                         "--out", "tagged"]) == 0
    assert "| depth | +20.0" in (tmp_path / "tagged" / "comparison.md").read_text()
    assert "no study settings" not in capsys.readouterr().out
