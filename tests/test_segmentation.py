"""Segmentation fine-tuning: every initialisation x protocol, a frozen encoder that really stays
frozen, consistent augmentation, DeepLab's dilated encoder, eval / export / overlays."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from trainer.config import ModelConfig
from trainer.models.depth import build_depth_net
from trainer.models.encoders import ResNetEncoder
from trainer.models.pretrained import PretrainedMismatchError
from trainer.models.seg_heads import dilate_encoder
from trainer.tasks.classification import ClassificationConfig, ClassificationTask
from trainer.tasks.flow import FlowConfig, FlowTask
from trainer.tasks.common import random_scale_crop_flip
from trainer.tasks.segmentation import INITS, PROTOCOLS, SegmentationConfig, SegmentationTask

H, W = 32, 64


def _model_cfg(**model):
    return ModelConfig(**model)


def _batch(seed=0, n=2, h=H, w=W, classes=4):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, classes, (n, h // 16 + 1, w // 16 + 1), generator=g)
    seg = seg.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :h, :w].to(torch.uint8).contiguous()
    seg[:, :4] = 255
    palette = torch.randint(0, 256, (classes, 3), generator=g, dtype=torch.uint8)
    rgb = palette[seg.long().clamp(max=classes - 1)].permute(0, 3, 1, 2).contiguous()
    return {"rgb": rgb, "seg": seg, "__key__": [f"s{i}" for i in range(n)], "__valid__": torch.ones(n, dtype=torch.bool)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exported weights of each of our pre-trainings (+ a local 'ImageNet' file and its source)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("exports")
    out = {}
    depth = torch.nn.ModuleDict(build_depth_net(ModelConfig()))
    flow = FlowTask(FlowConfig(), _model_cfg()).build_model()
    cls = ClassificationTask(ClassificationConfig(), _model_cfg()).build_model()
    for name, model in (("depth", depth), ("flow", flow), ("classification", cls)):
        with torch.no_grad():  # make the BN statistics non-default so loading them is checked
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
        torch.save(model.state_dict(), d / f"{name}.pt")
        out[name] = (d / f"{name}.pt", model)
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), d / "imagenet.pt")
    out["imagenet"] = (d / "imagenet.pt", tv)
    return out


def _task(exports, init, protocol="full", **kw):
    weights = {"depth_full": "depth", "checkpoint": "depth"}.get(init, init)
    path = str(exports[weights][0]) if weights in ("depth", "flow", "classification") else None
    model_kw = {"imagenet_weights": str(exports["imagenet"][0])} if init == "imagenet" else {}
    if init == "checkpoint":
        kw.setdefault("drop_prefixes", ["depth_decoder."])
        kw.setdefault("keep_init_prefixes", ["decoder."])
    cfg = SegmentationConfig(num_classes=4, init=init, protocol=protocol, weights=path, **kw)
    return SegmentationTask(cfg, _model_cfg(**model_kw))


def _train(task, model, steps=2):
    opt = torch.optim.SGD(task.parameter_groups(model), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    task.on_train_mode(model)
    for i in range(steps):
        loss, logs = task.training_step(model, _batch(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_init_x_protocol_trains_and_evaluates(exports, init, protocol):
    if init == "depth_full" and protocol == "linear":
        with pytest.raises(ValueError, match="depth_full"):
            _task(exports, init, protocol)
        return
    task = _task(exports, init, protocol)
    model = task.build_model()
    src = {"depth": "depth", "depth_full": "depth", "checkpoint": "depth", "flow": "flow",
           "classification": "classification"}.get(init)
    if src:
        want = {k[len("encoder."):]: v for k, v in exports[src][1].state_dict().items() if k.startswith("encoder.")}
        got = model["encoder"].state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    if init == "imagenet":
        assert torch.equal(model["encoder"].layers["stem"][0].weight, exports["imagenet"][1].conv1.weight)
    loss = _train(task, model, steps=1)
    assert torch.isfinite(loss)
    model.eval()
    metric = task.new_metric()
    with torch.no_grad():
        batch = _batch(5)
        metric.update(batch, task.eval_step(model, batch))
    result = metric.compute(metric.state())
    assert 0 <= result["miou"] <= 1 and 0 <= result["pixel_acc"] <= 1 and result["num_pixels"] == 2 * (H - 4) * W


@pytest.mark.parametrize("protocol", ["frozen", "linear"])
def test_frozen_encoder_is_bitwise_unchanged_while_head_learns(exports, protocol):
    task = _task(exports, "depth", protocol)
    model = task.build_model()
    enc0, dec0 = _clone(model["encoder"].state_dict()), _clone(model["decoder"].state_dict())
    groups = task.parameter_groups(model)
    enc_ids = {id(p) for p in model["encoder"].parameters()}
    assert not any(id(p) in enc_ids for g in groups for p in g["params"])
    assert not any(p.requires_grad for p in model["encoder"].parameters())
    _train(task, model, steps=3)
    assert not model["encoder"].training  # BN in eval mode: running statistics do not move
    enc1 = model["encoder"].state_dict()
    for k in enc0:  # weights, BN running mean / var and num_batches_tracked
        assert torch.equal(enc0[k], enc1[k]), k
    assert any(not torch.equal(dec0[k], v) for k, v in model["decoder"].state_dict().items())


def test_full_finetuning_does_change_the_encoder(exports):
    task = _task(exports, "depth", "full")
    model = task.build_model()
    enc0 = _clone(model["encoder"].state_dict())
    _train(task, model, steps=1)
    changed = [k for k, v in model["encoder"].state_dict().items() if not torch.equal(enc0[k], v)]
    assert any("running_mean" in k for k in changed) and any(k.endswith("weight") for k in changed)


def test_depth_full_loads_the_decoder_but_not_its_output_layer(exports):
    model = _task(exports, "depth_full").build_model()
    depth_dec = exports["depth"][1]["depth_decoder"].state_dict()
    seg_dec = model["decoder"].unet.state_dict()
    for k, v in seg_dec.items():
        if k.startswith("heads."):
            assert v.shape[0] == 4 if k.endswith("weight") else True
        else:
            assert torch.equal(v, depth_dec[k]), k


def test_wrong_pretraining_file_and_architecture_fail_clearly(exports, tmp_path):
    cfg = SegmentationConfig(num_classes=4, init="depth", weights=str(exports["flow"][0]))
    with pytest.raises(ValueError, match="no depth_decoder.* tensors"):
        SegmentationTask(cfg, _model_cfg()).build_model()
    cfg = SegmentationConfig(num_classes=4, init="depth", weights=str(exports["depth"][0]))
    with pytest.raises(PretrainedMismatchError, match="missing in file"):
        SegmentationTask(cfg, _model_cfg(encoder="resnet50")).build_model()
    with pytest.raises(PretrainedMismatchError, match="unexpected in file"):  # nothing dropped
        _task(exports, "checkpoint", drop_prefixes=[]).build_model()
    with pytest.raises(ValueError, match="needs task.weights"):
        SegmentationTask(SegmentationConfig(init="flow"), _model_cfg())
    with pytest.raises(ValueError, match="model.init=imagenet conflicts"):
        SegmentationTask(SegmentationConfig(init="random"), _model_cfg(init="imagenet"))


def test_augmentation_is_consistent_and_seeded():
    seg = torch.arange(64 * 96).reshape(64, 96).remainder(200).to(torch.uint8)
    rgb = torch.stack([seg, seg, seg])
    def run(seed, **kw):
        return random_scale_crop_flip(rgb, [seg], torch.Generator().manual_seed(seed), **kw)
    # no rescale: image and label must be cropped / flipped identically, pixel for pixel
    for seed in range(6):
        img, (lab,) = run(seed, scale_range=(1, 1), crop=(32, 48))
        assert img.shape == (3, 32, 48) and torch.equal(img[0], lab)
    # rescale + pad: padded label is ignore (255), padded image 0, and the label map stays aligned
    img, (lab,) = run(1, scale_range=(0.5, 0.5), crop=(40, 60), hflip=False)
    assert img.shape == (3, 40, 60)
    assert (lab[32:] == 255).all() and (img[:, 32:] == 0).all() and (lab[:32, :48] != 255).all()
    a, b = run(3, scale_range=(0.5, 2.0), crop=(32, 32)), run(3, scale_range=(0.5, 2.0), crop=(32, 32))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
    outs = {run(s, scale_range=(0.5, 2.0), crop=(32, 32))[0].float().sum().item() for s in range(5)}
    assert len(outs) > 1


def test_dilated_encoder_matches_torchvision_output_stride_16():
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    enc = dilate_encoder(ResNetEncoder("resnet50"), 16).eval()
    tv = ref
    enc.layers.load_state_dict({  # same weights: stem / layers renamed
        **{f"stem.{i}.{k}": v for i, m in ((0, tv.conv1), (1, tv.bn1)) for k, v in m.state_dict().items()},
        **{f"layer{j}.1.{k}" if j == 1 else f"layer{j}.{k}": v for j in range(1, 5)
           for k, v in getattr(tv, f"layer{j}").state_dict().items()}})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = enc(x)
        y = (x - enc.mean) / enc.std
        y = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(y))))))))
    assert feats[-1].shape == (1, 2048, 4, 4)  # stride 16
    torch.testing.assert_close(feats[-1], y, rtol=0, atol=1e-5)


def test_deeplab_head_odd_size_export_and_overlays(tmp_path, exports):
    task = SegmentationTask(SegmentationConfig(num_classes=4, head="deeplabv3", output_stride=16,
                                               export_predictions=str(tmp_path / "pred"),
                                               export_format="trainid"), _model_cfg())
    model = task.build_model().eval()
    batch = _batch(3, h=50, w=70)
    batch["name"] = ["a_leftImg8bit", "b_leftImg8bit"]
    batch["__valid__"] = torch.tensor([True, False])
    with torch.no_grad():
        out = task.eval_step(model, batch)
    assert out["pred"].shape == (2, 50, 70)
    files = sorted((tmp_path / "pred").iterdir())
    assert [f.name for f in files] == ["a_leftImg8bit.png"]  # padding sample not exported
    assert np.array_equal(np.asarray(Image.open(files[0])), out["pred"][0].numpy().astype(np.uint8))
    pngs = task.visualize(model, batch, out, tmp_path / "vis")
    assert len(pngs) == 2 and Image.open(pngs[0]).size[0] >= 800  # titled panels at a readable size


def test_cityscapes_export_writes_label_ids_in_the_official_layout(tmp_path):
    from data_shards.sources.labels import TRAINID_TO_LABELID

    task = SegmentationTask(SegmentationConfig(num_classes=19, export_predictions=str(tmp_path),
                                               export_size=[40, 80]), _model_cfg())
    pred = torch.randint(0, 19, (1, 20, 40))
    batch = {"name": ["aachen_000000_000019_leftImg8bit"], "__key__": ["k"], "__valid__": torch.tensor([True])}
    (path,) = task.export_predictions(batch, pred, tmp_path)
    assert path == tmp_path / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    got = np.asarray(Image.open(path))
    want = TRAINID_TO_LABELID[pred[0].numpy().astype(np.uint8)].repeat(2, 0).repeat(2, 1)
    assert got.shape == (40, 80) and np.array_equal(got, want)
