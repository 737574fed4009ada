"""data_shards.atomic: a reader sees the old file or the whole new one; a failed write leaves nothing."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from data_shards.atomic import atomic_save, atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_variants_write_whole_files_and_leave_no_temporary(tmp_path):
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01", fsync=True)
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]}, indent=1, trailing_newline=True)
    atomic_save(tmp_path / "w.pt", lambda tmp: torch.save({"x": torch.arange(3)}, tmp), fsync=True)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "j.json").read_text() == json.dumps({"a": [1, 2]}, indent=1) + "\n"
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "j.json", "t.txt", "w.pt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def half_then_fail(f):
        f.write(b"new, but only ha")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save(target, lambda tmp: (open(tmp, "wb").close(), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_temporary_is_hidden_beside_the_target_with_the_usual_permissions(tmp_path):
    seen = []
    atomic_write(tmp_path / "sub" / "f.png", lambda f: seen.extend(os.listdir(tmp_path / "sub")) or f.write(b"png"),
                 mkdir=True)
    assert len(seen) == 1 and seen[0].startswith(".f.png.tmp-")  # beside the target; the writer sweeps .*.tmp-*
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "sub" / "f.png").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "x.txt", "x")  # no folder is made unless asked
