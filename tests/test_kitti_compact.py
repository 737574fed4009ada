"""Compact KITTI shards: each frame stored once per shard, samples assembled when read.

Checks that decoded samples equal the plain layout's bit for bit, that the stream stays
exactly-once and exactly resumable, that a damaged frame is caught and named for every sample
that uses it, and that compact shards are much smaller than plain ones.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards.__main__ import main
from data_shards.manifest import Manifest, ManifestError
from data_shards.reader import ShardError
from data_shards.sources import kitti
from data_shards.loader import build_loader
from data_shards.stream import Plan, ShardStream, StreamConfig
from fixtures_real import KITTI_DATE, write_kitti_raw

D1, D2 = f"{KITTI_DATE}_drive_0001_sync", f"{KITTI_DATE}_drive_0002_sync"
HW = (24, 80)


def _texture(root: Path, drives: dict[str, int], hw: tuple[int, int]) -> None:
    """Replace the fixture's flat frames by seeded noise (incompressible, like real pixels)."""
    for d_idx, drive in enumerate(sorted(drives), 1):
        for side, cam in (("l", "image_02"), ("r", "image_03")):
            for f in range(drives[drive]):
                g = np.random.default_rng([d_idx, f, 2 if side == "l" else 3])
                img = g.integers(0, 256, hw + (3,), dtype=np.uint8)
                Image.fromarray(img).save(root / KITTI_DATE / drive / cam / "data" / f"{f:010d}.png")


def _build(root: Path, out: Path, *extra: str) -> Manifest:
    parser = argparse.ArgumentParser()
    kitti.add_arguments(parser)
    args = parser.parse_args(["--root", str(root), "--out", str(out), "--no-progress", *extra])
    return kitti.build(args)["train"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Two drives (7 and 6 frames, both cameras), textured, with annotated depth on image_02."""
    root = tmp_path_factory.mktemp("kc") / "raw"
    drives = {D1: 7, D2: 6}
    g = np.random.default_rng(7)
    depth = {(d, f): np.where(g.random(HW) < 0.3, g.integers(256, 20000, HW) / 256.0, 0.0)
             for d, n in drives.items() for f in range(n)}
    write_kitti_raw(root, drives, hw=HW, groundtruth=depth)
    _texture(root, drives, HW)
    kitti.load_calib.cache_clear()
    return root


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory) -> dict[str, Path]:
    """Both cameras as targets (the Eigen-Zhou case), 4 samples per shard, both layouts."""
    out = tmp_path_factory.mktemp("kc_out")
    common = ("--sides", "lr", "--max-samples-per-shard", "4")
    _build(raw, out / "compact", *common)
    _build(raw, out / "plain", *common, "--layout", "plain")
    return {"compact": out / "compact", "plain": out / "plain"}


def _samples(root: Path, **kw) -> dict[str, dict]:
    return {s["__key__"]: s for s in ShardStream(StreamConfig(str(root), "train", shuffle=False, **kw))}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for name, x in a[key].items():
            y = b[key][name]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), (key, name)
            else:
                assert x == y, (key, name)


def test_compact_samples_equal_plain_ones_bit_for_bit(built, raw, tmp_path):
    mc = Manifest.from_json((built["compact"] / "train" / "manifest.json").read_text(), "compact")
    mp = Manifest.from_json((built["plain"] / "train" / "manifest.json").read_text(), "plain")
    assert mc.compact and mc.format == "geoprime-shards/2" and mc.source["layout"] == "compact"
    assert not mp.compact and mp.format == "geoprime-shards/1"
    plain_text = (built["plain"] / "train" / "manifest.json").read_text()
    assert '"refs"' not in plain_text and '"frame_slots"' not in plain_text  # plain manifests as before
    assert mc.keys == mp.keys and mc.num_samples == mp.num_samples == 18  # (5 + 4) time steps x 2 cameras
    _assert_same(_samples(built["compact"]), _samples(built["plain"]))
    two = ["rgb", "rgb_right"]
    _assert_same(_samples(built["compact"], keys=two), _samples(built["plain"], keys=two))
    # with depth and a resize too (left camera only: annotated depth exists for image_02)
    extra = ("--depth", "groundtruth", "--resize", "6", "20", "--max-samples-per-shard", "3")
    _build(raw, tmp_path / "c", *extra)
    _build(raw, tmp_path / "p", *extra, "--layout", "plain")
    got = _samples(tmp_path / "c")
    _assert_same(got, _samples(tmp_path / "p"))
    assert len(got) == 9 and tuple(next(iter(got.values()))["depth"].shape) == (1, 6, 20)
    # a rebuild elsewhere gives byte-identical shards
    again = _build(raw, tmp_path / "c2", *extra)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in Manifest.from_json(
        (tmp_path / "c" / "train" / "manifest.json").read_text(), "c").shards]


def test_exactly_once_over_2_ranks_x_2_workers(built):
    for tail in ("drop", "pad"):
        seen, steps = [], []
        for rank in range(2):
            stream = ShardStream(StreamConfig(str(built["compact"]), "train", rank=rank, world_size=2, seed=3,
                                              tail=tail, lanes=4))
            plan = Plan(batch_size=2, num_workers=2)
            counts = []
            for worker in range(2):
                got = list(stream.iter_steps(plan, worker, 2))
                counts.append(len(got))
                samples = [s for step in got for _, s in step]
                seen += [s["__key__"] for s in samples if s["__valid__"]]
                assert all(s["rgb"].shape == (3, *HW) and "rgb_prev" in s for s in samples)
            assert counts[0] == counts[1]  # every worker delivers a share (maybe empty) of every step
            steps.append(counts[0])
        assert len(seen) == len(set(seen)) == 18, tail
        assert steps[0] == steps[1]
    # through real DataLoader workers as well
    stream = ShardStream(StreamConfig(str(built["compact"]), "train", rank=1, world_size=2, seed=3))
    keys = [k for b in build_loader(stream, 2, num_workers=2) for k in b["__key__"]]
    assert len(keys) == len(set(keys)) == 9


def _pass(loader) -> list[tuple[list[str], float]]:
    return [(b["__key__"], float(b["rgb_prev"].double().sum() + b["rgb_right"].double().sum())) for b in loader]


def test_mid_epoch_resume_gives_the_remaining_batches(built):
    def loader():
        return build_loader(ShardStream(StreamConfig(str(built["compact"]), "train", seed=5, lanes=4)), 3)

    full = _pass(loader())
    assert len(full) == 6
    for k in range(1, 6):
        first = loader()
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        resumed = loader()
        resumed.load_state_dict(state)
        assert _pass(resumed) == full[k:], k


def test_a_flipped_byte_in_a_frame_is_caught_and_named(built, tmp_path, capsys):
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(built["compact"], root)
    m = Manifest.from_json((root / "train" / "manifest.json").read_text(), "m")
    shard = m.shards[1]
    i, frame = max(enumerate(shard.frames), key=lambda t: sum(t[0] in r for r in shard.refs))
    users = sum(i in r for r in shard.refs)
    assert users >= 2  # one frame, several samples
    path = root / "train" / shard.name
    data = bytearray(path.read_bytes())
    data[frame.offset + frame.size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{shard.name}: member {frame.name} \(frame used as rgb.*checksum mismatch"):
        list(ShardStream(StreamConfig(str(root), "train", shuffle=False)))
    stream = ShardStream(StreamConfig(str(root), "train", shuffle=False, on_corrupt="skip"))
    loader = build_loader(stream, 2)
    valid = sum(int(b["__valid__"].sum()) for b in loader)
    assert loader.corrupt_count == users and valid == 18 - users
    assert all(frame.name in line for line in loader.skipped)
    assert main(["verify", str(root / "train")]) == 1
    err = capsys.readouterr().err
    assert f"member {frame.name} (frame used as" in err and err.count("checksum mismatch (crc32") == users
    assert main(["verify", str(built["compact"] / "train")]) == 0
    assert main(["inspect", str(built["compact"] / "train"), "-n", "0"]) == 0
    assert "layout: compact, " in capsys.readouterr().out


def test_manifest_references_must_resolve(built):
    text = (built["compact"] / "train" / "manifest.json").read_text()
    d = json.loads(text)
    d["shards"][0]["refs"][0][1] = len(d["shards"][0]["frames"])
    with pytest.raises(ManifestError, match=r"shard train-000000.tar: sample 0 refers to frames"):
        Manifest.from_json(json.dumps(d), "where.json")
    d = json.loads(text)
    d["format"] = "geoprime-shards/1"
    with pytest.raises(ManifestError, match="a compact manifest has both"):
        Manifest.from_json(json.dumps(d), "where.json")


def test_compact_shards_store_far_fewer_bytes_per_triplet(raw, tmp_path):
    def ratio(*extra: str) -> float:
        out = tmp_path / "_".join(extra or ("l",))
        per_sample = []
        for layout in ("compact", "plain"):
            m = _build(raw, out / layout, "--layout", layout, *extra)
            per_sample.append(sum(s.bytes for s in m.shards) / m.num_samples)
        return per_sample[0] / per_sample[1]

    both, left = ratio("--sides", "lr"), ratio()
    # measured (24x80 noise frames, one shard per split): both cameras 0.33 (each frame stored once
    # instead of 4 times; drive ends and the 1 KiB record per sample make it more than 1/4); left
    # camera only 0.55 (each sample still brings its own right view). 4-sample shards: 0.54 / 0.57.
    assert both < 0.4 and left < 0.6, (both, left)


def test_compact_over_http_equals_local(built):
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=built["compact"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        local = _samples(built["compact"])
        _assert_same(_samples(url), local)
        stream = ShardStream(StreamConfig(url, "train", seed=2, rank=1, world_size=2))
        stream.set_epoch(1)
        assert all(torch.equal(s["rgb_next"], local[s["__key__"]]["rgb_next"]) for s in stream)
        assert main(["verify", f"{url}/train"]) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_a_truncated_frames_section_loses_only_that_shard(built, tmp_path):
    import shutil

    root = tmp_path / "cut"
    shutil.copytree(built["compact"], root)
    m = Manifest.from_json((root / "train" / "manifest.json").read_text(), "m")
    last = m.shards[-1]
    path = root / "train" / last.name
    path.write_bytes(path.read_bytes()[:last.frames[-1].offset + 10])  # records intact, frames cut short
    with pytest.raises(ShardError, match=rf"{last.name}: \d+ bytes but its manifest says {last.bytes}"):
        list(ShardStream(StreamConfig(str(root), "train", shuffle=False)))
    loader = build_loader(ShardStream(StreamConfig(str(root), "train", shuffle=False, on_corrupt="skip")), 3)
    valid = [k for b in loader for k, v in zip(b["__key__"], b["__valid__"].tolist()) if v]
    assert loader.corrupt_count == last.count and len(valid) == 18 - last.count


def test_compact_over_s3_range_requests_equals_local(built, monkeypatch):
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        s3.create_bucket(Bucket="geoprime")
        for p in (built["compact"] / "train").iterdir():
            s3.upload_file(str(p), "geoprime", f"kitti/train/{p.name}")
        local = _samples(built["compact"])
        stream = ShardStream(StreamConfig("s3://geoprime/kitti", "train", seed=4, rank=0, world_size=2))
        got = {s["__key__"]: s for s in stream}
        assert len(got) == 9
        _assert_same(got, {k: local[k] for k in got})
    finally:
        server.stop()
