"""Image-level classifier: encoder features -> global average pool -> linear logits.

The classification pre-training's model is ``ModuleDict({"encoder", "classifier"})`` so its
exported weights carry the ``encoder.`` prefix that segmentation fine-tuning loads.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class PooledLinear(nn.Module):
    """Global average pool of the last feature map, then one linear layer to class logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fc(features[-1].mean(dim=(2, 3)))
