"""The reference-study presets compose against the typed schemas and carry its settings."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from trainer.config import register_configs
from trainer.tasks import build_task

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_kitti_semantics_reference():
    cfg = _compose(["+experiment=kitti_semantics_reference"])
    assert cfg.task.name == "segmentation" and cfg.data.name == "kitti_semantics"
    assert (cfg.task.head, cfg.model.encoder, cfg.optim.name, cfg.optim.lr) == ("unet", "resnet18", "adam", 1e-5)
    assert (cfg.schedule.name, cfg.train.steps, cfg.train.batch_size) == ("cosine", 20000, 16)
    assert list(cfg.task.eval_subset) == [0, 1, 2, 8, 9, 10, 13, 18]
    task = build_task(cfg)  # the DictConfig Hydra hands over: validated, as the dataclass
    assert task.cfg.eval_subset == [0, 1, 2, 8, 9, 10, 13, 18] and type(task.cfg.crop) is list


def test_cityscapes_reference():
    cfg = _compose(["+experiment=cityscapes_reference"])
    assert (cfg.task.head, cfg.task.output_stride, cfg.model.encoder) == ("aspp", 16, "resnet50")  # the reference's own head
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.01, 0.9, 1e-4)
    assert (cfg.schedule.name, cfg.schedule.poly_power, cfg.train.steps) == ("poly", 0.9, 50000)
    assert list(cfg.task.crop) == [512, 512]
    assert build_task(cfg).cfg.scale_range == [1.0, 1.0]  # the reference crops, never rescales


def test_task_configs_reject_unknown_fields():
    with pytest.raises(Exception, match="protocl"):
        _compose(["task=segmentation", "task.protocl=frozen"])
    for name in ("flow", "classification"):
        assert _compose([f"task={name}"]).task.name == name
