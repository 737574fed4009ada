"""Task registry: task name -> module defining ``TASK`` (a Task subclass) and ``CONFIG`` (its dataclass).

Each task's config dataclass lives in its own torch-free module (``<name>_config.py``), so the
entry points register and check configs without importing torch (:func:`TASK_CONFIGS`).
"""
from __future__ import annotations

import importlib

from trainer.config import RunConfig
from trainer.errors import ConfigError

TASK_MODULES = {
    "depth": "trainer.tasks.depth",
    "flow": "trainer.tasks.flow",
    "classification": "trainer.tasks.classification",
    "segmentation": "trainer.tasks.segmentation",
}

#: task name -> (torch-free module, class) of its config dataclass
CONFIG_CLASSES = {
    "depth": ("trainer.tasks.depth_config", "DepthTaskConfig"),
    "flow": ("trainer.tasks.flow_config", "FlowConfig"),
    "classification": ("trainer.tasks.classification_config", "ClassificationConfig"),
    "segmentation": ("trainer.tasks.segmentation_config", "SegmentationConfig"),
}


def _module(name: str):
    if name not in TASK_MODULES:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASK_MODULES))}")
    return importlib.import_module(TASK_MODULES[name])


def TASK_CONFIGS() -> dict[str, type]:
    """Every task's config dataclass, by task name (imports no torch)."""
    return {name: getattr(importlib.import_module(mod), cls) for name, (mod, cls) in CONFIG_CLASSES.items()}


def build_task(run_cfg: RunConfig):
    """Instantiate the task named by ``run_cfg.task.name`` with the slices of the run config it reads;
    its config validation errors are :class:`~trainer.errors.ConfigError`s (one line, exit 2), whoever
    builds it (the loop, the preflight)."""
    try:
        return _module(run_cfg.task.name).TASK(run_cfg.task, run_cfg.model, seed=int(run_cfg.seed),
                                               parallel=run_cfg.parallel)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"task={run_cfg.task.get('name')}: {e}") from e
