"""Compact shards, reading side: give each sample record its frame images back.

A compact shard (:mod:`data_shards.compact`) stores each frame once after the sample records;
the manifest says where (data offset, size, crc32) and which frame fills which image slot of
each sample. A :class:`FrameCursor` reads the frames a run of samples needs in offset order,
each once, and holds one read ahead of its turn only until its last use: the stream's lanes
(:mod:`data_shards.lanes`) fetch through their handle pool, ``verify`` (:func:`attach_frames`)
from one forward open of the shard. The raw sample is then exactly a plain shard's, plus
``__frames__`` (member name and crc32 of each frame used), so the checksum check names the frame
member and ``on_corrupt`` applies per sample.
"""
from __future__ import annotations

import tarfile
from collections import Counter
from typing import IO, Callable, Iterable, Iterator, Sequence

from webdataset.tariterators import base_plus_ext

from data_shards.handles import ReadStats
from data_shards.manifest import ShardInfo
from data_shards.openers import is_remote
from data_shards.reader import ShardError, open_at


def _skip(f: IO[bytes], n: int) -> None:
    """Move ``n`` bytes forward: seek when the stream can, read and discard otherwise."""
    if n <= 0:
        return
    seekable = getattr(f, "seekable", None)
    try:
        if seekable is not None and seekable():
            f.seek(n, 1)
            return
    except OSError:
        pass
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"ended {n} bytes early")
        n -= len(chunk)


class SequentialFetch:
    """Frame bytes from one open of the shard, read forward (seeking locally, reading through remotely)."""

    def __init__(self, url: str, shard_bytes: int | None):
        self.url, self.shard_bytes = url, shard_bytes
        self.f: IO[bytes] | None = None
        self.pos = 0

    def __call__(self, offset: int, size: int) -> bytes:
        if self.f is None:
            self.f, self.pos = open_at(self.url, offset, self.shard_bytes), offset
        _skip(self.f, offset - self.pos)
        data = self.f.read(size)
        self.pos = offset + len(data)
        return data

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class FrameCursor:
    """Reads the frames ``uses`` counts (index -> uses) in offset order through ``fetch(offset,
    size)``, each once, holding one read ahead of its turn until its last use."""

    def __init__(self, url: str, info: ShardInfo, uses: Counter, fetch: Callable[[int, int], bytes],
                 stats: ReadStats | None = None):
        self.url, self.info, self.uses, self.fetch = url, info, uses, fetch
        self.stats = stats or ReadStats()
        self.order = sorted(uses)  # frames ascend by offset (checked when the manifest is loaded)
        self.next = 0
        self.held: dict[int, bytes] = {}

    def take(self, i: int) -> bytes:
        """Frame ``i``'s bytes (read ahead of their turn are held until their last use)."""
        while i not in self.held:
            while self.next < len(self.order) and self.uses[self.order[self.next]] <= 0:
                self.next += 1  # every use of it was dropped (its samples could not be read)
            if self.next >= len(self.order):
                raise ShardError(f"{self.url}: frame {self.info.frames[i].name} asked for more often than planned")
            self._read(self.order[self.next])
            self.next += 1
        return self._use(i)

    def drop(self, i: int) -> None:
        """One planned use of frame ``i`` will not happen (its sample failed before reading it)."""
        if self.uses[i] > 0 and i in self.held:
            self._use(i)
        elif self.uses[i] > 0:
            self.uses[i] -= 1

    def _use(self, i: int) -> bytes:
        self.uses[i] -= 1
        if self.uses[i] > 0:
            return self.held[i]
        data = self.held.pop(i)
        self.stats.release(len(data))
        return data

    def _read(self, i: int) -> None:
        fr = self.info.frames[i]
        try:
            data = self.fetch(fr.offset, fr.size)
        except ShardError as e:
            raise ShardError(f"{self.url}: member {fr.name}: unreadable frame ({e})") from None
        except (OSError, EOFError, ValueError) as e:
            raise ShardError(f"{self.url}: member {fr.name}: unreadable frame ({type(e).__name__}: {e})") from None
        if len(data) != fr.size:
            raise ShardError(f"{self.url}: member {fr.name}: truncated ({len(data)} of {fr.size} bytes)")
        self.stats.frames_read += 1
        self.stats.frame_bytes_read += fr.size
        self.stats.hold(fr.size)
        self.held[i] = data

    def close(self) -> None:
        """Forget the frames still held (their later uses will not come)."""
        for data in self.held.values():
            self.stats.release(len(data))
        self.held.clear()


def slots_wanted(slots: Sequence[str], exts: frozenset[str] | None) -> list[tuple[int, str]]:
    """(slot index, image member) of the frame slots that ``exts`` asks for (None: all)."""
    return [(k, ext) for k, ext in enumerate(slots) if exts is None or ext in exts]


def frame_uses(info: ShardInfo, wanted: Sequence[tuple[int, str]], members: Iterable[int]) -> Counter:
    """How often each frame is used by the samples ``members`` (only the ``wanted`` slots)."""
    return Counter(info.refs[j][k] for j in members for k, _ in wanted if info.refs[j][k] >= 0)


def fill_frames(cursor: FrameCursor, info: ShardInfo, wanted: Sequence[tuple[int, str]], j: int, raw: dict) -> dict:
    """Fill sample ``j``'s wanted image slots from its frames; ``__frames__`` = {member: (frame
    member, crc32)} so the checksum check can name the frame."""
    used = {}
    for n, (k, ext) in enumerate(wanted):
        i = info.refs[j][k]
        if i < 0:
            continue
        try:
            raw[ext] = cursor.take(i)
        except ShardError:
            drop_frames(cursor, info, wanted[n:], j)  # the slots not filled will not be asked for
            raise
        used[ext] = (info.frames[i].name, info.frames[i].crc32)
    raw["__frames__"] = used
    return raw


def drop_frames(cursor: FrameCursor, info: ShardInfo, wanted: Sequence[tuple[int, str]], j: int) -> None:
    """Sample ``j`` will not be assembled: forget its planned frame uses."""
    for k, _ in wanted:
        if info.refs[j][k] >= 0:
            cursor.drop(info.refs[j][k])


def attach_frames(url: str, info: ShardInfo, slots: Sequence[str], members: Sequence[int],
                  records: Iterable[tuple[int, dict]], exts: frozenset[str] | None = None
                  ) -> Iterator[tuple[int, dict]]:
    """``(index, raw)`` of ``records`` (the samples at the ascending indices ``members``, read
    forward: ``verify``) with their frames filled in (:func:`fill_frames`), read from one open of
    the shard. A frame that cannot be read raises :class:`ShardError` naming shard and member."""
    wanted = slots_wanted(slots, exts)
    fetch = SequentialFetch(url, info.bytes)
    cursor = FrameCursor(url, info, frame_uses(info, wanted, members), fetch)
    try:
        for j, raw in records:
            yield j, fill_frames(cursor, info, wanted, j, raw)
    finally:
        cursor.close()
        fetch.close()


def layout_problems(url: str, info: ShardInfo) -> list[str]:
    """Check that a compact shard holds, after its last sample record, exactly the manifest's
    frames (name, data offset, size) and nothing else, and that every frame is used; one line
    per problem, naming shard and member (reads only headers from the last record on)."""
    start = info.offsets[-1]
    found: list[tuple[str, int, int]] = []
    remote = is_remote(url)
    base = start if remote else 0  # a seekable file's tar offsets count from the file's start, a stream's from here
    try:
        f = open_at(url, start, info.bytes)
        try:
            with tarfile.open(fileobj=f, mode="r|" if remote else "r:") as tar:
                for m in tar:
                    found.append((m.name, base + m.offset_data, m.size))
        finally:
            f.close()
    except (ShardError, tarfile.TarError, OSError, EOFError) as e:
        return [f"{url}: frames section unreadable ({type(e).__name__}: {e})"]
    last_key = base_plus_ext(found[0][0])[0] if found else None
    tail = {t for t in found if base_plus_ext(t[0])[0] != last_key}
    expected = {(fr.name, fr.offset, fr.size) for fr in info.frames}
    problems = [f"{url}: member {name} at {off}: not a frame the manifest lists at that place"
                for name, off, size in sorted(tail - expected, key=lambda t: t[1])]
    problems += [f"{url}: member {name}: listed in the manifest (offset {off}, {size} bytes) but not in the shard"
                 for name, off, size in sorted(expected - tail, key=lambda t: t[1])]
    used = {i for r in info.refs for i in r if i >= 0}
    problems += [f"{url}: member {fr.name}: a frame no sample uses"
                 for i, fr in enumerate(info.frames) if i not in used]
    return problems
