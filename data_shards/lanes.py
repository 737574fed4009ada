"""Reading a consumer's samples lane by lane: each lane front to back, each byte once.

A consumer (one rank, one DataLoader worker) is dealt positions of the epoch's order
(:mod:`data_shards.deal`); they fall into *groups*: the positions of one lane it reads (its own
lanes, or the few samples of another rank's lane a step moved to it, or padding). Within a group
the samples ascend in the base sequence, so a group is read forward: each sample's wanted members
from its byte range (the manifest's offsets; other members are skipped unread), and for compact
shards each frame once, held from its first to its last use within the group. Handles come from
the consumer's bounded
:class:`~data_shards.handles.HandlePool`; unreadable samples become :class:`Corrupt` under
``on_corrupt="skip"``.
"""
from __future__ import annotations

from itertools import groupby
from typing import Any, Hashable, Iterator, Sequence

from data_shards.frames import FrameCursor, drop_frames, fill_frames, frame_uses, slots_wanted
from data_shards.handles import HandlePool
from data_shards.manifest import Manifest
from data_shards.reader import Corrupt, ShardError, parse_record, record_span


class LaneReader:
    """The next raw sample of each group, on demand (:meth:`next`); groups are planned up front."""

    def __init__(self, manifest: Manifest, urls: Sequence[str], exts: frozenset[str], on_corrupt: str,
                 pool: HandlePool, groups: dict[Hashable, list[tuple[int, int]]]):
        self.manifest, self.urls, self.exts, self.on_corrupt, self.pool = manifest, urls, exts, on_corrupt, pool
        self.wanted = slots_wanted(manifest.frame_slots, exts) if manifest.compact else []
        self.plans = groups
        self.live: dict[Hashable, Iterator[Any]] = {}

    def next(self, group: Hashable) -> dict | Corrupt:
        """The group's next raw sample (a dict of member bytes) or, under ``skip``, a Corrupt."""
        it = self.live.get(group)
        if it is None:
            it = self.live[group] = self._group(group, self.plans.pop(group))
        try:
            return next(it)
        except StopIteration:
            raise ShardError(f"group {group}: asked for more samples than planned") from None

    def close(self) -> None:
        """Drop every group's held frames and close the handles."""
        for it in self.live.values():
            it.close()
        self.live.clear()
        self.pool.close()

    def _group(self, group: Hashable, items: list[tuple[int, int]]) -> Iterator[dict | Corrupt]:
        for shard, run in groupby(items, key=lambda sm: sm[0]):
            yield from self._run(group, shard, [m for _, m in run])

    def _run(self, group: Hashable, s: int, members: list[int]) -> Iterator[dict | Corrupt]:
        """One shard's samples of a group, in order: records forward, frames forward."""
        url, info = self.urls[s], self.manifest.shards[s]
        records_end = record_span(info, members[-1])[1]
        cursor = None
        if self.manifest.compact:
            uses = frame_uses(info, self.wanted, members)
            frames_end = max((info.frames[i].offset + info.frames[i].size for i in uses), default=None)

            def fetch(offset: int, size: int) -> bytes:
                return self.pool.read(url, (group, "frames"), offset, size, info.bytes, frames_end)

            cursor = FrameCursor(url, info, uses, fetch, self.pool.stats)
        try:
            for j in members:
                yield self._sample(group, url, s, j, records_end, cursor)
        finally:
            if cursor is not None:
                cursor.close()

    def _sample(self, group: Hashable, url: str, s: int, j: int, records_end: int,
                cursor: FrameCursor | None) -> dict | Corrupt:
        info = self.manifest.shards[s]
        filled = False
        try:
            a, b = record_span(info, j)
            raw = parse_record(url, self.pool.view(url, (group, "records"), a, b, info.bytes, records_end), self.exts)
            if info.crc32:
                raw["__crc32__"] = info.crc32[j]
            if cursor is not None:
                filled = True  # fill_frames forgets the slots it cannot fill itself
                fill_frames(cursor, info, self.wanted, j, raw)
            return raw
        except ShardError as e:
            if cursor is not None and not filled:
                drop_frames(cursor, info, self.wanted, j)
            if self.on_corrupt == "raise":
                raise
            return Corrupt(url, f"#{j} (sample {j} of the shard)", str(e))
