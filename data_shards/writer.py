"""Write a split as deterministic WebDataset tar shards plus ``manifest.json`` (written last).

Two entry points:

* :func:`write_split` streams an iterable of samples into shards, closing a shard once it
  holds ``max_count`` samples or reaches ``max_size`` bytes (for any in-order sample source).
* :func:`write_split_parallel` writes one shard per *chunk* (a callable producing samples),
  in parallel processes, and resumes an interrupted build by skipping chunks whose shard is
  already finished (the real-data converters and ``build synthetic``, one chunk per
  sequence, use it).

Both encode with ``schema.encode_sample`` and webdataset's ``TarWriter`` with fixed mtime,
owner and mode, so the same input gives byte-identical shards. Every shard is written to a
hidden temporary name and renamed when whole; the manifest is written atomically after all
shards, and removed before a rebuild starts, so a manifest never describes half a build.
A re-run whose ``source`` and writer settings match a complete, intact manifest does nothing.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from typing import Callable, Iterable, Sequence

from tqdm import tqdm

from data_shards import schema
from data_shards.atomic import atomic_write_bytes
from data_shards.compact import CompactShardFile
from data_shards.manifest import (COMPACT_FORMAT, MANIFEST_FORMAT, MANIFEST_NAME, FrameInfo, Manifest, ManifestError,
                                  ShardInfo, write_manifest)
from data_shards.shard_file import ShardFile, ShardStats, WriteError, intersect, sha256_file  # noqa: F401 (WriteError: API)

DEFAULT_MAX_COUNT = 256
DEFAULT_MAX_SIZE = 256 * 2**20
_PROGRESS_DIR = ".progress"


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def _remove_leftovers(split_dir: str) -> None:
    """Delete temporary files of interrupted writes (never taken for whole shards)."""
    for p in glob.glob(os.path.join(split_dir, ".*.tmp-*")) + glob.glob(os.path.join(split_dir, _PROGRESS_DIR, ".*.tmp-*")):
        os.remove(p)


def _existing_complete(split_dir: str, split: str, source: dict, writer: dict) -> Manifest | None:
    """The existing manifest if it was built from the same source/settings and its shards are intact."""
    path = os.path.join(split_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            m = Manifest.from_json(f.read(), path)
    except ManifestError:
        return None
    if m.split != split or _canon(m.source) != _canon(source) or _canon(m.writer) != _canon(writer):
        return None
    for s in m.shards:
        p = os.path.join(split_dir, s.name)
        if not os.path.exists(p) or os.path.getsize(p) != s.bytes or sha256_file(p) != s.sha256:
            return None
    return m


def _canon(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _finalize(split_dir: str, split: str, stats: list[ShardStats], source: dict, writer: dict) -> Manifest:
    """Check keys are unique, drop stale shards, and write the manifest last."""
    seen: dict[str, str] = {}
    for st in stats:
        for k in st.sample_keys:
            if k in seen:
                raise WriteError(f"{split_dir}: sample key {k!r} appears twice (shards {seen[k]} and {st.name})")
            seen[k] = st.name
    stats = [st for st in stats if st.count > 0]
    if not stats:
        raise WriteError(f"{split_dir}: no samples were written for split {split!r}")
    keep = {st.name for st in stats}
    for p in glob.glob(os.path.join(split_dir, f"{split}-*.tar")):
        if os.path.basename(p) not in keep:
            os.remove(p)
    keys = meta = None
    for st in stats:
        keys, meta = intersect(keys, st.keys or []), intersect(meta, st.meta_fields or [])
    compact = writer.get("layout") == "compact"
    shards = [ShardInfo(st.name, st.count, st.bytes, st.sha256, tuple(st.offsets), tuple(st.crc32),
                        frames=tuple(FrameInfo(*f) for f in st.frames), refs=tuple(tuple(r) for r in st.refs))
              for st in stats]
    m = Manifest(split=split, shards=shards, keys=keys or [], meta_fields=meta or [], source=json.loads(_canon(source)),
                 writer=writer, format=COMPACT_FORMAT if compact else MANIFEST_FORMAT,
                 frame_slots=list(_encoding(writer).keys) if compact else [])
    write_manifest(split_dir, m)
    return m


def _encoding(writer: dict) -> schema.ImageEncoding:
    """The image encoding a build's writer settings name (``images``; absent: PNG)."""
    images = writer.get("images")
    return schema.ImageEncoding(images["format"], images["quality"]) if images else schema.PNG


def _writer_settings(settings: dict, images: schema.ImageEncoding) -> dict:
    """The manifest's ``writer`` record; PNG builds keep the record (and bytes) they always had."""
    return settings if images == schema.PNG else {**settings, "images": images.describe()}


def _start(out_dir: str, split: str, source: dict, writer: dict) -> tuple[str, Manifest | None]:
    if not split or any(c in split for c in "/\\. "):
        raise WriteError(f"split name {split!r}: must be a plain name")
    if not isinstance(source, dict):
        raise WriteError(f"source must be a dict describing the input, got {type(source).__name__}")
    split_dir = os.path.join(out_dir, split)
    os.makedirs(split_dir, exist_ok=True)
    _remove_leftovers(split_dir)
    done = _existing_complete(split_dir, split, source, writer)
    if done is None and os.path.exists(os.path.join(split_dir, MANIFEST_NAME)):
        os.remove(os.path.join(split_dir, MANIFEST_NAME))  # rebuilding: never leave a stale manifest
    return split_dir, done


def write_split(samples: Iterable[dict], out_dir: str, split: str, *, source: dict,
                max_count: int = DEFAULT_MAX_COUNT, max_size: int = DEFAULT_MAX_SIZE,
                progress: bool = True, total: int | None = None, images: schema.ImageEncoding = schema.PNG) -> Manifest:
    """Write ``samples`` (``schema.encode_sample`` inputs) as ``<out_dir>/<split>/`` shards, RGB
    frames as ``images`` says.

    ``source`` identifies the input (dataset name, its config, resolution, resize policy):
    if a complete, intact manifest with the same ``source`` and limits exists, nothing is
    read or written and that manifest is returned. ``total`` sizes the progress bar.
    """
    if max_count < 1 or max_size < 1:
        raise WriteError(f"max_count={max_count} and max_size={max_size} must be >= 1")
    writer = _writer_settings({"mode": "stream", "max_count": max_count, "max_size": max_size}, images)
    split_dir, done = _start(out_dir, split, source, writer)
    if done is not None:
        return done
    stats: list[ShardStats] = []
    shard: ShardFile | None = None
    bar = tqdm(total=total, desc=f"write {split}", unit="sample", disable=not progress)
    try:
        for sample in samples:
            if shard is None:
                shard = ShardFile(split_dir, shard_name(split, len(stats)), images)
            shard.add(sample)
            bar.update(1)
            if shard.stats.count >= max_count or shard.size >= max_size:
                stats.append(shard.finish())
                shard = None
        if shard is not None:
            stats.append(shard.finish())
            shard = None
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    finally:
        bar.close()
    return _finalize(split_dir, split, stats, source, writer)


def _chunk_fingerprint(source: dict, n_chunks: int, index: int) -> str:
    return hashlib.sha256(_canon({"source": source, "n_chunks": n_chunks, "index": index,
                                  "schema": schema.SCHEMA_VERSION}).encode()).hexdigest()


def _write_chunk(split_dir: str, name: str, make_samples: Callable[[], Iterable[dict]], fingerprint: str,
                 compact: bool = False, images: schema.ImageEncoding = schema.PNG) -> ShardStats:
    """Write one chunk's shard (compact: frames stored once, :mod:`data_shards.compact`), then its
    completion record (in ``.progress/``)."""
    if compact:
        shard: ShardFile = CompactShardFile(split_dir, name, images)
    else:
        shard = ShardFile(split_dir, name, images)
    try:
        for sample in make_samples():
            shard.add(sample)
    except BaseException:
        shard.abort()
        raise
    if shard.stats.count == 0:
        shard.abort()
        st = shard.stats
    else:
        st = shard.finish()
    record = dict(asdict(st), fingerprint=fingerprint)
    atomic_write_bytes(os.path.join(split_dir, _PROGRESS_DIR, name + ".json"), _canon(record).encode(), fsync=True)
    return st


def _finished_chunk(split_dir: str, name: str, fingerprint: str) -> ShardStats | None:
    """The record of a finished chunk if it matches this build and its shard is intact."""
    rec_path = os.path.join(split_dir, _PROGRESS_DIR, name + ".json")
    try:
        with open(rec_path, "rb") as f:
            rec = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if rec.pop("fingerprint", None) != fingerprint:
        return None
    st = ShardStats(**rec)
    if st.count == 0:
        return st
    p = os.path.join(split_dir, name)
    if not os.path.exists(p) or os.path.getsize(p) != st.bytes or sha256_file(p) != st.sha256:
        return None
    return st


def write_split_parallel(chunks: Sequence[Callable[[], Iterable[dict]]], out_dir: str, split: str, *,
                         source: dict, workers: int = 1, progress: bool = True, compact: bool = False,
                         images: schema.ImageEncoding = schema.PNG) -> Manifest:
    """Write chunk ``i`` (a picklable zero-argument callable yielding samples) as shard ``i``.

    Chunks run in ``workers`` processes. An interrupted build resumes: a chunk whose shard
    and completion record (``<split>/.progress/<shard>.json``, matching ``source`` and the
    chunk count) are intact is not recomputed. Empty chunks give no shard. The chunking must
    be deterministic (e.g. sorted frame list cut every N frames) for resume to be sound.
    ``compact``: each distinct frame image (the samples' ``__frames__`` names) is stored once per
    shard and samples refer to it (:mod:`data_shards.compact`); readers assemble the same samples.
    ``images``: how RGB frames are stored (PNG, or JPEG at a quality; recorded in ``writer.images``).
    """
    if workers < 1:
        raise WriteError(f"workers={workers} must be >= 1")
    writer = _writer_settings({"mode": "chunks", "n_chunks": len(chunks), **({"layout": "compact"} if compact else {})},
                              images)
    split_dir, done = _start(out_dir, split, source, writer)
    if done is not None:
        return done
    os.makedirs(os.path.join(split_dir, _PROGRESS_DIR), exist_ok=True)
    names = [shard_name(split, i) for i in range(len(chunks))]
    keyed = {**source, "__layout__": "compact"} if compact else source  # a plain chunk never passes for compact
    keyed = keyed if images == schema.PNG else {**keyed, "__images__": images.describe()}
    prints = [_chunk_fingerprint(keyed, len(chunks), i) for i in range(len(chunks))]
    stats: list[ShardStats | None] = [_finished_chunk(split_dir, n, fp) for n, fp in zip(names, prints)]
    todo = [i for i, st in enumerate(stats) if st is None]
    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc=f"write {split}", unit="shard",
               disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for i in todo:
                try:
                    stats[i] = _write_chunk(split_dir, names[i], chunks[i], prints[i], compact, images)
                except Exception as e:
                    e.add_note(f"while writing chunk {i} ({names[i]}) of {split_dir}")
                    raise
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_write_chunk, split_dir, names[i], chunks[i], prints[i], compact, images): i
                           for i in todo}
                for fut in as_completed(futures):
                    i = futures[fut]
                    try:
                        stats[i] = fut.result()
                    except Exception as e:  # the converter's own error (e.g. SourceError), with where
                        e.add_note(f"while writing chunk {i} ({names[i]}) of {split_dir}")
                        raise
                    bar.update(1)
    finally:
        bar.close()
    m = _finalize(split_dir, split, [st for st in stats if st is not None], source, writer)
    for p in glob.glob(os.path.join(split_dir, _PROGRESS_DIR, "*")):
        os.remove(p)
    os.rmdir(os.path.join(split_dir, _PROGRESS_DIR))
    return m
