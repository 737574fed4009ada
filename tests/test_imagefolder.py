"""ImageNet-style folders -> shards -> single-label classification: class mapping, centre crop,
keys, manifest, errors naming the path, top-1/top-5 by hand and a short real training run."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data_shards.sources import imagefolder
from data_shards.sources.resize import SourceError
from data_shards.stream import ShardStream, StreamConfig, load_manifest

CLASSES = ["cat", "dog", "zebra"]
GREEN, RED, BLUE = (0, 200, 0), (220, 0, 0), (0, 0, 230)


def _banded(w: int, h: int, margin: int) -> Image.Image:
    """A red image with blue left/right margins of ``margin`` pixels (the centre crop must drop them)."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:] = RED
    arr[:, :margin] = BLUE
    arr[:, w - margin:] = BLUE
    return Image.fromarray(arr)


def _tree(root: Path) -> Path:
    """3 classes in train, 2 of them in val; JPEG and PNG, RGB / L / RGBA, different sizes."""
    def put(split, cls, name, im):
        f = root / split / cls / name
        f.parent.mkdir(parents=True, exist_ok=True)
        im.save(f)

    put("train", "zebra", "wide band.png", _banded(48, 16, 16))  # 48x16 -> 24x8 -> crop 8x8: pure red
    put("train", "zebra", "z2.JPEG", Image.new("RGB", (20, 30), GREEN))
    put("train", "cat", "c1.jpg", Image.new("RGB", (12, 10), (90, 90, 90)))
    put("train", "cat", "sub/c2.png", Image.new("L", (9, 9), 77))  # nested, grayscale
    put("train", "dog", "d1.png", Image.new("RGBA", (10, 14), (10, 20, 30, 5)))
    put("train", "dog", "d.1.jpeg", Image.new("RGB", (8, 8), (200, 200, 0)))
    put("val", "dog", "v1.png", Image.new("RGB", (16, 16), (10, 20, 30)))
    put("val", "zebra", "v2.jpg", _banded(32, 8, 8))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def _args(root, out, **kw):
    ns = argparse.ArgumentParser()
    imagefolder.add_arguments(ns)
    argv = ["--root", str(root), "--out", str(out), "--size", "8", "8", "--no-progress"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    return ns.parse_args(argv)


def _samples(out, split):
    return {s["meta"]["source"]["path"]: s for s in ShardStream(StreamConfig(str(out), split, shuffle=False))}


def test_cli_conversion_mapping_crop_keys_manifest(tmp_path):
    root = _tree(tmp_path / "folders")
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "data_shards", "build", "imagefolder", "--root", str(root),
                        "--out", str(out), "--size", "8", "8", "--max-samples-per-shard", "4", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train: 6 samples in 2 shards" in r.stdout
    for split in ("train", "val"):
        src = load_manifest(str(out), split).source
        assert src["dataset"] == "imagefolder" and src["classes"] == CLASSES and src["label_set"] == "imagefolder"
        assert src["resolution"] == [8, 8] and "centre crop" in src["resize"]
    train, val = _samples(out, "train"), _samples(out, "val")
    assert len(train) == 6 and len(val) == 2  # notes.txt skipped
    for path, s in {**train, **val}.items():
        cls = path.split("/")[1]
        assert s["meta"]["source"]["class"] == cls and int(s["label"]) == CLASSES.index(cls)
        assert s["label"].dtype == torch.int64 and s["rgb"].shape == (3, 8, 8) and s["rgb"].dtype == torch.uint8
        assert re.fullmatch(r"[A-Za-z0-9_-]+", s["__key__"]) and s["__key__"].startswith(f"{CLASSES.index(cls):04d}_")
    keys = [s["__key__"] for s in {**train, **val}.values()]
    assert len(set(keys)) == len(keys)
    assert train["train/cat/sub/c2.png"]["rgb"].eq(77).all()  # grayscale -> RGB
    assert train["train/dog/d1.png"]["rgb"][:, 0, 0].tolist() == [10, 20, 30]  # alpha dropped
    # centre crop removes the blue margins; a plain resize would keep them
    assert train["train/zebra/wide band.png"]["rgb"][:, :, 1:-1].permute(1, 2, 0).reshape(-1, 3).eq(
        torch.tensor(RED, dtype=torch.uint8)).all()
    assert val["val/zebra/v2.jpg"]["rgb"][0].float().mean() > 180 and val["val/zebra/v2.jpg"]["rgb"][2].float().mean() < 60
    assert int(val["val/dog/v1.png"]["label"]) == 1
    # the in-process build gives the same keys (deterministic) in a fresh folder
    again = imagefolder.build(_args(root, tmp_path / "again"))
    assert again["train"].num_samples == 6
    assert sorted(s["__key__"] for s in _samples(tmp_path / "again", "train").values()) == \
        sorted(s["__key__"] for s in train.values())


def test_errors_name_the_path(tmp_path):
    root = _tree(tmp_path / "a")
    (root / "val" / "horse").mkdir()
    Image.new("RGB", (4, 4)).save(root / "val" / "horse" / "h.png")
    with pytest.raises(SourceError, match=r"val/horse.*'horse' is not a class folder"):
        imagefolder.build(_args(root, tmp_path / "o1"))
    root = _tree(tmp_path / "b")
    (root / "train" / "empty").mkdir()
    with pytest.raises(SourceError, match=r"train/empty: empty class folder"):
        imagefolder.build(_args(root, tmp_path / "o2", splits=["train"]))
    root = _tree(tmp_path / "c")
    (root / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(SourceError, match=r"train/dog/bad\.jpg: cannot read as an image"):
        imagefolder.build(_args(root, tmp_path / "o3", splits=["train"]))
    with pytest.raises(SourceError, match=r"nosuch: missing"):
        imagefolder.build(_args(root, tmp_path / "o4", splits=["nosuch"]))
    r = subprocess.run([sys.executable, "-m", "data_shards", "build", "imagefolder", "--root", str(tmp_path / "zz"),
                        "--out", str(tmp_path / "o5"), "--size", "8", "8"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"{tmp_path / 'zz' / 'train'}: missing" in r.stderr


def test_topk_metric_by_hand_with_padding():
    from trainer.metrics.classification import TopKAccuracy

    logits = torch.tensor([[5., 4., 3., 2., 1., 0.],   # label 0: top1 hit
                           [5., 4., 3., 2., 1., 0.],   # label 4: top5 hit only
                           [5., 4., 3., 2., 1., 0.],   # label 5: miss
                           [0., 9., 0., 0., 0., 0.]])  # padding, would be a hit
    batch = {"label": torch.tensor([0, 4, 5, 1]), "__valid__": torch.tensor([True, True, True, False])}
    m = TopKAccuracy((1, 5))
    m.update(batch, {"logits": logits})
    r = m.compute(m.state())
    assert r == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3), "samples": 3.0}
    a, b = TopKAccuracy(), TopKAccuracy()
    a.update({"label": batch["label"][:1]}, {"logits": logits[:1]})
    b.update({"label": batch["label"][1:], "__valid__": batch["__valid__"][1:]}, {"logits": logits[1:]})
    assert torch.equal(a.state() + b.state(), m.state())


def test_single_label_task_checks_and_augments():

    from trainer.config import ModelConfig
    from trainer.tasks.classification import ClassificationConfig, ClassificationTask

    model_cfg = ModelConfig()
    task = ClassificationTask(ClassificationConfig(target="single", num_classes=3, crop=[6, 6],
                                                   scale_range=[0.8, 1.2]), model_cfg)
    assert task.required_keys == ("rgb",) and ClassificationTask.required_keys == ("rgb", "seg")
    sample = {"__key__": "k", "rgb": torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8),
              "label": torch.tensor(2), "meta": {}}
    a = task.train_transform(sample, torch.Generator().manual_seed(3))
    b = task.train_transform(sample, torch.Generator().manual_seed(3))
    assert a["rgb"].shape == (3, 6, 6) and torch.equal(a["rgb"], b["rgb"]) and int(a["label"]) == 2
    with pytest.raises(ValueError, match="label 7 outside 0..2"):
        task.eval_transform({**sample, "label": torch.tensor(7)})
    with pytest.raises(ValueError, match="task.target='multi'"):
        ClassificationTask(ClassificationConfig(target="multi"), model_cfg)


@pytest.mark.timeout(120)
def test_train_single_label_on_converted_shards(tmp_path):
    from trainer.config import RunConfig
    from trainer.loop import train
    from trainer.tasks import TASK_CONFIGS

    root = _tree(tmp_path / "folders")
    out = tmp_path / "shards"
    imagefolder.build(_args(root, out, size=[32, 32]))
    c = OmegaConf.structured(RunConfig(task=TASK_CONFIGS()["classification"](target="single", num_classes=3)))
    c.data.root, c.out_dir = str(out), str(tmp_path / "run")
    c.data.train_split, c.data.val_split, c.data.test_split = "train", "", "val"
    c.train.steps, c.train.batch_size, c.train.progress, c.train.resume = 3, 2, False, "never"
    c.tracking.enabled = False
    result = train(c)
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    assert test == result["test"] and test["samples"] == 2
    assert 0 <= test["top1"] <= 1 and 0 <= test["top5"] <= 1 and test["top5"] == 1.0  # 3 classes < 5
