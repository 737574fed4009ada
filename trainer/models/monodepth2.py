"""Monodepth2's released checkpoints (``encoder.pth``, ``depth.pth``, ``pose_encoder.pth``,
``pose.pth`` in one folder, e.g. ``mono_640x192/``) read into our depth model's key layout.

Their networks (github.com/nianticlabs/monodepth2, ``networks/``) are ours with other names:

* ``encoder.pth`` / ``pose_encoder.pth``: ``ResnetEncoder.encoder`` is a torchvision ResNet
  (``encoder.conv1.weight``, ``encoder.bn1.*``, ``encoder.layerN.*``, plus its unused classifier
  ``encoder.fc.*``); encoder.pth also holds the training ``height``, ``width`` and ``use_stereo``.
  Ours keeps the trunk under ``layers.stem`` (conv1, bn1), ``layers.layer1`` (maxpool, layer1) ...
* ``depth.pth``: ``DepthDecoder.decoder`` is a ModuleList of its ``convs`` in insertion order:
  ``upconv (4,0), (4,1), (3,0) ... (0,1)`` at ``decoder.0`` .. ``decoder.9`` (a ConvBlock:
  ``decoder.N.conv.conv.*``, reflection pad then conv) and ``dispconv 0..3`` at ``decoder.10`` ..
  ``decoder.13`` (``decoder.N.conv.*``); ours: ``upconvs.<i>_<j>.conv.*`` and ``heads.<s>.*``.
* ``pose.pth``: ``PoseDecoder.net`` = [squeeze, pose 0, pose 1, pose 2]; trained with
  ``num_frames_to_predict_for=2``, so its last conv has 12 outputs of which Monodepth2 uses the
  first 6 (``axisangle[:, 0]``, ``translation[:, 0]``); ours predicts those 6.

Every key of a file is mapped or dropped by name (the classifier; pose.pth's second frame), never
skipped silently: any other key is an error naming it. Their encoders normalise inputs with
``(x - 0.45) / 0.225``: a model loading these weights needs ``model.input_norm=monodepth2``.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Optional

import torch

from trainer.errors import PretrainedMismatchError

#: file name -> our part name (the prefix its keys get)
FILES = {"encoder.pth": "encoder", "depth.pth": "depth_decoder",
         "pose_encoder.pth": "pose_encoder", "pose.pth": "pose_decoder"}
#: encoder.pth entries that are not tensors: the resolution and mode it was trained with
INFO_KEYS = ("height", "width", "use_stereo")
#: the input normalisation their encoders apply (ResnetEncoder.forward)
NORM = "monodepth2"


def is_release(path: str | Path) -> bool:
    """True for a folder holding Monodepth2's ``encoder.pth`` and ``depth.pth``."""
    p = Path(path)
    return p.is_dir() and (p / "encoder.pth").is_file() and (p / "depth.pth").is_file()


def _resnet_key(key: str) -> Optional[str]:
    """Their ``ResnetEncoder`` key -> ours (None: the ResNet classifier, not part of the encoder)."""
    m = re.fullmatch(r"encoder\.(conv1|bn1|layer[1-4]|fc)\.(.+)", key)
    if m is None:
        return ""
    part, rest = m.groups()
    if part == "fc":
        return None
    if part == "conv1":
        return f"layers.stem.0.{rest}"
    if part == "bn1":
        return f"layers.stem.1.{rest}"
    return f"layers.{part}.{'1.' if part == 'layer1' else ''}{rest}"


def _decoder_key(key: str) -> str:
    """Their ``DepthDecoder`` key -> ours ("" when it is not one of its modules)."""
    m = re.fullmatch(r"decoder\.(\d+)\.conv\.(conv\.)?(weight|bias)", key)
    if m is None:
        return ""
    index, inner, name = int(m.group(1)), m.group(2), m.group(3)
    if index < 10 and inner:
        return f"upconvs.{4 - index // 2}_{index % 2}.conv.{name}"
    if 10 <= index < 14 and not inner:
        return f"heads.{index - 10}.{name}"
    return ""


_POSE_NET = {"0": "squeeze", "1": "convs.0", "2": "convs.2", "3": "convs.4"}


def _pose_key(key: str) -> str:
    m = re.fullmatch(r"net\.([0-3])\.(weight|bias)", key)
    return f"{_POSE_NET[m.group(1)]}.{m.group(2)}" if m else ""


def _map(name: str, state: dict[str, Any], path: Path, report: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """One file's tensors under our part ``name``; unknown keys raise, dropped ones are reported."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if name == "encoder" and key in INFO_KEYS:
            continue
        new = _resnet_key(key) if name in ("encoder", "pose_encoder") else (
            _decoder_key(key) if name == "depth_decoder" else _pose_key(key))
        if new is None:
            report["dropped"].append(f"{path.name}:{key}")
            continue
        if not new or not torch.is_tensor(value):
            unknown.append(key)
            continue
        if name == "pose_decoder" and key.startswith("net.3.") and value.shape[0] == 12:
            value = value[:6].clone()  # the first of the two predicted frames, the one Monodepth2 uses
            report["dropped"].append(f"{path.name}:{key}[6:12]")
        out[f"{name}.{new}"] = value
    if unknown:
        raise PretrainedMismatchError(f"{path}: {len(unknown)} key(s) that are not Monodepth2's "
                                      f"{name.replace('_', ' ')} layout: {', '.join(unknown[:10])}")
    return out


def _fill_batch_counters(state: dict[str, torch.Tensor], report: dict[str, list[str]]) -> None:
    """Checkpoints from PyTorch < 0.4.1 have no BatchNorm ``num_batches_tracked`` (a counter that
    no forward pass reads with a set momentum): add them as 0, reported."""
    for key in [k for k in state if k.endswith(".running_mean")]:
        counter = key[: -len("running_mean")] + "num_batches_tracked"
        if counter not in state:
            state[counter] = torch.tensor(0, dtype=torch.long)
            report["filled"].append(counter)


def sha256(path: Path) -> str:
    """Hex digest of a file (provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_release(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in our depth model's layout, info) from a Monodepth2 weights folder.

    ``info``: ``height``, ``width``, ``use_stereo`` from encoder.pth, ``files`` {name: sha256} of
    the files read (pose files are optional: stereo models have none), ``dropped`` / ``filled``."""
    folder = Path(folder)
    if not is_release(folder):
        raise FileNotFoundError(f"{folder}: not a Monodepth2 weights folder (needs encoder.pth and depth.pth)")
    state: dict[str, torch.Tensor] = {}
    report: dict[str, list[str]] = {"dropped": [], "filled": []}
    info: dict[str, Any] = {"files": {}}
    for file_name, part in FILES.items():
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PretrainedMismatchError(f"{path}: cannot load with weights_only=True ({e})") from e
        if not isinstance(raw, dict):
            raise PretrainedMismatchError(f"{path}: expected a state_dict, got {type(raw).__name__}")
        if part == "encoder":
            info.update({k: raw[k] for k in INFO_KEYS if k in raw})
        state.update(_map(part, raw, path, report))
        info["files"][file_name] = sha256(path)
    _fill_batch_counters(state, report)
    info.update(report)
    return state, info


def describe(folder: str | Path, info: dict[str, Any]) -> str:
    """One line of provenance: the folder, what it was trained at, the files' digests."""
    files = ", ".join(f"{name} sha256 {digest[:12]}" for name, digest in info["files"].items())
    return (f"Monodepth2 release {folder} (trained at {info.get('width', '?')}x{info.get('height', '?')}, "
            f"use_stereo={info.get('use_stereo', '?')}; {files})")
