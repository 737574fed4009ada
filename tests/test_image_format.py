"""RGB frames stored as JPEG (``--image-format jpeg``): smaller, decoded to the same layout, checked
like PNGs (size in the header before decoding), recorded in the manifest so a format change rebuilds."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards import schema
from data_shards.__main__ import main
from data_shards.sources import kitti
from data_shards.stream import ShardStream, StreamConfig
from fixtures_real import KITTI_DATE, write_kitti_raw

DRIVE = f"{KITTI_DATE}_drive_0001_sync"
HW = (32, 96)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """One drive of 6 frames per camera: smooth colour gradients with a camera's pixel noise (photo-like:
    PNG stores the noise losslessly, JPEG mostly drops it)."""
    root = tmp_path_factory.mktemp("fmt") / "raw"
    write_kitti_raw(root, {DRIVE: 6}, hw=HW)
    y, x = np.mgrid[0:HW[0], 0:HW[1]].astype(np.float32)
    noise = np.random.default_rng(0)
    for side, cam in (("l", "image_02"), ("r", "image_03")):
        for f in range(6):
            shift = 3 * f + (7 if side == "r" else 0)
            img = np.stack([128 + 100 * np.sin((x + shift) / 9), 128 + 90 * np.cos(y / 7 + x / 31),
                            60 + 2 * (x + shift) % 160], axis=-1) + noise.normal(0, 2, (*HW, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / KITTI_DATE / DRIVE / cam / "data"
                                                                       / f"{f:010d}.png")
    kitti.load_calib.cache_clear()
    return root


def _build(root: Path, out: Path, *extra: str):
    parser = argparse.ArgumentParser()
    kitti.add_arguments(parser)
    args = parser.parse_args(["--root", str(root), "--out", str(out), "--no-progress", "--sides", "lr",
                              "--max-samples-per-shard", "4", *extra])
    return kitti.build(args)["train"]


def _samples(root: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in ShardStream(StreamConfig(str(root), "train", shuffle=False))}


def test_jpeg_frames_round_trip_close_to_png_and_smaller(raw, tmp_path):
    png = _build(raw, tmp_path / "png")
    jpg = _build(raw, tmp_path / "jpg", "--image-format", "jpeg", "--jpeg-quality", "95")
    plain = _build(raw, tmp_path / "plain", "--image-format", "jpeg", "--jpeg-quality", "95", "--layout", "plain")
    assert {"rgb.jpg", "rgb_prev.jpg", "rgb_next.jpg", "rgb_right.jpg"} <= set(jpg.keys)
    assert "rgb.png" in png.keys and "rgb.jpg" not in png.keys
    assert jpg.writer["images"] == {"format": "jpeg", "quality": 95} and "images" not in png.writer
    assert jpg.frame_slots == list(schema.JPEG_IMAGE_KEYS)
    a, b, c = _samples(tmp_path / "png"), _samples(tmp_path / "jpg"), _samples(tmp_path / "plain")
    assert a.keys() == b.keys() == c.keys() and len(a) == 8
    for key in a:
        for name in ("rgb", "rgb_prev", "rgb_next", "rgb_right"):
            x, y = a[key][name], b[key][name]
            assert y.dtype == torch.uint8 and y.shape == x.shape == (3, *HW)
            diff = (x.int() - y.int()).abs().float()
            assert diff.mean() < 2.5 and diff.max() < 40, (key, name, float(diff.mean()), float(diff.max()))
            assert torch.equal(b[key][name], c[key][name])  # compact frames: the plain members' bytes
        torch.testing.assert_close(a[key]["K"], b[key]["K"])
    frame_bytes = lambda m: sum(f.size for s in m.shards for f in s.frames)  # noqa: E731 (tar records pad shards)
    assert frame_bytes(jpg) < 0.6 * frame_bytes(png)
    assert all(f.name.endswith(".jpg") for s in jpg.shards for f in s.frames)
    assert main(["verify", str(tmp_path / "jpg" / "train")]) == 0
    again = _build(raw, tmp_path / "jpg")  # the same folder as PNG: another build, not the JPEG one kept
    assert "rgb.png" in again.keys and "images" not in again.writer


def test_jpeg_and_png_headers_checked_before_decoding():
    img = np.zeros((8, 12, 3), np.uint8)
    jpg = schema.encode_rgb(img, images=schema.ImageEncoding("jpeg", 90))
    assert schema.jpeg_header_hw(jpg) == (8, 12) and schema.jpeg_header_hw(b"\x89PNG") is None
    assert schema.decode_sample({"__key__": "k", "rgb.jpg": jpg}, image_hw=(8, 12))["rgb"].shape == (3, 8, 12)
    with pytest.raises(schema.SchemaError, match=r"shard.tar: sample k, member k.rgb.jpg: JPEG header says 8x12"):
        schema.decode_sample({"__key__": "k", "rgb.jpg": jpg}, where="shard.tar", image_hw=(16, 12))
    with pytest.raises(schema.SchemaError, match="not a JPEG"):
        schema.decode_sample({"__key__": "k", "rgb.jpg": schema.encode_rgb(img)})
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 12, 4), np.uint8)).save(buf, format="PNG")
    with pytest.raises(schema.SchemaError, match="expected 8-bit RGB.*colour type 6"):
        schema.decode_sample({"__key__": "k", "rgb.png": buf.getvalue()})
    with pytest.raises(schema.SchemaError, match="image format 'webp'"):
        schema.ImageEncoding("webp")


def test_rgb_png_rows_use_the_up_filter_and_round_trip_exactly():
    """RGB PNGs are written with the Up filter on every row (cheap to undo: ~2x faster decoding than
    Pillow's mostly-Paeth rows) and read back bit-exact by libpng (torchvision.io) and by Pillow."""
    import struct
    import zlib

    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (7, 5), (HW[0], HW[1])):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[:, : w // 2] = img[:1, : w // 2]  # repeated rows: differences of 0 next to wrapping ones
        data = schema.encode_rgb(img)
        assert schema.png_header_hw(data) == (h, w) and data[24:26] == b"\x08\x02"
        idat, i = b"", 8
        while i < len(data):
            size, kind = struct.unpack(">I4s", data[i:i + 8])
            idat += data[i + 8:i + 8 + size] if kind == b"IDAT" else b""
            assert struct.unpack(">I", data[i + 8 + size:i + 12 + size])[0] == zlib.crc32(data[i + 4:i + 8 + size])
            i += 12 + size
        rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
        assert (rows[:, 0] == 2).all()
        assert np.array_equal(schema.decode_rgb(data, (h, w)).permute(1, 2, 0).numpy(), img)
        assert np.array_equal(np.array(Image.open(io.BytesIO(data))), img)
