"""Optical-flow pre-training (``task=flow``): the reference study's control experiment.

A siamese encoder (one ResNet, shared weights, both frames in one batched call) feeds the
flow decoder, which predicts flow t -> t+1 at 4 scales. Loss per scale, at the input
resolution: the same photometric error as depth (SSIM + L1, computed by depth's loss kernels,
``multiscale_reprojection_loss`` with one source and no auto-mask) between frame t and frame
t+1 warped back by the flow (``bilinear_warp``, border padding), over every pixel, plus
edge-aware smoothness of the flow. No flow labels are used in
training; end-point error against ground truth is the evaluation metric where it exists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig, ParallelConfig
from trainer.tasks.augment import hflip_sample, jitter_frames, sample_jitter
from trainer.geometry import bilinear_warp, in_bounds, pad_image
from trainer.kernels.dispatch import IMPLS, PAD, multiscale_reprojection_loss
from trainer.losses.smoothness import edge_aware_smoothness
from trainer.metrics.flow import FlowMetric
from trainer.models.encoders import build_encoder
from trainer.models.flow_net import FlowDecoder, flow_to_pixel_coords, fraction_to_pixels
from trainer.models.unet import pad_to_stride
from trainer.tasks.base import Task
from trainer.tasks.common import as_dataclass, keep_keys, to_unit_float
from trainer.tasks.visuals import flow_to_color
from trainer.tasks.flow_config import FlowConfig

FRAME_KEYS = ("rgb", "rgb_next")


def warp_by_flow(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame t+1 (B, C, H, W) sampled at p + flow(p): frame t's view; and the in-image mask."""
    coords = flow_to_pixel_coords(flow)
    h, w = image.shape[-2:]
    return bilinear_warp(image, coords), in_bounds(coords, h, w)


class FlowTask(Task):
    """Self-supervised optical flow; see the module docstring."""

    required_keys = FRAME_KEYS

    def __init__(self, cfg: FlowConfig, model: ModelConfig, *, seed: int = 0,
                 parallel: Optional[ParallelConfig] = None) -> None:
        super().__init__(as_dataclass(cfg, FlowConfig), model, seed=seed, parallel=parallel)
        cfg = self.cfg
        if not cfg.scales or any(s not in range(4) for s in cfg.scales):
            raise ValueError(f"task.scales={list(cfg.scales)}: need a non-empty subset of 0..3")
        if cfg.photometric_impl not in IMPLS:
            raise ValueError(f"task.photometric_impl={cfg.photometric_impl!r}: expected one of {', '.join(IMPLS)}")
        if not 0 <= cfg.ssim_weight <= 1 or cfg.smoothness_weight < 0:
            raise ValueError(f"task.ssim_weight={cfg.ssim_weight} must be in [0, 1] and "
                             f"task.smoothness_weight={cfg.smoothness_weight} >= 0")
        # training reads the frames only (required_keys); evaluation also reads GT flow for EPE
        self.eval_keys = FRAME_KEYS + (("flow",) if cfg.gt_flow else ())

    def build_model(self) -> nn.ModuleDict:
        encoder = build_encoder(self.model_cfg)
        return nn.ModuleDict({"encoder": encoder, "flow_decoder": FlowDecoder(encoder.num_ch, self.cfg.scales, self.cfg.coordinates)})

    def train_transform(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Flip both frames (and GT flow) together, then jitter into ``aug_*`` copies; always
        draws the same randomness and always adds the ``aug_*`` keys (samples collate alike)."""
        cfg = self.cfg
        sample = keep_keys(sample, FRAME_KEYS + ("flow",))
        flip = float(torch.rand(1, generator=generator)) < cfg.flip_prob
        jitter = float(torch.rand(1, generator=generator)) < cfg.jitter_prob
        params = sample_jitter(generator)
        if flip:
            sample = hflip_sample(sample)
        if jitter:
            return jitter_frames(sample, FRAME_KEYS, params)
        return {**sample, **{"aug_" + k: sample[k] for k in FRAME_KEYS}}

    def eval_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        return keep_keys(sample, FRAME_KEYS + ("flow",))

    def predict(self, model: nn.Module, frame_a: torch.Tensor, frame_b: torch.Tensor) -> dict[int, torch.Tensor]:
        """{scale: flow (B, 2, H, W) pixels} from two float [0, 1] frames, every scale upsampled to
        the input size; see :meth:`predict_fractions`."""
        h, w = frame_a.shape[-2:]
        fracs, (hp, wp) = self.predict_fractions(model, frame_a, frame_b)
        return {s: fraction_to_pixels(f, (hp, wp))[..., :h, :w] for s, f in fracs.items()}

    def predict_fractions(self, model: nn.Module, frame_a: torch.Tensor, frame_b: torch.Tensor
                          ) -> tuple[dict[int, torch.Tensor], tuple[int, int]]:
        """({scale: flow (B, 2, Hp / 2^s, Wp / 2^s) as a fraction of the image size}, (Hp, Wp)):
        one encoder call on both frames (shared weights; a single call keeps DDP's once-per-step
        gradient hooks), on frames padded (replicated border) to (Hp, Wp), a multiple of 32."""
        b = frame_a.shape[0]
        x = pad_to_stride(torch.cat([frame_a, frame_b], 0))
        feats = model["encoder"](x)
        fracs = model["flow_decoder"].fractions([f[:b] for f in feats], [f[b:] for f in feats])
        return fracs, tuple(x.shape[-2:])

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ref = model["flow_decoder"]
        a = to_unit_float(batch.get("aug_rgb", batch["rgb"]), ref)
        b = to_unit_float(batch.get("aug_rgb_next", batch["rgb_next"]), ref)
        target, source = to_unit_float(batch["rgb"], ref), to_unit_float(batch["rgb_next"], ref)
        fracs, padded = self.predict_fractions(model, a, b)
        photo, smooth = self._loss_terms(fracs, padded, target, source)
        loss = photo + self.cfg.smoothness_weight * smooth
        return loss, {"photometric": photo.detach(), "smoothness": smooth.detach()}

    def _loss_terms(self, fracs: dict[int, torch.Tensor], padded: tuple[int, int], target: torch.Tensor,
                    source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over scales of the photometric error and the edge-aware smoothness, every scale's
        flow upsampled to the input size (Monodepth2's convention for depth). The scales are
        stacked (S*B, scale-major): one warp and one call of depth's photometric loss kernels."""
        (h, w), n = target.shape[-2:], len(fracs)
        full = torch.cat([F.interpolate(f, size=padded, mode="bilinear", align_corners=False)
                          if f.shape[-2:] != padded else f for f in fracs.values()])[..., :h, :w]
        to_px = torch.tensor([padded[1], padded[0]], dtype=full.dtype, device=full.device).view(1, 2, 1, 1)
        # every pixel counts (border padding, as Monodepth2): masking the pixels whose flow
        # leaves the image would let the network lower the loss by pushing pixels out.
        warped, _ = warp_by_flow(source.repeat(n, 1, 1, 1), full * to_px)
        # the kernels' layout: (B, C, S, H, W), padded as their SSIM windows read it
        warped = pad_image(warped.unflatten(0, (n, -1)).permute(1, 2, 0, 3, 4), PAD)
        photo = multiscale_reprojection_loss(target, [warped], None, self.cfg.ssim_weight,
                                             self.cfg.photometric_impl)[0].mean()
        smooth = torch.stack([edge_aware_smoothness(f, target) / 2 ** s
                              for s, f in zip(fracs, full.chunk(n))]).mean()
        return photo, smooth

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        ref = model["flow_decoder"]
        flows = self.predict(model, to_unit_float(batch["rgb"], ref), to_unit_float(batch["rgb_next"], ref))
        return {"flow": flows[min(flows)].float()}

    def new_metric(self) -> FlowMetric:
        return FlowMetric()

    def visualize(self, model: nn.Module, batch: dict[str, Any], outputs: Any, out_dir: Path) -> list[Path]:
        """Frame t | predicted flow | ground-truth flow (if any), titled, one PNG per sample."""
        from trainer.tasks.visuals import flow_figure

        pred = outputs["flow"].cpu().numpy()
        rgb = batch["rgb"].cpu()
        rgb = (rgb if rgb.dtype == torch.uint8 else (rgb * 255).round().clamp(0, 255).byte()).permute(0, 2, 3, 1).numpy()
        gt = batch["flow"].cpu().numpy() if "flow" in batch else None
        keys = batch.get("__key__", [str(i) for i in range(len(pred))])
        written = []
        for i in range(min(len(pred), self.cfg.visualize_max)):
            top = float(np.hypot(gt[i][0], gt[i][1]).max()) if gt is not None else None
            panels = [rgb[i], flow_to_color(pred[i], top)]
            if gt is not None:
                panels.append(flow_to_color(gt[i][:2], top, valid=gt[i][2] > 0.5))
            written.append(flow_figure(rgb[i], panels[1], panels[2] if gt is not None else None,
                                       path=Path(out_dir) / f"flow_{keys[i]}.png", title=f"flow: {keys[i]}"))
        return written


CONFIG = FlowConfig
TASK = FlowTask
