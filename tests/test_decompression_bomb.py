"""A decompression bomb in a shard: a 13000x13000 PNG (a few hundred KB of zeros that decode to 169 MB)
inside a 64x96 split, built in with matching checksums (a bad source image). `verify` and the stream
refuse it from its header, naming shard, member, header size and manifest size, before decoding; a
split whose manifest states no size still refuses images above the decode limit. Before, verify passed
it and the reader decoded it and failed only at batching."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from dist_helpers import EAGER_LOSS, build_synthetic, child_env, survivors

REPO = Path(__file__).resolve().parents[1]
BOMB_HW = (13000, 13000)


def zero_png(height: int, width: int, channels: int = 1) -> bytes:
    """An all-zero 8-bit PNG (grayscale, or RGB with ``channels=3``) made row by row: the pixels are never
    in memory at once."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    color = {1: 0, 3: 2}[channels]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    comp, row, parts = zlib.compressobj(9), b"\0" * (1 + width * channels), []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def replace_members(split_dir: Path, shard_name: str, new: dict[str, bytes]) -> None:
    """Rewrite one shard with some members' bytes replaced, and its manifest entry to match (sizes, offsets,
    sha256, crc32): the shard reads as whole, as if it had been built from these images."""
    from data_shards.manifest import member_crc32

    shard = split_dir / shard_name
    with tarfile.open(shard) as tar:
        members = [(m, new.get(m.name, tar.extractfile(m).read())) for m in tar.getmembers() if m.isreg()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    manifest_path = split_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = next(s for s in manifest["shards"] if s["name"] == shard_name)
    with tarfile.open(shard) as tar:
        infos = tar.getmembers()
    keys = list(dict.fromkeys(i.name.split(".", 1)[0] for i in infos))
    entry["offsets"] = [next(i.offset for i in infos if i.name.split(".", 1)[0] == k) for k in keys]
    entry["crc32"] = [{i.name.split(".", 1)[1]: member_crc32(data) for i, data in members
                       if i.name.split(".", 1)[0] == k} for k in keys]
    entry["bytes"], entry["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def bombed(tmp_path_factory) -> tuple[Path, str, str]:
    """A 64x96 synthetic train split whose first sample's seg.png and second sample's rgb.png are bombs."""
    root = build_synthetic(tmp_path_factory.mktemp("syn"), "--width", "96", "--sequences", "train=1", "val=1",
                           "test=1", "--frames-per-sequence", "6")
    split = root / "train"
    shard = sorted(split.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
    seg, rgb = f"{keys[0]}.seg.png", f"{keys[1]}.rgb.png"
    replace_members(split, shard.name, {seg: zero_png(*BOMB_HW), rgb: zero_png(*BOMB_HW, channels=3)})
    return root, seg, rgb


@pytest.mark.timeout(120)
def test_verify_refuses_the_bombs_from_their_headers(bombed):
    root, seg, rgb = bombed
    res = subprocess.run([sys.executable, "-m", "data_shards", "verify", str(root / "train")], env=child_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=100)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    for member in (seg, rgb):
        line = next((ln for ln in out.splitlines() if f"member {member}:" in ln), "")
        assert "train-000000.tar" in line and "PNG header says 13000x13000" in line, out
        assert "the manifest's size is 64x96: refused before decoding" in line, line
    assert "checksum mismatch" not in out  # the shard is whole: only the sizes are wrong


@pytest.mark.timeout(300)
def test_training_refuses_the_bomb_before_decoding_it(bombed, tmp_path):
    """The start-up check meets the bomb among its probed samples: one line naming shard and member, exit 2,
    nothing left running. Under data.on_corrupt=skip the same run skips both bombs and trains."""
    root, _, rgb = bombed
    common = ["task=depth", EAGER_LOSS, f"data.root={root}", "tracking=none", "train.progress=false", "train.batch_size=2",
              "train.steps=4", "data.num_workers=1"]
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "trainer", *common, f"out_dir={out}"],
                         env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    line = next((ln for ln in res.stderr.splitlines() if "error:" in ln), "")
    assert f"member {rgb}: PNG header says 13000x13000 (height x width), the manifest's size is 64x96" in line
    assert "train-000000.tar" in line and "Traceback" not in res.stderr
    assert not survivors(str(out))
    skipped = tmp_path / "skip"
    res = subprocess.run([sys.executable, "-m", "trainer", *common, f"out_dir={skipped}", "data.on_corrupt=skip"],
                         env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert not survivors(str(skipped))


def test_without_a_declared_size_the_decode_limit_refuses_it():
    from data_shards import schema

    assert schema.declared_image_hw({"dataset": "kitti", "geometry": {"crop_tlhw": None, "resize_hw": None}}) is None
    assert schema.declared_image_hw({"geometry": {"crop_tlhw": None, "resize_hw": [192, 640]}}) == (192, 640)
    with pytest.raises(schema.SchemaError, match=r"member k.seg.png: PNG header says 13000x13000 = 169.0 million "
                                                 r"pixels, above the decode limit of 33.6 million"):
        schema.decode_sample({"__key__": "k", "seg.png": zero_png(*BOMB_HW)}, where="shard.tar")
    small = schema.decode_sample({"__key__": "k", "seg.png": zero_png(64, 96)}, where="shard.tar", image_hw=(64, 96))
    assert tuple(small["seg"].shape) == (64, 96)
