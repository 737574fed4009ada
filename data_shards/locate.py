"""Where the shards are: a path the user gives, as a split folder or a dataset root of splits.

``data/synthetic/train`` is one split (it holds ``manifest.json``); ``data/synthetic`` is a
dataset root (its sub-folders hold splits). :func:`splits_at` accepts both; when a path is
neither, :func:`missing_split` says what *is* there (other splits, a split folder given as the
root, nothing at all), so no message tells a user to build shards that exist.
"""
from __future__ import annotations

import os

from data_shards.manifest import MANIFEST_NAME, ManifestError
from data_shards.openers import is_remote


def local_splits(root: str) -> list[str]:
    """The splits of a local dataset root: its sub-folders holding a manifest (sorted)."""
    if is_remote(root) or not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, MANIFEST_NAME)))


def is_split_folder(path: str) -> bool:
    return not is_remote(path) and os.path.isfile(os.path.join(path, MANIFEST_NAME))


def splits_at(path: str) -> list[tuple[str, str]]:
    """``(root, split)`` for each split at ``path``: the split itself for a split folder (or any
    URL), every split for a local dataset root. Raises :class:`ManifestError` saying what is there
    when ``path`` holds no split."""
    p = path.rstrip("/") or "/"
    if is_remote(p) or is_split_folder(p):
        root, _, split = p.rpartition("/")
        return [(root or "/", split)]
    found = local_splits(p)
    if found:
        return [(p, s) for s in found]
    root, _, split = p.rpartition("/")
    others = local_splits(root or "/")
    if others:
        raise ManifestError(f"no split {split!r} in {root or '/'} (its splits: {', '.join(others)})")
    if os.path.isdir(p):
        raise ManifestError(f"{p}: no {MANIFEST_NAME} in it or in its sub-folders: neither a split nor a dataset "
                            "root (build shards with `python -m data_shards build <source> --out DIR`)")
    raise ManifestError(f"no such folder {p}")


def missing_split(root: str, split: str) -> str:
    """Why ``<root>/<split>/manifest.json`` is not there, and what to do, in one sentence."""
    where = os.path.join(root, split)
    if is_remote(root):
        return f"no readable manifest at {where}/{MANIFEST_NAME}"
    if is_split_folder(root):
        parent, _, name = root.rstrip("/").rpartition("/")
        return (f"{root} is itself a split folder (split {name!r}); its dataset root is {parent or '/'}: "
                f"use that as the root (data.root={parent or '/'})")
    others = local_splits(root)
    if others:
        return f"no split {split!r} in {root} (its splits: {', '.join(others)})"
    if os.path.isdir(where):
        return f"{where} has no {MANIFEST_NAME}: not a shard split (built partly, or by something else?)"
    if os.path.isdir(root):
        return f"no shards in {root} (no sub-folder holds a {MANIFEST_NAME}); build them, e.g. " \
               f"`python -m data_shards build synthetic --out {root}`"
    return f"no such folder {root}; build the shards there, e.g. `python -m data_shards build synthetic --out {root}`"
