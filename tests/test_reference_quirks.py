"""The reference study's quirks as switches (issue 32, item 6), each against a port of its code.

From github.com/donglao/DepthToSemantic (``KITTI/``): its fine-tuning loop never zeroes gradients
(``train_semantic.py:172-174``); its ImageNet / MoCo rows are normalised twice
(``train_semantic.py:114-115, 124-125, 158-159`` then ``resnet_encoder.py:89``); its
``--freezeencoder`` puts the encoder in eval mode but keeps training it (``train_semantic.py:85,
135``, ``monodepth_semantic.py:75-81, 99-103``); its labels are resized bicubically
(``data_utils_semantic.py:42``). The port below is its loop (lines 85-176) around our model; our
switches run through the real training loop and engine, and the weights must come out the same.
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as transforms
from omegaconf import OmegaConf
from PIL import Image

from trainer.config import RunConfig
from trainer.distributed import seed_everything
from trainer.tasks import build_task
from trainer.tasks.segmentation import SegmentationConfig, SegmentationTask

STEPS, LR, SEED = 3, 1e-3, 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        seg = torch.randint(0, 5, (2, 64, 64), generator=g, dtype=torch.uint8)
        seg[:, :4] = 255
        out.append({"rgb": torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8), "seg": seg,
                    "__key__": [f"s{i}a", f"s{i}b"], "__valid__": torch.ones(2, dtype=torch.bool)})
    return out


class FixedLoader:
    """The same batches every epoch (a resumable-loader stand-in for the loop)."""

    def __init__(self, batches):
        self.items, self.batches_per_epoch, self.epoch, self.batches = batches, len(batches), 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, s):
        self.epoch, self.batches = s["epoch"], s["batches"]

    def __iter__(self):
        while self.batches < self.batches_per_epoch:
            self.batches += 1
            yield self.items[self.batches - 1]
        self.epoch, self.batches = self.epoch + 1, 0


def _cfg(out, **task_kw):
    cfg = OmegaConf.structured(RunConfig(task=SegmentationConfig(num_classes=5, hflip=False, **task_kw)))
    cfg.out_dir, cfg.seed = str(out), SEED
    cfg.model.input_norm = "monodepth2"  # the reference's encoder normalises (x - 0.45) / 0.225
    cfg.optim.name, cfg.optim.lr, cfg.optim.fused, cfg.schedule.name = "adam", LR, False, "constant"
    cfg.train.steps, cfg.train.batch_size, cfg.train.progress, cfg.train.resume = STEPS, 2, False, "never"
    cfg.train.deterministic, cfg.tracking.enabled, cfg.data.val_split = True, False, ""
    cfg.parallel.channels_last = False  # the same convolution kernels as the port's plain tensors
    return cfg


def _ours(tmp_path, name, **task_kw) -> dict[str, torch.Tensor]:
    from trainer.loop import train

    cfg = _cfg(tmp_path / name, **task_kw)
    batches = _batches(STEPS)
    train(cfg, task=build_task(cfg), loaders=lambda split, is_train: FixedLoader(batches))
    return torch.load(tmp_path / name / "weights.pt", weights_only=True)


def _reference(tmp_path, freeze: bool, normalize: bool, zero_grad: bool = False, **task_kw) -> dict:
    """train_semantic.py's loop around our model: Adam over net.parameters() (encoder included),
    net.train() or net.freeze_encoder() (encoder.eval()), images in [0, 1] (ImageNet-normalised for
    its ImageNet / MoCo rows), loss.backward(); optimizer.step() -- and no zero_grad."""
    cfg = _cfg(tmp_path / "ref", **task_kw)
    task = build_task(cfg)
    seed_everything(SEED)
    net = task.build_model()
    for p in net.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    norm = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]) if normalize else None
    net.train()
    if freeze:
        net["encoder"].eval()
    for batch in _batches(STEPS):
        image = batch["rgb"].float() / 255.0
        if norm is not None:
            image = norm(image)
        score = net["decoder"](net["encoder"](image), size=tuple(image.shape[-2:]))
        loss = F.cross_entropy(score, batch["seg"].long(), ignore_index=255)
        if zero_grad:
            optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.state_dict()


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-6)
                                        for k in a)


@pytest.mark.timeout(300)
def test_the_kitti_loop_quirks_match_a_port_of_the_reference(tmp_path):
    """--freezeencoder + ImageNet row + no zero_grad, as its run.sh would train an ImageNet row."""
    quirks = dict(init="random", protocol="frozen", quirk_no_zero_grad=True, quirk_double_normalize=True,
                  quirk_frozen_trains_encoder=True)
    ours = _ours(tmp_path, "quirks", **quirks)
    assert _close(ours, _reference(tmp_path, freeze=True, normalize=True, **quirks))
    # each switch matters: without it our run is the port with that part of the reference fixed
    fixed = _ours(tmp_path, "zeroed", **{**quirks, "quirk_no_zero_grad": False})
    assert not _close(fixed, ours) and _close(fixed, _reference(tmp_path, True, True, zero_grad=True, **quirks))


@pytest.mark.timeout(300)
def test_frozen_protocol_without_the_quirk_keeps_the_encoder(tmp_path):
    before = build_task(_cfg(tmp_path))
    seed_everything(SEED)
    init = before.build_model().state_dict()
    ours = _ours(tmp_path, "frozen", protocol="frozen")
    assert all(torch.equal(ours[k], init[k]) for k in init if k.startswith("encoder."))
    quirk = _ours(tmp_path, "quirk", protocol="frozen", quirk_frozen_trains_encoder=True)
    assert not torch.equal(quirk["encoder.layers.stem.0.weight"], init["encoder.layers.stem.0.weight"])
    # BatchNorm statistics stay as loaded in both (eval mode), as there
    assert torch.equal(quirk["encoder.layers.stem.1.running_mean"], init["encoder.layers.stem.1.running_mean"])


def test_quirks_are_off_by_default_and_checked():
    c = SegmentationConfig()
    assert not (c.quirk_no_zero_grad or c.quirk_double_normalize or c.quirk_frozen_trains_encoder)
    cfg = _cfg("unused")
    with pytest.raises(ValueError, match="quirk_frozen_trains_encoder reproduces --freezeencoder: needs "
                                         "task.protocol=frozen"):
        SegmentationTask(SegmentationConfig(quirk_frozen_trains_encoder=True), cfg.model, parallel=cfg.parallel)
    cfg.parallel.strategy = "fsdp"
    with pytest.raises(ValueError, match="quirk_no_zero_grad needs parallel.strategy single or ddp"):
        SegmentationTask(SegmentationConfig(quirk_no_zero_grad=True), cfg.model, parallel=cfg.parallel)


# ------------------------------------------------------------------------ bicubic label resizing
def _reference_label(path, reshape):
    """data_utils_semantic.load_semantic_label (lines 38-59), as there."""
    label = np.asarray(Image.open(path).convert('L').resize(reshape), dtype=np.uint8).copy()
    for i in [-1, 0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]:
        label[label == i] = 0
    label[label > 33] = 0
    return label


def test_bicubic_label_resizing_matches_the_reference_loader(tmp_path):
    from data_shards.sources import kitti_semantics
    from data_shards.sources.labels import labelid_to_trainid
    from fixtures_real import write_kitti_semantics

    root = tmp_path / "kitti_semantics"
    write_kitti_semantics(root, n=3, hw=(30, 50))
    parser = argparse.ArgumentParser()
    kitti_semantics.add_arguments(parser)
    args = parser.parse_args(["--root", str(root), "--out", str(tmp_path / "o"), "--shots", "1",
                              "--resize", "12", "20", "--label-resize", "bicubic"])
    opts = kitti_semantics.SemOptions(str(root), kitti_semantics.geometry_from_args(args), args.label_resize)
    nearest = kitti_semantics.SemOptions(str(root), opts.geometry)
    for image in kitti_semantics.list_images(root):
        ours = kitti_semantics.make_sample(opts, image)["seg"]
        ref = _reference_label(root / "training" / "semantic" / image.name, [20, 12])
        # its 0 (unlabelled, ignored by its loss) is our ignore index: the same pixels, the same classes
        assert np.array_equal(ours, labelid_to_trainid(ref))
        assert not np.array_equal(ours, kitti_semantics.make_sample(nearest, image)["seg"])


@pytest.mark.timeout(300)
def test_the_carried_gradient_sum_is_checkpointed(tmp_path):
    """Resumed after step 2, the no-zero-grad run ends with the uninterrupted run's weights."""
    import shutil

    from trainer.loop import train

    def run(name):
        cfg = _cfg(tmp_path / name, protocol="full", quirk_no_zero_grad=True)
        cfg.train.ckpt_every, cfg.train.keep_last = 1, 5
        batches = _batches(STEPS)
        train(cfg, task=build_task(cfg), loaders=lambda split, is_train: FixedLoader(batches))
        return torch.load(tmp_path / name / "weights.pt", weights_only=True)

    ref = run("run")
    ck = tmp_path / "run" / "checkpoints"
    assert "grad_carry" in torch.load(ck / "step_00000002" / "rank_00000.pt", weights_only=True)
    shutil.rmtree(ck / "step_00000003")
    (ck / "latest").write_text("step_00000002\n")
    again = run("run")
    assert all(torch.equal(again[k], ref[k]) for k in ref)
