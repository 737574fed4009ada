"""Classification pre-training (``task=classification``): the built-in "ImageNet-like" baseline.

Image-level multi-label classification of which classes appear in an image: targets are the
multi-hot set of train ids present in the sample's ``seg`` (after augmentation, so they
describe the pixels the network sees), loss is binary cross-entropy. With ``target=single``
it is ImageNet-style single-label classification of image folders (``data_shards build
imagefolder``): cross-entropy on the sample's ``label``, top-1 / top-5 accuracy. The model is
``ModuleDict({"encoder", "classifier"})``: encoder + global average pool + linear.
"""
from __future__ import annotations

import logging
import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from data_shards.schema import CITYSCAPES_CLASSES, IGNORE_INDEX
from trainer.config import ModelConfig, ParallelConfig
from trainer.models.classifier import PooledLinear
from trainer.metrics.classification import TopKAccuracy
from trainer.models.encoders import build_encoder
from trainer.tasks.base import Metric, Task
from trainer.tasks.common import as_dataclass, keep_keys, random_scale_crop_flip, to_unit_float
from trainer.tasks.classification_config import ClassificationConfig

log = logging.getLogger("geoprime.classification")

#: training batches whose multi-hot targets are checked for an empty learning signal
LABEL_CHECK_BATCHES = 20


def multi_hot(seg: torch.Tensor, num_classes: int, min_pixels: int = 1,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(H, W) train ids -> (num_classes,) float32 0/1: classes with >= ``min_pixels`` pixels."""
    ids = seg.reshape(-1).long()
    ids = ids[ids != ignore_index]
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"seg label {int(ids.max())} outside 0..{num_classes - 1} (and not {ignore_index})")
    counts = torch.bincount(ids, minlength=num_classes)
    return (counts >= max(1, min_pixels)).float()


class MultiLabelMetric(Metric):
    """Per-class TP / FP / FN at a threshold, and per-class score histograms of positives and
    negatives. Both sum exactly over ranks; AP from the histograms treats scores within a bin as
    tied (exact for any world size, approximates sklearn's AP to the bin width). ``baseline_map``:
    the mAP of class frequencies (:func:`frequency_map`)."""

    def __init__(self, num_classes: int, threshold: float = 0.5, bins: int = 200,
                 class_names: list[str] | None = None) -> None:
        self.c, self.threshold, self.bins = num_classes, threshold, bins
        self.names = class_names or [str(i) for i in range(num_classes)]
        self.counts = torch.zeros(3, num_classes, dtype=torch.float64)  # tp, fp, fn
        self.hist = torch.zeros(2, num_classes, bins, dtype=torch.float64)  # positives, negatives

    def update(self, batch: dict[str, Any], outputs: Any) -> None:
        prob = (outputs["prob"] if isinstance(outputs, dict) else outputs).detach().double().cpu()
        target = batch["labels"].detach().cpu() > 0.5
        valid = batch.get("__valid__")
        if valid is not None:
            keep = torch.as_tensor(valid, dtype=torch.bool).cpu()
            prob, target = prob[keep], target[keep]
        pred = prob > self.threshold
        self.counts[0] += (pred & target).sum(0).double()
        self.counts[1] += (pred & ~target).sum(0).double()
        self.counts[2] += (~pred & target).sum(0).double()
        b = (prob * self.bins).long().clamp(0, self.bins - 1)
        for k in range(self.c):
            self.hist[0, k] += torch.bincount(b[target[:, k], k], minlength=self.bins).double()
            self.hist[1, k] += torch.bincount(b[~target[:, k], k], minlength=self.bins).double()

    def state(self) -> torch.Tensor:
        return torch.cat([self.counts.reshape(-1), self.hist.reshape(-1)])

    def compute(self, state: torch.Tensor) -> dict[str, float]:
        n = 3 * self.c
        if state.numel() != n + 2 * self.c * self.bins:
            raise ValueError(f"multi-label metric state has {state.numel()} values")
        tp, fp, fn = state[:n].reshape(3, self.c)
        hist = state[n:].reshape(2, self.c, self.bins)
        denom = 2 * tp + fp + fn
        seen = denom > 0
        out = {
            "f1_macro": float((2 * tp[seen] / denom[seen]).mean()) if seen.any() else float("nan"),
            "f1_micro": (float(2 * tp.sum() / denom.sum()) if denom.sum() > 0 else float("nan")),
        }
        aps = []
        for k in range(self.c):
            pos, neg = hist[0, k].flip(0), hist[1, k].flip(0)  # highest scores first
            if pos.sum() == 0:
                continue
            tp_cum, fp_cum = pos.cumsum(0), neg.cumsum(0)
            precision = tp_cum / (tp_cum + fp_cum).clamp(min=1)
            ap = float((precision * pos).sum() / pos.sum())
            aps.append(ap)
            out[f"ap/{self.names[k]}"] = ap
        out["map"] = sum(aps) / len(aps) if aps else float("nan")
        out["baseline_map"] = frequency_map(hist)
        return out


def frequency_map(hist: torch.Tensor) -> float:
    """mAP of scoring every image by the class frequencies (the same score per class for all images):
    each class's AP is then its prevalence, positives / images, averaged over the classes with
    positives as ``map`` is. ``hist``: (2, C, bins) score histograms of positives and negatives."""
    pos, neg = hist[0].sum(1), hist[1].sum(1)
    seen = pos > 0
    return float((pos[seen] / (pos[seen] + neg[seen])).mean()) if seen.any() else float("nan")


class ClassificationTask(Task):
    """Multi-label classification from segmentation labels, or single-label from image folders
    (``target``); see the module docstring."""

    required_keys = ("rgb", "seg")

    def __init__(self, cfg: ClassificationConfig, model: ModelConfig, *, seed: int = 0,
                 parallel: Optional[ParallelConfig] = None) -> None:
        super().__init__(as_dataclass(cfg, ClassificationConfig), model, seed=seed, parallel=parallel)
        cfg = self.cfg
        if cfg.target not in ("multilabel", "single"):
            raise ValueError(f"task.target={cfg.target!r}: expected 'multilabel' or 'single'")
        self.single = cfg.target == "single"
        if self.single:
            self.required_keys = ("rgb",)  # the label comes from the meta, always read
        if cfg.num_classes < 1 or cfg.ap_bins < 1 or not 0 < cfg.threshold < 1:
            raise ValueError(f"task: num_classes={cfg.num_classes}, ap_bins={cfg.ap_bins}, "
                             f"threshold={cfg.threshold}: need >= 1, >= 1 and in (0, 1)")
        if len(cfg.crop) != 2 or len(cfg.scale_range) != 2 or not 0 < cfg.scale_range[0] <= cfg.scale_range[1]:
            raise ValueError(f"task.crop={list(cfg.crop)} / task.scale_range={list(cfg.scale_range)}: "
                             "expected [h, w] and [min, max] with 0 < min <= max")
        names = CITYSCAPES_CLASSES if cfg.num_classes == len(CITYSCAPES_CLASSES) else None
        self.class_names = list(names) if names else [str(i) for i in range(cfg.num_classes)]
        self._label_sums: torch.Tensor | None = None  # positives per class over the first batches
        self._label_count = 0
        self._label_batches = 0

    def build_model(self) -> nn.ModuleDict:
        encoder = build_encoder(self.model_cfg)
        return nn.ModuleDict({"encoder": encoder,
                              "classifier": PooledLinear(encoder.num_ch[-1], self.cfg.num_classes)})

    def _with_labels(self, out: dict[str, Any], seg: torch.Tensor) -> dict[str, Any]:
        out["labels"] = multi_hot(seg, self.cfg.num_classes, self.cfg.min_pixels)
        return out

    def _with_label(self, out: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
        """Single-label target: the decoded ``label`` checked against ``num_classes``."""
        if "label" not in sample:
            raise KeyError(f"sample {sample.get('__key__', '?')}: no 'label' in its meta; task.target=single "
                           "needs image-folder shards (python -m data_shards build imagefolder)")
        label = int(sample["label"])
        if not 0 <= label < self.cfg.num_classes:
            raise ValueError(f"sample {sample.get('__key__', '?')}: label {label} outside "
                             f"0..{self.cfg.num_classes - 1} (task.num_classes={self.cfg.num_classes})")
        out["label"] = torch.tensor(label, dtype=torch.int64)
        return out

    def train_transform(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        out = keep_keys(sample, ("rgb",))
        if self.single:
            out["rgb"], _ = random_scale_crop_flip(sample["rgb"], [], generator, self.cfg.scale_range,
                                                   self.cfg.crop, self.cfg.hflip)
            return self._with_label(out, sample)
        out["rgb"], (seg,) = random_scale_crop_flip(sample["rgb"], [sample["seg"]], generator,
                                                    self.cfg.scale_range, self.cfg.crop, self.cfg.hflip)
        return self._with_labels(out, seg)

    def eval_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = keep_keys(sample, ("rgb",))
        seg = None if self.single else sample["seg"]
        if self.cfg.eval_crop:
            key = str(sample.get("__key__", ""))
            generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            out["rgb"], labels = random_scale_crop_flip(sample["rgb"], [] if seg is None else [seg], generator,
                                                        self.cfg.scale_range, self.cfg.crop, False)
            seg = labels[0] if labels else None
        if self.single:
            return self._with_label(out, sample)
        return self._with_labels(out, seg)

    def _logits(self, model: nn.Module, rgb: torch.Tensor) -> torch.Tensor:
        return model["classifier"](model["encoder"](to_unit_float(rgb, model["classifier"])))

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self._logits(model, batch["rgb"])
        if self.single:
            label = batch["label"].to(logits.device, torch.int64)
            loss = F.cross_entropy(logits.float(), label)
            with torch.no_grad():
                acc = (logits.argmax(1) == label).float().mean()
            return loss, {"ce": loss.detach(), "top1": acc}
        target = batch["labels"].to(logits.device, logits.dtype)
        self._check_label_signal(target)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        with torch.no_grad():
            acc = ((logits > 0) == (target > 0.5)).float().mean()
        return loss, {"bce": loss.detach(), "label_acc": acc}

    def _check_label_signal(self, target: torch.Tensor) -> None:
        """Warn once if every class was present in all or none of the first training samples:
        constant multi-hot targets teach the encoder nothing (e.g. full frames of a world where
        every frame shows every class; random crops via task.crop / task.scale_range fix it)."""
        if self._label_batches >= LABEL_CHECK_BATCHES:
            return
        sums = target.detach().float().sum(0)
        self._label_sums = sums if self._label_sums is None else self._label_sums + sums
        self._label_count += target.shape[0]
        self._label_batches += 1
        if self._label_batches == LABEL_CHECK_BATCHES:
            rate = (self._label_sums / self._label_count).cpu()
            if bool(((rate == 0) | (rate == 1)).all()):
                always = [self.class_names[k] for k in range(len(rate)) if rate[k] == 1]
                log.warning("classification targets are constant over the first %d training samples (always "
                            "present: %s; never: the rest): the loss has no signal about the images. Use random "
                            "crops (task.crop=[h,w], task.scale_range=[1,2]) or a higher task.min_pixels",
                            self._label_count, ", ".join(always) or "none")

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        if self.single:
            return {"logits": self._logits(model, batch["rgb"]).float()}
        return {"prob": torch.sigmoid(self._logits(model, batch["rgb"]).float())}

    def new_metric(self) -> MultiLabelMetric | TopKAccuracy:
        if self.single:
            return TopKAccuracy((1, 5), num_classes=self.cfg.num_classes)
        return MultiLabelMetric(self.cfg.num_classes, self.cfg.threshold, self.cfg.ap_bins, self.class_names)


CONFIG = ClassificationConfig
TASK = ClassificationTask
