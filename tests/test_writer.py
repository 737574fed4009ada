"""Shard writer: exact round trip, manifest contents, byte-identical rebuilds, idempotence,
and that interrupted writes are never taken for whole shards."""
from __future__ import annotations

import hashlib
import json
import os
from functools import partial

import numpy as np
import pytest
import torch

from data_shards.manifest import ManifestError
from data_shards.schema import SchemaError
from data_shards.stream import ShardStream, StreamConfig
from data_shards.writer import WriteError, write_split, write_split_parallel
from shard_fixtures import make_sample, samples

SRC = {"dataset": "test", "config": {"seed": 1}}


def _files(d):
    return sorted(f for f in os.listdir(d))


def test_round_trip_exact_values(tmp_path):
    m = write_split(samples(7), str(tmp_path), "train", source=SRC, max_count=3, progress=False)
    assert [s.count for s in m.shards] == [3, 3, 1]
    got = {s["__key__"]: s for s in ShardStream(StreamConfig(str(tmp_path), "train", shuffle=False))}
    assert len(got) == 7
    for i in range(7):
        ref = make_sample(i)
        s = got[ref["__key__"]]
        assert s["rgb"].dtype == torch.uint8 and s["rgb"].shape == (3, 8, 12)
        assert torch.equal(s["rgb"], torch.from_numpy(ref["rgb"]).permute(2, 0, 1))
        assert torch.equal(s["rgb_right"], torch.from_numpy(ref["rgb_right"]).permute(2, 0, 1))
        assert s["depth"].dtype == torch.float32 and s["depth"].shape == (1, 8, 12)
        assert torch.equal(s["depth"][0], torch.from_numpy(ref["depth"]).float())  # all 16 bits kept
        assert s["depth"].max() > 200  # values above 255/256 m survive (no 8-bit decode)
        assert torch.equal(s["seg"], torch.from_numpy(ref["seg"]))
        flow = torch.from_numpy(ref["flow"]).permute(2, 0, 1)
        valid = flow[2] > 0.5
        assert torch.equal(s["flow"][2], valid.float())  # 1/64-px fixed point: within half a step
        assert (s["flow"][:2] - flow[:2]).abs().max() <= 0.5 / 64 + 1e-6
        assert s["meta"] == ref["meta"]
        assert torch.equal(s["K"], torch.tensor(ref["meta"]["K"]))
        assert float(s["baseline"]) == pytest.approx(0.54)
        assert s["__valid__"] is True


def test_manifest_describes_shards(tmp_path):
    m = write_split(samples(5), str(tmp_path), "val", source=SRC, max_count=2, progress=False)
    d = tmp_path / "val"
    assert _files(d) == ["manifest.json", "val-000000.tar", "val-000001.tar", "val-000002.tar"]
    j = json.loads((d / "manifest.json").read_text())
    assert j["num_samples"] == 5 and j["split"] == "val" and j["source"] == SRC and j["schema_version"] == 2
    assert j["keys"] == ["depth.png", "flow.npz", "json", "rgb.png", "rgb_right.png", "seg.png"]
    assert j["meta_fields"] == ["K", "baseline_m", "source"]
    for s in j["shards"]:
        data = (d / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert [s["count"] for s in j["shards"]] == [2, 2, 1] == [s.count for s in m.shards]


def test_max_size_splits_shards(tmp_path):
    one = len(make_sample(0)["rgb"].tobytes())
    m = write_split(samples(6), str(tmp_path), "train", source=SRC, max_count=100, max_size=3 * one,
                    progress=False)
    assert len(m.shards) > 1 and m.num_samples == 6


def test_same_input_gives_byte_identical_shards(tmp_path):
    for d in ("a", "b"):
        write_split(samples(5), str(tmp_path / d), "train", source=SRC, max_count=2, progress=False)
    for name in _files(tmp_path / "a" / "train"):
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "b" / "train" / name).read_bytes()


def _must_not_run():
    raise AssertionError("an identical complete build must not read its input again")
    yield


def test_rebuild_is_idempotent(tmp_path):
    m1 = write_split(samples(5), str(tmp_path), "train", source=SRC, max_count=2, progress=False)
    mtimes = {f: os.stat(tmp_path / "train" / f).st_mtime_ns for f in _files(tmp_path / "train")}
    m2 = write_split(_must_not_run(), str(tmp_path), "train", source=SRC, max_count=2, progress=False)
    assert m2.to_json() == m1.to_json()
    assert mtimes == {f: os.stat(tmp_path / "train" / f).st_mtime_ns for f in _files(tmp_path / "train")}
    # a damaged shard makes the build run again and repair it
    (tmp_path / "train" / "train-000001.tar").write_bytes(b"garbage")
    m3 = write_split(samples(5), str(tmp_path), "train", source=SRC, max_count=2, progress=False)
    assert m3.to_json() == m1.to_json()
    # another source rebuilds; fewer shards -> stale shards are removed
    m4 = write_split(samples(3), str(tmp_path), "train", source={"dataset": "other"}, max_count=2, progress=False)
    assert m4.num_samples == 3 and _files(tmp_path / "train") == ["manifest.json", "train-000000.tar", "train-000001.tar"]


def _crashing(n_ok):
    for i in range(n_ok):
        yield make_sample(i)
    raise KeyboardInterrupt("killed mid-build")


def test_interrupted_build_is_never_taken_for_whole(tmp_path):
    write_split(samples(4), str(tmp_path), "train", source=SRC, max_count=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_split(_crashing(3), str(tmp_path), "train", source={"dataset": "new"}, max_count=2, progress=False)
    d = tmp_path / "train"
    # the old manifest is gone (it no longer describes the files), the partial shard was dropped
    assert "manifest.json" not in _files(d) and not [f for f in _files(d) if ".tmp-" in f]
    with pytest.raises(ManifestError, match="split 'train'.*build the shards"):
        ShardStream(StreamConfig(str(tmp_path), "train"))
    # a leftover of a killed process (temporary name) is removed by the next build
    (d / ".train-000000.tar.tmp-99999").write_bytes(b"half a shard")
    m = write_split(samples(3), str(tmp_path), "train", source={"dataset": "new"}, max_count=2, progress=False)
    assert m.num_samples == 3 and not [f for f in _files(d) if ".tmp-" in f]


def test_bad_input_is_named(tmp_path):
    dup = [make_sample(0), make_sample(1), make_sample(0)]
    with pytest.raises(WriteError, match="seq000_f000000.*twice"):
        write_split(dup, str(tmp_path), "train", source=SRC, progress=False)
    bad = make_sample(2)
    bad["seg"] = bad["seg"].astype(np.int32)
    with pytest.raises(SchemaError, match="seq000_f000002: seg"):
        write_split([bad], str(tmp_path), "t2", source=SRC, progress=False)
    with pytest.raises(WriteError, match="no samples"):
        write_split([], str(tmp_path), "t3", source=SRC, progress=False)


CALLS: list[int] = []


def _chunk(i: int, fail: bool = False):
    CALLS.append(i)
    if fail and i == 2:
        raise RuntimeError("converter crashed on chunk 2")
    return [make_sample(k) for k in range(3 * i, 3 * i + 3)]


def test_parallel_writer_resumes_and_matches(tmp_path):
    CALLS.clear()
    with pytest.raises(RuntimeError, match="converter crashed on chunk 2") as err:
        write_split_parallel([partial(_chunk, i, True) for i in range(4)], str(tmp_path / "a"), "train",
                             source=SRC, progress=False)
    assert "while writing chunk 2 (train-000002.tar)" in err.value.__notes__[0]
    assert CALLS == [0, 1, 2]
    CALLS.clear()
    m = write_split_parallel([partial(_chunk, i) for i in range(4)], str(tmp_path / "a"), "train",
                             source=SRC, progress=False)
    assert CALLS == [2, 3]  # finished chunks 0 and 1 were kept, not recomputed
    assert [s.count for s in m.shards] == [3, 3, 3, 3] and not (tmp_path / "a" / "train" / ".progress").exists()
    # two worker processes give byte-identical shards and the same manifest
    m2 = write_split_parallel([partial(_chunk, i) for i in range(4)], str(tmp_path / "b"), "train",
                              source=SRC, workers=2, progress=False)
    assert m2.to_json() == m.to_json()
    for s in m.shards:
        assert (tmp_path / "a" / "train" / s.name).read_bytes() == (tmp_path / "b" / "train" / s.name).read_bytes()
    keys = [s["__key__"] for s in ShardStream(StreamConfig(str(tmp_path / "b"), "train", shuffle=False))]
    assert keys == [make_sample(k, 1, 1)["__key__"] for k in range(12)]


def test_flow_is_stored_in_64ths_of_a_pixel_and_bad_flow_is_named():
    from data_shards.schema import FLOW_MAX, decode_flow, encode_flow

    g = np.random.default_rng(0)
    flow = np.zeros((40, 50, 3), np.float32)
    flow[..., :2] = g.normal(scale=30.0, size=(40, 50, 2))
    flow[..., 2] = g.random((40, 50)) < 0.8
    flow[0, 0, :2] = [511.9, -511.9]  # the ends of the range are kept
    flow[1, 1] = [np.nan, 900.0, 0.0]  # an invalid pixel may hold anything
    data = encode_flow(flow)
    back = decode_flow(data)
    assert back.dtype == np.float32 and back.shape == (3, 40, 50)
    assert np.array_equal(back[2], flow[..., 2])
    ok = np.ones((40, 50), bool)
    ok[1, 1] = False
    assert np.abs(back[:2] - flow[..., :2].transpose(2, 0, 1))[:, ok].max() <= 0.5 / 64 + 1e-6
    assert back[1, 1, 1] == pytest.approx(FLOW_MAX)  # clipped on the invalid pixel
    assert len(data) < 0.5 * flow.nbytes  # noise-like flow; smooth real flow compresses ~8x
    flow[2, 2] = [600.0, 0.0, 1.0]
    with pytest.raises(SchemaError, match=r"sample s7: valid flow must be finite and within \+-512.0 px \(got 600"):
        encode_flow(flow, "s7")
    flow[2, 2] = [np.nan, 0.0, 1.0]
    with pytest.raises(SchemaError, match="sample s7: valid flow must be finite"):
        encode_flow(flow, "s7")


def test_schema_v1_shards_with_float32_flow_are_still_read(tmp_path, monkeypatch):
    """Shards written before flow.npz (schema v1: float32 flow.npy) stream unchanged, exactly."""
    import io

    from data_shards import schema

    encode = schema.encode_sample

    def encode_v1(sample, *images):
        out = encode(sample, *images)
        del out["flow.npz"]
        buf = io.BytesIO()
        np.save(buf, np.asarray(sample["flow"], np.float32), allow_pickle=False)
        out["flow.npy"] = buf.getvalue()
        return out

    monkeypatch.setattr(schema, "encode_sample", encode_v1)
    write_split(samples(3), str(tmp_path), "train", source=SRC, progress=False)
    monkeypatch.undo()
    manifest = tmp_path / "train" / "manifest.json"
    j = json.loads(manifest.read_text())
    assert "flow.npy" in j["keys"]
    manifest.write_text(json.dumps({**j, "schema_version": 1}))
    got = {s["__key__"]: s for s in ShardStream(StreamConfig(str(tmp_path), "train", shuffle=False, keys=("rgb", "flow")))}
    for i in range(3):
        ref = make_sample(i)
        assert torch.equal(got[ref["__key__"]]["flow"], torch.from_numpy(ref["flow"]).permute(2, 0, 1))
    manifest.write_text(json.dumps({**j, "schema_version": 7}))
    with pytest.raises(ManifestError, match="schema version 7 but this code reads versions 1, 2"):
        ShardStream(StreamConfig(str(tmp_path), "train"))
