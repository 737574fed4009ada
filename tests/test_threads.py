"""Intra-op thread defaults (trainer/threads.py): formula, precedence, clear errors."""
from __future__ import annotations

import pytest
import torch

from trainer.threads import ENV, configure_threads, default_threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores,workers,ranks,expected", [
    (2, 0, 1, 2), (2, 1, 1, 2), (2, 2, 1, 2), (16, 2, 1, 14), (16, 8, 1, 12), (16, 3, 2, 6), (64, 7, 8, 6),
    (2, 0, 2, 1), (1, 4, 1, 1), (3, 1, 4, 1),
])
def test_default_shares_cores_between_ranks_and_spares_some_for_loader_workers(cores, workers, ranks, expected):
    assert default_threads(workers, ranks, cores) == expected


def test_precedence_env_then_omp_then_default():
    threads, source = configure_threads(2, env={ENV: "3", "OMP_NUM_THREADS": "1"})
    assert (threads, source) == (3, ENV) and torch.get_num_threads() == 3
    torch.set_num_threads(2)
    assert configure_threads(0, env={"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert torch.get_num_threads() == 2  # left as torch set it from OMP_NUM_THREADS
    threads, source = configure_threads(1, env={"LOCAL_WORLD_SIZE": "64"})
    assert (threads, source) == (1, "default") and torch.get_num_threads() == 1


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_bad_override_is_named(bad):
    with pytest.raises(ValueError, match=f"{ENV}='{bad}'"):
        configure_threads(0, env={ENV: bad})
