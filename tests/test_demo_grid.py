"""The demo grid's pieces: per-protocol N-shot columns (study.protocol_shots), a row fine-tuning
from another row's pre-training run (weights_from, e.g. depth_full), the different-domain world
(SyntheticConfig.palette) and the demo's own grid (frozen, 8 scored classes, 4 pre-training runs per row)."""
from __future__ import annotations

import numpy as np
import pytest

from data_shards.sources.synthetic import SyntheticConfig, iter_samples
from launch.grid import plan
from launch.study_config import from_dict, load_study

BASE = {
    "name": "g",
    "pretrainings": {
        "depth": {"task": "depth", "init": "depth", "overrides": ["train.steps=3"]},
        "depth_full": {"weights_from": "depth", "init": "depth_full"},
        "random": {"init": "random"},
    },
    "protocols": {"frozen": ["task.protocol=frozen"], "full": ["task.protocol=full"]},
    "protocol_shots": {"frozen": [0], "full": [4]},
    "datasets": {"syn": []},
    "seeds": [0, 1],
}


def test_protocol_shots_choose_columns_and_weights_from_shares_one_run(tmp_path):
    study = from_dict({**BASE, "out_dir": str(tmp_path)})
    jobs = plan(study)
    assert [j.job_id for j in jobs if j.kind == "pretrain"] == ["pre-depth"]  # depth_full has no run of its own
    ft = {j.job_id: j for j in jobs if j.kind == "finetune"}
    assert sorted(ft) == sorted(f"ft-{row}-syn-{col}-s{s}" for row in ("depth", "depth_full", "random")
                                for col in ("frozen-nall", "full-n4") for s in (0, 1))
    full = ft["ft-depth_full-syn-full-n4-s1"]
    assert full.needs == "pre-depth" and "task.init=depth_full" in full.overrides
    assert full.overrides[-2:] == ["data.subset=4", "data.subset_seed=1"]
    assert not any(o.startswith("data.subset") for o in ft["ft-depth_full-syn-frozen-nall-s1"].overrides)
    assert ft["ft-random-syn-full-n4-s0"].needs is None
    # the shared run's fingerprint reaches both rows: retraining it re-runs their fine-tunings
    assert ft["ft-depth-syn-full-n4-s0"].fingerprint != ft["ft-depth_full-syn-full-n4-s0"].fingerprint


@pytest.mark.parametrize("change, message", [
    ({"depth_full": {"weights_from": "nope", "init": "depth_full"}}, "weights_from='nope' must name a pre-training"),
    ({"depth_full": {"weights_from": "random", "init": "depth_full"}}, "weights_from='random' must name"),
    ({"depth_full": {"weights_from": "depth", "init": "depth_full", "task": "depth"}}, "exclude each other"),
    ({"depth_full": {"weights_from": "depth", "init": "random"}}, "would ignore the weights"),
])
def test_bad_weights_from_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        from_dict({**BASE, "pretrainings": {**BASE["pretrainings"], **change}})


def test_bad_protocol_shots_are_named():
    with pytest.raises(ValueError, match=r"protocol_shots.linear: no such protocol"):
        from_dict({**BASE, "protocol_shots": {"linear": [0]}})
    with pytest.raises(ValueError, match=r"protocol_shots.full=\[-1\]"):
        from_dict({**BASE, "protocol_shots": {"full": [-1]}})


def test_demo_grid_is_the_informative_one():
    study = load_study(["+experiment=demo"])
    jobs = plan(study)
    cols = {(j.tags["grid_protocol"], j.tags["grid_shots"]) for j in jobs if j.kind == "finetune"}
    assert cols == {("frozen", "0")}  # the study's protocols replace the schema's default "full"
    assert len(study.seeds) >= 4 and study.parallel_jobs == 2
    depth = study.pretrainings["depth_stereo_full"]
    assert depth.task == "depth" and depth.init == "depth_full"
    # depth from stereo pairs, scored with median scaling (beside a constant depth scaled alike)
    assert {"task.supervision=stereo", "task.eval_scaling=median"} <= set(depth.overrides)
    assert sorted(study.pretrainings) == ["classification_other_domain", "depth_stereo_full", "flow", "random"]
    # every pre-training row runs once per pre-training seed, one fine-tuning seed nested in each run
    assert len(study.pretrain_seeds) == len(study.seeds) == 4
    pre = [j for j in jobs if j.kind == "pretrain"]
    assert len(pre) == 3 * 4 and len(jobs) - len(pre) == 4 * 4
    assert {j.needs for j in jobs if j.job_id.startswith("ft-depth_stereo_full")} == {
        f"pre-depth_stereo_full-p{p}" for p in study.pretrain_seeds}
    # pre-trainings are scored on their own task: depth and flow on the test split, classification on
    # keyed crops of the other world's validation split (full frames show every class)
    assert not any(o.startswith("data.test_split") for o in depth.overrides + study.pretrainings["flow"].overrides)
    assert "task.eval_crop=true" in study.pretrainings["classification_other_domain"].overrides
    # the columns and rows measured and left out of the budget are an override away
    more = load_study(["+experiment=demo", "+study.protocols.full=['task.protocol=full','train.steps=80']",
                       "+study.protocol_shots.full=[4]",
                       "+study.pretrainings.depth_stereo_encoder={weights_from:depth_stereo_full,init:depth}"])
    cols = {(j.tags["grid_protocol"], j.tags["grid_shots"]) for j in plan(more) if j.kind == "finetune"}
    assert cols == {("frozen", "0"), ("full", "4")} and more.pretrainings["depth_stereo_encoder"].init == "depth"
    assert "data.root=data/synthetic_demo_gbr" in study.pretrainings["classification_other_domain"].overrides
    assert study.compare.miou == "miou_subset"
    assert "task.eval_subset=[0,1,2,5,8,9,10,13]" in study.finetune
    assert study.compare.baselines[0] == "classification_other_domain"


def test_gbr_palette_recolours_the_same_world():
    kw = dict(seed=2, height=24, width=80, sequences={"train": 1}, frames_per_sequence=3)
    plain = next(iter_samples("train", SyntheticConfig(**kw)))
    other = next(iter_samples("train", SyntheticConfig(palette="gbr", **kw)))
    assert np.array_equal(other["rgb"], plain["rgb"][..., [1, 2, 0]])
    assert np.array_equal(other["rgb_right"], plain["rgb_right"][..., [1, 2, 0]])
    assert np.array_equal(other["seg"], plain["seg"]) and np.array_equal(other["depth"], plain["depth"])
    assert not np.array_equal(other["rgb"], plain["rgb"])
    with pytest.raises(ValueError, match="palette='pink'"):
        SyntheticConfig(palette="pink")
