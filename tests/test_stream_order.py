"""The ordering contract, counted by sample key: one global order per (seed, epoch), consumed as
consecutive windows by any number of ranks x workers x batch size; resume chains across such
layouts (one killed with SIGKILL) consume every sample of the epoch exactly once and the next
epoch equals an uninterrupted run's; batches do not depend on the worker count; user stages
survive; the plan the benchmark simulates is the loader's; batches mix drives on the real
Eigen-Zhou structure; compact frames are read about once and held briefly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.loader import build_loader
from data_shards.stages import Stage, select
from data_shards.stream import ShardStream, StreamConfig
from shard_fixtures import all_keys, build

SEED = 11
PLAIN_COUNTS = [7, 5, 9, 3, 8, 6, 11, 4, 10, 9]  # 72 samples in uneven shards
LANES = 5  # lanes of ~14 samples: each read over many steps, frames held between them
CHAIN = [(2, 2, 4, 2), (3, 0, 2, 3), (1, 3, 8, None)]  # ranks x workers x batch, steps (None: to the end)


def _noise(sample: dict, g: torch.Generator) -> dict:
    sample["noise"] = torch.rand(2, generator=g)
    return sample


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> str:
    return build(str(tmp_path_factory.mktemp("order_plain")), "train", PLAIN_COUNTS)


@pytest.fixture(scope="module")
def compact(tmp_path_factory) -> str:
    """Compact KITTI shards, both cameras as targets: 2 drives of 20 and 18 frames -> 68 samples."""
    from fixtures_real import KITTI_DATE, write_kitti_raw
    from test_kitti_compact import _build

    root = tmp_path_factory.mktemp("order_compact")
    write_kitti_raw(root / "raw", {f"{KITTI_DATE}_drive_0001_sync": 20, f"{KITTI_DATE}_drive_0002_sync": 18},
                    hw=(6, 10))
    _build(root / "raw", root / "out", "--sides", "lr", "--max-samples-per-shard", "16")
    return str(root / "out")


@pytest.fixture(params=["plain", "compact"])
def root(request) -> str:
    return request.getfixturevalue(request.param)


def _loaders(root: str, world: int, workers: int, batch: int, **cfg) -> list:
    cfg = {"seed": SEED, "lanes": LANES, "transform": _noise, **cfg}
    return [build_loader(ShardStream(StreamConfig(root, "train", rank=r, world_size=world, **cfg)), batch,
                         num_workers=workers, drop_last=True) for r in range(world)]


def _record(batches: list[dict]) -> list[tuple[list[str], list[bool], list[list[float]]]]:
    return [(b["__key__"], b["__valid__"].tolist(), b["noise"].tolist()) for b in batches]


def _run(loaders: list, state: dict | None = None, steps: int | None = None) -> tuple[list, dict]:
    """The ranks' loaders in lockstep from ``state`` for ``steps`` steps (None: to the epoch's end);
    returns (per step, every rank's (keys, valid, noise)) and the data state after (equal on every rank)."""
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    its = [iter(ld) for ld in loaders]
    out = []
    while steps is None or len(out) < steps:
        got = [next(it, None) for it in its]
        if all(b is None for b in got):
            break
        assert all(b is not None for b in got), "ranks ended at different steps"
        out.append(_record(got))
    for it in its:
        it.close()
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)
    return out, states[0]


def _order(root: str) -> list[str]:
    """The epoch-0 order S, read by one consumer one sample at a time."""
    return [x["__key__"] for x in ShardStream(StreamConfig(root, "train", seed=SEED, lanes=LANES, tail="pad"))]


def _step_sets(steps: list) -> list[set[str]]:
    return [{k for keys, valid, _ in ranks for k, v in zip(keys, valid) if v} for ranks in steps]


@pytest.mark.parametrize("world,workers,batch", [(1, 0, 1), (2, 2, 4), (3, 0, 2), (1, 3, 8), (4, 1, 3)])
def test_every_layout_consumes_consecutive_windows_of_one_order(root, world, workers, batch):
    order = _order(root)
    steps, _ = _run(_loaders(root, world, workers, batch))
    q = world * batch
    assert len(steps) == len(order) // q
    assert _step_sets(steps) == [set(order[t * q:(t + 1) * q]) for t in range(len(steps))]
    assert all(len(keys) == batch for ranks in steps for keys, _, _ in ranks)


def test_batches_do_not_depend_on_the_worker_count(compact):
    ref = [_run(_loaders(compact, 2, 0, 3))[0]]
    for workers in (1, 2, 3):
        assert _run(_loaders(compact, 2, workers, 3))[0] == ref[0]  # keys, validity and transform values


_KILLED_SEGMENT = """
import json, os, signal, sys
from data_shards.loader import build_loader
from data_shards.stream import ShardStream, StreamConfig
sys.path.insert(0, {tests!r})
from test_stream_order import _loaders, _record

root, state_in, log_path, ckpt = sys.argv[1:5]
world, workers, batch = {layout}
loaders = _loaders(root, world, workers, batch)
for ld in loaders:
    ld.load_state_dict(json.loads(state_in))
its = [iter(ld) for ld in loaders]
with open(log_path, "a") as log:
    for step in range(1, 4):
        log.write(json.dumps(_record([next(it) for it in its])) + "\\n")
        log.flush()
        os.fsync(log.fileno())
        if step == 2:  # the checkpoint, written atomically
            with open(ckpt + ".tmp", "w") as f:
                json.dump(loaders[0].state_dict(), f)
            os.replace(ckpt + ".tmp", ckpt)
        if step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_segment(root: str, layout: tuple[int, int, int], state: dict, tmp: Path) -> tuple[list, list, dict]:
    """Run ``layout`` from ``state`` in a child that checkpoints after 2 steps and is SIGKILLed after
    step 3; returns (the 2 checkpointed steps, the step lost with the kill, the checkpoint)."""
    script = _KILLED_SEGMENT.format(tests=str(Path(__file__).parent), layout=layout)
    log, ckpt = tmp / "killed.jsonl", tmp / "ckpt.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, root, json.dumps(state), str(log), str(ckpt)],
                          env=env, timeout=240, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    steps = [[tuple(r) for r in json.loads(line)] for line in log.read_text().splitlines()]
    assert len(steps) == 3
    return steps[:2], steps[2:], json.loads(ckpt.read_text())


def test_a_resume_chain_across_layouts_with_a_kill_is_exact(root, tmp_path):
    """2x2x4 -> 3x0x2 (SIGKILLed after its checkpoint) -> 1x3x8: every sample of the epoch once, each
    step the next window of the one order, transforms unchanged, and the next epoch is the
    uninterrupted run's."""
    order = _order(root)
    world, workers, batch, steps = CHAIN[0]
    first, state = _run(_loaders(root, world, workers, batch), steps=steps)
    kept, lost, state = _killed_segment(root, CHAIN[1][:3], state, tmp_path)
    world, workers, batch, _ = CHAIN[2]
    last_loaders = _loaders(root, world, workers, batch)
    rest, after = _run(last_loaders, state)
    assert after == {**after, "epoch": 1, "samples": 0}
    chain = first + kept + rest
    used = [k for s in _step_sets(chain) for k in s]
    assert len(used) == len(set(used))  # nothing twice
    cut = 2 * 8 + 2 * 6 + (len(order) - 28) // 8 * 8  # what the three layouts consume
    assert sorted(used) == sorted(order[:cut])  # and nothing left out but the last layout's tail
    windows, start = [], 0
    for q, n in ((8, len(first)), (6, len(kept)), (8, len(rest))):
        windows += [set(order[start + t * q:start + (t + 1) * q]) for t in range(n)]
        start += n * q
    assert _step_sets(chain) == windows
    assert _step_sets(lost)[0] <= _step_sets(rest)[0]  # the killed step's samples come again, in the next step
    noise = {k: x for ranks in chain for keys, _, xs in ranks for k, x in zip(keys, xs)}
    ref_steps, _ = _run(_loaders(root, 1, 0, 1))
    ref_noise = {k: x for ranks in ref_steps for keys, _, xs in ranks for k, x in zip(keys, xs)}
    assert all(noise[k] == ref_noise[k] for k in noise)  # transforms seeded per sample, not per consumer
    next_epoch, _ = _run(last_loaders)
    uninterrupted = _loaders(root, world, workers, batch)
    _run(uninterrupted)
    assert next_epoch == _run(uninterrupted)[0]


def test_user_stages_survive_an_exact_resume_on_another_layout(plain):
    """A map stage and a filter inserted through the config (stream.py untouched) give every
    sample the same values on a resumed run under another layout; dropped samples stay stand-ins."""
    def jitter(sample: dict, g: torch.Generator) -> dict:
        sample["noise"] = sample["noise"] + torch.randn(2, generator=g)
        return sample

    def odd(sample: dict) -> bool:
        return int(sample["__key__"][-1]) % 2 == 1

    stages = (Stage("jitter", jitter), select(odd, "odd"))

    def good(steps: list) -> dict:
        return {k: x for ranks in steps for keys, valid, xs in ranks for k, v, x in zip(keys, valid, xs) if v}

    whole, _ = _run(_loaders(plain, 1, 0, 4, stages=stages))
    first, state = _run(_loaders(plain, 2, 2, 2, stages=stages), steps=3)
    rest, _ = _run(_loaders(plain, 3, 0, 2, stages=stages), state)
    assert good(first + rest) == good(whole)
    keys = all_keys(PLAIN_COUNTS)
    assert sorted(good(whole)) == sorted(k for k in keys if int(k[-1]) % 2 == 1)
    stand_ins = sum(not v for ranks in whole for _, valid, _ in ranks for v in valid)
    assert stand_ins == sum(int(k[-1]) % 2 == 0 for k in keys)  # dropped: in the batch, marked invalid
    without = good(_run(_loaders(plain, 1, 0, 4))[0])
    assert all(good(whole)[k] != without[k] for k in good(whole))  # the map stage ran on every sample


def test_the_benchmarks_plan_is_the_loaders(compact):
    """benchmarks/bench_data_order.py simulates batches with plan_batches: exactly the loader's."""
    from benchmarks.bench_data_order import plan_batches

    stream = ShardStream(StreamConfig(compact, "train", seed=SEED, lanes=LANES))
    in_manifest_order = [x["__key__"] for x in ShardStream(StreamConfig(compact, "train", shuffle=False, lanes=1))]
    order = stream.epoch_order()
    starts = np.cumsum([0] + stream.counts)
    key_of = [in_manifest_order[starts[s] + m] for s, m in zip(order.shard, order.member)]
    for world, workers in ((1, 0), (1, 2), (2, 0), (2, 2)):
        planned = [[key_of[i] for i in b] for b in plan_batches(order, world, 3)]
        steps, _ = _run(_loaders(compact, world, workers, 3))
        assert planned == [ranks[r][0] for r in range(world) for ranks in steps]


@pytest.mark.parametrize("layout", ["compact", "plain"])
def test_batches_mix_drives_on_the_eigen_zhou_split(layout):
    """The issue's target on the real split's structure: >= 6 drives per batch of 12 on average and
    no batch from a single drive, at 1 and 64 ranks (the default 960 lanes)."""
    from benchmarks.bench_data_order import cut_shards, drive_stats, plan_batches
    from benchmarks.eigen_zhou import samples
    from data_shards.epoch_order import epoch_order

    ez = samples()
    names = sorted({d for d, _, _ in ez})
    drive = np.array([names.index(d) for d, _, _ in ez])
    shards = cut_shards(ez, layout)
    ids = np.concatenate([np.array(s) for s in shards])
    order = epoch_order([len(s) for s in shards], seed=0, epoch=1, shuffle=True)
    base = ids[np.cumsum([0] + [len(s) for s in shards])[order.shard] + order.member]
    for world in (1, 64):
        drives, single, top = drive_stats(drive, [base[b] for b in plan_batches(order, world, 12)])
        assert drives >= 6 and single == 0 and top < 0.5, (world, drives, single, top)


def test_compact_frames_are_read_about_once_and_held_briefly(compact):
    """A lane reads each frame once and holds it from its first to its last use: one lane reads
    every stored frame exactly once; two lanes re-read only the few frames their boundary shares."""
    from data_shards.manifest import Manifest

    m = Manifest.from_json((Path(compact) / "train" / "manifest.json").read_text(), "m")
    distinct = sum(len(s.frames) for s in m.shards)
    images = ("rgb", "rgb_prev", "rgb_next", "rgb_right")
    for lanes, most in ((1, distinct), (2, distinct + 4)):
        stream = ShardStream(StreamConfig(compact, "train", seed=SEED, lanes=lanes, keys=images))
        assert len(list(stream)) == m.num_samples
        st = stream.read_stats
        assert distinct <= st.frames_read <= most, (lanes, st.frames_read, distinct)
        assert st.peak_held_frames <= 4 * lanes and st.held_frames == 0  # ~4 frames per lane, all let go
        assert st.opens == len(m.shards)  # local shards: one handle per shard, shared by the lanes


def test_open_handles_stay_bounded(plain):
    fds = len(os.listdir("/proc/self/fd"))
    stream = ShardStream(StreamConfig(plain, "train", lanes=10, open_handles=2, keys=("rgb",)))
    seen = []
    for x in stream:
        seen.append(x["__key__"])
        assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert sorted(seen) == all_keys(PLAIN_COUNTS)


def test_assembly_keeps_position_order_stands_in_and_passes_ragged_keys():
    """Two workers' shares of a step: interleaved positions come out in order; a stand-in copies its
    neighbour (invalid); tensors whose shapes differ between the shares become a per-sample list
    named in __ragged__, as collate names them within one share."""
    from data_shards.assemble import assemble, pack, partial, unpack
    from data_shards.collate import RAGGED, collate

    def sample(p, hw):
        return {"__key__": f"k{p}", "__valid__": True, "rgb": torch.full((3, *hw), p, dtype=torch.uint8),
                "K": torch.eye(3) * p, "meta": {"p": p}}

    a = partial(0, [1, 4, 6], {4: ("corrupt", "bad member")}, collate([sample(1, (2, 2)), sample(6, (2, 2))]))
    b = partial(0, [2, 3], {}, collate([sample(2, (2, 2)), sample(3, (2, 2))]))
    out = assemble(unpack(pack([a]))[:1] + [b])
    assert out["__key__"] == ["k1", "k2", "k3", "k3", "k6"] and out["__valid__"].tolist() == [1, 1, 1, 0, 1]
    assert out["rgb"][:, 0, 0, 0].tolist() == [1, 2, 3, 3, 6] and out["K"][4, 0, 0] == 6
    assert out["meta"][3] == {"p": 3} and out["__skipped__"] == ["bad member"] and RAGGED not in out
    c = partial(0, [2, 3], {}, collate([sample(2, (4, 4)), sample(3, (4, 4))]))
    out = assemble([partial(0, [1], {}, collate([sample(1, (2, 2))])), c])
    assert out[RAGGED] == ["rgb"] and [tuple(t.shape) for t in out["rgb"]] == [(3, 2, 2), (3, 4, 4), (3, 4, 4)]
    assert out["K"].shape == (3, 3, 3)  # keys of one shape still stack
