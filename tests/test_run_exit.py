"""Every way a run ends (success, exception, config error, signal) ends its process and its loader
workers: real CLI (`python -m trainer`), workers on, each run under a hard timeout (a hang fails it).

Before data_shards/workers.py ended them at exit, a rank whose loader raised (a corrupt shard under
the default on_corrupt=raise) logged "run failed" and then waited for ever in multiprocessing's exit
hook, which SIGTERMs its workers (they ignore SIGTERM, to outlive a save) and joins them.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from dist_helpers import EAGER_LOSS, build_synthetic, child_env, processes_naming, signal_and_wait, survivors
from fixtures_real import KITTI_DATE, write_kitti_raw

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 150  # s: a run of a few steps takes ~10 s idle; a hang never ends


def flip_member_byte(shard: Path, member_suffix: str) -> str:
    """Flip one byte in the middle of the last member of ``shard`` whose name ends with ``member_suffix``."""
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(member_suffix)][-1]
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return member.name


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("syn"), "--width", "64", "--sequences", "train=2", "val=1",
                           "test=1", "--frames-per-sequence", "6")


@pytest.fixture(scope="module")
def synthetic_corrupt(tmp_path_factory) -> Path:
    """16 training samples, the last one's rgb.png with a flipped byte: the pre-flight probes 8 samples
    (positions 0, 2, ... 14), so the loader workers are the first to read it."""
    root = build_synthetic(tmp_path_factory.mktemp("bad"), "--width", "64", "--sequences", "train=4", "val=1",
                           "test=1", "--frames-per-sequence", "6")
    flip_member_byte(sorted((root / "train").glob("train-*.tar"))[-1], ".rgb.png")
    return root


@pytest.fixture(scope="module")
def kitti_corrupt(tmp_path_factory) -> Path:
    """KITTI raw in compact shards (each frame stored once), 40 training triplets (frames 1..40); frame 4's
    left image has a flipped byte. It is read by the samples at positions 2, 3 and 4 (as next, current and
    previous frame); the pre-flight probes positions 0, 5, ... 35, so the loader workers meet it first."""
    tmp = tmp_path_factory.mktemp("kitti")
    d1, d2 = f"{KITTI_DATE}_drive_0001_sync", f"{KITTI_DATE}_drive_0002_sync"
    write_kitti_raw(tmp / "raw", {d1: 42, d2: 5}, hw=(64, 96))
    (tmp / "train.txt").write_text("".join(f"{KITTI_DATE}/{d1} {i} l\n" for i in range(1, 41)))
    (tmp / "val.txt").write_text("".join(f"{KITTI_DATE}/{d2} {i} l\n" for i in range(1, 4)))
    subprocess.run([sys.executable, "-m", "data_shards", "build", "kitti", "--root", str(tmp / "raw"), "--out",
                    str(tmp / "shards"), "--split", f"train={tmp / 'train.txt'}", "--split", f"val={tmp / 'val.txt'}",
                    "--no-progress"],
                   check=True, env=child_env(), cwd=REPO, timeout=120, capture_output=True)
    flip_member_byte(sorted((tmp / "shards" / "train").glob("train-*.tar"))[0], "0000000004_image_02.png")
    return tmp / "shards"


def trainer(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", f"out_dir={out}", "tracking=none", "train.progress=false",
                           "train.batch_size=2", *overrides], env=child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout,workers", [("synthetic", 1), ("kitti", 2)])
def test_a_loader_error_ends_the_run_and_its_workers(layout, workers, synthetic_corrupt, kitti_corrupt, tmp_path):
    out = tmp_path / "run"
    data = (["task=depth", EAGER_LOSS, f"data.root={synthetic_corrupt}"] if layout == "synthetic" else
            ["data=kitti", "task=depth", EAGER_LOSS, f"data.root={kitti_corrupt}", "data.test_split=val"])
    res = trainer(out, *data, "train.steps=20", f"data.num_workers={workers}")  # default on_corrupt=raise
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    log = (out / "logs" / "rank0.log").read_text()
    assert "run failed: ShardError: Caught ShardError in DataLoader worker process" in log, log[-3000:]
    assert "checksum mismatch" in log
    assert not survivors(str(out))


@pytest.mark.timeout(300)
def test_success_and_config_error_end_with_workers_on(synthetic, tmp_path):
    done = trainer(tmp_path / "ok", "task=depth", EAGER_LOSS, f"data.root={synthetic}", "train.steps=3", "data.num_workers=2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert not survivors(str(tmp_path / "ok"))
    typo = trainer(tmp_path / "typo", "task=depth", EAGER_LOSS, f"data.root={synthetic}", "data.num_workers=2", "+train.stepz=5")
    assert typo.returncode == 2 and "unknown key train.stepz" in typo.stderr, typo.stderr[-2000:]
    assert not survivors(str(tmp_path / "typo"))


@pytest.mark.timeout(300)
def test_kill_9_of_a_rank_takes_its_workers_at_once(synthetic, tmp_path):
    """A worker asked the kernel for SIGKILL when its rank dies (no 5 s watchdog poll, no orphan)."""
    out = tmp_path / "kill"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", f"out_dir={out}", "tracking=none", "task=depth", EAGER_LOSS,
                             f"data.root={synthetic}", "train.progress=false", "train.batch_size=2", "train.log_every=1",
                             "train.steps=500", "data.num_workers=2"],
                            env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + RUN_TIMEOUT
        log = out / "logs" / "rank0.log"
        workers: list[int] = []
        while not (log.is_file() and "step 2/" in log.read_text()) or len(workers) != 2:
            assert proc.poll() is None and time.monotonic() < end, "the run did not reach step 2 with 2 workers"
            time.sleep(0.2)
            workers = [pid for pid in processes_naming(str(out)) if pid != proc.pid]
        signal_and_wait(proc, signal.SIGKILL, 30)
        assert not survivors(str(out), wait=2.0)  # the watchdog alone would take up to 5 s
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_failed_rank_under_launch_run_fails_the_job(synthetic_corrupt, tmp_path):
    """2 ranks with a loader worker each under `launch run`: the rank that reads the corrupt shard exits,
    torchrun restarts the group once (--max-restarts 1), then the job fails; nothing is left, the lock is free."""
    from trainer.checkpointing.run_lock import is_locked

    out = tmp_path / "ddp"
    res = subprocess.run([sys.executable, "-m", "launch", "run", "--gpus-per-node", "2", "--max-restarts", "1",
                          "task=depth", EAGER_LOSS, "parallel=ddp", f"data.root={synthetic_corrupt}", f"out_dir={out}",
                          "tracking=none", "train.progress=false", "train.batch_size=1", "train.steps=20",
                          "data.num_workers=1"], env=child_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT * 2)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    logs = (out / "logs" / "rank0.log").read_text() + (out / "logs" / "rank1.log").read_text()
    assert logs.count("Caught ShardError in DataLoader worker process") >= 2, logs[-3000:]  # each attempt
    assert not survivors(str(out)) and is_locked(out) is None


@pytest.mark.timeout(300)
def test_a_corrupt_sample_met_by_preflight_is_one_line(tmp_path):
    """The pre-flight probes 8 samples of each split: a corrupt one is a one-line error (exit 2) naming
    shard and member under on_corrupt=raise (it was a traceback), and is skipped under on_corrupt=skip."""
    from trainer.preflight import probe_sizes

    root = build_synthetic(tmp_path / "syn", "--width", "64", "--sequences", "train=2", "val=1", "test=1",
                           "--frames-per-sequence", "6")
    shard = sorted((root / "train").glob("train-*.tar"))[0]
    with tarfile.open(shard) as tar:  # every rgb of the first of 2 shards: 8 probes of 12 samples meet some
        rgbs = [m for m in tar.getmembers() if m.name.endswith(".rgb.png")]
    data = bytearray(shard.read_bytes())
    for m in rgbs:
        data[m.offset_data + m.size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = trainer(tmp_path / "raise", "task=depth", EAGER_LOSS, f"data.root={root}", "train.steps=1")
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "checksum mismatch" in err and shard.name in err and "data.on_corrupt=skip" in err, err
    kept = probe_sizes(str(root), "train", ("rgb",), on_corrupt="skip")
    assert 0 < len(kept) < 8 and all(sizes == {"rgb": (64, 64)} for _, sizes in kept), kept
