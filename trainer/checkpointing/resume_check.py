"""Which configuration changes a resumed run may make, and the error when it makes others.

A checkpoint holds the resolved config of the run that wrote it. Resuming it under another
model, task, optimizer, schedule, data set or seed would silently mix two experiments, so
``train.resume=auto`` refuses that with every difference named. Changes that only affect how
the run is executed or observed (logging, checkpoint cadence, tracking, data workers, world
size / strategy within the same checkpoint family, precision) and extending ``train.steps``
are allowed; each field of :mod:`trainer.config` declares which (``setting(..., resumable=...)``).
An explicit ``train.resume=<dir>`` is a deliberate warm start: the differences are logged as a
warning instead.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.config import RESUMABLE, RunConfig
from trainer.errors import ConfigError

log = logging.getLogger("geoprime.checkpoint")


#: config keys retired (checkpoint has it, this version not) or introduced (the other way round) by a
#: change of how the data is ordered: such a checkpoint resumes at an epoch boundary (the loader refuses
#: it mid-epoch with one line), so the key itself does not block
DATA_ORDER_KEYS = {"data.shuffle_buffer": "retired", "data.lanes": "introduced"}


class ConfigMismatch(ConfigError):
    """The checkpoint was written under a configuration this run may not continue."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _container(cfg: Any) -> dict:
    if isinstance(cfg, str):
        cfg = OmegaConf.create(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def resumable(key: str, schema: type = RunConfig) -> bool:
    """May a resumed run change the dotted ``key``? As its field in ``schema`` declares (the field
    decides for everything below it: ``task.*``, ``tracking.tags.*``); a key no schema field holds may not."""
    head, _, rest = key.partition(".")
    for f in dataclasses.fields(schema):
        if f.name != head:
            continue
        if RESUMABLE in f.metadata:
            return bool(f.metadata[RESUMABLE])
        section = f.default_factory
        return bool(rest) and dataclasses.is_dataclass(section) and resumable(rest, section)  # type: ignore[arg-type]
    return False


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    missing = object()
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            fmt = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: {fmt(a)} -> {fmt(b)}")
    return out


def _order_change(diff: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A key of :data:`DATA_ORDER_KEYS` present only on the side its change says."""
    key = diff.split(":", 1)[0]
    kind = DATA_ORDER_KEYS.get(key)
    return (kind == "retired" and key not in new) or (kind == "introduced" and key not in old)


def config_differences(saved: Any, current: Any) -> list[str]:
    """``key: old -> new`` for every leaf that differs (either side may lack it)."""
    return _differences(_flat(_container(saved)), _flat(_container(current)))


def check_resume_config(saved: Any, current: Any, checkpoint: str, explicit: bool) -> list[str]:
    """Raise :class:`ConfigMismatch` naming ``checkpoint`` and every difference outside
    the fields declared resumable (a warning instead when ``explicit``); returns the allowed differences."""
    old, new = _flat(_container(saved)), _flat(_container(current))
    diffs = _differences(old, new)
    blocking = [d for d in diffs if not resumable(d.split(":", 1)[0]) and not _order_change(d, old, new)]
    # within parallel.*: DCP strategies reshard among themselves, DeepSpeed only within one ZeRO stage
    was_ds, is_ds = old.get("parallel.strategy") == "deepspeed", new.get("parallel.strategy") == "deepspeed"
    if was_ds != is_ds:
        blocking += [d for d in diffs if d.startswith("parallel.strategy:")]
    elif was_ds:
        blocking += [d for d in diffs if d.startswith("parallel.zero_stage:")]
    if blocking:
        text = "; ".join(blocking)
        if not explicit:
            raise ConfigMismatch(
                f"checkpoint {checkpoint} was written by a run with another configuration ({text}). "
                "Resume with that configuration, use a new out_dir for the new one, or warm-start from it "
                f"deliberately with train.resume={checkpoint}")
        log.warning("train.resume=%s: continuing a checkpoint written with another configuration (%s)",
                    checkpoint, text)
    allowed = [d for d in diffs if d not in blocking]
    if allowed:
        log.info("resuming %s with changed settings: %s", checkpoint, "; ".join(allowed))
    return allowed
