"""Monodepth2's released checkpoints (issue 32, item 5) load strictly and compute what they compute there.

The files are written here exactly as Monodepth2's ``Trainer.save_model`` writes them, from a port
of its networks (github.com/nianticlabs/monodepth2 ``networks/resnet_encoder.py``,
``depth_decoder.py``, ``pose_decoder.py``, ``layers.py``: same module names, so the same keys), with
random weights and BatchNorm statistics: ``encoder.pth`` (+ height, width, use_stereo),
``depth.pth``, ``pose_encoder.pth`` (6-channel ResNet) and ``pose.pth`` (2 frames predicted).
Loaded into our depth model (``task.weights``) and into segmentation (``task.init=depth_full``),
every output must equal the port's: disparities at all four scales, the pose vector, the features.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision.models as models
from omegaconf import OmegaConf
from torch import nn

from trainer.config import ModelConfig, RunConfig
from trainer.models.pretrained import PretrainedMismatchError
from trainer.preflight import PreflightError, check_files
from trainer.tasks import build_task
from trainer.tasks.depth import DepthTask, DepthTaskConfig
from trainer.tasks.segmentation import SegmentationConfig, SegmentationTask


# ---------------------------------------------------------------- a port of Monodepth2's networks
class Conv3x3(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv = nn.Conv2d(int(cin), int(cout), 3)

    def forward(self, x):
        return self.conv(self.pad(x))


class ConvBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = Conv3x3(cin, cout)
        self.nonlin = nn.ELU(inplace=True)

    def forward(self, x):
        return self.nonlin(self.conv(x))


class ResnetEncoder(nn.Module):
    def __init__(self, num_input_images=1):
        super().__init__()
        self.num_ch_enc = np.array([64, 64, 128, 256, 512])
        self.encoder = models.resnet18(weights=None)
        if num_input_images > 1:  # ResNetMultiImageInput: conv1 over the stacked frames
            self.encoder.conv1 = nn.Conv2d(num_input_images * 3, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward(self, x):
        f = []
        x = (x - 0.45) / 0.225
        x = self.encoder.relu(self.encoder.bn1(self.encoder.conv1(x)))
        f.append(x)
        f.append(self.encoder.layer1(self.encoder.maxpool(f[-1])))
        for layer in (self.encoder.layer2, self.encoder.layer3, self.encoder.layer4):
            f.append(layer(f[-1]))
        return f


class DepthDecoder(nn.Module):
    def __init__(self, num_ch_enc, scales=range(4)):
        super().__init__()
        self.scales, self.num_ch_dec = scales, np.array([16, 32, 64, 128, 256])
        self.convs = OrderedDict()
        for i in range(4, -1, -1):
            cin = num_ch_enc[-1] if i == 4 else self.num_ch_dec[i + 1]
            self.convs[("upconv", i, 0)] = ConvBlock(cin, self.num_ch_dec[i])
            cin = self.num_ch_dec[i] + (num_ch_enc[i - 1] if i > 0 else 0)
            self.convs[("upconv", i, 1)] = ConvBlock(cin, self.num_ch_dec[i])
        for s in self.scales:
            self.convs[("dispconv", s)] = Conv3x3(self.num_ch_dec[s], 1)
        self.decoder = nn.ModuleList(list(self.convs.values()))

    def forward(self, feats):
        out, x = {}, feats[-1]
        for i in range(4, -1, -1):
            x = [nn.functional.interpolate(self.convs[("upconv", i, 0)](x), scale_factor=2, mode="nearest")]
            if i > 0:
                x += [feats[i - 1]]
            x = self.convs[("upconv", i, 1)](torch.cat(x, 1))
            if i in self.scales:
                out[("disp", i)] = torch.sigmoid(self.convs[("dispconv", i)](x))
        return out


class PoseDecoder(nn.Module):
    def __init__(self, num_ch_enc, num_input_features=1, num_frames_to_predict_for=2):
        super().__init__()
        self.n = num_frames_to_predict_for
        self.convs = OrderedDict()
        self.convs["squeeze"] = nn.Conv2d(num_ch_enc[-1], 256, 1)
        self.convs[("pose", 0)] = nn.Conv2d(num_input_features * 256, 256, 3, 1, 1)
        self.convs[("pose", 1)] = nn.Conv2d(256, 256, 3, 1, 1)
        self.convs[("pose", 2)] = nn.Conv2d(256, 6 * self.n, 1)
        self.relu = nn.ReLU()
        self.net = nn.ModuleList(list(self.convs.values()))

    def forward(self, input_features):
        out = torch.cat([self.relu(self.convs["squeeze"](f[-1])) for f in input_features], 1)
        for i in range(3):
            out = self.convs[("pose", i)](out)
            if i != 2:
                out = self.relu(out)
        out = 0.01 * out.mean(3).mean(2).view(-1, self.n, 1, 6)
        return out[..., :3], out[..., 3:]


def _randomise_bn(*modules):
    with torch.no_grad():
        for m in (x for mod in modules for x in mod.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A folder as Monodepth2's save_model writes it, and the port's networks (eval mode)."""
    torch.manual_seed(3)
    nets = {"encoder": ResnetEncoder(), "pose_encoder": ResnetEncoder(2)}
    nets["depth"] = DepthDecoder(nets["encoder"].num_ch_enc)
    nets["pose"] = PoseDecoder(nets["pose_encoder"].num_ch_enc)
    _randomise_bn(*nets.values())
    folder = tmp_path_factory.mktemp("mono_640x192")
    for name, net in nets.items():
        net.eval()
        to_save = net.state_dict()
        if name == "encoder":
            to_save["height"], to_save["width"], to_save["use_stereo"] = 192, 640, False
        torch.save(to_save, folder / f"{name}.pth")
    return folder, nets


def _model_cfg(**kw):
    return ModelConfig(input_norm="monodepth2", **kw)


def test_the_files_have_monodepth2s_key_layout(release):
    folder, _ = release
    enc = torch.load(folder / "encoder.pth", weights_only=True)
    assert enc["height"] == 192 and enc["width"] == 640 and enc["use_stereo"] is False
    assert {"encoder.conv1.weight", "encoder.bn1.running_var", "encoder.layer1.0.conv1.weight",
            "encoder.fc.weight"} <= set(enc)
    dec = torch.load(folder / "depth.pth", weights_only=True)
    assert {"decoder.0.conv.conv.weight", "decoder.9.conv.conv.bias", "decoder.10.conv.weight",
            "decoder.13.conv.bias"} <= set(dec) and len(dec) == 28
    assert torch.load(folder / "pose.pth", weights_only=True)["net.3.weight"].shape == (12, 256, 1, 1)
    assert torch.load(folder / "pose_encoder.pth", weights_only=True)["encoder.conv1.weight"].shape == (64, 6, 7, 7)


@torch.no_grad()
def test_depth_model_from_the_release_computes_what_monodepth2_computes(release):
    folder, nets = release
    task = DepthTask(DepthTaskConfig(supervision="mono", weights=str(folder)), _model_cfg())
    model = task.build_model().eval()
    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(2, 3, 64, 192, generator=g) for _ in range(2)]
    ours = model["depth_decoder"](model["encoder"](frames[0]))
    theirs = nets["depth"](nets["encoder"](frames[0]))
    for s in range(4):
        torch.testing.assert_close(ours[s], theirs[("disp", s)], rtol=1e-5, atol=1e-6)
    axis, trans = model["pose_decoder"]([model["pose_encoder"](torch.cat(frames, 1))[-1]])
    their_axis, their_trans = nets["pose"]([nets["pose_encoder"](torch.cat(frames, 1))])
    torch.testing.assert_close(axis, their_axis[:, 0, 0], rtol=1e-5, atol=1e-7)  # the frame Monodepth2 uses
    torch.testing.assert_close(trans, their_trans[:, 0, 0], rtol=1e-5, atol=1e-7)
    prov = task.provenance()["init.provenance"]
    assert prov.startswith(f"Monodepth2 release {folder} (trained at 640x192, use_stereo=False; encoder.pth sha256 ")


@torch.no_grad()
def test_segmentation_depth_full_from_the_release(release):
    folder, nets = release
    task = SegmentationTask(SegmentationConfig(num_classes=5, init="depth_full", weights=str(folder)),
                            _model_cfg())
    model = task.build_model().eval()
    x = torch.rand(1, 3, 64, 128)
    for a, b in zip(model["encoder"](x), nets["encoder"](x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    dec = model["decoder"].unet.state_dict()
    theirs = nets["depth"].state_dict()
    assert torch.equal(dec["upconvs.4_0.conv.weight"], theirs["decoder.0.conv.conv.weight"])
    assert torch.equal(dec["upconvs.0_1.conv.bias"], theirs["decoder.9.conv.conv.bias"])
    assert "Monodepth2 release" in task.provenance()["init.provenance"]


def test_legacy_files_without_batch_counters_load(tmp_path, release):
    """Files saved by PyTorch 0.4 (the release's version: no zip container, maybe no BatchNorm
    ``num_batches_tracked``) load; the counters come back as 0, reported."""
    from trainer.models.monodepth2 import read_release

    folder, _ = release
    for name in ("encoder", "depth"):
        state = torch.load(folder / f"{name}.pth", weights_only=True)
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        torch.save(state, tmp_path / f"{name}.pth", _use_new_zipfile_serialization=False)
    state, info = read_release(tmp_path)
    assert state["encoder.layers.stem.1.num_batches_tracked"] == 0 and len(info["filled"]) == 20
    assert "encoder.pth:encoder.fc.weight" in info["dropped"] and set(info["files"]) == {"encoder.pth", "depth.pth"}
    DepthTask(DepthTaskConfig(supervision="supervised", weights=str(tmp_path)),
              _model_cfg()).build_model()


def test_mismatches_are_named(tmp_path, release):
    folder, _ = release
    for name in ("encoder", "depth", "pose_encoder", "pose"):
        (tmp_path / f"{name}.pth").write_bytes((folder / f"{name}.pth").read_bytes())
    dec = torch.load(tmp_path / "depth.pth", weights_only=True)
    dec["decoder.14.conv.weight"] = torch.zeros(1)
    torch.save(dec, tmp_path / "depth.pth")
    with pytest.raises(PretrainedMismatchError, match=r"depth.pth: 1 key\(s\) that are not Monodepth2's depth "
                                                      r"decoder layout: decoder.14.conv.weight"):
        DepthTask(DepthTaskConfig(weights=str(tmp_path)), _model_cfg()).build_model()
    with pytest.raises(PretrainedMismatchError, match="expect model.input_norm=monodepth2"):
        DepthTask(DepthTaskConfig(weights=str(folder)), ModelConfig()).build_model()
    # stereo mode builds no pose parts: the release's pose tensors are unexpected, named
    with pytest.raises(PretrainedMismatchError, match=r"unexpected in file \(128\): pose_encoder"):
        DepthTask(DepthTaskConfig(supervision="stereo", weights=str(folder)),
                  _model_cfg()).build_model()
    cfg = OmegaConf.structured(RunConfig(task=SegmentationConfig(init="depth_full", weights=str(folder))))
    with pytest.raises(PreflightError, match=r"is a Monodepth2 release: .* set model.input_norm=monodepth2"):
        check_files(cfg.model, cfg.task, str(cfg.train.resume))
    cfg.model.input_norm = "monodepth2"
    check_files(cfg.model, cfg.task, str(cfg.train.resume))


def test_the_monodepth2_preset_is_its_published_recipe(tmp_path):
    from hydra import compose, initialize_config_dir

    from trainer.config import register_configs
    from trainer.schedules import lr_multiplier

    register_configs()
    configs = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=monodepth2", "model.imagenet_weights=/w.pth"])
    assert (cfg.task.name, cfg.task.supervision, cfg.task.pose_encoder, cfg.task.init_depth) == ("depth", "mono",
                                                                                                  "separate", None)
    assert (cfg.model.encoder, cfg.model.init, cfg.model.input_norm) == ("resnet18", "imagenet", "monodepth2")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.train.batch_size) == ("adam", 1e-4, 0.0, 12)
    assert (cfg.task.min_depth, cfg.task.max_depth, cfg.task.smoothness_weight, cfg.task.ssim_weight) == (
        0.1, 100.0, 1e-3, 0.85)
    assert (list(cfg.task.eval_resize), cfg.task.eval_crop, cfg.task.eval_scaling) == ([192, 640], "garg", "median")
    per_epoch = 39810 // 12  # Eigen-Zhou's training triplets, drop_last as its DataLoader
    f = lr_multiplier(cfg.schedule, int(cfg.train.steps))
    assert cfg.train.steps == 20 * per_epoch
    assert f(15 * per_epoch - 1) == 1.0 and f(15 * per_epoch) == pytest.approx(0.1) and f(20 * per_epoch - 1) == pytest.approx(0.1)
    build_task(cfg)  # validates
