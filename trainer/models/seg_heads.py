"""Segmentation heads over a ResNet feature pyramid, all returning class logits at a given size.

- ``unet``: the shared Monodepth2-style U-Net decoder (``trainer/models/unet.py``) with a class
  output at full resolution, so a depth decoder can initialise it (all but the last layer).
- ``deeplabv3``: torchvision's ``DeepLabHead`` (ASPP + 3x3 conv + 1x1 classifier) on the last
  feature map of an encoder dilated to output stride 16 (:func:`dilate_encoder`).
- ``aspp``: the reference study's own DeepLabV3 head (its ``Cityscapes/deeplab.py``): ASPP, a
  1x1 projection and a 1x1 classifier, without torchvision's 3x3 conv and dropout.
- ``linear``: a linear probe, a 1x1 conv on the last features, bilinearly upsampled.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from trainer.models.unet import UNetDecoder

HEADS = ("unet", "deeplabv3", "aspp", "linear")


def dilate_encoder(encoder: nn.Module, output_stride: int = 16) -> nn.Module:
    """Trade the last stride(s) of a ResNetEncoder for dilation, in place, as torchvision's
    ``replace_stride_with_dilation`` does (first block keeps the previous dilation). Weights keep
    their shapes, so any ResNet checkpoint still loads."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride={output_stride}: expected 8, 16 or 32")
    names = {32: [], 16: ["layer4"], 8: ["layer3", "layer4"]}[output_stride]
    dilation = 1
    for name in names:
        previous, dilation = dilation, dilation * 2
        for b, block in enumerate(encoder.layers[name]):
            for mod in block.modules():
                if isinstance(mod, nn.Conv2d):
                    mod.stride = (1, 1)
                    if mod.kernel_size == (3, 3):
                        # torchvision: in a dilated layer, the first block's 3x3 conv that strides
                        # (conv2 in Bottleneck, conv1 in BasicBlock) keeps the previous dilation.
                        d = previous if (b == 0 and _is_strided_conv(block, mod)) else dilation
                        mod.dilation = (d, d)
                        mod.padding = (d, d)
    return encoder


def _is_strided_conv(block: nn.Module, conv: nn.Conv2d) -> bool:
    """The 3x3 conv of a torchvision residual block that carries the block's stride."""
    if hasattr(block, "conv3"):  # Bottleneck: stride on conv2
        return conv is block.conv2
    return conv is block.conv1  # BasicBlock: stride on conv1


class UNetSegHead(nn.Module):
    """U-Net decoder with a single full-resolution class-logit output."""

    def __init__(self, num_ch_enc: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.unet = UNetDecoder(num_ch_enc, num_classes, scales=(0,), activation="none")

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        logits = self.unet(features)[0]
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


class DeepLabV3SegHead(nn.Module):
    """torchvision's DeepLabV3 head (ASPP) on the last features, upsampled bilinearly."""

    def __init__(self, num_ch_enc: Sequence[int], num_classes: int,
                 atrous_rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.head = DeepLabHead(num_ch_enc[-1], num_classes, atrous_rates=tuple(atrous_rates))

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.head(features[-1]), size=size, mode="bilinear", align_corners=False)


class ReferenceASPPHead(nn.Module):
    """The reference study's Cityscapes head (``ASPP`` of its ``Cityscapes/deeplab.py``): a 1x1
    branch, 3x3 branches at ``atrous_rates`` and an image-pooling branch, each conv + BN + ReLU,
    concatenated, 1x1 conv + BN + ReLU to 256, 1x1 classifier. BatchNorm momentum 0.0003 and
    convs drawn from N(0, 2 / fan_out) as there; logits upsampled with ``align_corners=True``."""

    def __init__(self, num_ch_enc: Sequence[int], num_classes: int,
                 atrous_rates: Sequence[int] = (6, 12, 18), depth: int = 256, bn_momentum: float = 3e-4) -> None:
        super().__init__()
        cin = num_ch_enc[-1]

        def conv_bn_relu(c_in: int, k: int, d: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(c_in, depth, k, padding=d if k == 3 else 0, dilation=d, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(depth, momentum=bn_momentum), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([conv_bn_relu(cin, 1)] + [conv_bn_relu(cin, 3, r) for r in atrous_rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(cin, 1))
        self.project = conv_bn_relu(depth * (len(atrous_rates) + 2), 1)
        self.classifier = nn.Conv2d(depth, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = features[-1]
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])  # bilinear upsampling of a 1x1 map
        y = self.classifier(self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=True)


class LinearSegHead(nn.Module):
    """Linear probe: 1x1 conv on the last encoder features, upsampled bilinearly."""

    def __init__(self, num_ch_enc: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(num_ch_enc[-1], num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.classifier(features[-1]), size=size, mode="bilinear", align_corners=False)


def build_seg_head(kind: str, num_ch_enc: Sequence[int], num_classes: int,
                   atrous_rates: Sequence[int] = (6, 12, 18)) -> nn.Module:
    """Head by name (see :data:`HEADS`)."""
    if kind == "unet":
        return UNetSegHead(num_ch_enc, num_classes)
    if kind == "deeplabv3":
        return DeepLabV3SegHead(num_ch_enc, num_classes, atrous_rates)
    if kind == "aspp":
        return ReferenceASPPHead(num_ch_enc, num_classes, atrous_rates)
    if kind == "linear":
        return LinearSegHead(num_ch_enc, num_classes)
    raise ValueError(f"task.head={kind!r}: expected one of {', '.join(HEADS)}")
