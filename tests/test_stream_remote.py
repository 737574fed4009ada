"""Streaming from real servers on 127.0.0.1 (not mocks): an http.server and moto's S3 server."""
from __future__ import annotations

import functools
import http.server
import os
import socket
import threading

import pytest

from data_shards.manifest import ManifestError
from data_shards.reader import ShardError
from data_shards.loader import build_loader
from data_shards.stream import ShardStream, StreamConfig
from shard_fixtures import all_keys, build

COUNTS = [4, 2, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_root(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("remote")), "train", COUNTS)


@pytest.fixture(scope="module")
def http_root(local_root):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=local_root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_stream_equals_local(local_root, http_root):
    local = [(x["__key__"], x["depth"]) for x in ShardStream(StreamConfig(local_root, "train", shuffle=False))]
    remote = [(x["__key__"], x["depth"]) for x in ShardStream(StreamConfig(http_root, "train", shuffle=False))]
    assert [k for k, _ in remote] == [k for k, _ in local] == all_keys(COUNTS)
    assert all((a == b).all() for (_, a), (_, b) in zip(local, remote))


def test_http_exactly_once_with_workers_and_resume(http_root):
    ranks = []
    for r in range(2):
        loader = build_loader(ShardStream(StreamConfig(http_root, "train", rank=r, world_size=2, tail="pad", seed=1)), 2,
                              num_workers=2)
        ranks.append([b for b in loader])
    assert len(ranks[0]) == len(ranks[1])
    valid = [k for bs in ranks for b in bs for k, v in zip(b["__key__"], b["__valid__"].tolist()) if v]
    assert sorted(valid) == all_keys(COUNTS)
    full = [b["__key__"] for b in ranks[1]]
    resumed = build_loader(ShardStream(StreamConfig(http_root, "train", rank=1, world_size=2, tail="pad", seed=1)), 2,
                           num_workers=2)
    resumed.load_state_dict({"epoch": 0, "samples": 4})  # one step of 2 ranks x 2
    assert [b["__key__"] for b in resumed] == full[1:]


def test_http_errors_name_the_url(http_root, local_root):
    with pytest.raises(ManifestError, match=r"split 'nope'.*HTTP 404"):
        ShardStream(StreamConfig(http_root, "nope"))
    os.rename(os.path.join(local_root, "train", "train-000001.tar"), os.path.join(local_root, "moved.tar"))
    try:
        with pytest.raises(ShardError, match=r"http://127\.0\.0\.1:\d+/train/train-000001\.tar: HTTP 404"):
            list(ShardStream(StreamConfig(http_root, "train", shuffle=False)))
    finally:
        os.rename(os.path.join(local_root, "moved.tar"), os.path.join(local_root, "train", "train-000001.tar"))


@pytest.fixture(scope="module")
def s3_root(local_root):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket="geoprime")
        for name in os.listdir(os.path.join(local_root, "train")):
            s3.upload_file(os.path.join(local_root, "train", name), "geoprime", f"data/synth/train/{name}")
        yield "s3://geoprime/data/synth"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_s3_stream_exactly_once_with_workers(s3_root):
    ranks = []
    for r in range(2):
        loader = build_loader(ShardStream(StreamConfig(s3_root, "train", rank=r, world_size=2, tail="pad", seed=3)), 2,
                              num_workers=2)
        ranks.append(list(loader))
    assert len(ranks[0]) == len(ranks[1]) == 3
    valid = [k for bs in ranks for b in bs for k, v in zip(b["__key__"], b["__valid__"].tolist()) if v]
    assert sorted(valid) == all_keys(COUNTS)
    assert ranks[0][0]["depth"].dtype.is_floating_point and ranks[0][0]["depth"].max() > 200


def test_s3_missing_split_is_named(s3_root):
    with pytest.raises(ManifestError, match=r"split 'val'.*s3://geoprime/data/synth/val/manifest\.json"):
        ShardStream(StreamConfig(s3_root, "val"))


def test_http_transient_errors_are_retried(local_root, monkeypatch):
    from data_shards import openers

    monkeypatch.setattr(openers, "RETRY_BACKOFF_S", 0.01)
    failures = {"left": 2}

    class Flaky(_Quiet):
        def do_GET(self):
            if self.path.endswith(".tar") and failures["left"] > 0:
                failures["left"] -= 1
                self.send_error(503, "busy")
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Flaky, directory=local_root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        keys = [x["__key__"] for x in ShardStream(StreamConfig(f"http://127.0.0.1:{server.server_address[1]}", "train",
                                                   shuffle=False, keys=("rgb",)))]
        assert keys == all_keys(COUNTS) and failures["left"] == 0
    finally:
        server.shutdown()
        server.server_close()


def test_range_reads_mid_shard_http_and_s3(http_root, s3_root):
    # rank 1 of 3 reads samples 1, 4 and 7 (9 lanes of one sample each): samples 1 of shard 0 and
    # 1 of shard 2 start mid-shard, an S3 range request; http.server ignores Range, so the reader
    # skips the bytes itself
    want = all_keys(COUNTS)[1::3]
    for root in (http_root, s3_root):
        assert [x["__key__"] for x in ShardStream(StreamConfig(root, "train", rank=1, world_size=3, shuffle=False))] == want
