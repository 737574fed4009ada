"""Through the real trainer (torchrun, the loop, checkpoints, ``ShardStream`` loaders): a run killed
with SIGKILL and resumed on other world sizes, worker counts and batch sizes consumes every sample
of the epoch exactly once, each step the next window of the epoch's one order, and the next
epoch is the one an uninterrupted loader gives; DDP, FSDP2 and DeepSpeed ZeRO-2 alike.

This file is also the torchrun worker: ``python tests/test_resume_order.py key=value ...`` trains
:class:`KeyTask` (which writes every batch's sample keys to ``$GEOPRIME_TEST_KEY_LOG``) on shards.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer.metrics.base import Metric  # noqa: E402
from trainer.tasks.base import Task  # noqa: E402

COUNTS = [7, 5, 9, 3, 8, 6, 11, 4, 10, 9]  # 72 samples
SEED = 3


class _Count(Metric):
    def __init__(self) -> None:
        self.n = torch.zeros(1, dtype=torch.float64)

    def update(self, batch, outputs):
        self.n += float(batch["__valid__"].sum())

    def state(self):
        return self.n.clone()

    def compute(self, state):
        return {"count": float(state[0])}


class KeyTask(Task):
    """A tiny regression on ``rgb`` that logs the keys of every batch it trains on, one JSON line
    per step: ``[attempt pid, keys, valid]`` in ``$GEOPRIME_TEST_KEY_LOG/rank<r>.jsonl``."""

    required_keys = ("rgb",)

    def build_model(self) -> nn.ModuleDict:
        return nn.ModuleDict({"enc": nn.Conv2d(3, 4, 3, padding=1), "head": nn.Conv2d(4, 1, 1)})

    def training_step(self, model, batch):
        path = Path(os.environ["GEOPRIME_TEST_KEY_LOG"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps([os.getpid(), batch["__key__"], batch["__valid__"].tolist()]) + "\n")
        x = batch["rgb"].float() / 255.0
        pred = model["head"](model["enc"](x))
        loss = ((pred - x.mean(1, keepdim=True)) ** 2).mean()
        return loss, {}

    def eval_step(self, model, batch):
        return model["head"](model["enc"](batch["rgb"].float() / 255.0))

    def new_metric(self) -> Metric:
        return _Count()


def worker(argv: list[str]) -> None:
    """torchrun entry: train :class:`KeyTask` on the shards of ``data.root`` (dotlist overrides)."""
    from omegaconf import OmegaConf

    from trainer.config import RunConfig
    from trainer.loop import train
    from trainer.tracking import Tracker

    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.from_dotlist([
        "task={name: keys}", "train.progress=false", "train.deterministic=true", "tracking.enabled=false",
        "train.log_every=1", f"seed={SEED}", "data.lanes=7", "train.keep_last=10", "train.export=false", *argv]))
    cfg.data.val_split = cfg.data.test_split = ""  # training only
    train(cfg, task=KeyTask(cfg.task, cfg.model), tracker=Tracker("run-keys"))


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from shard_fixtures import build

    return build(str(tmp_path_factory.mktemp("resume_order")), "train", COUNTS)


def _launch(out: Path, shards: str, world: int, workers: int, batch: int, steps: int, *extra: str,
            kill_at: int | None = None) -> None:
    from dist_helpers import run_torchrun

    env = {"GEOPRIME_TEST_KEY_LOG": str(out / "keys")}
    if kill_at is not None:
        env.update(GEOPRIME_TEST_KILL_AT_STEP=str(kill_at), GEOPRIME_TEST_KILL_RANK=str(world - 1))
    (out / "keys").mkdir(parents=True, exist_ok=True)
    proc = run_torchrun([__file__, f"out_dir={out}", f"data.root={shards}", f"data.num_workers={workers}",
                         f"train.batch_size={batch}", f"train.steps={steps}", "train.ckpt_every=2", *extra],
                        nproc=world, timeout=280, check=kill_at is None, env=env)
    if kill_at is not None:
        log = (out / "logs" / f"rank{world - 1}.log").read_text()
        assert proc.returncode != 0 and f"killing rank {world - 1} at step {kill_at}" in log, proc.stderr[-3000:]


def _consumed(out: Path, world_sizes: list[int]) -> list[set[str]]:
    """The sample keys of every step the run finally kept (a step redone after a resume counts once:
    the last attempt's), in step order."""
    per_rank = {p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in (out / "keys").glob("rank*.jsonl")}
    log = (out / "logs" / "rank0.log").read_text()
    starts = [0] + [int(m) for m in re.findall(r"resumed from \S+ \(step (\d+)\)", log)]
    steps: dict[int, set[str]] = {}
    for attempt, (start, world) in enumerate(zip(starts, world_sizes)):
        for r in range(world):
            rows = per_rank[f"rank{r}"]
            pids = list(dict.fromkeys(pid for pid, _, _ in rows))
            mine = [(k, v) for pid, k, v in rows if pid == pids[_attempt_of(attempt, world_sizes, r)]]
            for i, (keys, valid) in enumerate(mine):
                step = start + i + 1
                if r == 0:
                    steps[step] = set()
                steps[step] |= {k for k, ok in zip(keys, valid) if ok}
    return [steps[s] for s in sorted(steps)]


def _attempt_of(attempt: int, world_sizes: list[int], rank: int) -> int:
    """Index, among the pids that wrote ``rank``'s file, of attempt ``attempt`` (ranks that did not
    exist in an attempt, e.g. rank 2 of a 2-rank attempt, have no pid for it)."""
    return sum(1 for a in range(attempt) if rank < world_sizes[a])


def _order(shards: str) -> list[str]:
    from data_shards.stream import ShardStream, StreamConfig

    return [x["__key__"] for x in ShardStream(StreamConfig(shards, "train", seed=SEED, lanes=7, tail="pad"))]


def _epoch_keys(shards: str, epoch: int, batch: int) -> list[set[str]]:
    """Step sets of a whole epoch from an uninterrupted loader (one rank of ``batch``)."""
    from data_shards.loader import build_loader
    from data_shards.stream import ShardStream, StreamConfig

    ld = build_loader(ShardStream(StreamConfig(shards, "train", seed=SEED, lanes=7)), batch, drop_last=True)
    ld.load_state_dict({"epoch": epoch, "samples": 0})
    return [set(b["__key__"]) for b in ld]


def test_checkpoints_of_the_earlier_order_resume_at_an_epoch_boundary_only(shards):
    """Progress.reposition: a new checkpoint's position loads as is; one written before the global
    order (epoch + samples only) loads at an epoch boundary and is refused mid-epoch in one line;
    its retired config key data.shuffle_buffer does not block the resume, a changed data.lanes does."""
    from data_shards.loader import build_loader
    from data_shards.stream import ShardStream, StreamConfig
    from trainer.checkpointing.resume_check import ConfigMismatch, check_resume_config
    from trainer.checkpointing.run_state import Progress

    loader = build_loader(ShardStream(StreamConfig(shards, "train", seed=SEED, lanes=7)), 4, drop_last=True)
    progress = Progress(loader, "", 4, 1)
    saved = {"step": 5, "run_id": None, "batch_size": 4, "world_size": 2}
    progress.load_state_dict({**saved, "data": {"epoch": 1, "samples": 24, "order": loader.stream.order_identity()}})
    progress.reposition()
    assert (loader.epoch, loader.samples) == (1, 24)
    progress.load_state_dict({**saved, "epoch": 3, "samples": 0})
    progress.reposition()
    assert (loader.epoch, loader.samples) == (3, 0)
    progress.load_state_dict({**saved, "epoch": 3, "samples": 16})
    with pytest.raises(ValueError, match=r"2 batches into epoch 3 under the earlier data order.*epoch boundary"):
        progress.reposition()
    old = {"data": {"root": "d", "shuffle_buffer": 64}, "seed": 0}
    check_resume_config(old, {"data": {"root": "d", "lanes": 960}, "seed": 0}, "ckpt", explicit=False)
    with pytest.raises(ConfigMismatch, match="data.lanes: 960 -> 480"):
        check_resume_config({"data": {"lanes": 960}}, {"data": {"lanes": 480}}, "ckpt", explicit=False)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_chain_killed_and_resumed_on_other_layouts_is_exact(shards, tmp_path):
    """2 ranks x 2 workers x batch 4 (killed after step 3; checkpoint at 2) -> 3 x 0 x 2 (killed after
    step 7; checkpoints at 4, 6) -> 1 x 3 x 8 through epoch 0's end and all of epoch 1."""
    out = tmp_path / "run"
    ddp = "parallel.strategy=ddp"
    _launch(out, shards, 2, 2, 4, 19, ddp, kill_at=3)
    _launch(out, shards, 3, 0, 2, 19, ddp, kill_at=7)
    _launch(out, shards, 1, 3, 8, 19, ddp)
    steps = _consumed(out, [2, 3, 1])
    assert len(steps) == 19
    order = _order(shards)
    q = [8, 8] + [6] * 4 + [8] * 4  # epoch 0: steps 1-2 at 2x4, 3-6 at 3x2, 7-10 at 1x8: all 72 samples
    windows, at = [], 0
    for n in q:
        windows.append(set(order[at:at + n]))
        at += n
    assert steps[:10] == windows  # each step the next window of the one order
    used = [k for s in steps[:10] for k in s]
    assert len(used) == len(set(used)) == sum(COUNTS)  # every sample exactly once
    assert steps[10:] == _epoch_keys(shards, 1, 8)  # epoch 1: the uninterrupted loader's
    log = (out / "logs" / "rank0.log").read_text()
    assert "world size changed 2 -> 3" in log and "world size changed 3 -> 1" in log


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_resume_on_another_world_size_exactly(shards, tmp_path, strategy):
    """FSDP2 and ZeRO-2 checkpoints of 2 ranks x batch 4 (killed after step 3) resume on 1 rank x
    batch 8: the rest of the epoch is exactly the samples not yet consumed."""
    out = tmp_path / strategy
    extra = [f"parallel.strategy={strategy}"] + (["parallel.zero_stage=2"] if strategy == "deepspeed" else [])
    _launch(out, shards, 2, 0, 4, 6, *extra, kill_at=3)
    _launch(out, shards, 1, 2, 8, 6, *extra)
    steps = _consumed(out, [2, 1])
    order = _order(shards)
    assert steps == [set(order[a:a + 8]) for a in range(0, 48, 8)]
    assert "world size changed 2 -> 1" in (out / "logs" / "rank0.log").read_text()


if __name__ == "__main__":
    worker(sys.argv[1:])
