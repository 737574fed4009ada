"""Task registry: task name -> module defining ``TASK`` (a Task subclass) and ``CONFIG`` (its dataclass)."""
from __future__ import annotations

import importlib
from typing import Any

TASK_MODULES = {
    "depth": "trainer.tasks.depth",
    "flow": "trainer.tasks.flow",
    "classification": "trainer.tasks.classification",
    "segmentation": "trainer.tasks.segmentation",
}


def _module(name: str):
    if name not in TASK_MODULES:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASK_MODULES))}")
    return importlib.import_module(TASK_MODULES[name])


def TASK_CONFIGS() -> dict[str, type]:
    """Every task's config dataclass, by task name."""
    return {name: _module(name).CONFIG for name in TASK_MODULES}


def build_task(task_cfg: Any, run_cfg: Any):
    """Instantiate the task named by ``task_cfg.name``."""
    return _module(task_cfg.name).TASK(task_cfg, run_cfg)
