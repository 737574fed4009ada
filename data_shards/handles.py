"""A consumer's open shard handles: a bounded pool, least recently used closed first, with counters.

A consumer reads hundreds of lanes at once (each a run of one shard), so it cannot keep a file or
HTTP/S3 stream open per lane. Local shards get one handle per shard, which seeks anywhere. Remote
shards get one stream per (shard, reader key) (a lane's records, or its frames), read forward: a
read a little ahead of the stream reads through the gap, anything else opens a new range request.
Every byte fetched is counted (:class:`ReadStats`), so read amplification can be measured.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import IO, Hashable

from data_shards.openers import is_remote
from data_shards.reader import ShardError, open_at

READ_THROUGH = 1 << 20
"""A remote stream reads through a gap of up to this many bytes instead of a new range request."""
DEFAULT_OPEN_HANDLES = 64


@dataclass
class ReadStats:
    """What one consumer fetched and holds: bytes (gaps read through included), opens, frames."""

    bytes_read: int = 0
    opens: int = 0
    frames_read: int = 0
    frame_bytes_read: int = 0
    held_frames: int = 0
    held_bytes: int = 0
    peak_held_frames: int = 0
    peak_held_bytes: int = 0

    def hold(self, nbytes: int) -> None:
        """A frame read ahead of (some of) its uses is kept."""
        self.held_frames += 1
        self.held_bytes += nbytes
        self.peak_held_frames = max(self.peak_held_frames, self.held_frames)
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)

    def release(self, nbytes: int) -> None:
        """A held frame was used for the last time (or its reader closed)."""
        self.held_frames -= 1
        self.held_bytes -= nbytes


class _Handle:
    def __init__(self, f: IO[bytes], pos: int, end: int | None):
        self.f, self.pos, self.end = f, pos, end


class HandlePool:
    """At most ``limit`` open shard handles of one consumer (see the module docstring)."""

    def __init__(self, limit: int = DEFAULT_OPEN_HANDLES, stats: ReadStats | None = None):
        if limit < 1:
            raise ValueError(f"limit={limit}: a consumer needs at least one open handle")
        self.limit = limit
        self.stats = stats or ReadStats()
        self._open: OrderedDict[Hashable, _Handle] = OrderedDict()

    def read(self, url: str, key: Hashable, start: int, size: int, shard_bytes: int | None,
             end: int | None = None) -> bytes:
        """``size`` bytes of ``url`` from ``start``. ``key`` names the remote stream to continue;
        ``end`` bounds a new remote range request (the reader's furthest byte in this shard)."""
        remote = is_remote(url)
        slot = (url, key) if remote else url
        h = self._open.pop(slot, None)
        if h is not None and remote and not (h.pos <= start <= h.pos + READ_THROUGH
                                             and (h.end is None or start + size <= h.end)):
            h.f.close()
            h = None
        if h is None:
            stop = max(end or 0, start + size) if remote else None
            h = _Handle(open_at(url, start, shard_bytes, stop), start, stop)
            self.stats.opens += 1
        self._open[slot] = h
        while len(self._open) > self.limit:
            self._open.popitem(last=False)[1].f.close()
        return self._read(url, h, start, size)

    def _read(self, url: str, h: _Handle, start: int, size: int) -> bytes:
        try:
            if h.pos != start:
                if is_remote(url):  # a short gap: read through it
                    self.stats.bytes_read += len(_read_exact(h.f, start - h.pos, url, h.pos))
                else:
                    h.f.seek(start)
            data = _read_exact(h.f, size, url, start)
        except ShardError:
            self._drop(h)
            raise
        except (OSError, ValueError) as e:
            self._drop(h)
            raise ShardError(f"{url}: read failed at byte {start} ({type(e).__name__}: {e})") from None
        h.pos = start + size
        self.stats.bytes_read += size
        return data

    def _drop(self, h: _Handle) -> None:
        for slot, other in list(self._open.items()):
            if other is h:
                del self._open[slot]
        h.f.close()

    def close(self) -> None:
        """Close every open handle."""
        while self._open:
            self._open.popitem()[1].f.close()

    def view(self, url: str, key: Hashable, start: int, end: int, shard_bytes: int | None,
             stream_end: int | None = None) -> "RangeView":
        """A file-like view of bytes ``[start, end)`` of ``url``, read through this pool on demand."""
        return RangeView(self, url, key, start, end, shard_bytes, stream_end)


class RangeView:
    """Bytes ``[start, end)`` of a shard as a read-only file (``read``, ``seek``, ``tell``: what
    ``tarfile`` needs), each read fetched through the pool: members nobody wants are never read
    (skipped by a seek locally, read through remotely); past ``end`` it reads as end of file."""

    def __init__(self, pool: HandlePool, url: str, key: Hashable, start: int, end: int,
                 shard_bytes: int | None, stream_end: int | None):
        self.pool, self.url, self.key, self.shard_bytes = pool, url, key, shard_bytes
        self.pos, self.end, self.stream_end = start, end, stream_end

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.end + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n is None or n < 0 else min(n, self.end - self.pos)
        if n <= 0:
            return b""
        data = self.pool.read(self.url, self.key, self.pos, n, self.shard_bytes, self.stream_end)
        self.pos += n
        return data


def _read_exact(f: IO[bytes], n: int, url: str, start: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            raise ShardError(f"{url}: truncated: ends {left} bytes short of byte {start + n}")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
