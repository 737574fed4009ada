"""Image encoders: torchvision ResNets returning a 5-level feature pyramid for U-Net skips.

Weights never download at run time: ImageNet initialisation reads a local file (or the
torch hub cache) and fails with a message saying which file to put where.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn

#: torchvision builder, channels of the 5 pyramid levels, torchvision weights enum name.
_RESNETS = {
    "resnet18": ("resnet18", [64, 64, 128, 256, 512], "ResNet18_Weights"),
    "resnet34": ("resnet34", [64, 64, 128, 256, 512], "ResNet34_Weights"),
    "resnet50": ("resnet50", [64, 256, 512, 1024, 2048], "ResNet50_Weights"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: input normalisation -> per-channel (mean, std): torchvision's ImageNet statistics, or the single
#: pair Monodepth2's ResnetEncoder applies (``(x - 0.45) / 0.225``), which its weights expect
INPUT_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "monodepth2": ((0.45,) * 3, (0.225,) * 3)}


def imagenet_weights_file(name: str) -> Path:
    """Where torchvision's ImageNet weights for ``name`` live in the torch hub cache."""
    weights_enum = getattr(torchvision.models, _RESNETS[name][2]).IMAGENET1K_V1
    filename = os.path.basename(weights_enum.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_imagenet_state(name: str, weights_path: Optional[str]) -> dict[str, torch.Tensor]:
    """ImageNet weights from ``weights_path`` or the hub cache; never downloads."""
    path = Path(weights_path) if weights_path else imagenet_weights_file(name)
    if not path.is_file():
        weights_enum = getattr(torchvision.models, _RESNETS[name][2]).IMAGENET1K_V1
        raise FileNotFoundError(
            f"ImageNet weights for {name} not found at {path}. geoprime never downloads at run "
            f"time: download {weights_enum.url} and place it at {imagenet_weights_file(name)} "
            f"(or pass model.imagenet_weights=<file>)."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


class ResNetEncoder(nn.Module):
    """ResNet trunk returning features at strides 2, 4, 8, 16, 32 (channels in ``num_ch``).

    Input: float images in [0, 1], shape (B, in_channels, H, W); normalised inside with
    ``INPUT_NORMS[norm]`` (for in_channels = 3k, the statistics are tiled, e.g. stacked frames).
    """

    def __init__(self, name: str = "resnet18", init: str = "random",
                 weights_path: Optional[str] = None, in_channels: int = 3, norm: str = "imagenet") -> None:
        super().__init__()
        if norm not in INPUT_NORMS:
            raise ValueError(f"model.input_norm={norm!r}: expected one of {', '.join(INPUT_NORMS)}")
        if name not in _RESNETS:
            raise ValueError(f"model.encoder={name!r}: known encoders are {', '.join(_RESNETS)}")
        if init not in ("random", "imagenet"):
            raise ValueError(f"model.init={init!r}: expected random or imagenet")
        builder, self.num_ch, _ = _RESNETS[name]
        net = getattr(torchvision.models, builder)(weights=None)
        if init == "imagenet":
            net.load_state_dict(load_imagenet_state(name, weights_path))
        if in_channels != 3:
            if in_channels % 3:
                raise ValueError(f"in_channels={in_channels}: must be a multiple of 3")
            old = net.conv1.weight.data
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            if init == "imagenet":  # Monodepth2: replicate pretrained filters, keep the response scale
                net.conv1.weight.data = old.repeat(1, in_channels // 3, 1, 1) / (in_channels // 3)
            else:  # independent filters per frame (copies would see only the frames' sum, not their order)
                nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.layers = nn.ModuleDict({
            "stem": nn.Sequential(net.conv1, net.bn1, net.relu),
            "layer1": nn.Sequential(net.maxpool, net.layer1),
            "layer2": net.layer2,
            "layer3": net.layer3,
            "layer4": net.layer4,
        })
        reps, (mean, std) = in_channels // 3, INPUT_NORMS[norm]
        self.norm = norm
        self.register_buffer("mean", torch.tensor(mean * reps).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std * reps).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        feats = []
        for layer in self.layers.values():
            x = layer(x)
            feats.append(x)
        return feats


def set_bn_momentum(module: nn.Module, momentum: float) -> nn.Module:
    """Set the running-statistics momentum of every BatchNorm in ``module`` (in place)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return module


def build_encoder(model_cfg, in_channels: int = 3) -> ResNetEncoder:
    """Encoder from a :class:`trainer.config.ModelConfig`."""
    return ResNetEncoder(model_cfg.encoder, model_cfg.init, model_cfg.imagenet_weights, in_channels,
                         getattr(model_cfg, "input_norm", "imagenet"))
