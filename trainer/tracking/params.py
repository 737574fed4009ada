"""Config trees as MLflow params: flattening and the limits MLflow puts on a value."""
from __future__ import annotations

import json
from typing import Any

#: MLflow refuses param values longer than this (6000 characters since MLflow 2.x).
MAX_PARAM_VALUE = 6000


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> ``{"a.b.c": "value"}`` strings, as MLflow params want them."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        if not tree and prefix:
            out[prefix] = "{}"
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}.{i}"))
    elif isinstance(tree, (list, tuple)):
        out[prefix] = json.dumps(list(tree))
    else:
        out[prefix] = "null" if tree is None else str(tree)
    return out


def sanitize_params(flat: dict) -> dict[str, str]:
    """Keys and values as strings (None -> "null"), values longer than MLflow takes truncated."""
    out = {}
    for key, value in flat.items():
        text = "null" if value is None else str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[:MAX_PARAM_VALUE - 15] + "...[truncated]"
        out[str(key)] = text
    return out


#: Config keys (a trailing '.' means "and everything under it") whose values differ from run to run
#: without being training settings: paths, the tracking set-up, progress bars. Logged as tags
#: ``config.<key>`` so that MLflow's "show differences only" compares settings, not folders.
RUN_SPECIFIC = ("out_dir", "tracking.", "task.weights", "train.resume", "train.progress", "data.root")
#: Config keys already on the run as MLflow attributes (run name, parent, tags): not logged again.
ALREADY_ON_RUN = ("tracking.run_name", "tracking.parent_run_id", "tracking.tags.", "tracking.color")
#: Prefix of the tags that hold :data:`RUN_SPECIFIC` config values.
CONFIG_TAG_PREFIX = "config."


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in patterns)


def split_settings(flat: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Flattened config -> (params: the settings, tags: ``config.<key>`` for run-specific values)."""
    params, tags = {}, {}
    for key, value in flat.items():
        if _matches(key, ALREADY_ON_RUN):
            continue
        if _matches(key, RUN_SPECIFIC):
            tags[CONFIG_TAG_PREFIX + key] = value
        else:
            params[key] = value
    return params, sanitize_params(tags)
