"""Compact shards, writing side: each distinct frame image is stored once per shard.

Video datasets (KITTI) make every frame the target of one sample, t-1 / t+1 of two others and
the other stereo view of one more, so plain shards store each image about four times. A
compact shard stores, for every sample, a record of its own members (``json``, ``depth.png``,
...) as in a plain shard, then, after all records, each distinct frame once as a member
``<frame name>.png`` (``.jpg``; sorted by name). The manifest (format ``geoprime-shards/2``) lists the
frames (name, data offset, size, crc32) and per sample the frame index of each image slot
(``schema.IMAGE_KEYS``); readers (:mod:`data_shards.frames`) assemble exactly the plain sample.

Samples say which frame each image is with ``sample["__frames__"] = {"rgb": name, ...}``:
one name per image the sample has. The same name must always carry the same pixels (checked).
The plan (exactly-once, resume) is unchanged: its unit is still one sample.
"""
from __future__ import annotations

import hashlib
import re
import tempfile
from typing import Any

import numpy as np

from data_shards import schema
from data_shards.manifest import member_crc32
from data_shards.shard_file import TAR_BLOCK, ShardFile, WriteError

IMAGE_NAMES = schema.IMAGE_NAMES  # rgb, rgb_prev, rgb_next, rgb_right
_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")


def _pixels_digest(img: np.ndarray) -> str:
    """Identity of an image's pixels (shape + bytes): cheaper than encoding it again."""
    a = np.ascontiguousarray(img)
    return hashlib.sha256(repr((a.dtype.str, a.shape)).encode() + a.tobytes()).hexdigest()


class CompactShardFile(ShardFile):
    """A shard whose samples share frame images: records first, then each frame once."""

    def __init__(self, split_dir: str, name: str, images: schema.ImageEncoding = schema.PNG):
        super().__init__(split_dir, name, images)
        # An integer mtime: tarfile writes a float one (the plain writer's 0.0) as a 1 KiB PAX header per member.
        self._tar.mtime = 0
        self._spool = tempfile.TemporaryFile(dir=split_dir)  # frames wait here until the records are written
        self._frames: dict[str, tuple[int, int, str]] = {}  # name -> (spool offset, size, pixels digest)
        self._names: list[dict[str, str]] = []  # per sample: image member -> frame name

    def add(self, sample: dict[str, Any]) -> None:
        """Encode the sample's own members as a record; store its images as frames (once)."""
        key = sample.get("__key__")
        frames = sample.get("__frames__")
        images = [n for n in IMAGE_NAMES if n in sample]
        if not isinstance(frames, dict) or any(n not in frames for n in images):
            raise WriteError(f"{self.path}: sample {key}: a compact shard needs sample['__frames__'] naming the "
                             f"frame of each image {images}, got {frames!r}")
        enc = schema.encode_sample({k: v for k, v in sample.items() if k not in IMAGE_NAMES})
        names = {f"{n}.{self.images.ext}": self._store(str(frames[n]), sample[n], enc["__key__"], n) for n in images}
        self._append(enc, sample["meta"].keys(), more_keys=names)
        self._names.append(names)

    def _store(self, name: str, img: Any, key: str, slot: str) -> str:
        """Spool frame ``name`` the first time it is seen; later uses must have the same pixels."""
        if not _SAFE.match(name):
            raise WriteError(f"{self.path}: sample {key}: frame name {name!r} for {slot} must match [A-Za-z0-9_-]+")
        img = np.asarray(img)
        digest = _pixels_digest(img)
        if name in self._frames:
            if self._frames[name][2] != digest:
                raise WriteError(f"{self.path}: sample {key}: frame {name} ({slot}) has other pixels than where it "
                                 f"was first stored: the source is not deterministic, or two frames share a name")
            return name
        data = schema.encode_rgb(img, key, slot, self.images)
        self._spool.seek(0, 2)
        self._frames[name] = (self._spool.tell(), len(data), digest)
        self._spool.write(data)
        return name

    def finish(self):
        """Append each frame once (sorted by name) after the records, index them, then finish."""
        clash = sorted(set(self._frames) & set(self.stats.sample_keys))
        if clash:
            raise WriteError(f"{self.path}: frame names {clash[:3]} are also sample keys; they must differ")
        order = sorted(self._frames)
        index = {n: i for i, n in enumerate(order)}
        for n in order:
            off, size, _ = self._frames[n]
            self._spool.seek(off)
            data = self._spool.read(size)
            self._tar.write({"__key__": n, self.images.ext: data})
            start = self._tar.tarstream.offset - -(-size // TAR_BLOCK) * TAR_BLOCK
            self.stats.frames.append([f"{n}.{self.images.ext}", start, size, member_crc32(data)])
        self.stats.refs = [[index[names[k]] if k in names else -1 for k in self.images.keys] for names in self._names]
        self._spool.close()
        return super().finish()

    def abort(self) -> None:
        """Drop the spool and the temporary shard."""
        self._spool.close()
        super().abort()
