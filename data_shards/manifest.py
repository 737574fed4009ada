"""``manifest.json``: the per-split index of shards that writers produce and readers trust.

A split folder ``<root>/<split>/`` holds ``<split>-NNNNNN.tar`` shards and a
``manifest.json`` written last (atomically), so a manifest only ever describes whole shards.
Readers take the shard list, per-shard sample counts and common keys from it; ``verify``
checks the byte sizes and sha256 digests.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from data_shards import schema
from data_shards.atomic import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "geoprime-shards/1"


class ManifestError(ValueError):
    """A manifest is missing, unreadable or inconsistent; the message names the file/URL."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its file name (relative to the split folder), sample count, size and digest."""

    name: str
    count: int
    bytes: int
    sha256: str
    offsets: tuple[int, ...] = ()
    """Byte offset of each sample's first tar header (lets readers start mid-shard); may be empty."""
    crc32: tuple[dict[str, str], ...] = ()
    """Per sample, ``{member extension: crc32 hex}``: readers check each member they read (PIL
    does not check PNG CRCs, so a flipped bit can decode into other pixels); may be empty
    (shards built before checksums existed)."""


@dataclass
class Manifest:
    """Everything a reader needs about a split, and the identity of what produced it."""

    split: str
    shards: list[ShardInfo]
    keys: list[str]
    """Schema members (with extension, e.g. ``rgb.png``) that every sample of the split has."""
    meta_fields: list[str]
    """Top-level ``json`` meta fields that every sample has (e.g. ``K``, ``baseline_m``)."""
    source: dict[str, Any]
    """Provenance and build configuration (dataset, its config, resolution, resize policy)."""
    schema_version: int = schema.SCHEMA_VERSION
    format: str = MANIFEST_FORMAT
    writer: dict[str, Any] = field(default_factory=dict)
    """Writer settings that shaped the shards (max_count, max_size, chunking)."""

    @property
    def num_samples(self) -> int:
        """Total samples in the split."""
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys; one line per shard) so identical builds give identical manifests."""
        d = asdict(self)
        d["num_samples"] = self.num_samples
        shards = d.pop("shards")
        d["shards"] = "@SHARDS@"
        one_per_line = ",\n".join("  " + json.dumps(s, sort_keys=True, separators=(",", ":")) for s in shards)
        return json.dumps(d, indent=1, sort_keys=True).replace('"@SHARDS@"', f"[\n{one_per_line}\n ]") + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "Manifest":
        """Parse and validate a manifest; ``where`` (path or URL) is named in every error."""
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where}: not a geoprime manifest (format {d.get('format') if isinstance(d, dict) else None!r}, "
                                f"expected {MANIFEST_FORMAT!r})")
        if d.get("schema_version") not in schema.READABLE_SCHEMA_VERSIONS:
            raise ManifestError(f"{where}: schema version {d.get('schema_version')} but this code reads "
                                f"versions {', '.join(map(str, schema.READABLE_SCHEMA_VERSIONS))}; rebuild the shards")
        try:
            shards = [ShardInfo(name=str(s["name"]), count=int(s["count"]), bytes=int(s["bytes"]),
                                sha256=str(s["sha256"]), offsets=tuple(int(o) for o in s.get("offsets", ())),
                                crc32=tuple({str(k): str(v) for k, v in c.items()} for c in s.get("crc32", ())))
                      for s in d["shards"]]
            m = cls(split=str(d["split"]), shards=shards, keys=list(d["keys"]), meta_fields=list(d["meta_fields"]),
                    source=dict(d["source"]), schema_version=int(d["schema_version"]), format=d["format"],
                    writer=dict(d.get("writer", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        for s in m.shards:
            if "/" in s.name or "\\" in s.name or s.name.startswith(".") or not s.name.endswith(".tar"):
                raise ManifestError(f"{where}: shard name {s.name!r} is not a plain .tar file name")
            if s.count < 0:
                raise ManifestError(f"{where}: shard {s.name} has a negative count")
            if s.crc32 and len(s.crc32) != s.count:
                raise ManifestError(f"{where}: shard {s.name}: {len(s.crc32)} member checksums for {s.count} samples")
            if s.offsets and (len(s.offsets) != s.count or list(s.offsets) != sorted(s.offsets)
                              or s.offsets[-1] >= s.bytes):
                raise ManifestError(f"{where}: shard {s.name}: offsets do not match its {s.count} samples")
        if "num_samples" in d and int(d["num_samples"]) != m.num_samples:
            raise ManifestError(f"{where}: num_samples {d['num_samples']} != sum of shard counts {m.num_samples}")
        return m


def write_manifest(split_dir: str, manifest: Manifest) -> str:
    """Atomically write ``<split_dir>/manifest.json``; returns its path."""
    path = os.path.join(split_dir, MANIFEST_NAME)
    atomic_write_bytes(path, manifest.to_json().encode("utf-8"), fsync=True)
    return path


def member_crc32(data: bytes) -> str:
    """The checksum recorded for one tar member (crc32, 8 hex digits: cheap enough for every read)."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
