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
from typing import Any, NamedTuple

from data_shards import schema
from data_shards.atomic import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "geoprime-shards/1"
COMPACT_FORMAT = "geoprime-shards/2"
"""Manifests of compact shards (frames stored once, samples refer to them); older readers refuse
them by this name instead of reading samples without their images."""
READABLE_FORMATS = (MANIFEST_FORMAT, COMPACT_FORMAT)


class ManifestError(ValueError):
    """A manifest is missing, unreadable or inconsistent; the message names the file/URL."""


class FrameInfo(NamedTuple):
    """One frame image stored once in a compact shard (JSON: ``[name, offset, size, crc32]``)."""

    name: str
    """Tar member name, ``<frame key>.png`` (``.jpg`` in a split of JPEG frames)."""
    offset: int
    """Byte offset of the member's *data* in the shard (its tar header is just before)."""
    size: int
    crc32: str


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
    frames: tuple[FrameInfo, ...] = ()
    """Compact shards only: the frame images stored once after the sample records, by ascending offset."""
    refs: tuple[tuple[int, ...], ...] = ()
    """Compact shards only: per sample, the index into ``frames`` of each of the manifest's
    ``frame_slots`` (-1: the sample has no such image)."""


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
    frame_slots: list[str] = field(default_factory=list)
    """Compact splits only: the image members (``rgb.png``, ...) that samples take from shared
    frames, in the order of each shard's ``refs``; empty for plain splits."""

    @property
    def compact(self) -> bool:
        """True when images are stored once per shard as frames and assembled when read."""
        return bool(self.frame_slots)

    @property
    def num_samples(self) -> int:
        """Total samples in the split."""
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys; one line per shard) so identical builds give identical manifests."""
        d = asdict(self)
        d["num_samples"] = self.num_samples
        shards = d.pop("shards")
        if not self.compact:  # plain manifests stay byte-identical to those of earlier builds
            d.pop("frame_slots")
            for s in shards:
                s.pop("frames"), s.pop("refs")
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
        if not isinstance(d, dict) or d.get("format") not in READABLE_FORMATS:
            raise ManifestError(f"{where}: not a geoprime manifest (format {d.get('format') if isinstance(d, dict) else None!r}, "
                                f"expected one of {', '.join(map(repr, READABLE_FORMATS))})")
        if d.get("schema_version") not in schema.READABLE_SCHEMA_VERSIONS:
            raise ManifestError(f"{where}: schema version {d.get('schema_version')} but this code reads "
                                f"versions {', '.join(map(str, schema.READABLE_SCHEMA_VERSIONS))}; rebuild the shards")
        try:
            shards = [_shard_from_json(s) for s in d["shards"]]
            m = cls(split=str(d["split"]), shards=shards, keys=list(d["keys"]), meta_fields=list(d["meta_fields"]),
                    source=dict(d["source"]), schema_version=int(d["schema_version"]), format=d["format"],
                    writer=dict(d.get("writer", {})), frame_slots=[str(x) for x in d.get("frame_slots", [])])
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        for s in m.shards:
            _check_shard(where, s)
        _check_frames(where, m)
        if "num_samples" in d and int(d["num_samples"]) != m.num_samples:
            raise ManifestError(f"{where}: num_samples {d['num_samples']} != sum of shard counts {m.num_samples}")
        return m


def _shard_from_json(s: dict) -> ShardInfo:
    return ShardInfo(name=str(s["name"]), count=int(s["count"]), bytes=int(s["bytes"]), sha256=str(s["sha256"]),
                     offsets=tuple(int(o) for o in s.get("offsets", ())),
                     crc32=tuple({str(k): str(v) for k, v in c.items()} for c in s.get("crc32", ())),
                     frames=tuple(FrameInfo(str(n), int(o), int(z), str(c)) for n, o, z, c in s.get("frames", ())),
                     refs=tuple(tuple(int(i) for i in r) for r in s.get("refs", ())))


def _check_shard(where: str, s: ShardInfo) -> None:
    """A shard entry's own consistency: plain file name, counts, checksums and offsets per sample."""
    if "/" in s.name or "\\" in s.name or s.name.startswith(".") or not s.name.endswith(".tar"):
        raise ManifestError(f"{where}: shard name {s.name!r} is not a plain .tar file name")
    if s.count < 0:
        raise ManifestError(f"{where}: shard {s.name} has a negative count")
    if s.crc32 and len(s.crc32) != s.count:
        raise ManifestError(f"{where}: shard {s.name}: {len(s.crc32)} member checksums for {s.count} samples")
    if s.offsets and (len(s.offsets) != s.count or list(s.offsets) != sorted(s.offsets)
                      or s.offsets[-1] >= s.bytes):
        raise ManifestError(f"{where}: shard {s.name}: offsets do not match its {s.count} samples")


def _check_frames(where: str, m: Manifest) -> None:
    """Compact manifests: the format says so, every reference resolves to a frame of its shard,
    and frames lie after the sample records, ascending, inside the shard."""
    if m.compact != (m.format == COMPACT_FORMAT):
        raise ManifestError(f"{where}: format {m.format!r} but frame_slots {m.frame_slots}: a compact manifest "
                            f"has both {COMPACT_FORMAT!r} and frame slots, a plain one neither")
    if len(set(m.frame_slots)) != len(m.frame_slots) or not any(set(m.frame_slots) <= set(keys) for keys in
                                                                 (schema.IMAGE_KEYS, schema.JPEG_IMAGE_KEYS)):
        raise ManifestError(f"{where}: frame_slots {m.frame_slots} must be distinct image members of "
                            f"{', '.join(schema.IMAGE_KEYS)} (or {', '.join(schema.JPEG_IMAGE_KEYS)})")
    for s in m.shards:
        if not m.compact:
            if s.frames or s.refs:
                raise ManifestError(f"{where}: shard {s.name}: frames/refs in a plain (non-compact) manifest")
            continue
        if len(s.refs) != s.count or not s.offsets:
            raise ManifestError(f"{where}: shard {s.name}: {len(s.refs)} frame references and "
                                f"{len(s.offsets)} offsets for {s.count} samples")
        for j, r in enumerate(s.refs):
            if len(r) != len(m.frame_slots) or not all(-1 <= i < len(s.frames) for i in r):
                raise ManifestError(f"{where}: shard {s.name}: sample {j} refers to frames {list(r)}, but the "
                                    f"shard has {len(s.frames)} frames and {len(m.frame_slots)} slots")
        ends = [s.offsets[-1]] + [f.offset + f.size for f in s.frames]
        for f, end in zip(s.frames, ends):
            if f.offset <= end or f.offset + f.size > s.bytes or f.size < 0:
                raise ManifestError(f"{where}: shard {s.name}: frame {f.name} at {f.offset}+{f.size} is not after "
                                    f"the previous member or not inside the shard ({s.bytes} bytes)")


def write_manifest(split_dir: str, manifest: Manifest) -> str:
    """Atomically write ``<split_dir>/manifest.json``; returns its path."""
    path = os.path.join(split_dir, MANIFEST_NAME)
    atomic_write_bytes(path, manifest.to_json().encode("utf-8"), fsync=True)
    return path


def member_crc32(data: bytes) -> str:
    """The checksum recorded for one tar member (crc32, 8 hex digits: cheap enough for every read)."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
