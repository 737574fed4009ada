"""Resuming under another configuration: refused with every difference named (auto-resume),
allowed for execution-only settings and longer runs, a logged warm start when explicit."""
from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from test_loop import _train_single

from trainer.checkpointing.resume_check import ConfigMismatch, check_resume_config, config_differences

SAVED = {"seed": 0, "optim": {"lr": 1e-3, "name": "adamw"}, "train": {"steps": 10, "log_every": 5},
         "parallel": {"strategy": "fsdp", "zero_stage": 0}, "tracking": {"uri": None}}


def _with(**changes):
    cfg = OmegaConf.create(SAVED)
    for k, v in changes.items():
        OmegaConf.update(cfg, k.replace("__", "."), v)
    return cfg


def test_differences_are_named_with_old_and_new_values():
    saved = OmegaConf.to_yaml(OmegaConf.create(SAVED))
    assert config_differences(saved, _with()) == []
    assert config_differences(saved, _with(optim__lr=0.01, seed=3)) == ["optim.lr: 0.001 -> 0.01", "seed: 0 -> 3"]
    assert config_differences(saved, _with(optim__extra=1)) == ["optim.extra: (absent) -> 1"]


def test_what_may_change_and_what_may_not():
    saved = OmegaConf.to_yaml(OmegaConf.create(SAVED))
    allowed = check_resume_config(saved, _with(train__steps=20, train__log_every=1, tracking__uri="x",
                                               parallel__strategy="ddp"), "ck", explicit=False)
    assert len(allowed) == 4
    with pytest.raises(ConfigMismatch, match=r"checkpoint ck .*optim.lr: 0.001 -> 0.01.*train.resume=ck"):
        check_resume_config(saved, _with(optim__lr=0.01), "ck", explicit=False)
    # DCP strategies reshard among themselves; DeepSpeed's files are another format
    with pytest.raises(ConfigMismatch, match="parallel.strategy: 'fsdp' -> 'deepspeed'"):
        check_resume_config(saved, _with(parallel__strategy="deepspeed", parallel__zero_stage=2), "ck", False)
    ds = OmegaConf.to_yaml(_with(parallel__strategy="deepspeed", parallel__zero_stage=2))
    with pytest.raises(ConfigMismatch, match="parallel.zero_stage: 2 -> 3"):
        check_resume_config(ds, _with(parallel__strategy="deepspeed", parallel__zero_stage=3), "ck", False)


@pytest.mark.timeout(120)
def test_the_loop_refuses_a_changed_run_and_warm_starts_when_asked(tmp_path, caplog):
    _train_single(tmp_path, "train.steps=4", "train.ckpt_every=2", "train.export=false")
    with pytest.raises(ConfigMismatch, match=r"step_00000004 .*optim.lr: 0.01 -> 0.02"):
        _train_single(tmp_path, "train.steps=6", "optim.lr=0.02")
    assert not (tmp_path / "weights.pt").exists()
    res = _train_single(tmp_path, "train.steps=6", "train.log_every=1")  # a longer run: allowed
    assert res["step"] == 6
    ck = tmp_path / "checkpoints" / "step_00000006"
    with caplog.at_level(logging.WARNING, logger="geoprime.checkpoint"):
        res = _train_single(tmp_path / "warm", "train.steps=8", "optim.lr=0.02", f"train.resume={ck}")
    assert res["step"] == 8
    assert "another configuration (optim.lr: 0.01 -> 0.02" in caplog.text
