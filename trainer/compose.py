"""The run config from command-line overrides, checked before anything heavy is imported.

:func:`load_run_config` composes ``configs/config.yaml`` with Hydra's compose API (the same
composition ``python -m trainer`` runs), refuses keys no schema declares, and gives the run a
default ``out_dir`` of its own. Every Hydra / OmegaConf error becomes one
:class:`~trainer.errors.ConfigError` line naming the override, with the likely intended key or
option (``unknown key train.step; did you mean train.steps?``) instead of Hydra's page of advice.
Imports no torch: a typo is answered in about a second.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any, Optional

from trainer.errors import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
#: ``out_dir`` when neither the command line nor a preset sets one (see :func:`default_out_dir`)
SCHEMA_OUT_DIR = "outputs/run"


def config_options(group: str) -> list[str]:
    """The options a user can pick for a config group (``configs/<group>/*.yaml``)."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def config_groups() -> list[str]:
    return sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())


def compose(overrides: list[str]) -> Any:
    """The run config ``python -m trainer <overrides>`` would get (Hydra's compose API); Hydra's
    own exceptions propagate (see :func:`load_run_config` for the checked version)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def default_out_dir(task: str, overrides: list[str]) -> str:
    """``outputs/<task>-<8 hex digits of the overrides>``: the same command (any order of its
    overrides, on every rank and after every restart) gets the same folder and resumes there; a
    different command gets its own folder instead of colliding in one shared default."""
    key = "\n".join(sorted(o for o in overrides if not o.lstrip("+~").startswith("hydra.")))
    return f"outputs/{task}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _sets_out_dir(overrides: list[str]) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == "out_dir" for o in overrides)


def load_run_config(overrides: list[str]) -> tuple[Any, list[str]]:
    """(composed and checked config, the overrides to run it with): the given ones plus
    ``out_dir=<default_out_dir>`` when nothing set ``out_dir``. Raises :class:`ConfigError`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import check_known_keys

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(explain(e, overrides)) from None
    check_known_keys(cfg)
    if str(cfg.out_dir) == SCHEMA_OUT_DIR and not _sets_out_dir(overrides):
        out_dir = default_out_dir(str(cfg.task.name), overrides)
        cfg.out_dir = out_dir
        overrides = [*overrides, f"out_dir={out_dir}"]
    return cfg, list(overrides)


def explain(e: Exception, overrides: list[str]) -> str:
    """One line for a Hydra / OmegaConf composition error, naming the override and what to write."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(e)
    if isinstance(e, MissingConfigException) and "Could not find '" in text:
        return _missing_option(text.split("Could not find '", 1)[1].split("'", 1)[0], overrides)
    in_file = re.match(r"In '([^']+)': \w+ raised while composing config:\n(.*)", text, flags=re.S)
    if in_file:
        return _error_in_file(f"configs/{in_file.group(1)}.yaml", in_file.group(2), overrides)
    if isinstance(e, OverrideParseException):
        bad = text.split("'", 2)[1] if text.count("'") >= 2 else text
        return f"{bad!r} is not an override: write key=value (e.g. train.steps=100), group=option (task=flow) " \
               "or +key=value to add a key"
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None)
    if "Could not override '" in text:
        return _unknown_key(text.split("Could not override '", 1)[1].split("'", 1)[0], cause)
    override = _override_for(key, overrides) if key else None
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if key and key.split(".")[0] in _schema_groups() and "." not in key and "is not a subclass" in first:
        return (f"{override or key}: {key} is not a config group ({', '.join(config_groups())}); set its "
                f"fields instead, e.g. {key}.name=...")
    return f"{override or key or 'config'}: {first}"


def _schema_groups() -> set[str]:
    from trainer.config import RunConfig

    return {f.name for f in dataclasses.fields(RunConfig)}


def _override_for(key: str, overrides: list[str]) -> Optional[str]:
    for o in overrides:
        if o.lstrip("+~").split("=", 1)[0] == key:
            return o
    return None


def _missing_option(spec: str, overrides: list[str]) -> str:
    from trainer.config import close_match

    group, _, option = spec.rpartition("/")
    given = _override_for(group, overrides) or f"{group}={option}"
    plus = given[: len(given) - len(given.lstrip("+~"))]
    options = config_options(group)
    if not options:
        return f"{given}: {group} is not a config group ({', '.join(config_groups())})"
    match = close_match(option, options)
    hint = f"did you mean {plus}{group}={match}? " if match else ""
    return f"{given}: no such {group}; {hint}choose one of {', '.join(options)} (configs/{group}/)"


def _error_in_file(where: str, inner: str, overrides: list[str]) -> str:
    """An error raised while merging a preset file: name the file and the key it sets."""
    first = inner.strip().splitlines()[0] if inner.strip() else "cannot be merged"
    key = re.match(r"Key '([^']+)' not in '(\w+)'", first)
    if not key:
        return f"{where}: {first}"
    hint = ""
    if key.group(1) == "study":
        hint = f" (a study preset: run it with python -m launch study +{Path(where).parent.name}={Path(where).stem})"
    return f"{where}: unknown key {key.group(1)} for the run config ({key.group(2)}){hint}"


def _unknown_key(key: str, cause: BaseException) -> str:
    """A key the schema at that level does not have (a typo), or a new key in a free-form dict."""
    from trainer.config import close_match, unknown_key_message

    parent = getattr(cause, "object_type", None)
    if not dataclasses.is_dataclass(parent):
        return f"{key}: a new key in a free-form mapping is added with a leading +, e.g. +{key}=..."
    fields = [f.name for f in dataclasses.fields(parent)]
    full = getattr(cause, "full_key", None) or key
    prefix, _, name = full.rpartition(".")
    rest = key[len(full):]  # trian.steps: the unknown part is 'trian', '.steps' follows it
    match = close_match(name, fields)
    suggestion = f"{prefix + '.' if prefix else ''}{match}{rest}" if match else None
    return unknown_key_message(key, suggestion, fields)
