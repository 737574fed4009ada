"""The stream's stages: small generator steps, each with one job, composed by ``ShardStream``.

    read_positions  -> (position, raw | Corrupt, valid) for the wanted positions of a rank's pieces
    in_order        -> the same items in the shuffle buffer's order (reads ahead, holds a few)
    decode_all      -> decoded sample dicts or Corrupt stand-ins (checksums, schema, transform)
    batches_of      -> lists of ``size`` items, from the resume batch on
    stand_in        -> each Corrupt replaced by a copy of the last good sample, ``__valid__`` False
                       and ``__skipped__`` saying why (counted once, by whoever consumes the batch)

Like webdataset's ``filters``: plain generators over plain items, so each can be tested and
replaced alone.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

from data_shards import split as layout
from data_shards.frames import attach_frames
from data_shards.manifest import Manifest, member_crc32
from data_shards.reader import Corrupt, ShardError, iter_members

log = logging.getLogger("data_shards.stream")


def check_members(raw: dict) -> None:
    """Compare each member read with the manifest's crc32 (when the manifest has them; a compact
    shard's frames always have one); a mismatch is a :class:`ShardError` naming shard and member,
    for a shared frame also the sample and image it fills (on_corrupt decides what happens)."""
    expected = dict(raw.get("__crc32__") or {})
    names = {}
    for ext, (frame, crc) in raw.get("__frames__", {}).items():
        expected[ext], names[ext] = crc, f"{frame} (frame used as {ext} of sample {raw['__key__']})"
    for ext, data in raw.items():
        if ext.startswith("__") or ext not in expected:
            continue
        got = member_crc32(data)
        if got != expected[ext]:
            member = names.get(ext, f"{raw['__key__']}.{ext}")
            raise ShardError(f"{raw['__url__']}: member {member}: checksum mismatch (crc32 {got}, "
                             f"manifest {expected[ext]}): the shard changed after it was written")


def read_positions(pieces: Sequence[layout.Piece], need: set[int], manifest: Manifest, urls: Sequence[str],
                   exts: frozenset[str], on_corrupt: str) -> Iterator[tuple[int, Any, bool]]:
    """(position, raw sample or Corrupt, valid) for the ``need``-ed positions of ``pieces``,
    ascending. Shards with no needed position are not opened; other members are skipped unread.
    With ``on_corrupt="skip"`` an unreadable shard's remaining positions become Corrupt.
    Compact shards: each record gets its frame images (:func:`frames.attach_frames`)."""
    pos0 = 0
    for p in pieces:
        idx = [i for i in range(len(p)) if pos0 + i in need]
        if idx:
            url, info, done = urls[p.shard], manifest.shards[p.shard], 0
            members = [p.members[i] for i in idx]
            try:
                records = iter_members(url, members, info.count, exts, info.offsets, info.bytes)
                if manifest.compact:
                    records = attach_frames(url, info, manifest.frame_slots, members, records, exts)
                for j, raw in records:
                    if info.crc32:
                        raw["__crc32__"] = info.crc32[j]
                    yield pos0 + idx[done], raw, p.valid
                    done += 1
            except ShardError as e:
                if on_corrupt == "raise":
                    raise
                for i in idx[done:]:  # the rest of this shard is unreadable: keep the positions
                    yield pos0 + i, Corrupt(url, "(rest of shard)", str(e)), p.valid
        pos0 += len(p)


def in_order(items: Iterator[tuple[int, Any, bool]], order: Sequence[int], where: str) -> Iterator[tuple[Any, bool]]:
    """``(raw, valid)`` in ``order`` from items arriving in ascending position (read ahead of
    their turn are held: at most about the shuffle buffer's size)."""
    held: dict[int, tuple[Any, bool]] = {}
    for pos in order:
        while pos not in held:
            got = next(items, None)
            if got is None:
                raise ShardError(f"{where}: shards hold fewer samples than the manifest says; "
                                 "run `python -m data_shards verify`")
            held[got[0]] = got[1:]
        yield held.pop(pos)


def decode_all(items: Iterable[tuple[Any, bool]], decode: Callable[[Any, bool], Any]) -> Iterator[Any]:
    """Each ``(raw, valid)`` through ``decode`` (which returns a sample dict or a Corrupt)."""
    for raw, valid in items:
        yield decode(raw, valid)


def batches_of(items: Iterator[Any], sizes: Sequence[int]) -> Iterator[list[Any]]:
    """Consecutive lists of ``sizes[0]``, ``sizes[1]``... items."""
    for size in sizes:
        yield [next(items) for _ in range(size)]


def stand_in(batches: Iterable[list[Any]]) -> Iterator[list[dict]]:
    """Replace each Corrupt by a copy of the last good sample (``__valid__`` False, ``__skipped__``
    naming shard, member and reason) so batch counts and shapes never change."""
    last_good: dict | None = None
    for batch in batches:
        good = [s for s in batch if not isinstance(s, Corrupt)]
        if good:
            last_good = good[-1]
        out = []
        for s in batch:
            if isinstance(s, Corrupt):
                if last_good is None:
                    raise ShardError(f"{s} (and no good sample seen yet to stand in for it)")
                log.warning("skipping corrupt sample (on_corrupt='skip'): %s", s)
                s = {**last_good, "__valid__": False, "__skipped__": str(s)}
            out.append(s)
        yield out
