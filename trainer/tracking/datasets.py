"""The shards a run reads, as MLflow dataset inputs: one per split, identified by its manifest's digest.

MLflow's runs table has a Datasets column and its run page a Datasets section; both show what
:func:`manifest_inputs` returns for a run config: for the train, val and test splits the run uses,
the dataset ``<data.name>/<split>`` with the digest of that split's ``manifest.json`` (which itself
lists every shard's sha256, so equal digests mean byte-identical shards), its location, the sample
keys as schema and the sample / shard counts as profile. Plain dicts, so the offline spool can keep
them; :func:`trainer.tracking.client.apply` turns them into MLflow entities.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from data_shards.manifest import MANIFEST_NAME, Manifest, ManifestError
from data_shards.openers import OpenError, is_remote, join, read_bytes

log = logging.getLogger(__name__)

#: Length of the digest shown in MLflow (the first hex digits of the manifest's sha256; MLflow takes <= 36).
DIGEST_CHARS = 16
#: Run-config split field -> MLflow's ``mlflow.data.context`` of that input.
CONTEXTS = {"train_split": "training", "val_split": "validation", "test_split": "test"}


def _source(url: str) -> tuple[str, str]:
    if url.startswith("s3://"):
        return "s3", json.dumps({"uri": url})
    if is_remote(url):
        return "http", json.dumps({"url": url})
    return "local", json.dumps({"uri": Path(url).resolve().as_uri()})


def manifest_input(root: str, split: str, name: str, context: str) -> dict[str, Any]:
    """The dataset input of ``<root>/<split>/manifest.json`` (raises ManifestError / OpenError)."""
    url = join(root, split, MANIFEST_NAME)
    raw = read_bytes(url)
    manifest = Manifest.from_json(raw, url)
    source_type, source = _source(url)
    schema = {"mlflow_colspec": [{"name": key, "type": "string" if key == "json" else "binary"}
                                 for key in manifest.keys]}
    profile = {"num_samples": manifest.num_samples, "num_shards": len(manifest.shards),
               "schema_version": manifest.schema_version, "built_from": manifest.source.get("dataset", "")}
    return {"name": f"{name}/{split}", "digest": hashlib.sha256(raw).hexdigest()[:DIGEST_CHARS],
            "source_type": source_type, "source": source, "schema": json.dumps(schema),
            "profile": json.dumps(profile), "context": context}


def manifest_inputs(data_cfg: Any) -> list[dict[str, Any]]:
    """The dataset inputs of every split a run config's ``data`` section names (once per split).

    A manifest that cannot be read is left out with a logged warning naming it: the data loader
    reports the same problem with its own clear error when it matters for training."""
    out, seen = [], set()
    for field_name, context in CONTEXTS.items():
        split = getattr(data_cfg, field_name, None)
        if not split or split in seen:
            continue
        seen.add(split)
        try:
            out.append(manifest_input(str(data_cfg.root), str(split), str(data_cfg.name), context))
        except (ManifestError, OpenError) as e:
            log.warning("dataset input of split %r not logged: %s", split, e)
    return out
