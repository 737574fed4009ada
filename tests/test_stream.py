"""ShardStream / ResumableLoader: exactly-once over ranks and workers, equal batch counts,
exact mid-epoch resume, seeded shuffling, N-shot subsets, resampling and corrupt shards.
The ordering contract across layouts and resume chains: ``tests/test_stream_order.py``."""
from __future__ import annotations

import json
import os
import tarfile
from collections import Counter

import pytest
import torch

from data_shards.deal import deal, epoch_steps
from data_shards.epoch_order import epoch_order
from data_shards.reader import ShardError
from data_shards.loader import build_loader
from data_shards.stream import ShardStream, StreamConfig
from shard_fixtures import all_keys, build

UNEVEN = [5, 1, 3]  # 9 samples in 3 shards: fewer shards than 2 ranks x 2 workers


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("shards")), "train", UNEVEN)


def _epoch(loader):
    return [b["__key__"] for b in loader]


def _rank_batches(root, world, tail, batch, workers, drop_last=False, **kw):
    out = []
    for r in range(world):
        s = ShardStream(StreamConfig(root, "train", rank=r, world_size=world, tail=tail, **kw))
        loader = build_loader(s, batch, num_workers=workers, drop_last=drop_last)
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch
        out.append(batches)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_exactly_once_two_ranks_two_workers(root, workers):
    keys = all_keys(UNEVEN)
    # pad: every real sample exactly once, the padding marked invalid
    ranks = _rank_batches(root, 2, "pad", 2, workers)
    assert [len(b) for b in ranks] == [3, 3]
    valid = [k for bs in ranks for b in bs for k, v in zip(b["__key__"], b["__valid__"].tolist()) if v]
    invalid = [k for bs in ranks for b in bs for k, v in zip(b["__key__"], b["__valid__"].tolist()) if not v]
    assert sorted(valid) == sorted(keys) and len(invalid) == 1
    # drop: each rank floor(9/2) = 4 samples, no sample twice, one left out
    ranks = _rank_batches(root, 2, "drop", 2, workers)
    seen = [k for bs in ranks for b in bs for k in b["__key__"]]
    assert len(seen) == 8 and len(set(seen)) == 8 and set(seen) < set(keys)
    assert all(b["__valid__"].all() for bs in ranks for b in bs)


def test_batches_are_stacked_with_documented_dtypes(root):
    s = ShardStream(StreamConfig(root, "train", keys=("rgb", "rgb_right", "depth", "seg", "flow", "K", "baseline")))
    b = next(iter(build_loader(s, 4)))
    assert b["rgb"].shape == (4, 3, 8, 12) and b["rgb"].dtype == torch.uint8
    assert b["rgb_right"].shape == (4, 3, 8, 12)
    assert b["depth"].shape == (4, 1, 8, 12) and b["depth"].dtype == torch.float32
    assert b["seg"].shape == (4, 8, 12) and b["seg"].dtype == torch.uint8
    assert b["flow"].shape == (4, 3, 8, 12) and b["flow"].dtype == torch.float32
    assert b["K"].shape == (4, 3, 3) and b["baseline"].shape == (4,)
    assert b["__valid__"].dtype == torch.bool and len(b["meta"]) == len(b["__key__"]) == 4


def test_keys_select_members_and_missing_key_is_named(root):
    s = ShardStream(StreamConfig(root, "train", keys=("rgb", "seg")))
    sample = next(iter(s))
    assert "rgb" in sample and "seg" in sample and "depth" not in sample and "flow" not in sample
    with pytest.raises(KeyError, match="split 'train'.*'rgb_prev'"):
        ShardStream(StreamConfig(root, "train", keys=("rgb", "rgb_prev")))
    with pytest.raises(KeyError, match="'normals' is not a schema key"):
        ShardStream(StreamConfig(root, "train", keys=("normals",)))


@pytest.mark.parametrize("n,world,batch,workers,drop_last", [
    (9, 2, 2, 2, False), (9, 4, 2, 3, False), (10, 3, 4, 2, True), (7, 2, 3, 0, True), (13, 3, 1, 4, False),
    (50, 7, 3, 2, True), (50, 7, 3, 2, False),
])
def test_every_rank_gets_its_count_and_every_sample_at_most_once(n, world, batch, workers, drop_last):
    counts = [4, 1, 0, n - 5]
    for tail in ("drop", "pad"):
        order = epoch_order(counts, seed=3, epoch=1, shuffle=True, lanes=4)
        steps = epoch_steps(n, 0, world, batch, drop_last, tail)
        dealt = deal(order, steps, workers)
        for r in range(world):  # every rank the same number of steps, each of its per-rank size
            per_step = dealt.positions(r)
            assert [len(p) for p in per_step] == [steps.per_rank(t) for t in range(steps.count)]
            by_worker = [dealt.positions(r, w) for w in range(max(1, workers))]
            for t in range(steps.count):  # the workers' shares partition the rank's
                assert sorted(x for w in by_worker for x in w[t]) == list(per_step[t])
        real = [int(p) for p in dealt.pos if p < n]
        assert real == list(range(len(real)))  # a prefix of the order, each position once
        shard, member = order.samples(dealt.pos[dealt.pos < n])
        assert len(set(zip(shard.tolist(), member.tolist()))) == len(real)
        if tail == "pad":
            assert len(real) == n and steps.end >= n
        else:
            assert n - len(real) < (world * batch if drop_last else world)


def test_real_batch_counts_for_awkward_sizes(tmp_path):
    root = build(str(tmp_path), "train", [4, 3])  # 7 samples
    for world, batch, workers in [(3, 2, 2), (2, 3, 0), (4, 2, 1)]:
        counts = [len(b) for b in _rank_batches(root, world, "pad", batch, workers)]
        assert len(set(counts)) == 1, (world, batch, workers, counts)


def test_shuffle_is_seeded_and_changes_per_epoch(root):
    def epoch_keys(seed, epoch, shuffle=True):
        s = ShardStream(StreamConfig(root, "train", seed=seed, shuffle=shuffle))
        s.set_epoch(epoch)
        return [x["__key__"] for x in s]

    e0, e1 = epoch_keys(0, 0), epoch_keys(0, 1)
    assert e0 == epoch_keys(0, 0) and sorted(e0) == sorted(e1) == all_keys(UNEVEN)
    assert e0 != e1 and e0 != epoch_keys(1, 0)
    assert epoch_keys(0, 0, shuffle=False) == all_keys(UNEVEN) == epoch_keys(0, 5, shuffle=False)


def _noise(sample, g):
    sample["noise"] = torch.rand(2, generator=g)
    return sample


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_is_exact(root, workers):
    def loader():
        return build_loader(ShardStream(StreamConfig(root, "train", rank=1, world_size=2, tail="pad", seed=7,
                                        transform=_noise)), 1, num_workers=workers)

    ref = loader()
    full = [(b["__key__"], b["noise"]) for b in ref] + [(b["__key__"], b["noise"]) for b in ref]  # epochs 0, 1
    nb = ref.batches_per_epoch
    assert nb == 5 and {k: ref.state_dict()[k] for k in ("epoch", "samples")} == {"epoch": 2, "samples": 0}
    for stop in (1, 2, 3, nb):
        a = loader()
        seen = []
        for b in a:
            seen.append((b["__key__"], b["noise"]))
            if len(seen) == stop:
                break
        state = json.loads(json.dumps(a.state_dict()))  # JSON-able, tiny
        assert state["epoch"] == 0 and state["samples"] == min(2 * stop, 9)  # positions consumed by both ranks
        b = loader()
        b.load_state_dict(state)
        rest = [(x["__key__"], x["noise"]) for x in b] + [(x["__key__"], x["noise"]) for x in b]
        resumed = seen + rest
        assert [k for k, _ in resumed] == [k for k, _ in full]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(resumed, full))  # transforms too


def test_resume_under_any_worker_count_and_refused_under_another_order(root):
    def loader(workers, seed=2):
        return build_loader(ShardStream(StreamConfig(root, "train", seed=seed)), 2, num_workers=workers)

    full = _epoch(loader(3))
    assert all(_epoch(loader(w)) == full for w in (0, 1, 2))  # batches do not depend on the worker count
    for k in range(len(full) + 1):
        b = loader(3 - k % 4)
        b.load_state_dict({"epoch": 0, "samples": min(2 * k, 9)})
        assert _epoch(b) == full[k:]
    with pytest.raises(ValueError, match="samples must be in"):
        loader(3).load_state_dict({"epoch": 0, "samples": 99})
    state = loader(3).state_dict()
    state["samples"] = 4
    with pytest.raises(ValueError, match="another data order: seed 2 -> 5"):
        loader(1, seed=5).load_state_dict(state)
    state["samples"] = 0  # an epoch boundary resumes under any order
    loader(1, seed=5).load_state_dict(state)


def test_states_of_the_earlier_order_resume_only_at_an_epoch_boundary(root):
    old = {"epoch": 3, "batches": 0, "layout": {"world_size": 2, "rank": 0, "num_workers": 0, "batch_size": 2}}
    a = loader = build_loader(ShardStream(StreamConfig(root, "train")), 2)
    loader.load_state_dict(old)
    assert (a.epoch, a.samples) == (3, 0)
    with pytest.raises(ValueError, match=r"written 2 batches into epoch 3 under the earlier data order.*epoch boundary"):
        loader.load_state_dict({**old, "batches": 2})


def test_plain_dataloader_over_stream_is_exactly_once(root):
    s = ShardStream(StreamConfig(root, "train"))
    got = [x["__key__"] for x in torch.utils.data.DataLoader(s, batch_size=None, num_workers=2)]
    assert sorted(got) == all_keys(UNEVEN)


def test_subset_is_deterministic(root):
    def keys(subset_seed, epoch):
        s = ShardStream(StreamConfig(root, "train", subset=4, subset_seed=subset_seed))
        s.set_epoch(epoch)
        return [x["__key__"] for x in s]

    a0, a1, b0 = keys(0, 0), keys(0, 1), keys(1, 0)
    assert len(a0) == 4 and sorted(a0) == sorted(a1) and sorted(a0) == sorted(keys(0, 3))
    assert sorted(a0) != sorted(b0)
    with pytest.raises(ValueError, match="subset=10 is larger than the split"):
        ShardStream(StreamConfig(root, "train", subset=10))


def test_resampled_is_seeded_and_sized(root):
    def epoch(seed):
        loader = build_loader(ShardStream(StreamConfig(root, "train", rank=0, world_size=2, resampled=True, seed=seed)), 2)
        return _epoch(loader), loader

    keys, loader = epoch(4)
    assert len(keys) == loader.batches_per_epoch == 2 and keys == epoch(4)[0]
    many = [k for s in range(6) for b in epoch(s)[0] for k in b]
    assert set(many) <= set(all_keys(UNEVEN)) and max(Counter(many).values()) > 1  # with replacement


def test_too_few_samples_for_world_is_clear(root):
    with pytest.raises(ValueError, match="tail='pad'"):
        ShardStream(StreamConfig(root, "train", rank=0, world_size=16))
    assert build_loader(ShardStream(StreamConfig(root, "train", rank=15, world_size=16, tail="pad")), 1).batches_per_epoch == 1


# ------------------------------------------------------------------------------ corrupt shards
def _rewrite_member(path, member, data):
    """Overwrite a member's bytes in place (same length: the tar structure stays valid)."""
    with tarfile.open(path) as t:
        info = t.getmember(member)
    with open(path, "r+b") as f:
        f.seek(info.offset_data)
        f.write(data.ljust(info.size, b"\0")[: info.size])


@pytest.fixture()
def broken(tmp_path):
    root = build(str(tmp_path), "train", [3, 3, 3])
    _rewrite_member(os.path.join(root, "train", "train-000001.tar"), "seq000_f000004.depth.png", b"not a png")
    return root


def test_corrupt_member_raises_naming_shard_and_member(broken):
    with pytest.raises(Exception, match=r"train-000001\.tar.*seq000_f000004\.depth\.png"):
        list(build_loader(ShardStream(StreamConfig(broken, "train", shuffle=False)), 2))


def test_truncated_shard_raises_naming_shard(broken):
    path = os.path.join(broken, "train", "train-000002.tar")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"train-000002\.tar: \d+ bytes but its manifest says \d+"):
        list(ShardStream(StreamConfig(broken, "train", shuffle=False, keys=("rgb",))))


def test_skip_policy_counts_and_keeps_batch_count(broken):
    path = os.path.join(broken, "train", "train-000002.tar")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:1024 + 600])  # the first sample's first member is cut
    for workers in (0, 2):
        s = ShardStream(StreamConfig(broken, "train", shuffle=False, on_corrupt="skip"))
        loader = build_loader(s, 2, num_workers=workers)
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch == 5
        valid = [k for b in batches for k, v in zip(b["__key__"], b["__valid__"].tolist()) if v]
        assert len(valid) == 5  # 9 - 1 corrupt member - 3 samples of the truncated shard
        assert loader.corrupt_count == s.corrupt_count == 4
        assert any("seq000_f000004" in m and "depth.png" in m for m in loader.skipped)
        assert sum("train-000002.tar" in m for m in loader.skipped) == 3


# ------------------------------------------------------------------------------ real torchrun
_DIST_SCRIPT = """
import json, sys
import torch.distributed as dist
from data_shards.loader import build_loader
from data_shards.stream import ShardStream, StreamConfig

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
root, out = sys.argv[1], sys.argv[2]
result = {}
for tail in ("pad", "drop"):
    stream = ShardStream(StreamConfig(root, "train", rank=rank, world_size=world, tail=tail, seed=5))
    loader = build_loader(stream, batch_size=2, num_workers=2)
    keys, n = [], 0
    for epoch in range(2):
        for batch in loader:
            n += 1
            keys += [[epoch, k, v] for k, v in zip(batch["__key__"], batch["__valid__"].tolist())]
            dist.barrier()  # a rank with fewer batches would hang here (caught by the timeout)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"keys": keys, "batches": n, "per_epoch": loader.batches_per_epoch})
    result[tail] = gathered
if rank == 0:
    json.dump(result, open(out, "w"))
dist.destroy_process_group()
"""


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_torchrun_two_ranks_exactly_once(root, tmp_path):
    from dist_helpers import run_torchrun

    script, out = tmp_path / "stream_dist.py", tmp_path / "out.json"
    script.write_text(_DIST_SCRIPT)
    run_torchrun([str(script), root, str(out)], nproc=2, timeout=120)
    result = json.loads(out.read_text())
    keys = all_keys(UNEVEN)
    for tail, ranks in result.items():
        assert [r["batches"] for r in ranks] == [2 * ranks[0]["per_epoch"]] * 2
        for epoch in (0, 1):
            got = [(k, v) for r in ranks for e, k, v in r["keys"] if e == epoch]
            valid = [k for k, v in got if v]
            if tail == "pad":
                assert sorted(valid) == keys and len(got) == 10
            else:
                assert len(valid) == len(set(valid)) == 8 and set(valid) < set(keys)


def test_resume_does_not_read_consumed_shards(tmp_path):
    root = build(str(tmp_path), "train", [3, 3, 3])
    full = _epoch(build_loader(ShardStream(StreamConfig(root, "train", shuffle=False)), 3))
    for name in ("train-000000.tar", "train-000001.tar"):  # batches 0 and 1 came from these
        os.remove(os.path.join(root, "train", name))
    loader = build_loader(ShardStream(StreamConfig(root, "train", shuffle=False)), 3)
    loader.load_state_dict({"epoch": 0, "samples": 6})
    assert _epoch(loader) == full[2:]
    with pytest.raises(ShardError, match=r"train-000000\.tar: no such file"):
        _epoch(build_loader(ShardStream(StreamConfig(root, "train", shuffle=False)), 3))


def test_reads_start_mid_shard_only_if_the_shard_is_unchanged(tmp_path):
    root = build(str(tmp_path), "train", [6])
    m = json.loads(open(os.path.join(root, "train", "manifest.json")).read())
    offsets = m["shards"][0]["offsets"]
    assert len(offsets) == 6 and offsets[0] == 0 and offsets == sorted(offsets)
    rank1 = [x["__key__"] for x in ShardStream(StreamConfig(root, "train", rank=1, world_size=2, shuffle=False))]
    assert rank1 == all_keys([6])[1::2]  # each read at its own offset (6 lanes of one sample: rank 1 has the odd ones)
    with open(os.path.join(root, "train", "train-000000.tar"), "ab") as f:
        f.write(b"\0" * 10240)  # still a valid tar, but not the one the manifest describes
    with pytest.raises(ShardError, match=r"train-000000\.tar: \d+ bytes but its manifest says \d+"):
        list(ShardStream(StreamConfig(root, "train", rank=1, world_size=2, shuffle=False)))


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 2])
def test_pin_memory_on_gpu(root, workers):
    loader = build_loader(ShardStream(StreamConfig(root, "train", keys=("rgb", "depth"))), 4, num_workers=workers, pin_memory=True)
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch
    assert all(b["rgb"].is_pinned() and b["depth"].is_pinned() for b in batches)
    assert torch.equal(batches[0]["depth"].cuda(non_blocking=True).cpu(), batches[0]["depth"])


def test_too_few_samples_name_the_tail_policy_in_use(tmp_path):
    root = build(str(tmp_path), "train", [1, 1])
    with pytest.raises(ValueError, match=r"2 samples cannot give every one of 3 ranks a sample with tail='drop'"):
        ShardStream(StreamConfig(root, "train", rank=0, world_size=3, tail="drop"))
    assert build_loader(ShardStream(StreamConfig(root, "train", rank=2, world_size=3, tail="pad")), 1).batches_per_epoch == 1
    manifest = tmp_path / "train" / "manifest.json"  # a manifest listing no shard (the writer refuses to make one)
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "shards": [], "num_samples": 0}))
    empty = root
    for tail in ("drop", "pad"):
        with pytest.raises(ValueError, match=r"no samples to read \(the manifest lists 0\)"):
            ShardStream(StreamConfig(empty, "train", tail=tail))


def _flip_bit_in_png_data(path, member: str) -> None:
    """Flip one bit inside a PNG's compressed image data (after its IHDR): PIL decodes it without
    complaint (it does not check chunk CRCs) into different pixels."""
    with tarfile.open(path) as t:
        info = t.getmember(member)
    with open(path, "r+b") as f:
        f.seek(info.offset_data)
        data = bytearray(f.read(info.size))
        idat = data.index(b"IDAT") + 4
        data[idat + (info.size - idat) // 2] ^= 0x10
        f.seek(info.offset_data)
        f.write(bytes(data))


def test_a_flipped_bit_in_a_member_is_caught_on_read(tmp_path):
    root = build(str(tmp_path), "train", [3, 3])
    shard = os.path.join(root, "train", "train-000001.tar")
    _flip_bit_in_png_data(shard, "seq000_f000004.rgb.png")
    with pytest.raises(ShardError, match=r"train-000001\.tar: member seq000_f000004\.rgb\.png: checksum mismatch"):
        list(ShardStream(StreamConfig(root, "train", shuffle=False, keys=("rgb",))))
    s = ShardStream(StreamConfig(root, "train", shuffle=False, keys=("rgb",), on_corrupt="skip"))
    batches = list(build_loader(s, 2))
    assert s.corrupt_count == 1 and sum(b["__valid__"].sum().item() for b in batches) == 5
    # a member the run does not read is not checked (and not read)
    assert len(list(ShardStream(StreamConfig(root, "train", shuffle=False, keys=("depth",))))) == 6


def test_verify_flags_flipped_bits_extra_samples_and_empty_splits(tmp_path, capsys):
    from data_shards.__main__ import main

    root = build(str(tmp_path), "train", [3, 3])
    assert main(["verify", os.path.join(root, "train")]) == 0
    _flip_bit_in_png_data(os.path.join(root, "train", "train-000000.tar"), "seq000_f000001.seg.png")
    manifest = os.path.join(root, "train", "manifest.json")
    m = json.loads(open(manifest).read())
    last = m["shards"][1]  # its count lowered by one: one sample would never be trained on
    last.update(count=2, offsets=last["offsets"][:2], crc32=last["crc32"][:2])
    m["num_samples"] = 5
    open(manifest, "w").write(json.dumps(m))
    capsys.readouterr()
    assert main(["verify", os.path.join(root, "train")]) == 1
    err = capsys.readouterr().err
    assert "member seq000_f000001.seg.png: checksum mismatch" in err
    assert "train-000001.tar: holds more samples than the manifest's count 2" in err
    open(manifest, "w").write(json.dumps({**m, "shards": [], "num_samples": 0}))
    assert main(["verify", os.path.join(root, "train")]) == 1
    assert "the split is empty" in capsys.readouterr().err


def test_loader_workers_are_forked_with_stop_signals_blocked_until_they_ignore_them(tmp_path, monkeypatch):
    """torchrun SIGTERMs a rank's whole process group; a worker reached before it ignores stop
    signals used to die (torch's worker SIGTERM handler), failing the rank's checkpoint-and-stop.
    Workers start with the signals blocked, end up ignoring them, and the rank's mask is restored."""
    import signal

    import data_shards.loader as loader_mod
    import data_shards.workers as workers_mod

    seen = tmp_path / "worker_signals.txt"
    original = workers_mod.ignore_stop_signals

    def recording(worker_id: int) -> None:
        blocked_at_start = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        original(worker_id)
        seen.write_text(json.dumps({
            "blocked_at_start": sorted(int(s) for s in blocked_at_start),
            "blocked_after": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            "ignored": [signal.getsignal(s) == signal.SIG_IGN for s in workers_mod.STOP_SIGNALS]}))

    monkeypatch.setattr(loader_mod, "ignore_stop_signals", recording)
    root = build(str(tmp_path / "shards"), "train", [6])
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    batches = list(build_loader(ShardStream(StreamConfig(root, "train", shuffle=False)), 2, num_workers=1))
    assert len(batches) == 3
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before  # the rank's mask is back
    got = json.loads(seen.read_text())
    stop = sorted(int(s) for s in workers_mod.STOP_SIGNALS)
    assert set(stop) <= set(got["blocked_at_start"])
    assert not set(stop) & set(got["blocked_after"]) and all(got["ignored"])
