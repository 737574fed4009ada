"""A full disk at a checkpoint: "no space left on <path>: N MiB needed, M free", the previous checkpoint
whole, and the same command resumes once space is freed. Before, the run died with torch's
"[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598"."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_helpers import EAGER_LOSS, child_env, survivors, wait_for_text

REPO = Path(__file__).resolve().parents[1]

#: `python -m trainer` with shutil.disk_usage reporting the free bytes written in $FAKE_FREE_FILE (when it
#: exists): a small disk stand-in for the free-space check, the rest of the CLI as is
SMALL_DISK_TRAINER = """
import os, runpy, shutil, sys
real = shutil.disk_usage
def disk_usage(path):
    fake = os.environ["FAKE_FREE_FILE"]
    if not os.path.exists(fake):
        return real(path)
    total = real(path).total
    free = int(open(fake).read())
    return shutil._ntuple_diskusage(total, total - free, free)
shutil.disk_usage = disk_usage
sys.argv = ["trainer", *sys.argv[1:]]
runpy.run_module("trainer", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_full_disk_is_named_keeps_the_last_checkpoint_and_resumes_once_freed(small_synthetic, tmp_path):
    from trainer.checkpointing.checkpoint import find_latest_whole

    out, fake = tmp_path / "run", tmp_path / "free_bytes"
    args = [sys.executable, "-c", SMALL_DISK_TRAINER, "task=depth", EAGER_LOSS, f"data.root={small_synthetic}", f"out_dir={out}",
            "tracking=none", "train.batch_size=1", "train.log_every=1", "train.progress=false", "train.ckpt_every=2",
            "data.num_workers=1"]
    env = child_env({"FAKE_FREE_FILE": str(fake)})
    proc = subprocess.Popen(args + ["train.steps=500"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = out / "logs" / "rank0.log"
    try:
        wait_for_text(log, "checkpoint saved: ", proc, timeout=240)
        fake.write_text(str(5 * 2**20))  # the disk fills up: 5 MiB left
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output[-3000:]
    said = re.search(r"run failed: CheckpointError: no space left on (\S+): (\d+) MiB needed, 5 MiB free "
                     r"\(checkpoint (step_\d+) not written; the previous ones are kept\)", log.read_text())
    assert said, log.read_text()[-3000:]
    assert said.group(1) == str(out / "checkpoints") and int(said.group(2)) > 100  # the depth model + Adam
    whole = find_latest_whole(out / "checkpoints")
    assert whole is not None and whole.name < said.group(3)
    assert not list((out / "checkpoints").glob(".step_*.partial")) and not survivors(str(out))

    fake.unlink()  # space freed: the same command resumes from the whole checkpoint
    step = int(whole.name.split("_")[1])
    res = subprocess.run(args + [f"train.steps={step + 1}"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {whole}" in log.read_text()


@pytest.mark.timeout(120)
def test_a_real_enospc_during_the_save_is_named_and_cleaned_up(tmp_path, monkeypatch):
    """A 64 KiB tmpfs as the checkpoint folder (root only; skipped elsewhere), the free-space check
    switched off so that the write itself hits ENOSPC."""
    import trainer.checkpointing.checkpoint as ckpt_mod
    from test_loop import _train_single
    from trainer.checkpointing.checkpoint import CheckpointError

    mount = tmp_path / "checkpoints"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        monkeypatch.setattr(ckpt_mod, "space_shortfall", lambda path, needed: None)
        with pytest.raises(CheckpointError, match=rf"no space left on {mount}: \d+ [KM]iB needed, \d+ KiB free "
                                                  r"\(checkpoint step_00000002 not written"):
            _train_single(tmp_path, "train.steps=4", "train.ckpt_every=2", "train.export=false")
        assert not list(mount.iterdir())  # the partial checkpoint was removed, nothing else was there
    finally:
        subprocess.run(["umount", str(mount)], check=True)
