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


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """Synthetic-world shards at 64x64, one sequence of 6 frames per split (4 train samples): built once
    per session for the tests that drive whole runs through the CLIs."""
    from dist_helpers import build_synthetic

    return build_synthetic(tmp_path_factory.mktemp("small_syn"), "--width", "64", "--sequences", "train=1",
                           "val=1", "test=1", "--frames-per-sequence", "6")
