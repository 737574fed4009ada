"""Semantic segmentation fine-tuning (``task=segmentation``): the study's transfer measurement.

One config value picks the initialisation (random, ImageNet, our depth / classification / flow
pre-trainings, the depth encoder + decoder, or any exported checkpoint), one the head (U-Net or
DeepLabV3) and one the protocol (full fine-tuning, frozen encoder, linear probe). Loss:
cross-entropy with ignore index 255 and optional class weights. Augmentation: random scale,
crop and horizontal flip applied to image and label together, then optional colour jitter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from data_shards.atomic import atomic_write
from data_shards.schema import CITYSCAPES_CLASSES, IGNORE_INDEX
from trainer.config import ModelConfig, ParallelConfig
from trainer.tasks.augment import apply_jitter, sample_jitter
from trainer.metrics.seg_reference import MetricSet, ReferencePerImageMetric
from trainer.metrics.segmentation import SegmentationMetric
from trainer.models.encoders import IMAGENET_MEAN, IMAGENET_STD, ResNetEncoder, set_bn_momentum
from trainer.models.pretrained import (check_input_norm, encoder_provenance, load_pretrained,
                                       read_init_weights)
from trainer.models.seg_heads import HEADS, build_seg_head, dilate_encoder
from trainer.models.unet import pad_to_stride
from trainer.tasks.base import Metric, Task
from trainer.tasks.quirks import GradientCarry
from trainer.tasks.common import as_dataclass, keep_keys, random_scale_crop_flip, to_unit_float
from trainer.tasks.segmentation_config import SegmentationConfig

INITS = ("random", "imagenet", "depth", "depth_full", "classification", "flow", "checkpoint")
PROTOCOLS = ("full", "frozen", "linear")
#: The part each of our pre-trainings exports beside ``encoder.``: proof the file is what init says.
PRETRAINING_MARKERS = {"depth": "depth_decoder.", "depth_full": "depth_decoder.",
                       "classification": "classifier.", "flow": "flow_decoder."}



def sample_name(sample: dict[str, Any]) -> str:
    """File stem for exported predictions: the source image's stem when the meta names a file,
    else the sample key."""
    src = (sample.get("meta") or {}).get("source")
    for cand in ([src.get(k) for k in ("path", "file", "image")] if isinstance(src, dict) else [src]):
        if isinstance(cand, str) and cand.lower().endswith((".png", ".jpg", ".jpeg")):
            return Path(cand).stem
    return str(sample["__key__"])


def write_png_atomic(array: np.ndarray, path: Path) -> Path:
    """Write a PNG under a temporary name in the same folder, then rename it into place."""
    return atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"), mkdir=True)


class SegmentationTask(Task):
    """Encoder + segmentation head trained with cross-entropy; see the module docstring."""

    required_keys = ("rgb", "seg")
    same_size_keys = ("rgb", "seg")

    def __init__(self, cfg: SegmentationConfig, model: ModelConfig, *, seed: int = 0,
                 parallel: Optional[ParallelConfig] = None) -> None:
        super().__init__(as_dataclass(cfg, SegmentationConfig), model, seed=seed, parallel=parallel)
        self._validate()
        self.frozen = cfg.protocol in ("frozen", "linear") and not cfg.quirk_frozen_trains_encoder
        self.carry = GradientCarry() if cfg.quirk_no_zero_grad else None
        self.init_provenance = ""
        names = CITYSCAPES_CLASSES if cfg.num_classes == len(CITYSCAPES_CLASSES) else None
        self.class_names = list(names) if names else [str(i) for i in range(cfg.num_classes)]

    def _validate(self) -> None:
        c = self.cfg
        if c.init not in INITS:
            raise ValueError(f"task.init={c.init!r}: expected one of {', '.join(INITS)}")
        if c.protocol not in PROTOCOLS:
            raise ValueError(f"task.protocol={c.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if c.head not in HEADS or c.head == "linear":
            raise ValueError(f"task.head={c.head!r}: expected unet, deeplabv3 or aspp")
        if c.init in PRETRAINING_MARKERS or c.init == "checkpoint":
            if not c.weights:
                raise ValueError(f"task.init={c.init} needs task.weights=<path to an exported weights.pt>")
        elif c.weights:
            raise ValueError(f"task.weights={c.weights!r} given but task.init={c.init} loads no file")
        if c.init == "depth_full" and (c.head != "unet" or c.protocol == "linear"):
            raise ValueError("task.init=depth_full initialises the U-Net decoder: needs task.head=unet "
                             "and protocol full or frozen")
        if c.head == "unet" and c.output_stride != 32:
            raise ValueError("task.head=unet uses the whole pyramid: task.output_stride must be 32")
        model_init = getattr(self.model_cfg, "init", "random")
        if model_init != "random" and c.init != model_init:
            raise ValueError(f"model.init={model_init} conflicts with task.init={c.init}: "
                             f"segmentation initialises from task.init (set task.init={model_init})")
        if c.encoder_bn_momentum is not None and not 0 < c.encoder_bn_momentum <= 1:
            raise ValueError(f"task.encoder_bn_momentum={c.encoder_bn_momentum}: must be in (0, 1]")
        if c.class_weights is not None and len(c.class_weights) != c.num_classes:
            raise ValueError(f"task.class_weights has {len(c.class_weights)} values for {c.num_classes} classes")
        if len(c.crop) != 2 or len(c.scale_range) != 2 or not 0 < c.scale_range[0] <= c.scale_range[1]:
            raise ValueError(f"task.crop={list(c.crop)} / task.scale_range={list(c.scale_range)}: "
                             "expected [h, w] and [min, max] with 0 < min <= max")
        if not 0 <= c.jitter_prob <= 1 or min(c.jitter_brightness, c.jitter_contrast, c.jitter_saturation) < 0 \
                or not 0 <= c.jitter_hue <= 0.5:
            raise ValueError(f"task.jitter_prob={c.jitter_prob} must be in [0, 1], task.jitter_brightness / "
                             f"contrast / saturation >= 0 and task.jitter_hue in [0, 0.5]")
        if len(c.export_size) != 2 or min(c.export_size) < 0:
            raise ValueError(f"task.export_size={list(c.export_size)}: expected [height, width] >= 0")
        if c.export_format not in ("cityscapes", "trainid"):
            raise ValueError(f"task.export_format={c.export_format!r}: expected cityscapes or trainid")
        if c.quirk_frozen_trains_encoder and c.protocol != "frozen":
            raise ValueError("task.quirk_frozen_trains_encoder reproduces --freezeencoder: needs task.protocol=frozen")
        if c.quirk_no_zero_grad:
            GradientCarry.check_supported(self.parallel)

    # ---- model -------------------------------------------------------------------------------
    def build_model(self) -> nn.ModuleDict:
        c, m = self.cfg, self.model_cfg
        encoder = ResNetEncoder(m.encoder, "imagenet" if c.init == "imagenet" else "random",
                                m.imagenet_weights, norm=getattr(m, "input_norm", "imagenet"))
        if c.output_stride != 32:
            dilate_encoder(encoder, c.output_stride)
        if c.encoder_bn_momentum is not None:
            set_bn_momentum(encoder, c.encoder_bn_momentum)
        head = "linear" if c.protocol == "linear" else c.head
        model = nn.ModuleDict({"encoder": encoder,
                               "decoder": build_seg_head(head, encoder.num_ch, c.num_classes, c.atrous_rates)})
        self._initialise(model)
        if self.frozen:
            for p in model["encoder"].parameters():
                p.requires_grad_(False)
        return model

    def _initialise(self, model: nn.ModuleDict) -> None:
        c = self.cfg
        if c.init in ("random", "imagenet"):
            m = self.model_cfg
            self.init_provenance = encoder_provenance(c.init == "imagenet", m.encoder, m.imagenet_weights, self.seed)
            return
        weights = read_init_weights(c.weights)
        check_input_norm(weights, model["encoder"].norm, f"task.weights={c.weights}")
        self.init_provenance, state = weights.provenance, weights.state
        if c.init == "checkpoint":
            load_pretrained(model, state, drop=c.drop_prefixes, keep_init=c.keep_init_prefixes,
                            source=str(c.weights))
            return
        marker = PRETRAINING_MARKERS[c.init]
        if not any(k.startswith(marker) for k in state) and not any(p.startswith(marker) for p in c.drop_prefixes):
            raise ValueError(f"task.init={c.init}: {c.weights} has no {marker}* tensors, so it is not a "
                             f"{c.init.split('_')[0]} pre-training export (prefixes: "
                             f"{sorted({k.split('.')[0] for k in state})})")
        load_pretrained(model["encoder"], state, take="encoder.", drop=c.drop_prefixes, source=str(c.weights))
        if c.init == "depth_full":
            # same decoder, every output head dropped; the class output stays freshly initialised.
            load_pretrained(model["decoder"], state, take="depth_decoder.", rename={"": "unet."},
                            drop=list(c.drop_prefixes) + ["depth_decoder.heads."],
                            keep_init=["unet.heads."], source=str(c.weights))

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        params = [p for name, p in model.named_parameters() if p.requires_grad
                  and not (self.frozen and name.split(".")[0] == "encoder")]
        return [{"params": params}]

    def on_train_mode(self, model: nn.Module) -> None:
        if self.cfg.protocol in ("frozen", "linear"):
            model["encoder"].eval()  # BatchNorm running statistics stay exactly as loaded

    def before_optimizer_step(self, model: nn.Module) -> None:
        if self.carry is not None:
            self.carry.apply(model)

    def stateful(self) -> dict[str, Any]:
        return {"grad_carry": self.carry} if self.carry is not None else {}

    def provenance(self) -> dict[str, str]:
        return {"init.provenance": self.init_provenance} if self.init_provenance else {}

    # ---- data --------------------------------------------------------------------------------
    def train_transform(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        out = keep_keys(sample, ("rgb", "seg"))
        c = self.cfg
        out["rgb"], (out["seg"],) = random_scale_crop_flip(
            sample["rgb"], [sample["seg"]], generator, c.scale_range, c.crop, c.hflip, c.ignore_index)
        if c.jitter_prob > 0:  # when on, always the same draws per sample (exact resume)
            apply = float(torch.rand(1, generator=generator)) < c.jitter_prob
            params = sample_jitter(generator, c.jitter_brightness, c.jitter_contrast, c.jitter_saturation,
                                   c.jitter_hue)
            if apply:
                out["rgb"] = apply_jitter(out["rgb"], params)
        return out

    def eval_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = keep_keys(sample, ("rgb", "seg"))
        out["name"] = sample_name(sample)
        return out

    # ---- steps -------------------------------------------------------------------------------
    def logits(self, model: nn.Module, rgb: torch.Tensor) -> torch.Tensor:
        """(B, num_classes, H, W) logits; the input is padded (replicated border) to a multiple of 32,
        at least 64, and the logits cropped back to the input size."""
        x = to_unit_float(rgb, model["decoder"])
        if self.cfg.quirk_double_normalize:  # the reference's transforms.Normalize before the encoder's own
            x = (x - x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        h, w = x.shape[-2:]
        x = pad_to_stride(x)
        if self.frozen:
            with torch.no_grad():
                feats = model["encoder"](x)
        else:
            feats = model["encoder"](x)
        return model["decoder"](feats, size=tuple(x.shape[-2:]))[..., :h, :w]

    def _class_weights(self, device: torch.device) -> Optional[torch.Tensor]:
        w = self.cfg.class_weights
        return None if w is None else torch.tensor(w, dtype=torch.float32, device=device)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(model, batch["rgb"])
        target = batch["seg"].to(logits.device).long()
        loss = F.cross_entropy(logits, target, weight=self._class_weights(logits.device),
                               ignore_index=self.cfg.ignore_index)
        with torch.no_grad():
            labelled = target != self.cfg.ignore_index
            acc = (logits.argmax(1) == target)[labelled].float().mean() if labelled.any() else loss.new_zeros(())
        return loss, {"ce": loss.detach(), "pixel_acc": acc.detach()}

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        pred = self.logits(model, batch["rgb"]).argmax(1)
        if self.cfg.export_predictions:
            self.export_predictions(batch, pred, Path(self.cfg.export_predictions))
        return {"pred": pred}

    def new_metric(self) -> Metric:
        c = self.cfg
        metric = SegmentationMetric(c.num_classes, c.ignore_index, self.class_names, c.eval_subset)
        if not c.parity_classes:
            return metric
        parity = ReferencePerImageMetric(c.num_classes, c.ignore_index, self.class_names, c.parity_classes)
        return MetricSet([metric, parity])

    # ---- outputs -----------------------------------------------------------------------------
    def export_predictions(self, batch: dict[str, Any], pred: torch.Tensor, out_dir: Path) -> list[Path]:
        """One PNG per valid sample, named like its input: Cityscapes label ids in the layout
        cityscapesScripts evaluates (``<city>/<city>_<seq>_<frame>_leftImg8bit.png``, via the
        converter's ``write_cityscapes_predictions``) or train ids as ``<name>.png``."""
        valid = batch.get("__valid__")
        names = batch.get("name") or batch["__key__"]
        size = tuple(self.cfg.export_size) if all(self.cfg.export_size) else None
        written = []
        for i, p in enumerate(pred.cpu().numpy().astype(np.uint8)):
            if valid is not None and not bool(valid[i]):
                continue
            if self.cfg.export_format == "cityscapes":
                from data_shards.sources.cityscapes import write_cityscapes_predictions
                written.append(write_cityscapes_predictions(p, names[i], out_dir, size))
            else:
                if size is not None and p.shape != size:
                    p = np.asarray(Image.fromarray(p).resize(size[::-1], Image.NEAREST))
                written.append(write_png_atomic(p, out_dir / f"{names[i]}.png"))
        return written

    def visualize(self, model: nn.Module, batch: dict[str, Any], outputs: Any, out_dir: Path) -> list[Path]:
        """Image | prediction overlay | ground-truth overlay, titled, with a legend of the classes shown;
        one PNG per sample (trainer.tasks.visuals)."""
        from trainer.tasks.visuals import segmentation_figure

        pred = outputs["pred"].cpu().numpy()
        gt = batch["seg"].cpu().numpy()
        keys = batch.get("__key__", [str(i) for i in range(len(pred))])
        return [segmentation_figure(batch["rgb"][i], pred[i], gt[i], self.class_names, self.cfg.ignore_index,
                                    path=Path(out_dir) / f"seg_{keys[i]}.png", title=f"segmentation: {keys[i]}")
                for i in range(min(len(pred), self.cfg.visualize_max))]


CONFIG = SegmentationConfig
TASK = SegmentationTask
