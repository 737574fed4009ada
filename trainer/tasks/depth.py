"""Monocular depth pre-training task: self-supervised (video, stereo, both) or supervised depth.

One switch, ``task.supervision``, picks the signal:

* ``mono``: frames t-1 and t+1 warped into t with the predicted depth and a predicted pose;
* ``stereo``: the right image warped into the left with the known baseline;
* ``mono_stereo``: all three sources;
* ``supervised``: masked L1 or scale-invariant log loss on the valid ground-truth depth.

Self-supervised losses follow Monodepth2: per-pixel minimum reprojection (SSIM 0.85 + L1)
with auto-masking, each scale's disparity upsampled to the input resolution, edge-aware
smoothness on mean-normalised disparity weighted by 1/2^scale, averaged over scales. The
networks see augmented frames (``aug_*`` keys added by :meth:`DepthTask.train_transform`);
the loss compares unaugmented frames.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from trainer.config import ModelConfig, ParallelConfig
from trainer.tasks.augment import hflip_sample, jitter_batch, jitter_frames, jitter_row, sample_jitter
from trainer.geometry import pad_image, stereo_pose, warp_scales
from trainer.losses.depth_supervised import masked_l1, scale_invariant_log, valid_depth_mask
from trainer.kernels.dispatch import IMPLS, PAD, depth_functions, multiscale_reprojection_loss
from trainer.metrics.depth import DepthMetric
from trainer.models.depth import build_depth_net, disparities, predict_depth, upsampled_depths
from trainer.models.pretrained import check_input_norm, encoder_provenance, load_pretrained, read_init_weights
from trainer.models.unet import pad_to_stride
from trainer.models.pose import build_pose_net, predict_pose
from trainer.tasks.base import Metric, Task
from trainer.tasks.device_decode import decode_on_device
from trainer.tasks.depth_config import DepthTaskConfig

SUPERVISION_MODES = ("mono", "stereo", "mono_stereo", "supervised")
_FRAME_KEYS = {
    "mono": ("rgb", "rgb_prev", "rgb_next"),
    "stereo": ("rgb", "rgb_right"),
    "mono_stereo": ("rgb", "rgb_prev", "rgb_next", "rgb_right"),
    "supervised": ("rgb",),
}
#: the frames the networks see (jittered into ``aug_*``): the depth net sees t, the pose net t-1, t and
#: t+1; the stereo view is only warped for the loss, which compares unaugmented frames
_NET_KEYS = {
    "mono": ("rgb", "rgb_prev", "rgb_next"),
    "stereo": ("rgb",),
    "mono_stereo": ("rgb", "rgb_prev", "rgb_next"),
    "supervised": ("rgb",),
}
JITTER_ON = ("auto", "loader", "step")


def _float(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1]; float input is returned as is."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


TEMPORAL = ("rgb_prev", "rgb", "rgb_next")
"""The pose network's frames in temporal order: its pairs (t-1, t) and (t, t+1) overlap."""


def _float_frames(frames: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`_float` of each frame; the :data:`TEMPORAL` triplet, where all there with one shape and
    dtype, converted in one pass into one (B, 9, H, W) tensor whose channel views they are, with the
    pose pairs as views too (``pair_prev``, ``pair_next``: what ``cat`` of the two frames would copy)."""
    triplet = [frames.get(k) for k in TEMPORAL]
    if any(t is None for t in triplet) or len({(t.shape, t.dtype) for t in triplet}) > 1 or triplet[0].dim() != 4:
        return {k: _float(v) for k, v in frames.items()}
    c = triplet[0].shape[1]
    stacked = _float(torch.cat(triplet, dim=1))
    out = {k: _float(v) for k, v in frames.items() if k not in TEMPORAL}
    out.update({k: stacked[:, i * c:(i + 1) * c] for i, k in enumerate(TEMPORAL)})
    out["pair_prev"], out["pair_next"] = stacked[:, :2 * c], stacked[:, c:]
    return out


#: mode -> init_depth used where the config leaves it None (None = Monodepth2's init). Its
#: untrained depth, ~2 x min_depth = 0.2 m, suits scale-free mono video; with a metric 0.54 m
#: baseline it asks for ~300 px stereo disparities, every warp samples the border and stereo
#: training collapses (abs_rel 0.99), so the stereo modes start at 10 m (docs/depth.md).
MODE_INIT_DEPTH = {"mono": None, "supervised": None, "stereo": 10.0, "mono_stereo": 10.0}


def with_mode_defaults(cfg: Any) -> DepthTaskConfig:
    """The config as a :class:`DepthTaskConfig` (Hydra hands over a DictConfig) with
    ``init_depth`` left None filled in from :data:`MODE_INIT_DEPTH`."""
    if not isinstance(cfg, DepthTaskConfig):
        from omegaconf import DictConfig, OmegaConf
        obj = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else DepthTaskConfig(**dict(cfg))
        cfg = obj if isinstance(obj, DepthTaskConfig) else DepthTaskConfig(**obj)
    if cfg.supervision not in MODE_INIT_DEPTH:
        raise ValueError(f"task.supervision={cfg.supervision!r}: expected one of {', '.join(SUPERVISION_MODES)}")
    if cfg.init_depth is not None or MODE_INIT_DEPTH[cfg.supervision] is None:
        return cfg
    logging.getLogger("geoprime.depth").info("supervision=%s: the untrained network predicts %s m (task.init_depth)",
                                             cfg.supervision, MODE_INIT_DEPTH[cfg.supervision])
    return dataclasses.replace(cfg, init_depth=MODE_INIT_DEPTH[cfg.supervision])


class DepthTask(Task):
    """Depth pre-training; the model is an ``nn.ModuleDict`` with ``encoder`` and
    ``depth_decoder`` (+ ``pose_encoder`` / ``pose_decoder`` when a pose is predicted)."""

    def __init__(self, cfg: DepthTaskConfig, model: ModelConfig, *, seed: int = 0,
                 parallel: Optional[ParallelConfig] = None) -> None:
        cfg = with_mode_defaults(cfg)  # also checks task.supervision
        super().__init__(cfg, model, seed=seed, parallel=parallel)
        if cfg.pose_encoder not in ("separate", "shared"):
            raise ValueError(f"task.pose_encoder={cfg.pose_encoder!r}: expected separate or shared")
        if cfg.supervised_loss not in ("l1", "silog"):
            raise ValueError(f"task.supervised_loss={cfg.supervised_loss!r}: expected l1 or silog")
        if cfg.photometric_impl not in IMPLS:
            raise ValueError(f"task.photometric_impl={cfg.photometric_impl!r}: expected one of {', '.join(IMPLS)}")
        if len(cfg.eval_resize) != 2 or min(cfg.eval_resize) < 0 or (0 in cfg.eval_resize and any(cfg.eval_resize)):
            raise ValueError(f"task.eval_resize={list(cfg.eval_resize)}: expected [height, width] > 0, or [0, 0]")
        if cfg.eval_scaling not in ("auto", "median", "fixed"):
            raise ValueError(f"task.eval_scaling={cfg.eval_scaling!r}: expected auto, median or fixed")
        if not cfg.scales or any(s not in range(4) for s in cfg.scales) or 0 not in cfg.scales:
            raise ValueError(f"task.scales={list(cfg.scales)}: must include 0, each in 0..3")
        if not 0 < cfg.min_depth < cfg.max_depth:
            raise ValueError(f"task.min_depth={cfg.min_depth}, task.max_depth={cfg.max_depth}: need 0 < min < max")
        for name in ("flip_prob", "jitter_prob", "ssim_weight"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"task.{name}={getattr(cfg, name)}: must be in [0, 1]")
        self.mode = cfg.supervision
        self.uses_pose = self.mode in ("mono", "mono_stereo")
        self.frame_keys = _FRAME_KEYS[self.mode]
        self.net_keys = _NET_KEYS[self.mode]
        if cfg.jitter_on not in JITTER_ON:
            raise ValueError(f"task.jitter_on={cfg.jitter_on!r}: expected one of {', '.join(JITTER_ON)}")
        # auto: in the step where it runs on a GPU (the loader's cores then only decode and flip)
        self.jitter_in_step = cfg.jitter_on == "step" or (cfg.jitter_on == "auto" and torch.cuda.is_available())
        keys = list(self.frame_keys)
        if self.mode != "supervised":
            keys.append("K")
        if self.mode in ("stereo", "mono_stereo"):
            keys.append("baseline")
        if self.mode == "supervised":
            keys.append("depth")
        self.required_keys = tuple(keys)  # self-supervised modes train on frames alone (raw video)
        self.eval_keys = ("rgb", "depth")  # evaluation: the frame and its ground-truth depth
        if self.mode != "supervised" and cfg.smoothness_weight > 0:
            # frames are padded for the network; the smoothness term needs 2 px at the coarsest scale
            self.min_train_side = 2 ** max(cfg.scales) + 1
            self.min_side_reason = (f"the edge-aware smoothness needs 2 px at the 1/{2 ** max(cfg.scales)} scale "
                                    f"of task.scales={list(cfg.scales)}")

    # ----------------------------------------------------------------- model
    def build_model(self) -> nn.ModuleDict:
        parts = build_depth_net(self.model_cfg, tuple(self.cfg.scales), self.cfg.init_depth,
                                self.cfg.min_depth, self.cfg.max_depth)
        if self.uses_pose:
            parts.update(build_pose_net(self.model_cfg, self.cfg.pose_encoder, parts["encoder"].num_ch))
        model = nn.ModuleDict(parts)
        m = self.model_cfg
        self.init_provenance = encoder_provenance(m.init == "imagenet", m.encoder, m.imagenet_weights, self.seed)
        if self.cfg.weights:
            source = f"task.weights={self.cfg.weights}"
            weights = read_init_weights(self.cfg.weights)
            check_input_norm(weights, model["encoder"].norm, source)
            load_pretrained(model, weights.state, source=source)
            self.init_provenance = weights.provenance
        return model

    def provenance(self) -> dict[str, str]:
        return {"init.provenance": self.init_provenance} if getattr(self, "init_provenance", "") else {}

    # ------------------------------------------------------------ transforms
    def train_transform(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Flip (whole sample, geometry consistent) then colour jitter of the frames the networks see
        into ``aug_*`` copies, here or (``jitter_in_step``) as a ``jitter`` row the step applies on its
        device (:meth:`augmented`). Always adds the same keys, so samples collate alike."""
        cfg = self.cfg
        flip = float(torch.rand(1, generator=generator)) < cfg.flip_prob
        jitter = float(torch.rand(1, generator=generator)) < cfg.jitter_prob
        params = sample_jitter(generator, cfg.jitter_brightness, cfg.jitter_contrast,
                               cfg.jitter_saturation, cfg.jitter_hue)  # drawn always: fixed stream use
        if flip:
            sample = hflip_sample(sample)
        if self.jitter_in_step:
            return {**sample, "jitter": jitter_row(params, applied=jitter)}
        if jitter:
            return jitter_frames(sample, self.net_keys, params)
        out = dict(sample)
        for key in self.net_keys:
            out["aug_" + key] = sample[key]
        return out

    def augmented(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its ``aug_*`` frames: jittered here, on the batch's device, when the loader
        sent ``jitter`` rows instead (on the CPU the values the loader would have made, bit for bit); frames
        the loader left encoded (``data.decode_on=device``) are decoded here first."""
        batch = decode_on_device(batch)
        if "jitter" not in batch or "aug_rgb" in batch:
            return batch
        return jitter_batch(batch, self.net_keys)

    # ------------------------------------------------------------------ loss
    def _frames(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(network inputs, loss frames): each frame as float in [0, 1], converted once; a frame
        without colour jitter is the same tensor in both; ``pair_prev`` / ``pair_next``: the pose
        network's inputs as views (:func:`_float_frames`)."""
        with record_function("depth/inputs"):
            loss_frames = _float_frames({k: batch[k] for k in self.frame_keys})
            jittered = {k: batch["aug_" + k] for k in self.frame_keys
                        if batch.get("aug_" + k, batch[k]) is not batch[k]}
            if not jittered:
                return loss_frames, loss_frames  # no jitter drawn: the same tensors
            net = {k: v for k, v in loss_frames.items() if not k.startswith("pair_")}
            net.update(_float_frames(jittered))
        return net, loss_frames

    def _source_poses(self, model: nn.ModuleDict, batch: dict[str, Any], net: dict[str, Tensor],
                      frames: dict[str, Tensor], feats_t: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """[(unaugmented source image, T_src_from_t)] for the mode's source frames."""
        sources = []
        if self.uses_pose:
            shared = "pose_encoder" not in model
            for key, invert in (("rgb_prev", True), ("rgb_next", False)):
                deep_s = model["encoder"](pad_to_stride(net[key]))[-1] if shared else None
                deep_t = feats_t[-1] if shared else None
                pair = net.get("pair_prev" if invert else "pair_next")  # a view: no cat of the two frames
                if invert:  # temporal order (prev, t); inverted so it maps t -> prev
                    T = predict_pose(model, net[key], net["rgb"], True, deep_s, deep_t, pair=pair)
                else:
                    T = predict_pose(model, net["rgb"], net[key], False, deep_t, deep_s, pair=pair)
                sources.append((frames[key], T))
        if self.mode in ("stereo", "mono_stereo"):
            sources.append((frames["rgb_right"], stereo_pose(batch["baseline"].float())))
        return sources

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        batch = self.augmented(batch)
        net, frames = self._frames(batch)
        feats, disps = disparities(model, net["rgb"])  # any frame size: padded
        if self.mode == "supervised":
            return self._supervised_loss(disps, batch)
        with record_function("depth/pose"):
            sources = self._source_poses(model, batch, net, frames, feats)
        target = frames["rgb"]
        fns = depth_functions(cfg.photometric_impl, target)  # warp projection, smoothness: compiled or eager
        with record_function("depth/upsample"):
            disp = self._full_size_disps(disps, target.shape[-2:])
        with record_function("depth/warp"):
            K, disp_range = batch["K"].float(), (1.0 / cfg.max_depth, 1.0 / cfg.min_depth)
            disp = pad_image(disp, PAD)  # once for every source: one fold of their summed gradients
            warped = [warp_scales(img, disp, T, K, pad=PAD, grid_fns=fns.grid, disp_range=disp_range,
                                  depths_padded=True) for img, T in sources]
        with record_function("depth/photometric"):
            identity = [img for img, _ in sources] if cfg.automask else None
            reproj_terms, argmin = multiscale_reprojection_loss(target, warped, identity, cfg.ssim_weight,
                                                                cfg.photometric_impl)
            masked = torch.count_nonzero(argmin >= len(identity or ())) / argmin.numel()
            reproj = reproj_terms.mean()
        with record_function("depth/smoothness"):
            smooth = reproj.new_zeros(())
            if cfg.smoothness_weight > 0:
                smooth = fns.smoothness([disps[s] for s in cfg.scales], target, tuple(cfg.scales))
            loss = reproj + cfg.smoothness_weight * smooth
        logs = {"loss": loss.detach(), "reprojection": reproj.detach(), "smoothness": smooth.detach(),
                "automask_fraction": masked.detach()}
        return loss, logs

    def _full_size_disps(self, disps: dict[int, Tensor], size: tuple[int, int]) -> Tensor:
        """Every loss scale's sigmoid disparity upsampled to the input size (B, S, H, W), fp32 (the
        warp turns it into depth, as :func:`trainer.geometry.disp_to_depth`)."""
        full = [d if d.shape[-2:] == size else F.interpolate(d, size=tuple(size), mode="bilinear", align_corners=False)
                for d in (disps[s] for s in self.cfg.scales)]
        return torch.cat(full, dim=1).float()

    def _supervised_loss(self, disps: dict[int, Tensor], batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked L1 or silog against the ground-truth depth, averaged over the upsampled scales."""
        cfg = self.cfg
        depths = upsampled_depths(disps, tuple(batch["rgb"].shape[-2:]), cfg.min_depth, cfg.max_depth)
        gt = batch["depth"].float()
        valid = valid_depth_mask(gt, cfg.min_depth, cfg.max_depth)
        terms = []
        for s in cfg.scales:
            pred = depths[s][1]
            if cfg.supervised_loss == "l1":
                terms.append(masked_l1(pred, gt, valid))
            else:
                terms.append(scale_invariant_log(pred, gt, valid, cfg.silog_variance_focus))
        loss = torch.stack(terms).mean()
        return loss, {"loss": loss.detach(), "depth_loss": loss.detach(),
                      "valid_fraction": valid.float().mean().detach()}

    # ------------------------------------------------------------ evaluation
    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """Predicted depth (B, 1, H, W) in metres from the unaugmented frame, at the ground
        truth's size (the frame's without one), for any frame size (e.g. KITTI's 375x1242)."""
        images = _float(batch["rgb"])
        out_size = tuple(batch["depth"].shape[-2:]) if "depth" in batch else tuple(images.shape[-2:])
        net_size = tuple(self.cfg.eval_resize) if all(self.cfg.eval_resize) else None
        return predict_depth(model, images, self.cfg.min_depth, self.cfg.max_depth, out_size, net_size)

    def eval_scaling(self) -> str:
        """median for monocular training (scale ambiguous), fixed otherwise, unless configured."""
        if self.cfg.eval_scaling != "auto":
            return self.cfg.eval_scaling
        return "median" if self.mode == "mono" else "fixed"

    def new_metric(self) -> Metric:
        cfg = self.cfg
        return DepthMetric(cfg.eval_min_depth, cfg.eval_max_depth, self.eval_scaling(),
                           cfg.eval_fixed_scale, cfg.eval_crop)

    def visualize(self, model: nn.Module, batch: dict[str, Any], outputs: Any, out_dir: Path) -> list[Path]:
        """``depth_<key>.png``: input | predicted depth | ground truth (if any), titled, as magma colour
        maps of inverse depth with a colour bar (near = bright; no ground truth = black)."""
        from trainer.tasks.visuals import depth_figure

        keys = batch.get("__key__", [str(i) for i in range(batch["rgb"].shape[0])])
        valid = batch.get("__valid__")
        written = []
        for i in range(min(self.cfg.vis_samples, batch["rgb"].shape[0])):
            if valid is not None and not bool(valid[i]):
                continue
            gt = batch["depth"][i, 0].float().cpu().numpy() if "depth" in batch else None
            written.append(depth_figure(batch["rgb"][i], outputs[i, 0].float().cpu().numpy(), gt,
                                        path=Path(out_dir) / f"depth_{keys[i]}.png", title=f"depth: {keys[i]}"))
        return written


CONFIG = DepthTaskConfig
TASK = DepthTask
