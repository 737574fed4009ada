"""Initialising a model (or one part of it) from exported weights: strict, and never silent.

An exported ``weights.pt`` is a plain state_dict whose keys start with the part names of the
pre-training model (``encoder.``, ``depth_decoder.``, ``flow_decoder.``, ``classifier.`` ...).
:func:`load_pretrained` takes the keys under one prefix (e.g. ``encoder.``), optionally renames
prefixes and drops the prefixes the caller names, and then requires an exact match: every key
of the target module present, no extra key, every shape equal. Anything else raises
:class:`PretrainedMismatchError` listing the keys, so a wrong architecture or a misspelt prefix
can never leave part of a model silently at its random initialisation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from trainer.errors import PretrainedMismatchError

log = logging.getLogger("geoprime.pretrained")  # under the run logger (rank-prefixed files)


@dataclass
class LoadReport:
    """What a load did: keys loaded, keys of the file left unused (outside ``take``), keys dropped
    on request, and target keys deliberately left at their initialisation (``keep_init``)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    kept_init: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs."""
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
        parts = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} on request ({few(self.dropped)})")
        if self.kept_init:
            parts.append(f"kept {len(self.kept_init)} at initialisation ({few(self.kept_init)})")
        if self.unused:
            parts.append(f"{len(self.unused)} file tensors outside the selected prefix ({few(self.unused)})")
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a plain state_dict with ``weights_only=True``; clear errors for a missing/bad file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights {p} not found (expected a weights.pt exported "
                                f"by a pre-training run, i.e. <out_dir>/weights.pt)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedMismatchError(f"pretrained weights {p}: cannot load with weights_only=True ({e})") from e
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise PretrainedMismatchError(f"pretrained weights {p}: expected a plain state_dict "
                                      f"(str -> tensor), got {type(state).__name__}")
    return dict(state)


def _starts(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def load_pretrained(module: nn.Module, state: Mapping[str, torch.Tensor], *, take: str = "",
                    rename: Mapping[str, str] | None = None, drop: Sequence[str] = (),
                    keep_init: Sequence[str] = (), source: str = "state_dict") -> LoadReport:
    """Load ``state`` into ``module`` strictly.

    ``drop``: prefixes of the file's keys removed on purpose (applied first, on the raw keys).
    ``take``: only file keys starting with this prefix are used, with the prefix removed (the
    others are reported as unused). ``rename``: {old_prefix: new_prefix} applied after ``take``.
    ``keep_init``: prefixes of the module's keys expected to be absent (left at initialisation).
    Raises :class:`PretrainedMismatchError` on any missing / unexpected key or shape mismatch.
    """
    report = LoadReport(source=source)
    selected: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _starts(key, drop):
            report.dropped.append(key)
            continue
        if take and not key.startswith(take):
            report.unused.append(key)
            continue
        new = key[len(take):]
        for old_p, new_p in (rename or {}).items():
            if new.startswith(old_p):
                new = new_p + new[len(old_p):]
                break
        selected[new] = value
    if take and not selected and not report.dropped:
        raise PretrainedMismatchError(
            f"{source}: no tensor under prefix {take!r}; the file's prefixes are "
            f"{sorted({k.split('.')[0] + '.' for k in state})}")
    target = module.state_dict()
    missing = [k for k in target if k not in selected and not _starts(k, keep_init)]
    unexpected = [k for k in selected if k not in target]
    shapes = [f"{k}: file {tuple(selected[k].shape)} vs model {tuple(target[k].shape)}"
              for k in selected if k in target and selected[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model (take={take!r}, drop={list(drop)}):"]
        if missing:
            lines.append(f"  missing in file ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            lines.append(f"  unexpected in file ({len(unexpected)}): {', '.join(unexpected[:10])}")
        if shapes:
            lines.append(f"  shape mismatch ({len(shapes)}): {'; '.join(shapes[:10])}")
        lines.append("  check model.encoder matches the pre-training run, or name the prefixes to drop.")
        raise PretrainedMismatchError("\n".join(lines))
    report.kept_init = [k for k in target if k not in selected]
    with torch.no_grad():
        result = module.load_state_dict(selected, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above
    report.loaded = sorted(selected)
    log.info(report.summary())
    return report


@dataclass
class InitWeights:
    """Weights read for an initialisation, with where they came from."""

    state: dict[str, torch.Tensor]
    provenance: str
    """One line: the file(s), their sha256, and what made them (a run id, a release)."""
    input_norm: str | None = None
    """The encoder input normalisation the weights need when the file says (a Monodepth2 release)."""


def _sha256(path: Path) -> str:
    from trainer.models.monodepth2 import sha256

    return sha256(path)


def export_provenance(path: Path) -> str:
    """``geoprime export <path> (sha256 ...; run <id>, step <n>)``: the run and step from the
    ``metrics.json`` a run writes beside its ``weights.pt`` (when there is one)."""
    import json

    made_by = ""
    metrics = path.parent / "metrics.json"
    if path.name == "weights.pt" and metrics.is_file():
        try:
            saved = json.loads(metrics.read_text())
            made_by = f"; run {saved.get('run_id')}, step {saved.get('step')}"
        except (OSError, ValueError):
            made_by = "; its metrics.json is unreadable"
    return f"weights file {path} (sha256 {_sha256(path)[:16]}{made_by})"


def read_init_weights(path: str | Path) -> InitWeights:
    """The weights an initialisation names: a Monodepth2 release folder (or its ``encoder.pth``),
    mapped into our layout (:mod:`trainer.models.monodepth2`), or a plain state_dict file."""
    from trainer.models import monodepth2

    p = Path(path)
    folder = p.parent if p.name == "encoder.pth" and monodepth2.is_release(p.parent) else p
    if monodepth2.is_release(folder):
        state, info = monodepth2.read_release(folder)
        log.info("%s: %d tensors; dropped %s; filled %s", folder, len(state), info["dropped"] or "none",
                 info["filled"] or "none")
        return InitWeights(state, monodepth2.describe(folder, info), monodepth2.NORM)
    return InitWeights(read_state_dict(p), export_provenance(p))


def is_weights_source(path: str | Path) -> bool:
    """A file, or a Monodepth2 release folder: something :func:`read_init_weights` reads."""
    from trainer.models import monodepth2

    return Path(path).is_file() or monodepth2.is_release(path)


def check_input_norm(weights: InitWeights, norm: str, source: str) -> None:
    """Refuse weights that need another encoder input normalisation than the model's."""
    if weights.input_norm is not None and weights.input_norm != norm:
        raise PretrainedMismatchError(
            f"{source}: these weights expect model.input_norm={weights.input_norm} (their encoders normalise "
            f"inputs that way), the model has {norm}: set model.input_norm={weights.input_norm}")


def encoder_provenance(imagenet: bool, encoder: str, imagenet_weights: str | None, seed: int) -> str:
    """Provenance of an encoder not initialised from a file of ours: torchvision's ImageNet weights
    (the file and its sha256) or a random initialisation (the seed)."""
    if imagenet:
        from trainer.models.encoders import imagenet_weights_file

        path = Path(imagenet_weights) if imagenet_weights else imagenet_weights_file(encoder)
        return f"torchvision ImageNet weights {path} (sha256 {_sha256(path)[:16]})"
    return f"random initialisation (seed {seed})"
