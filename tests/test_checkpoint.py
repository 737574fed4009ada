"""Checkpoints: completion marker + sizes + sha256, damaged / partial ones skipped with a warning
naming them, keep-last-K, and exact resume under DDP, FSDP2 and DeepSpeed ZeRO-2 with BatchNorm (2 ranks, gloo)
after kill -9 while a background save is in flight or right after its commit.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dist_helpers import run_torchrun
from test_loop import _train_single, load_weights

from trainer.checkpointing.checkpoint import CheckpointError, find_latest_whole, verify

WORKER = str(Path(__file__).resolve().parent / "test_loop.py")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_of_checkpoint():
    h = _Collect()
    logger = logging.getLogger("geoprime.checkpoint")
    logger.addHandler(h)
    yield h.messages
    logger.removeHandler(h)


@pytest.mark.timeout(120)
def test_damaged_and_partial_checkpoints_are_skipped(tmp_path, warnings_of_checkpoint):
    _train_single(tmp_path, "train.steps=9", "train.ckpt_every=3", "train.keep_last=3", "train.export=false")
    ck = tmp_path / "checkpoints"
    names = sorted(p.name for p in ck.iterdir() if p.is_dir())
    assert names == ["step_00000003", "step_00000006", "step_00000009"]
    info = verify(ck / "step_00000009")
    assert info["step"] == 9 and "train_state.pt" in info["files"] and "rank_00000.pt" in info["files"]
    assert any(f.startswith("dcp/") for f in info["files"])

    # flip one byte of the newest checkpoint's model shard: same size, wrong sha256
    shard = next(p for p in (ck / "step_00000009" / "dcp").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step_00000009 is damaged: file dcp/.*sha256"):
        verify(ck / "step_00000009")
    # truncate a file of the next one, and leave a partial save lying around
    (ck / "step_00000006" / "train_state.pt").write_bytes(b"x")
    (ck / ".step_00000012.partial").mkdir()
    (ck / "step_00000012").mkdir()  # a directory without its completion marker
    assert find_latest_whole(ck) == ck / "step_00000003"
    joined = "\n".join(warnings_of_checkpoint)
    assert "step_00000009 is damaged" in joined and "sha256" in joined
    assert "step_00000006 is damaged: file train_state.pt has 1 bytes" in joined
    assert "step_00000012 is partial: no COMPLETE.json" in joined

    # the loop resumes from step 3 and finishes equal to an uninterrupted run
    _train_single(tmp_path / "ref", "train.steps=9")
    res = _train_single(tmp_path, "train.steps=9", "train.ckpt_every=3", "train.keep_last=3")
    assert res["step"] == 9
    ref, got = load_weights(tmp_path / "ref"), load_weights(tmp_path)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.timeout(60)
def test_explicit_resume_path_must_be_whole(tmp_path):
    with pytest.raises(CheckpointError, match="train.resume=.*does not exist"):
        _train_single(tmp_path, f"train.resume={tmp_path / 'nope'}")


class _RunsShell:
    """A pickle payload: unpickling it runs ``touch <path>`` (what a crafted .metadata could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.path}",))


@pytest.mark.timeout(120)
def test_malicious_dcp_metadata_is_refused_not_run(tmp_path):
    import pickle

    from trainer.checkpointing.checkpoint import write_marker
    from trainer.checkpointing.safe_dcp import UnsafeCheckpointError

    _train_single(tmp_path, "train.steps=2", "train.export=false")
    ck = tmp_path / "checkpoints" / "step_00000002"
    pwned = tmp_path / "pwned"
    (ck / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsShell(pwned)))
    (ck / "COMPLETE.json").unlink()
    write_marker(ck, 2, 1)  # the attacker can also forge the marker: it is no signature
    verify(ck)
    with pytest.raises(UnsafeCheckpointError, match=r"dcp/.metadata: refusing to load posix.system"):
        _train_single(tmp_path, "train.steps=4")
    assert not pwned.exists()


def test_metrics_json_is_never_partial(tmp_path):
    _train_single(tmp_path, "train.steps=2")
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 2
    assert not list(tmp_path.glob("*.tmp*"))


#: tiny checkpoints (~10 KiB per rank) written at 20 kB/s: a background save is in flight for a good second
SLOW_WRITES = {"GEOPRIME_TEST_WRITE_MB_S": "0.02"}
#: how each exact-resume run is killed: (its test hooks, the checkpoint its resume takes)
KILLS = {"mid_save": ({**SLOW_WRITES, "GEOPRIME_TEST_KILL_AT_STEP": "5", "GEOPRIME_TEST_KILL_MID_SAVE": "1"}, 2),  # 4 in flight
         "after_commit": ({"GEOPRIME_TEST_KILL_AFTER_COMMIT_STEP": "4"}, 4)}  # rank 0, before its prune


def _resume_matches_uninterrupted(tmp_path: Path, *args: str, kill_rank: int, kill: str) -> None:
    """A run killed (``kill``: see :data:`KILLS`; periodic checkpoints at 2 and 4, written in the
    background) resumes from the checkpoint it must take and ends equal to an uninterrupted one."""
    base = ["train.steps=7", "train.ckpt_every=2", "train.keep_last=1", *args]
    run_torchrun([WORKER, f"out_dir={tmp_path / 'ref'}", *base], nproc=2, timeout=300)
    hooks, resumed_at = KILLS[kill]
    run, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = run_torchrun([WORKER, f"out_dir={run}", *base], nproc=2, timeout=300, check=False,
                         env={**hooks, "GEOPRIME_TEST_KILL_RANK": str(kill_rank)})
    assert first.returncode != 0 and not (run / "weights.pt").exists()
    if kill == "mid_save":  # checkpoint 4 was being written: left partial, never taken for a whole one
        assert f"killing rank {kill_rank} at step 5 with a checkpoint in flight" in (
            run / "logs" / f"rank{kill_rank}.log").read_text()
        assert (ck / ".step_00000004.partial").is_dir() and not (ck / "step_00000004").exists()
    if kill == "after_commit":  # 4 committed; killed before pruning 2: pruning comes only after a commit
        assert (ck / "latest").read_text().strip() == "step_00000004" and (ck / "step_00000002").is_dir()
    assert find_latest_whole(ck) == ck / f"step_{resumed_at:08d}"
    run_torchrun([WORKER, f"out_dir={run}", *base], nproc=2, timeout=300)
    assert f"resumed from {ck / f'step_{resumed_at:08d}'} (step {resumed_at})" in (run / "logs" / "rank0.log").read_text()
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith(("step_", ".step_"))) == ["step_00000007"]
    ref, got = load_weights(tmp_path / "ref"), load_weights(run)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy,kill_rank,kill", [("ddp", 0, "after_commit"), ("fsdp", 0, "mid_save"),
                                                     ("deepspeed", 1, "mid_save")])
def test_exact_resume_with_batchnorm(tmp_path, strategy, kill_rank, kill):
    """Exact resume under FSDP2 and ZeRO-2 (and DDP) after one rank is killed: each rank keeps its
    own BatchNorm running statistics, so the resumed run must get back every rank's own; its final
    weights equal the uninterrupted run's, buffers included. The kills land on the background saves
    (issue 31.3): while one is being written (the previous checkpoint is taken: FSDP2, ZeRO-2), right
    after a commit (the new one: DDP)."""
    extra = ["parallel.zero_stage=2"] if strategy == "deepspeed" else []
    _resume_matches_uninterrupted(tmp_path, f"parallel.strategy={strategy}", "task.bn=true", *extra,
                                  kill_rank=kill_rank, kill=kill)
    if strategy != "deepspeed":
        _dcp_buffers_are_rank0s(tmp_path / "run" / "checkpoints" / "step_00000007")


def _dcp_buffers_are_rank0s(ckpt: Path) -> None:
    """The BatchNorm statistics in a DCP checkpoint are rank 0's (as in ``weights.pt``), not a mix of the
    ranks' (each rank stages only its share of the replicated state: trainer/engine/dcp_share.py)."""
    import torch.distributed.checkpoint as dcp

    from trainer.checkpointing.safe_dcp import SafeFileSystemReader
    from trainer.engine.core import quiet_single_process

    own = [torch.load(ckpt / f"rank_{r:05d}.pt", weights_only=True)["buffers"] for r in range(2)]
    assert any(not torch.equal(own[0][k], own[1][k]) for k in own[0])  # the ranks' statistics differ
    state = {"model": {k: torch.empty_like(v) for k, v in own[0].items()}}
    with quiet_single_process():
        dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt / "dcp")), no_dist=True)
    for k, v in own[0].items():
        assert torch.equal(state["model"][k], v), k


def _resume_on_world_size(tmp_path: Path, before: int, after: int, *args: str) -> str:
    """``before`` ranks die after step 3 (checkpoint at 2); ``after`` ranks resume and finish 6
    steps. Returns the resumed run's rank-0 log."""
    base = ["train.steps=6", "train.ckpt_every=2", "train.keep_last=3", *args]
    first = run_torchrun([WORKER, f"out_dir={tmp_path}", *base], nproc=before, timeout=150, check=False,
                         env={"GEOPRIME_TEST_KILL_AT_STEP": "3", "GEOPRIME_TEST_KILL_RANK": "0"})
    assert first.returncode != 0 and not (tmp_path / "weights.pt").exists()
    run_torchrun([WORKER, f"out_dir={tmp_path}", *base], nproc=after, timeout=150)
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert f"world size changed {before} -> {after}" in log and "step_00000002 (step 2)" in log
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["world_size"] == after
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path).values())
    return log


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_deepspeed_resumes_on_another_world_size(tmp_path):
    """ZeRO-2 checkpoints written by 2 ranks resume on 1 and by 1 rank on 2: the loop converts
    them to DeepSpeed's universal format (kept beside the original shards) and finishes."""
    zero2 = ("parallel.strategy=deepspeed", "parallel.zero_stage=2")
    log = _resume_on_world_size(tmp_path / "down", 2, 1, *zero2)
    assert "to DeepSpeed's universal format for 1 ranks" in log
    assert (tmp_path / "down" / "checkpoints" / "step_00000002" / "deepspeed_universal").is_dir()
    _resume_on_world_size(tmp_path / "up", 1, 2, *zero2)
    verify(tmp_path / "up" / "checkpoints" / "step_00000006")  # saves after a universal load are whole


def test_large_files_are_hashed_in_pieces_and_old_whole_file_markers_still_verify(tmp_path, monkeypatch):
    """Files above PIECE_BYTES get one sha256 per piece (hashed on several threads); a flipped byte in any
    piece is named; a marker written with one whole-file sha256 (before pieces) still verifies."""
    import hashlib

    import trainer.checkpointing.checkpoint_marker as marker

    monkeypatch.setattr(marker, "PIECE_BYTES", 1024)
    ck = tmp_path / "step_00000001"
    (ck / "dcp").mkdir(parents=True)
    big = ck / "dcp" / "__0_0.distcp"
    big.write_bytes(bytes(range(256)) * 20)  # 5120 bytes: 5 pieces
    (ck / "train_state.pt").write_bytes(b"small")
    assert marker.write_marker(ck, 1, 1) == 5125
    info = json.loads((ck / "COMPLETE.json").read_text())
    assert len(info["files"]["dcp/__0_0.distcp"]["sha256_pieces"]) == 5 and "sha256" in info["files"]["train_state.pt"]
    assert verify(ck)["step"] == 1
    data = bytearray(big.read_bytes())
    data[3 * 1024 + 7] ^= 0xFF
    big.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"file dcp/__0_0.distcp fails its sha256 check"):
        verify(ck)
    # the format before pieces: one digest of the whole file, whatever its size
    info["files"]["dcp/__0_0.distcp"] = {"size": len(data), "sha256": hashlib.sha256(bytes(data)).hexdigest()}
    del info["piece_bytes"]
    (ck / "COMPLETE.json").write_text(json.dumps(info))
    assert verify(ck)["step"] == 1
