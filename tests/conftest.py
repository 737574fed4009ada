"""Shared pytest setup: GPU tests are skipped without CUDA; CPU-only defaults for every test."""
from __future__ import annotations

import os

import pytest

# Every test runs on the CPU unless marked gpu; DeepSpeed must not probe for CUDA.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
