"""The pose encoder's 6-channel stem: independent filters per frame from random init (copies
would make the first layer see only the sum of the two frames, blind to their order), and
Monodepth2's replicated-and-halved ImageNet filters when initialised from ImageNet."""
from __future__ import annotations

import math

import torch
import torchvision

from trainer.config import ModelConfig
from trainer.models.encoders import ResNetEncoder
from trainer.models.pose import build_pose_net


def test_random_pose_stem_is_not_symmetric_in_the_two_frames():
    torch.manual_seed(0)
    parts = build_pose_net(ModelConfig(), "separate", [64, 64, 128, 256, 512])
    w = parts["pose_encoder"].layers["stem"][0].weight.detach()
    assert w.shape == (64, 6, 7, 7)
    assert not torch.allclose(w[:, :3], w[:, 3:])
    corr = torch.corrcoef(torch.stack([w[:, :3].flatten(), w[:, 3:].flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05  # independent draws, not scaled copies
    # torchvision's own init for a conv (kaiming normal, fan_out): std sqrt(2 / (64 * 7 * 7))
    assert abs(float(w.std()) / math.sqrt(2 / (64 * 49)) - 1) < 0.05
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    stem = parts["pose_encoder"].eval()
    with torch.no_grad():
        ab, ba = stem(torch.cat([a, b], 1))[0], stem(torch.cat([b, a], 1))[0]
    assert (ab - ba).abs().max() > 1e-2  # frame order is visible from the first layer on


def test_imagenet_pose_stem_keeps_monodepth2s_halved_copies(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    enc = ResNetEncoder("resnet18", "imagenet", str(tmp_path / "resnet18.pth"), in_channels=6)
    w = enc.layers["stem"][0].weight
    assert torch.equal(w[:, :3], tv.conv1.weight / 2) and torch.equal(w[:, 3:], tv.conv1.weight / 2)


def test_three_channel_encoder_is_torchvisions():
    torch.manual_seed(2)
    enc = ResNetEncoder("resnet18", "random")
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None)
    assert torch.equal(enc.layers["stem"][0].weight, tv.conv1.weight)
