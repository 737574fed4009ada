"""``task.init=depth_full``: segmentation starts from a depth model's encoder AND decoder.

Checks that the tensors really arrive (bitwise, BatchNorm statistics included), that the
decoder computes exactly the depth decoder's features up to its replaced last layer, that a
file that does not fit fails naming the keys, and that the reference presets load a depth
export (KITTI: encoder + decoder; Cityscapes: encoder only, into the dilated DeepLab encoder).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from trainer.config import ModelConfig, register_configs
from trainer.models.depth import build_depth_net
from trainer.models.pretrained import PretrainedMismatchError
from trainer.tasks import build_task
from trainer.tasks.segmentation import SegmentationConfig, SegmentationTask

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def _depth_export(tmp_path: Path, encoder: str = "resnet18", seed: int = 0) -> tuple[Path, dict]:
    """A depth pre-training export (encoder + depth decoder + a pose part, as a mono run writes),
    with non-default BatchNorm statistics so that loading them is checked too."""
    torch.manual_seed(seed)
    depth = torch.nn.ModuleDict(build_depth_net(ModelConfig(encoder=encoder)))
    with torch.no_grad():
        for m in depth.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = dict(depth.state_dict())
    state["pose_decoder.squeeze.weight"] = torch.randn(256, 512, 1, 1)  # outside both prefixes
    path = tmp_path / f"depth_{encoder}.pt"
    torch.save(state, path)
    return path, state


def _task(path, num_classes=5, **kw):
    cfg = SegmentationConfig(num_classes=num_classes, init="depth_full", weights=str(path), **kw)
    return SegmentationTask(cfg, ModelConfig())


def test_encoder_and_decoder_tensors_are_loaded_bitwise(tmp_path):
    path, state = _depth_export(tmp_path)
    model = _task(path).build_model()
    enc = model["encoder"].state_dict()
    assert {f"encoder.{k}" for k in enc} == {k for k in state if k.startswith("encoder.")}
    for k, v in enc.items():
        assert torch.equal(v, state[f"encoder.{k}"]), k
    dec = model["decoder"].unet.state_dict()
    loaded = [k for k in dec if not k.startswith("heads.")]
    assert len(loaded) == 20  # 10 conv blocks x (weight, bias)
    for k in loaded:
        assert torch.equal(dec[k], state[f"depth_decoder.{k}"]), k
    # the last layer is replaced: one full-resolution class output, freshly initialised
    assert set(k for k in dec if k.startswith("heads.")) == {"heads.0.weight", "heads.0.bias"}
    assert dec["heads.0.weight"].shape == (5, 16, 3, 3)


def test_decoder_features_equal_the_depth_decoders(tmp_path):
    """Same input -> the segmentation decoder's last feature map (before its class layer) is
    the depth decoder's; only the output layer differs."""
    path, state = _depth_export(tmp_path)
    seg = _task(path).build_model().eval()
    depth = torch.nn.ModuleDict(build_depth_net(ModelConfig()))
    depth.load_state_dict({k: v for k, v in state.items() if not k.startswith("pose_")})
    depth.eval()
    feats = {}
    seg["decoder"].unet.upconvs["0_1"].register_forward_hook(lambda m, i, o: feats.__setitem__("seg", o))
    depth["depth_decoder"].upconvs["0_1"].register_forward_hook(lambda m, i, o: feats.__setitem__("depth", o))
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        logits = seg["decoder"](seg["encoder"](x), size=(64, 96))
        depth["depth_decoder"](depth["encoder"](x))
    assert logits.shape == (2, 5, 64, 96)
    assert torch.equal(feats["seg"], feats["depth"])


def test_a_decoder_that_does_not_fit_names_its_keys(tmp_path):
    path, state = _depth_export(tmp_path)
    bad = dict(state)
    del bad["depth_decoder.upconvs.2_1.conv.weight"]
    bad["depth_decoder.upconvs.9_0.conv.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(PretrainedMismatchError) as err:
        _task(tmp_path / "bad.pt").build_model()
    msg = str(err.value)
    assert "missing in file (1): unet.upconvs.2_1.conv.weight" in msg
    assert "unexpected in file (1): unet.upconvs.9_0.conv.weight" in msg
    shaped = dict(state)
    shaped["depth_decoder.upconvs.4_0.conv.bias"] = torch.zeros(7)
    torch.save(shaped, tmp_path / "shaped.pt")
    with pytest.raises(PretrainedMismatchError, match=r"unet.upconvs.4_0.conv.bias: file \(7,\) vs model \(256,\)"):
        _task(tmp_path / "shaped.pt").build_model()
    no_decoder = {k: v for k, v in state.items() if not k.startswith("depth_decoder.")}
    torch.save(no_decoder, tmp_path / "enc_only.pt")
    with pytest.raises(ValueError, match="no depth_decoder"):
        _task(tmp_path / "enc_only.pt").build_model()


def test_depth_full_needs_the_unet_head():
    with pytest.raises(ValueError, match="depth_full initialises the U-Net decoder"):
        _task("x.pt", head="deeplabv3", output_stride=16)


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_kitti_reference_preset_loads_encoder_and_decoder(tmp_path):
    path, state = _depth_export(tmp_path)
    cfg = _compose(["+experiment=kitti_semantics_reference", "task.init=depth_full", f"task.weights={path}"])
    model = build_task(cfg).build_model()
    for part, prefix in (("encoder", "encoder."), ("decoder", "depth_decoder.")):
        got = model[part].state_dict()
        for k, v in got.items():
            key = prefix + (k[len("unet."):] if part == "decoder" else k)
            if ".heads." not in f".{k}":
                assert torch.equal(v, state[key]), key
    assert model["decoder"].unet.heads["0"].weight.shape[0] == cfg.task.num_classes


def test_cityscapes_reference_preset_loads_the_encoder_only(tmp_path):
    path, state = _depth_export(tmp_path, encoder="resnet50")
    cfg = _compose(["+experiment=cityscapes_reference", "task.init=depth", f"task.weights={path}"])
    model = build_task(cfg).build_model()
    got = model["encoder"].state_dict()
    assert len(got) == len([k for k in state if k.startswith("encoder.")])
    assert all(torch.equal(v, state[f"encoder.{k}"]) for k, v in got.items())
    assert model["encoder"].layers["layer4"][1].conv2.dilation == (2, 2)  # output stride 16
    with pytest.raises(ValueError, match="depth_full"):
        SegmentationTask(_compose(["+experiment=cityscapes_reference", "task.init=depth_full",
                                   f"task.weights={path}"]).task, cfg.model)
