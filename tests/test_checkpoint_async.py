"""Checkpoints written in the background (issue 31.3): the staged copy is a snapshot, every guarantee
of a synchronous save still holds (whole or partial, never pruned before a commit, a full disk named),
and the faults of a long run: kill -9 while a save is in flight (the previous checkpoint is taken),
kill -9 right after a commit (the new one), a stop signal during a save in flight.

This file is also a torchrun worker: ``python tests/test_checkpoint_async.py snapshot <out> <strategy>...``.
"""
from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine import (ACCUM, MICRO, STEPS, STRATEGIES, global_batches, ocfg, pcfg, scfg,  # noqa: E402
                         tiny_model, train_steps)

from trainer.checkpoint import Checkpointer, CheckpointError, find_latest_whole, verify  # noqa: E402
from trainer.engine import Engine  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "test_loop.py")


# ------------------------------------------------------------------ the engine's staged copy
def _snapshot_round_trip(eng: Engine, directory: Path, world: int) -> dict:
    """STEPS steps; stage; one more step; then write the staged copy on a thread (while this thread makes
    collectives of its own); load it back. Returns what the caller checks."""
    data = global_batches(world)
    train_steps(eng, data, range(STEPS), world)
    at_stage = eng.full_state_dict()
    write = eng.stage_state(directory)
    staged_only = not any(p.suffix in (".pt", ".distcp") for p in directory.rglob("*"))  # no state file yet
    train_steps(eng, data, range(STEPS, STEPS + 1), world)  # changes weights and Adam moments in place
    after = eng.full_state_dict()
    writer = threading.Thread(target=write)
    writer.start()
    for _ in range(20):  # the training thread's collectives meanwhile, on the default group
        eng.all_reduce_sum(torch.ones(3))
    writer.join()
    eng.barrier()
    eng.load_state(directory)
    loaded = eng.full_state_dict()
    train_steps(eng, data, range(STEPS, STEPS + 1), world)  # the same step again, from the loaded moments
    again = eng.full_state_dict()
    return {"staged_only": staged_only,
            "step_moved": any(not torch.equal(at_stage[k], after[k]) for k in at_stage),
            "loaded_is_staged": all(torch.equal(loaded[k], at_stage[k]) for k in at_stage),
            "again_equal": all(torch.equal(again[k], after[k]) for k in after)}


def worker_snapshot(out: Path, names: list[str]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    for name in names:
        strategy, stage, offload = STRATEGIES[name]
        eng = Engine(pcfg(strategy, stage, offload), ocfg(), scfg(), 10, micro_batch_size=MICRO)
        eng.setup(tiny_model())
        res = _snapshot_round_trip(eng, out / f"ck_{name}", dist.get_world_size())
        if dist.get_rank() == 0:
            (out / f"{name}.json").write_text(json.dumps(res))
        eng.close()
    dist.destroy_process_group()


def test_the_staged_copy_is_a_snapshot_single_process(tmp_path):
    eng = Engine(pcfg(), ocfg(accum=1), scfg(), 10, micro_batch_size=MICRO * ACCUM)
    try:
        eng.setup(tiny_model())
        res = _snapshot_round_trip(eng, tmp_path / "ck", 1)
    finally:
        eng.close()
    assert res == {"staged_only": True, "step_moved": True, "loaded_is_staged": True, "again_equal": True}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_staged_copy_is_a_snapshot_under_every_strategy(tmp_path):
    """DDP, FSDP2 (DTensor shards), ZeRO-2 and ZeRO-3 on 2 ranks: what is written is the state at
    staging, not after the step that followed; the step taken again from it gives the same weights."""
    from dist_helpers import run_torchrun

    names = ["ddp", "fsdp", "zero2", "zero3"]
    run_torchrun([__file__, "snapshot", str(tmp_path), *names], nproc=2, timeout=360)
    for name in names:
        res = json.loads((tmp_path / f"{name}.json").read_text())
        assert res == {"staged_only": True, "step_moved": True, "loaded_is_staged": True, "again_equal": True}, name


# ------------------------------------------------------------------ the checkpointer, one process
class _Counter:
    """A Stateful whose state keeps changing (a step count, a data position)."""

    def __init__(self) -> None:
        self.n, self.seen = 0, [0]

    def state_dict(self) -> dict:
        return {"n": self.n, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.n, self.seen = int(state["n"]), list(state["seen"])


@pytest.fixture
def gated():
    """An engine whose staged writes wait for ``gate`` (a save held in flight as long as a test needs)."""
    eng = Engine(pcfg(), ocfg(accum=1), scfg(), 10, micro_batch_size=MICRO * ACCUM)
    eng.setup(tiny_model())
    gate = threading.Event()
    stage = eng.stage_state

    def held_stage(directory):
        write = stage(directory)
        return lambda: (gate.wait(60), write())

    eng.stage_state = held_stage
    yield eng, gate
    gate.set()
    eng.close()


def test_a_background_save_is_a_snapshot_and_whole_only_after_its_commit(tmp_path, gated):
    eng, gate = gated
    data = global_batches(1)
    ck = Checkpointer(tmp_path, eng, keep_last=1)
    counter = _Counter()
    ck.save(1, {"progress": counter}, {"rng": counter})
    train_steps(eng, data, range(1), 1)
    counter.n, counter.seen = 2, [0, 1]
    weights = eng.full_state_dict()
    ck.save(2, {"progress": counter}, {"rng": counter}, background=True)
    assert ck.in_flight
    train_steps(eng, data, range(1, 2), 1)  # the run goes on while step 2 is written
    counter.n = 3
    counter.seen.append(2)
    assert ck.poll() is None  # not done: the write waits at the gate
    # in flight: a partial folder, the previous checkpoint whole and not pruned, `latest` unchanged
    assert (tmp_path / ".step_00000002.partial").is_dir() and not (tmp_path / "step_00000002").exists()
    assert find_latest_whole(tmp_path) == tmp_path / "step_00000001"
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    gate.set()
    times = ck.wait()
    assert not ck.in_flight and times["stall_s"] < times["total_s"] and times["bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]  # pruned after the commit
    verify(tmp_path / "step_00000002")
    rank = torch.load(tmp_path / "step_00000002" / "rank_00000.pt", weights_only=True)
    train = torch.load(tmp_path / "step_00000002" / "train_state.pt", weights_only=True)
    assert rank["rng"] == {"n": 2, "seen": [0, 1]} and train["progress"] == {"n": 2, "seen": [0, 1]}
    eng.load_state(tmp_path / "step_00000002")
    assert all(torch.equal(v, weights[k]) for k, v in eng.full_state_dict().items())


def test_a_full_disk_during_a_background_save_is_raised_on_the_next_poll(tmp_path, gated, monkeypatch):
    from trainer import slow_storage

    eng, gate = gated
    ck = Checkpointer(tmp_path, eng, keep_last=2)
    ck.save(1, {}, {})
    real = slow_storage.torch_save

    def full(obj, path, **kw):
        if ".step_00000002.partial" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, **kw)

    monkeypatch.setattr(slow_storage, "torch_save", full)
    ck.save(2, {}, {}, background=True)
    gate.set()
    with pytest.raises(CheckpointError, match=rf"no space left on {tmp_path}: .* needed, .* free \(checkpoint "
                                              r"step_00000002 not written; the previous ones are kept\)"):
        while ck.poll() is None:
            threading.Event().wait(0.05)
    assert not ck.in_flight and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    verify(tmp_path / "step_00000001")


# ------------------------------------------------------------------ faults through the real loop
def _tiny_run(out: Path, nproc: int, *args: str, env: dict | None = None, check: bool = True):
    from dist_helpers import run_torchrun

    return run_torchrun([WORKER, f"out_dir={out}", *args], nproc=nproc, timeout=300, check=check, env=env)


def _weights_equal(a: Path, b: Path) -> None:
    from test_loop import load_weights

    ref, got = load_weights(a), load_weights(b)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


#: tiny checkpoints (~10 KiB per rank) written at 20 kB/s: a save is in flight for a good second
SLOW_WRITES = {"GEOPRIME_TEST_WRITE_MB_S": "0.02"}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_kill_9_while_a_save_is_in_flight_resumes_from_the_previous_one(tmp_path, strategy):
    base = ["train.steps=7", "train.ckpt_every=2", f"parallel.strategy={strategy}", "task.bn=true",
            *(["parallel.zero_stage=2"] if strategy == "deepspeed" else [])]
    _tiny_run(tmp_path / "ref", 2, *base)
    run = tmp_path / "run"
    first = _tiny_run(run, 2, *base, env={**SLOW_WRITES, "GEOPRIME_TEST_KILL_AT_STEP": "5",
                                          "GEOPRIME_TEST_KILL_RANK": "1", "GEOPRIME_TEST_KILL_MID_SAVE": "1"},
                      check=False)
    assert first.returncode != 0
    assert "killing rank 1 at step 5 with a checkpoint in flight" in (run / "logs" / "rank1.log").read_text()
    log = (run / "logs" / "rank0.log").read_text()
    assert "checkpoint step_00000004 staged" in log and "checkpoint saved: " + str(run / "checkpoints" /
                                                                                 "step_00000004") not in log
    assert (run / "checkpoints" / ".step_00000004.partial").is_dir()  # the save in flight when killed
    assert find_latest_whole(run / "checkpoints") == run / "checkpoints" / "step_00000002"
    _tiny_run(run, 2, *base)
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} (step 2)" in (run / "logs" / "rank0.log").read_text()
    _weights_equal(tmp_path / "ref", run)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_right_after_a_commit_resumes_from_the_new_one(tmp_path):
    base = ["train.steps=7", "train.ckpt_every=2", "parallel.strategy=ddp", "task.bn=true", "train.keep_last=1"]
    _tiny_run(tmp_path / "ref", 2, *base)
    run = tmp_path / "run"
    first = _tiny_run(run, 2, *base, env={"GEOPRIME_TEST_KILL_AFTER_COMMIT_STEP": "4"}, check=False)
    assert first.returncode != 0 and not (run / "weights.pt").exists()
    ck = run / "checkpoints"
    assert find_latest_whole(ck) == ck / "step_00000004" and (ck / "latest").read_text().strip() == "step_00000004"
    assert (ck / "step_00000002").is_dir()  # killed before its prune: pruning comes only after a commit
    _tiny_run(run, 2, *base)
    assert f"resumed from {ck / 'step_00000004'} (step 4)" in (run / "logs" / "rank0.log").read_text()
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_00000007"]
    _weights_equal(tmp_path / "ref", run)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stop_signal_during_a_save_in_flight_waits_for_it_then_saves_whole(tmp_path):
    """SIGTERM while checkpoint 300 is being written (~3 s at 5 kB/s; the tiny steps go on meanwhile):
    the stop's save waits for it, then writes its own; both are whole, nothing is left partial, and the
    resumed run ends equal to an uninterrupted one."""
    from dist_helpers import REPO_ROOT, child_env, signal_and_wait, wait_for_text

    base = ["train.steps=600", "train.ckpt_every=300", "train.keep_last=3", "train.log_every=100"]

    def direct(out: Path, env: dict | None = None) -> subprocess.Popen:  # one plain process, no torchrun
        return subprocess.Popen([sys.executable, WORKER, f"out_dir={out}", *base], env=child_env(env), cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ref = direct(tmp_path / "ref")
    assert ref.wait(timeout=200) == 0, ref.stdout.read()[-3000:]
    run = tmp_path / "run"
    proc = direct(run, {"GEOPRIME_TEST_WRITE_MB_S": "0.005"})
    log, ck = run / "logs" / "rank0.log", run / "checkpoints"
    wait_for_text(log, "checkpoint step_00000300 staged", proc, timeout=120)
    output = signal_and_wait(proc, signal.SIGTERM, 120)
    assert proc.returncode != 0 and "stopped by SIGTERM after step" in output, output[-3000:]
    text = log.read_text()
    stopped = int(text.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 300 < stopped < 600, stopped
    # the signal came while 300 was in flight; the stop's save waited for it, then made its own
    order = [text.index(s) for s in ("checkpoint step_00000300 staged", "received SIGTERM",
                                     f"checkpoint saved: {ck / 'step_00000300'}",
                                     f"checkpoint saved: {ck / f'step_{stopped:08d}'}")]
    assert order == sorted(order), order
    assert not list(ck.glob(".step_*")) and not (ck / ".stopping.json").exists()  # nothing left partial
    verify(ck / "step_00000300")
    verify(ck / f"step_{stopped:08d}")
    again = direct(run)
    assert again.wait(timeout=200) == 0, again.stdout.read()[-3000:]
    assert f"resumed from {ck / f'step_{stopped:08d}'} (step {stopped})" in log.read_text()
    _weights_equal(tmp_path / "ref", run)


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "snapshot":
        worker_snapshot(out, sys.argv[3:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
