"""Parity with the reference study's fine-tuning code (github.com/donglao/DepthToSemantic):
its KITTI per-image metric, its Cityscapes colour jitter, its lr schedules, and the presets."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from data_shards.sources.labels import trainid_to_labelid
from trainer.config import ModelConfig, register_configs
from trainer.metrics.seg_reference import MetricSet, ReferencePerImageMetric
from trainer.metrics.segmentation import SegmentationMetric
from trainer.schedules import lr_multiplier
from trainer.tasks import build_task
from trainer.tasks.common import random_scale_crop_flip
from trainer.tasks.segmentation import SegmentationConfig, SegmentationTask

KITTI_8 = [0, 1, 2, 8, 9, 10, 13, 18]  # the paper's 8 scored classes
KITTI_7 = KITTI_8[:-1]  # what its code scores: iou[-1] (bicycle) is in its ignore list


def reference_get_miou_and_pix_acc(score, label, num_channels=34):
    """KITTI/train_utils.py of the reference code, verbatim but for the layout (label ids,
    0 = unlabelled; ``score`` = predicted label ids), for one batch (B, H, W)."""
    ignore_list = [-1, 0, 1, 2, 3, 4, 5, 6, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20, 24, 25, 27, 28, 29, 30, 31, 32]
    intersection = (score == label)
    acc_map = intersection * score
    iou = np.ones(num_channels) * np.nan
    with np.errstate(divide='ignore', invalid='ignore'):
        for i in range(1, num_channels):
            tp = np.sum(acc_map == i, axis=(1, 2))
            p_score = np.sum(score == i, axis=(1, 2))
            p_label = np.sum(label == i, axis=(1, 2))
            iou[i] = np.nanmean(np.divide(tp, p_score + p_label - tp))
        iou[ignore_list] = np.nan
        miou = np.nanmean(iou)
        pix_acc = np.sum(intersection) / np.sum(label > 0)
    return miou, pix_acc, iou


def _images(n=6, h=24, w=40, seed=0):
    """Train-id labels (with unlabelled 255 blocks) and noisy predictions; image 1 lacks 'car' in
    its labels but predicts it, image 2 neither labels nor predicts 'sky'."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, 19, (n, h, w), generator=g)
    gt[:, :6] = 255
    gt[:, :, :5][torch.rand(n, h, 5, generator=g) < 0.5] = 255
    pred = torch.where(torch.rand(n, h, w, generator=g) < 0.6, gt, torch.randint(0, 19, (n, h, w), generator=g))
    pred[pred == 255] = 13  # some car predictions on unlabelled pixels
    gt[1][gt[1] == 13] = 2
    gt[2][gt[2] == 10] = 8
    pred[2][pred[2] == 10] = 8
    return gt.to(torch.uint8), pred


def test_parity_metric_equals_the_reference_code():
    gt, pred = _images()
    metric = ReferencePerImageMetric(19, subset=KITTI_7)
    metric.update({"seg": gt, "__valid__": torch.ones(len(gt), dtype=torch.bool)}, {"pred": pred})
    got = metric.compute(metric.state())
    mious, accs, ious = [], [], []
    for g, p in zip(gt.numpy(), pred.numpy()):  # batch size 1, as the reference tests
        m, a, i = reference_get_miou_and_pix_acc(trainid_to_labelid(p.astype(np.uint8))[None],
                                                 trainid_to_labelid(g)[None])
        mious.append(m), accs.append(a), ious.append(i)
    assert got["parity/miou_per_image"] == pytest.approx(np.nanmean(mious), abs=1e-12)
    assert got["parity/pixel_acc_per_image"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert np.isnan(np.array(ious)[:, 33]).all()  # bicycle: never scored by the reference code
    per_class = np.nanmean(np.array(ious), axis=0)
    for train_id, label_id in ((0, 7), (1, 8), (10, 23), (13, 26)):
        assert got[f"parity/iou/{train_id}"] == pytest.approx(per_class[label_id], abs=1e-12)
    assert "parity/iou/18" not in got
    # ours, on labelled pixels only, is higher: the car predictions on unlabelled pixels are free there
    ours = SegmentationMetric(19, subset=KITTI_7)
    ours.update({"seg": gt}, {"pred": pred})
    assert ours.compute(ours.state())["miou_subset_per_image"] > got["parity/miou_per_image"] + 0.01


def test_metric_set_sums_like_one_pass_and_task_reports_both():
    gt, pred = _images(n=4)
    names = [f"c{i}" for i in range(19)]

    def new():
        return MetricSet([SegmentationMetric(19, subset=KITTI_8, class_names=names),
                          ReferencePerImageMetric(19, class_names=names, subset=KITTI_8)])
    one, a, b = new(), new(), new()
    one.update({"seg": gt}, {"pred": pred})
    a.update({"seg": gt[:2]}, {"pred": pred[:2]})
    b.update({"seg": gt[2:]}, {"pred": pred[2:]})
    assert one.compute(one.state()) == pytest.approx(one.compute(a.state() + b.state()))
    task = SegmentationTask(SegmentationConfig(parity_classes=KITTI_7, eval_subset=KITTI_8),
                            ModelConfig())
    metric = task.new_metric()
    metric.update({"seg": gt}, {"pred": pred})
    result = metric.compute(metric.state())
    assert {"miou", "miou_subset_per_image", "parity/miou_per_image", "parity/iou/car"} <= set(result)


def _seg_task(**kw):
    return SegmentationTask(SegmentationConfig(**kw), ModelConfig())


def test_colour_jitter_changes_the_image_only_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    sample = {"rgb": torch.randint(0, 256, (3, 40, 60), generator=g, dtype=torch.uint8),
              "seg": torch.randint(0, 19, (40, 60), generator=g, dtype=torch.uint8), "__key__": "k"}
    off = _seg_task(crop=[32, 48])
    on = _seg_task(crop=[32, 48], jitter_prob=1.0)
    a = off.train_transform(sample, torch.Generator().manual_seed(3))
    b = on.train_transform(sample, torch.Generator().manual_seed(3))
    c = on.train_transform(sample, torch.Generator().manual_seed(3))
    assert torch.equal(a["seg"], b["seg"]) and not torch.equal(a["rgb"], b["rgb"])  # same crop, jittered
    assert torch.equal(b["rgb"], c["rgb"])
    # jitter off: exactly the crop / flip of before, drawing nothing more from the stream's generator
    gen = torch.Generator().manual_seed(3)
    rgb, (seg,) = random_scale_crop_flip(sample["rgb"], [sample["seg"]], gen, (1, 1), (32, 48), True)
    gen2 = torch.Generator().manual_seed(3)
    off.train_transform(sample, gen2)
    assert torch.equal(a["rgb"], rgb) and torch.equal(gen.get_state(), gen2.get_state())
    with pytest.raises(ValueError, match="jitter"):
        _seg_task(jitter_prob=1.5)


def test_schedules_match_the_reference_formulas():
    T = 1000
    poly = lr_multiplier(SimpleNamespace(name="poly", warmup_steps=0, min_lr_ratio=1e-4, poly_power=0.9), T)
    cos = lr_multiplier(SimpleNamespace(name="cosine", warmup_steps=0, min_lr_ratio=0.0), T)
    for i in (0, 1, 500, 998, 999, 1000):
        # Cityscapes/utils/scheduler.py PolyLR(min_lr=1e-6) at lr 0.01, stepped once per iteration
        assert 0.01 * poly(i) == pytest.approx(max(0.01 * (1 - i / T) ** 0.9, 1e-6), rel=1e-9)
        # KITTI/train_utils.py adjust_learning_rate_cosine at lr 1e-5
        assert 1e-5 * cos(i) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * i / T)), rel=1e-9, abs=1e-20)


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_presets_carry_the_reference_settings():
    k = _compose(["+experiment=kitti_semantics_reference"])
    assert (k.task.hflip, k.task.jitter_prob, list(k.task.scale_range), list(k.task.crop)) == (False, 0.0, [1.0, 1.0], [0, 0])
    assert list(k.task.eval_subset) == KITTI_8 and list(k.task.parity_classes) == KITTI_7 and k.task.num_classes == 19
    assert (k.optim.name, k.optim.lr, k.optim.weight_decay, k.schedule.name, k.train.steps, k.train.batch_size) == (
        "adam", 1e-5, 0.0, "cosine", 20000, 16)
    c = _compose(["+experiment=cityscapes_reference"])
    assert (list(c.task.crop), list(c.task.scale_range), c.task.hflip) == ([512, 512], [1.0, 1.0], True)
    assert (c.task.jitter_prob, c.task.jitter_brightness, c.task.jitter_contrast, c.task.jitter_saturation,
            c.task.jitter_hue) == (1.0, 0.5, 0.5, 0.5, 0.0)
    assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == ("sgd", 0.01, 0.9, 1e-4)
    assert (c.schedule.name, c.schedule.poly_power, c.schedule.min_lr_ratio, c.train.steps) == ("poly", 0.9, 1e-4, 50000)
    assert c.train.batch_size * 4 == 32  # per rank, on the reference's 4 GPUs
    build_task(c)  # validates


class _RefASPP(torch.nn.Module):
    """ASPP of the reference's Cityscapes/deeplab.py (plain convs, BatchNorm), verbatim but for names."""

    def __init__(self, C, depth, num_classes, momentum=0.0003):
        super().__init__()
        nn = torch.nn
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.relu = nn.ReLU(inplace=True)
        self.aspp1 = nn.Conv2d(C, depth, kernel_size=1, stride=1, bias=False)
        self.aspp2 = nn.Conv2d(C, depth, kernel_size=3, stride=1, dilation=6, padding=6, bias=False)
        self.aspp3 = nn.Conv2d(C, depth, kernel_size=3, stride=1, dilation=12, padding=12, bias=False)
        self.aspp4 = nn.Conv2d(C, depth, kernel_size=3, stride=1, dilation=18, padding=18, bias=False)
        self.aspp5 = nn.Conv2d(C, depth, kernel_size=1, stride=1, bias=False)
        for i in range(1, 6):
            setattr(self, f"aspp{i}_bn", nn.BatchNorm2d(depth, momentum=momentum))  # its ResNet.norm
        self.conv2 = nn.Conv2d(depth * 5, depth, kernel_size=1, stride=1, bias=False)
        self.bn2 = nn.BatchNorm2d(depth, momentum=momentum)
        self.conv3 = nn.Conv2d(depth, num_classes, kernel_size=1, stride=1)

    def forward(self, x):
        xs = [self.relu(getattr(self, f"aspp{i}_bn")(getattr(self, f"aspp{i}")(x))) for i in range(1, 5)]
        x5 = self.relu(self.aspp5_bn(self.aspp5(self.global_pooling(x))))
        xs.append(torch.nn.Upsample((x.shape[2], x.shape[3]), mode='bilinear', align_corners=True)(x5))
        return self.conv3(self.relu(self.bn2(self.conv2(torch.cat(xs, 1)))))


def test_aspp_head_computes_the_reference_head():
    from trainer.models.seg_heads import ReferenceASPPHead

    torch.manual_seed(0)
    ours, ref = ReferenceASPPHead([0, 0, 0, 0, 64], 5, depth=32), _RefASPP(64, 32, 5)
    parts = [(b[0], b[1]) for b in ours.branches] + [(ours.pool[1], ours.pool[2]), (ours.project[0], ours.project[1])]
    refs = [(getattr(ref, f"aspp{i}"), getattr(ref, f"aspp{i}_bn")) for i in range(1, 6)] + [(ref.conv2, ref.bn2)]
    for (c, bn), (rc, rbn) in zip(parts, refs):
        assert bn.momentum == rbn.momentum == 3e-4 and c.weight.shape == rc.weight.shape
        rc.weight.data.copy_(c.weight)
    ref.conv3.load_state_dict(ours.classifier.state_dict())
    x = torch.randn(3, 64, 8, 12)
    for mode in (True, False):  # training (batch statistics, running stats updated) and eval
        ours.train(mode), ref.train(mode)
        want = torch.nn.Upsample((32, 48), mode="bilinear", align_corners=True)(ref(x))
        assert torch.allclose(ours([x], size=(32, 48)), want, atol=1e-5)
    assert torch.allclose(ours.project[1].running_mean, ref.bn2.running_mean)
    std = float(ours.branches[1][0].weight.detach().std())  # N(0, 2 / fan_out), fan_out = 3 * 3 * 32
    assert abs(std / math.sqrt(2 / (9 * 32)) - 1) < 0.05


def test_encoder_bn_momentum_and_aspp_head_in_the_cityscapes_preset():
    c = _compose(["+experiment=cityscapes_reference", "model.encoder=resnet18"])
    model = build_task(c).build_model()
    assert {m.momentum for m in model["encoder"].modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.05}
    assert type(model["decoder"]).__name__ == "ReferenceASPPHead"
    assert {m.momentum for m in model["decoder"].modules() if isinstance(m, torch.nn.BatchNorm2d)} == {3e-4}
