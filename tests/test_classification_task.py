"""Classification pre-training: multi-hot targets from seg, rank-exact F1 / binned AP by hand,
a training step that learns, and an export that initialises segmentation."""
from __future__ import annotations


import pytest
import torch

from trainer.config import ModelConfig
from trainer.tasks.classification import ClassificationConfig, ClassificationTask, MultiLabelMetric, multi_hot
from trainer.tasks.segmentation import SegmentationConfig, SegmentationTask


def test_multi_hot_from_seg():
    seg = torch.tensor([[0, 0, 2], [255, 2, 2]], dtype=torch.uint8)
    assert multi_hot(seg, 4).tolist() == [1, 0, 1, 0]
    assert multi_hot(seg, 4, min_pixels=3).tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="label 9"):
        multi_hot(torch.tensor([[9]], dtype=torch.uint8), 4)


def test_f1_and_ap_by_hand_and_summed_over_ranks():
    # class 0: scores (pos .9, neg .7, pos .3, neg .1) -> AP = (1/1 + 2/3) / 2 = 5/6
    # class 1: scores (pos .8, pos .6, neg .95, neg .2) -> AP = (1/2 + 2/3) / 2 = 7/12
    prob = torch.tensor([[0.9, 0.8], [0.7, 0.6], [0.3, 0.95], [0.1, 0.2]])
    labels = torch.tensor([[1., 1.], [0., 1.], [1., 0.], [0., 0.]])
    whole = MultiLabelMetric(2, threshold=0.5, bins=100)
    whole.update({"labels": labels}, {"prob": prob})
    r = whole.compute(whole.state())
    assert r["ap/0"] == pytest.approx(5 / 6) and r["ap/1"] == pytest.approx(7 / 12)
    assert r["map"] == pytest.approx((5 / 6 + 7 / 12) / 2)
    # threshold .5: class 0 tp1 fp1 fn1 -> F1 1/2; class 1 tp2 fp1 fn0 -> 4/5; micro 2*3/(6+2+1)
    assert r["f1_macro"] == pytest.approx((1 / 2 + 4 / 5) / 2) and r["f1_micro"] == pytest.approx(6 / 9)
    a, b = MultiLabelMetric(2, bins=100), MultiLabelMetric(2, bins=100)
    a.update({"labels": labels[:1]}, {"prob": prob[:1]})
    b.update({"labels": labels[1:], "__valid__": torch.tensor([True, True, True])}, {"prob": prob[1:]})
    b.update({"labels": labels, "__valid__": torch.zeros(4, dtype=torch.bool)}, {"prob": 1 - prob})  # padding
    assert torch.equal(a.state() + b.state(), whole.state())


def test_training_learns_and_export_initialises_segmentation(tmp_path):
    torch.manual_seed(0)
    model_cfg = ModelConfig()
    task = ClassificationTask(ClassificationConfig(num_classes=3, crop=[32, 32], scale_range=[0.8, 1.2]), model_cfg)
    model = task.build_model()
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(4):  # class 0 always, class 1 in bright images only
        seg = torch.zeros(40, 40, dtype=torch.uint8)
        rgb = torch.full((3, 40, 40), 30, dtype=torch.uint8)
        if i % 2:
            seg[:, 20:] = 1
            rgb[:, :, 20:] = 220
        samples.append(task.train_transform({"__key__": str(i), "rgb": rgb, "seg": seg, "meta": {}}, g))
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("rgb", "labels")}
    assert batch["rgb"].shape == (4, 3, 32, 32) and batch["labels"][:, 2].sum() == 0
    opt = torch.optim.Adam(task.parameter_groups(model), lr=1e-3)
    first = None
    for _ in range(5):
        loss, logs = task.training_step(model, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    model.eval()
    with torch.no_grad():
        out = task.eval_step(model, batch)
    assert out["prob"].shape == (4, 3) and ((out["prob"] >= 0) & (out["prob"] <= 1)).all()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    seg = SegmentationTask(SegmentationConfig(num_classes=3, init="classification",
                                              weights=str(tmp_path / "weights.pt")), model_cfg).build_model()
    assert torch.equal(seg["encoder"].layers["stem"][1].running_mean, model["encoder"].layers["stem"][1].running_mean)


def test_constant_targets_are_warned_about_once(caplog):
    """Every sample showing the same classes gives BCE nothing to learn from the image: warned
    once after LABEL_CHECK_BATCHES batches; varying targets are not."""
    from trainer.tasks import classification as cls

    model_cfg = ModelConfig(encoder="resnet18")
    task = ClassificationTask(ClassificationConfig(num_classes=3), model_cfg)
    model = task.build_model()
    rgb = torch.rand(2, 3, 32, 32)
    constant = {"rgb": rgb, "labels": torch.tensor([[1., 0., 1.], [1., 0., 1.]])}
    with caplog.at_level("WARNING", logger="geoprime.classification"):
        for _ in range(cls.LABEL_CHECK_BATCHES + 3):
            task.training_step(model, constant)
    warned = [r for r in caplog.records if "targets are constant" in r.getMessage()]
    assert len(warned) == 1 and "always present: 0, 2" in warned[0].getMessage()

    caplog.clear()
    task = ClassificationTask(ClassificationConfig(num_classes=3), model_cfg)
    varying = {"rgb": rgb, "labels": torch.tensor([[1., 0., 1.], [1., 1., 0.]])}
    with caplog.at_level("WARNING", logger="geoprime.classification"):
        for _ in range(cls.LABEL_CHECK_BATCHES):
            task.training_step(model, varying)
    assert "targets are constant" not in caplog.text
