"""Resuming under another configuration: refused with every difference named (auto-resume),
allowed for execution-only settings and longer runs, a logged warm start when explicit."""
from __future__ import annotations

import dataclasses
import logging

import pytest
from omegaconf import OmegaConf

from test_loop import _train_single

from trainer.checkpointing.resume_check import ConfigMismatch, check_resume_config, config_differences, resumable
from trainer.config import RESUMABLE, RunConfig

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


def _leaves(schema: type, prefix: str = ""):
    """(dotted key, field) for every field of the run config that is not a section."""
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.default_factory) and RESUMABLE not in f.metadata:
            yield from _leaves(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_config_field_declares_whether_a_resume_may_change_it():
    undeclared = [key for key, f in _leaves(RunConfig) if not isinstance(f.metadata.get(RESUMABLE), bool)]
    assert undeclared == []
    may = {key for key, f in _leaves(RunConfig) if f.metadata[RESUMABLE]}
    assert {k for k in may if not k.startswith(("tracking.", "parallel."))} == {
        "out_dir", "train.steps", "train.resume", "train.progress", "train.log_every", "train.eval_every",
        "train.eval_max_batches", "train.ckpt_every", "train.ckpt_every_minutes", "train.ckpt_async",
        "train.keep_last", "train.keep_checkpoints", "train.export", "train.batch_size", "train.deterministic",
        "data.root", "data.num_workers", "data.on_corrupt"}
    assert all(resumable(k) for k, _ in _leaves(RunConfig) if k.startswith(("tracking.", "parallel.")))
    # a field decides for everything below it; a key no field holds may not change
    assert resumable("tracking.tags.grid") and not resumable("task.supervision") and not resumable("optim.extra")


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
