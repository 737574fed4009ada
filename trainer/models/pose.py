"""Pose network (Monodepth2): relative camera motion between two frames as axis-angle + translation.

Two layouts: ``separate`` -- its own ResNet on the two frames concatenated (6 channels), or
``shared`` -- the depth encoder's deepest features of both frames, concatenated.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from trainer.geometry import pose_vec_to_mat
from trainer.models.encoders import build_encoder
from trainer.models.precision import run_fp32


class PoseDecoder(nn.Module):
    """Squeeze (1x1) each input's deepest feature map, two 3x3 convs, a 1x1 to 6 numbers,
    global average, times 0.01 (keeps the initial motion small) -> (axisangle, translation).
    The last conv and the average run in fp32 under mixed precision."""

    def __init__(self, num_ch_enc: Sequence[int], num_input_features: int) -> None:
        super().__init__()
        self.num_input_features = num_input_features
        self.squeeze = nn.Conv2d(num_ch_enc[-1], 256, 1)
        self.convs = nn.Sequential(
            nn.Conv2d(num_input_features * 256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 6, 1),
        )
        self.relu = nn.ReLU()

    def forward(self, deepest: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if len(deepest) != self.num_input_features:
            raise ValueError(f"PoseDecoder: expected {self.num_input_features} feature maps, got {len(deepest)}")
        x = torch.cat([self.relu(self.squeeze(f)) for f in deepest], dim=1)
        out = 0.01 * run_fp32(self.convs[-1], self.convs[:-1](x)).mean(dim=(2, 3))  # fp32 under mixed precision
        return out[:, :3], out[:, 3:]


def build_pose_net(model_cfg, layout: str, num_ch_enc: Sequence[int]) -> dict[str, nn.Module]:
    """``separate``: {"pose_encoder", "pose_decoder"}; ``shared``: {"pose_decoder"} only."""
    if layout == "separate":
        encoder = build_encoder(model_cfg, in_channels=6)
        return {"pose_encoder": encoder, "pose_decoder": PoseDecoder(encoder.num_ch, 1)}
    if layout == "shared":
        return {"pose_decoder": PoseDecoder(num_ch_enc, 2)}
    raise ValueError(f"task.pose_encoder={layout!r}: expected separate or shared")


def predict_pose(model: nn.ModuleDict, first: Tensor, second: Tensor, invert: bool,
                 first_deepest: Tensor | None = None, second_deepest: Tensor | None = None,
                 pair: Tensor | None = None) -> Tensor:
    """(B, 4, 4) transform from the frame pair in temporal order (first, second).

    Separate layout: the pose encoder sees ``cat(first, second)``; shared layout: pass the depth
    encoder's deepest features of both frames. Following Monodepth2, the pair is always fed
    in temporal order and ``invert`` is set when the source is the earlier frame, so that the
    result maps target-camera points into the source camera. ``pair``: ``cat([first, second], 1)``
    where the caller already has it (e.g. a view of one tensor holding both frames).
    """
    if "pose_encoder" in model:
        pair = torch.cat([first, second], 1) if pair is None else pair
        axisangle, translation = model["pose_decoder"]([model["pose_encoder"](pair)[-1]])
    else:
        if first_deepest is None or second_deepest is None:
            raise ValueError("predict_pose: shared layout needs the depth encoder's deepest features")
        axisangle, translation = model["pose_decoder"]([first_deepest, second_deepest])
    return pose_vec_to_mat(axisangle, translation, invert=invert)
