"""data.decode_on=device: the loader leaves RGB frames encoded, the step decodes the batch on its device.
On the CPU that gives the very batch the loader-side decode gives, in the same order and loader state."""
from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_shards import schema
from data_shards.loader import build_loader
from data_shards.sources import kitti
from data_shards.stream import ShardStream, StreamConfig
from fixtures_real import KITTI_DATE, write_kitti_raw
from trainer.tasks.augment import hflip_sample, jitter_frames, sample_jitter
from trainer.tasks.depth import DepthTask
from trainer.tasks.depth_config import DepthTaskConfig
from trainer.tasks.device_decode import decode_on_device
from trainer.tasks.loaders import shard_loader_factory

FRAMES = ("rgb", "rgb_prev", "rgb_next", "rgb_right")
KEYS = (*FRAMES, "K", "baseline")


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, Path]:
    """One drive of 6 frames per camera (8 mono+stereo samples) as compact PNG and JPEG q90 shards."""
    root = tmp_path_factory.mktemp("decode")
    write_kitti_raw(root / "raw", {f"{KITTI_DATE}_drive_0001_sync": 6}, hw=(24, 40))
    kitti.load_calib.cache_clear()
    out = {}
    for fmt in ("png", "jpeg"):
        parser = argparse.ArgumentParser()
        kitti.add_arguments(parser)
        args = parser.parse_args(["--root", str(root / "raw"), "--out", str(root / fmt), "--no-progress", "--sides",
                                  "lr", "--max-samples-per-shard", "3", "--image-format", fmt])
        kitti.build(args)
        out[fmt] = root / fmt
    return out


def _loader(root: Path, task: DepthTask, decode_on: str):
    return build_loader(ShardStream(StreamConfig(str(root), "train", keys=KEYS, lanes=2, seed=3, decode_on=decode_on,
                                                 transform=task.train_transform)), 3, drop_last=True)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_device_decode_gives_the_loaders_batch_order_and_state(splits, fmt):
    task = DepthTask(DepthTaskConfig(supervision="mono_stereo", jitter_on="step"), None)
    here, there = _loader(splits[fmt], task, "loader"), _loader(splits[fmt], task, "device")
    flipped = 0
    for a, b in zip(here, there, strict=True):
        assert isinstance(b["rgb"], list) and isinstance(b["rgb"][0], schema.EncodedImage)
        assert b["rgb"][0].jpeg == (fmt == "jpeg") and b["rgb"][0].hw == (24, 40)
        flipped += sum(f.flipped for f in b["rgb"])
        decoded = decode_on_device(b)
        for k in FRAMES:
            assert decoded[k].dtype == torch.uint8 and torch.equal(decoded[k], a[k]), k
        for k in ("K", "baseline", "jitter"):
            assert torch.equal(b[k], a[k]), k
        stepped, reference = task.augmented(b), task.augmented(a)
        for k in ("aug_rgb", "aug_rgb_prev", "aug_rgb_next"):
            assert torch.equal(stepped[k], reference[k]), k
        assert here.state_dict() == there.state_dict()
    assert 0 < flipped < 6  # flipped and unflipped samples both decoded
    resumed = _loader(splits[fmt], task, "device")  # resume after the first batch: the same next samples
    first = _loader(splits[fmt], task, "loader")
    next(iter(first))
    resumed.load_state_dict(first.state_dict())
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in first]


def test_encoded_frames_need_the_jitter_in_the_step(splits):
    sample = next(iter(ShardStream(StreamConfig(str(splits["jpeg"]), "train", keys=KEYS, decode_on="device"))))
    mirrored = hflip_sample(sample)
    assert mirrored["rgb"].flipped and not sample["rgb"].flipped and mirrored["rgb"].data == sample["rgb"].data
    assert torch.equal(mirrored["K"][0, 2], 40 - 1 - sample["K"][0, 2])
    with pytest.raises(ValueError, match="'rgb' is still encoded .*task.jitter_on=step"):
        jitter_frames(sample, ["rgb"], sample_jitter(torch.Generator()))
    data = SimpleNamespace(root=str(splits["jpeg"]), decode_on="device", lanes=2, tail_policy="drop", resampled=False,
                           on_corrupt="raise", subset=0, subset_seed=0, num_workers=0)
    loader_jitter = DepthTask(DepthTaskConfig(supervision="mono_stereo", jitter_on="loader"), None)
    with pytest.raises(ValueError, match="data.decode_on=device: the task must"):
        shard_loader_factory(data, loader_jitter, SimpleNamespace(rank=0, world_size=1), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="decode_on='gpu'"):
        StreamConfig(str(splits["jpeg"]), "train", decode_on="gpu")
