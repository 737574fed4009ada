"""One shard being written: a tar under a hidden temporary name, the stats its manifest entry
needs, renamed into place when whole. Used by :mod:`data_shards.writer` (plain shards) and
:mod:`data_shards.compact` (frames stored once), so neither reaches into the other."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import webdataset as wds

from data_shards import schema
from data_shards.manifest import member_crc32

TAR_BLOCK = 512


class WriteError(RuntimeError):
    """A split could not be written; the message names the file or sample key."""


def sha256_file(path: str, bufsize: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def member_bytes(encoded: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a header block per member plus padded data."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for k, v in encoded.items() if k != "__key__")


@dataclass
class ShardStats:
    """What a finished shard holds: count, digest, size, and the keys / meta fields all samples share."""

    name: str
    count: int = 0
    bytes: int = 0
    sha256: str = ""
    keys: list[str] | None = None
    meta_fields: list[str] | None = None
    sample_keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    crc32: list[dict[str, str]] = field(default_factory=list)
    frames: list[list] = field(default_factory=list)
    """Compact shards: ``[name, offset, size, crc32]`` of each frame stored once (see data_shards.compact)."""
    refs: list[list[int]] = field(default_factory=list)
    """Compact shards: per sample, the frame index of each of ``schema.IMAGE_KEYS`` (-1: none)."""


def intersect(a: list[str] | None, b: Iterable[str]) -> list[str]:
    return sorted(set(b) if a is None else set(a) & set(b))


class ShardFile:
    """One shard being written to a temporary name; :meth:`finish` renames it into place."""

    def __init__(self, split_dir: str, name: str, images: schema.ImageEncoding = schema.PNG):
        self.images = images
        self.path = os.path.join(split_dir, name)
        self.tmp = os.path.join(split_dir, f".{name}.tmp-{os.getpid()}")
        self.stats = ShardStats(name)
        self._file = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._file, user="geoprime", group="geoprime", mode=0o444, mtime=0.0,
                                  encoder=False)
        self.size = 2 * TAR_BLOCK

    def add(self, sample: dict[str, Any]) -> None:
        """Encode and append one sample."""
        self._append(schema.encode_sample(sample, self.images), sample["meta"].keys())

    def _append(self, enc: dict[str, Any], meta_fields: Iterable[str], more_keys: Iterable[str] = ()) -> None:
        """Append one encoded sample record and account for it (``more_keys``: members the sample
        has that are stored elsewhere in the shard, e.g. a compact shard's shared frames)."""
        st = self.stats
        st.offsets.append(self._tar.tarstream.offset)
        st.crc32.append({k: member_crc32(v) for k, v in enc.items() if k != "__key__"})
        self._tar.write(enc)
        st.count += 1
        st.sample_keys.append(enc["__key__"])
        st.keys = intersect(st.keys, [k for k in enc if k != "__key__"] + list(more_keys))
        st.meta_fields = intersect(st.meta_fields, meta_fields)
        self.size += member_bytes(enc)

    def finish(self) -> ShardStats:
        """Close, fsync and move into place; an identical finished shard is kept untouched."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        st = self.stats
        st.sha256 = sha256_file(self.tmp)
        st.bytes = os.path.getsize(self.tmp)
        if os.path.exists(self.path) and os.path.getsize(self.path) == st.bytes and sha256_file(self.path) == st.sha256:
            os.remove(self.tmp)
        else:
            os.replace(self.tmp, self.path)
        return st

    def abort(self) -> None:
        """Drop the temporary file (on error)."""
        # The shard is discarded: mark tarfile's stream closed so that its finaliser does not try
        # to write the end-of-archive blocks into the file we close here.
        self._tar.tarstream.closed = True
        stream = getattr(self._tar.tarstream, "fileobj", None)
        if stream is not None and hasattr(stream, "closed"):
            stream.closed = True
        try:
            self._file.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
