"""Read the raw members of chosen samples of a shard, naming shard and member on any error.

Raw samples are ``{"__key__", "__url__", "<ext>": bytes}`` dicts, grouped by webdataset's
``base_plus_ext`` rule. The stream reads one sample at a time from its byte range (the
manifest's per-sample offsets: :func:`record_span`, :func:`parse_record`); ``verify`` reads whole
shards forward (:func:`iter_members`, skipping unwanted samples without reading their bytes).
Nothing is extracted to disk; member names must be plain ``<key>.<ext>`` (no folders).
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import IO, Iterator, Sequence

from webdataset.tariterators import base_plus_ext

from data_shards import schema
from data_shards.manifest import ShardInfo
from data_shards.openers import OpenError, is_remote, open_range


class ShardError(RuntimeError):
    """A shard is unreadable, truncated or holds a bad member; names the shard URL and member."""


@dataclass
class Corrupt:
    """Stands in for a sample that could not be read (``on_corrupt="skip"``)."""

    url: str
    member: str
    reason: str

    def __str__(self) -> str:
        return f"{self.url}: member {self.member}: {self.reason}"


def _check_name(url: str, name: str) -> tuple[str, str]:
    key, ext = base_plus_ext(name)
    if key is None or "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        raise ShardError(f"{url}: member {name!r}: not a tar-safe '<key>.<ext>' name")
    return key, ext


def open_at(url: str, offset: int, shard_bytes: int | None, end: int | None = None):
    """Open ``url`` at byte ``offset`` (a remote stream ends at ``end`` when given); with
    ``shard_bytes``, refuse a shard whose size changed."""
    try:
        f, size = open_range(url, offset, end=end)
    except OpenError as e:
        raise ShardError(str(e)) from None
    if shard_bytes is not None and size is not None and size != shard_bytes:
        f.close()  # offsets from the manifest would point into the wrong place
        raise ShardError(f"{url}: {size} bytes but its manifest says {shard_bytes}: the shard changed after the "
                         f"manifest was written; run `python -m data_shards verify` or rebuild")
    return f


def _add_member(url: str, tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str, cur: dict,
                exts: frozenset[str] | None) -> None:
    """Check one member's key and add its bytes to the sample ``cur`` when ``exts`` wants it."""
    if ext not in schema.KNOWN_KEYS:
        raise ShardError(f"{url}: member {info.name}: unknown key {ext!r} "
                         f"(schema v{schema.SCHEMA_VERSION} keys: {', '.join(schema.KNOWN_KEYS)})")
    if ext in cur:
        raise ShardError(f"{url}: member {info.name}: duplicate member in sample {cur['__key__']}")
    if exts is None or ext in exts:
        data = tar.extractfile(info).read()
        if len(data) != info.size:
            raise ShardError(f"{url}: member {info.name}: truncated ({len(data)} of {info.size} bytes)")
        cur[ext] = data


def iter_members(url: str, members: Sequence[int], expected: int,
                 exts: frozenset[str] | None = None, offsets: Sequence[int] = (),
                 shard_bytes: int | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(index, raw)`` for the shard's samples at the ascending indices ``members``.

    ``expected`` is the manifest's sample count (a shorter shard is reported as truncated);
    ``exts`` limits which members are read (None: all); ``offsets`` (the manifest's byte offset
    of each sample) lets the read start at the first wanted sample, after checking that the
    shard still has the manifest's size ``shard_bytes``. Raises :class:`ShardError`.
    """
    if not members:
        return
    wanted = set(members)
    last_wanted = members[-1]
    first = members[0] if offsets else 0
    idx, cur_key, cur, last_member = first - 1, None, None, "(start of shard)"
    f = open_at(url, offsets[first] if first else 0, shard_bytes if first else None)
    try:
        tar = tarfile.open(fileobj=f, mode="r|" if is_remote(url) else "r:")
        for info in tar:
            if not info.isreg():
                continue
            key, ext = _check_name(url, info.name)
            if key != cur_key:
                if cur is not None:
                    yield idx, cur
                    cur = None
                idx += 1
                cur_key = key
                if idx > last_wanted:
                    return
                if idx in wanted:
                    cur = {"__key__": key, "__url__": url}
            last_member = info.name
            if cur is not None:
                _add_member(url, tar, info, ext, cur, exts)
        if cur is not None:
            yield idx, cur
            cur = None
        if idx + 1 < expected and last_wanted > idx:
            raise ShardError(f"{url}: truncated: ends after member {last_member} with {idx + 1} samples, "
                             f"manifest says {expected}")
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise ShardError(f"{url}: member after {last_member}: unreadable tar ({type(e).__name__}: {e})") from None
    finally:
        f.close()


def record_span(info: ShardInfo, j: int) -> tuple[int, int]:
    """Byte range holding sample ``j``'s members: up to the next sample's first header, or, for the
    last sample, up to a compact shard's first frame (its header included) or the shard's end."""
    if j + 1 < info.count:
        return info.offsets[j], info.offsets[j + 1]
    return info.offsets[j], (info.frames[0].offset if info.frames else info.bytes)


def parse_record(url: str, f: IO[bytes], exts: frozenset[str] | None) -> dict:
    """The raw sample whose members file ``f`` starts with (a member of another key, or the end of
    ``f``, ends it); only the members ``exts`` wants are read (None: all)."""
    cur: dict | None = None
    last = "(start of sample)"
    try:
        tar = tarfile.TarFile(fileobj=f, mode="r")
        for info in tar:
            if not info.isreg():
                continue
            key, ext = _check_name(url, info.name)
            if cur is None:
                cur = {"__key__": key, "__url__": url}
            elif key != cur["__key__"]:
                break
            last = info.name
            _add_member(url, tar, info, ext, cur, exts)
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise ShardError(f"{url}: member after {last}: unreadable tar ({type(e).__name__}: {e})") from None
    if cur is None:
        raise ShardError(f"{url}: no sample where the manifest's offsets put one: the shard does not match its manifest")
    return cur
