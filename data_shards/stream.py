"""The one reader every task uses: exactly-once, resumable streaming of a split's shards.

``ShardStream`` reads ``<root>/<split>/manifest.json`` (root: folder, http(s) URL or
``s3://bucket/prefix``), lays the epoch out with :mod:`data_shards.split`, reads only the
shards overlapping this consumer's range (:mod:`data_shards.reader`), shuffles with a seeded
buffer, skips already-consumed batches without reading them, decodes with
``schema.decode_sample`` (never webdataset's image decoder, which drops 16-bit depth to 8
bits), then applies the per-sample transform with a generator seeded by (seed, epoch, key).

``build_loader`` wraps it in a :class:`ResumableLoader` whose ``state_dict()`` is the number
of batches handed out in the current epoch; after ``load_state_dict`` the rest of the epoch is
exactly the unseen batches, in the uninterrupted order, for any number of workers.
"""
from __future__ import annotations

import hashlib
import logging
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards import schema
from data_shards import split as layout
from data_shards.manifest import MANIFEST_NAME, Manifest, ManifestError, member_crc32
from data_shards.openers import OpenError, join, read_bytes
from data_shards.reader import Corrupt, ShardError, iter_members

log = logging.getLogger(__name__)

#: Keys derived from the ``json`` meta: stream key -> meta field.
META_DERIVED = {"K": "K", "baseline": "baseline_m", "meta": None}


def load_manifest(root: str, split_name: str) -> Manifest:
    """Read and validate ``<root>/<split>/manifest.json``; a clear error says what to build."""
    url = join(root, split_name, MANIFEST_NAME)
    try:
        text = read_bytes(url)
    except OpenError as e:
        raise ManifestError(f"split {split_name!r}: no readable manifest ({e}); build the shards first, "
                            f"e.g. `python -m data_shards build synthetic --out {root}`") from None
    m = Manifest.from_json(text, url)
    if m.split != split_name:
        raise ManifestError(f"{url}: describes split {m.split!r}, not {split_name!r}")
    return m


def _sample_seed(seed: int, epoch: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_keys(manifest: Manifest, keys: Sequence[str] | None, split: str, root: str) -> frozenset[str]:
    """Requested sample names -> the tar member extensions to read; a name that not every sample
    of the split has is a ``KeyError`` naming the split, the key and what the manifest holds."""
    have = set(manifest.keys)
    if keys is None:
        return frozenset(have | {"json"})
    by_name: dict[str, str] = {}  # name -> member extension, the split's own where a name has two
    for k in schema.KNOWN_KEYS:
        name = k.rsplit(".", 1)[0] if k != "json" else "meta"
        if name not in by_name or k in have:
            by_name[name] = k
    exts = {"json"}
    for k in keys:
        if k in META_DERIVED:
            field = META_DERIVED[k]
            if "json" not in have or (field and field not in manifest.meta_fields):
                raise KeyError(f"split {split!r} ({root}): key {k!r} needs meta field {field!r}, "
                               f"which not every sample has (meta fields: {manifest.meta_fields})")
            continue
        if k not in by_name:
            raise KeyError(f"key {k!r} is not a schema key (known: {sorted(by_name) + ['K', 'baseline']})")
        if by_name[k] not in have:
            raise KeyError(f"split {split!r} ({root}): key {k!r} is not in every sample "
                           f"(the manifest's keys: {sorted(have)})")
        exts.add(by_name[k])
    return frozenset(exts)


def check_members(raw: dict) -> None:
    """Compare each member read with the manifest's crc32 (when the manifest has them); a
    mismatch is a :class:`ShardError` naming shard and member (on_corrupt decides what happens)."""
    expected = raw.get("__crc32__")
    if not expected:
        return
    for ext, data in raw.items():
        if ext.startswith("__") or ext not in expected:
            continue
        got = member_crc32(data)
        if got != expected[ext]:
            raise ShardError(f"{raw['__url__']}: member {raw['__key__']}.{ext}: checksum mismatch (crc32 {got}, "
                             f"manifest {expected[ext]}): the shard changed after it was written")


@dataclass(frozen=True)
class _Plan:
    """How the consumer groups its samples: set by ResumableLoader before each iteration."""

    batch_size: int = 1
    drop_last: bool = False
    num_workers: int | None = None
    """Consumers per rank; None: as many as the DataLoader running the stream has (1 in-process)."""
    start_batch: int = 0


class ShardStream(IterableDataset):
    """A split's samples for one rank: exactly once per epoch, seeded order, exact resume.

    Iterating yields decoded sample dicts (``__key__``, ``__valid__``, the requested schema
    keys without extension, ``meta``, ``K``/``baseline`` when present). See module docstring
    and ``docs/data.md`` for the tail, corrupt and resampled policies.
    """

    def __init__(self, root: str, split: str, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 64, tail: str = "drop",
                 resampled: bool = False, on_corrupt: str = "raise",
                 keys: Sequence[str] | None = None,
                 subset: int = 0, subset_seed: int = 0,
                 transform: Callable[[dict, torch.Generator], dict] | None = None):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if tail not in ("drop", "pad"):
            raise ValueError(f"tail={tail!r}: must be 'drop' or 'pad'")
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt={on_corrupt!r}: must be 'raise' or 'skip'")
        if shuffle_buffer < 0 or seed < 0 or subset < 0 or subset_seed < 0:
            raise ValueError("shuffle_buffer, seed, subset and subset_seed must be >= 0")
        self.root, self.split = root, split
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer, self.tail = shuffle, shuffle_buffer, tail
        self.resampled, self.on_corrupt, self.transform = resampled, on_corrupt, transform
        self.manifest = load_manifest(root, split)
        self.shard_urls = [join(root, split, s.name) for s in self.manifest.shards]
        self.counts = [s.count for s in self.manifest.shards]
        self.exts = resolve_keys(self.manifest, keys, split, root)
        self.subset = layout.subset_indices(self.manifest.num_samples, subset, subset_seed)
        self.total = len(self.subset) if self.subset is not None else self.manifest.num_samples
        if self.total == 0:
            raise ValueError(f"split {split!r} at {root}: no samples to read (the manifest lists "
                             f"{self.manifest.num_samples}{', subset ' + str(subset) if subset else ''})")
        if self.num_samples() == 0:
            raise ValueError(f"split {split!r} at {root}: {self.total} samples cannot give every one of "
                             f"{world_size} ranks a sample with tail={tail!r}; use tail='pad' or fewer ranks")
        self.epoch = 0
        self.corrupt_count = 0
        self.skipped: list[str] = []
        self._plan = _Plan()

    # ---------------------------------------------------------------- public API
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle buffer and transforms are seeded by it."""
        self.epoch = int(epoch)

    def num_samples(self) -> int:
        """Samples this rank yields per epoch (identical on every rank)."""
        return layout.per_rank_count(self.total, self.world_size, self.tail)

    def __iter__(self) -> Iterator[dict]:
        """Yield this consumer's decoded samples for the current epoch."""
        for batch in self._iter_batches():
            yield from batch

    # ---------------------------------------------------------------- internals
    def _rank_pieces(self) -> list[layout.Piece]:
        per_rank = self.num_samples()
        if self.resampled:
            return layout.resampled_pieces(self.counts, per_rank, self.seed, self.epoch, self.rank, 0x2E5)
        pieces = layout.epoch_pieces(self.counts, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                                    subset=self.subset)
        return layout.take(pieces, self.rank * per_rank, (self.rank + 1) * per_rank)

    def _iter_positions(self, pieces: list[layout.Piece], need: set[int]) -> Iterator[tuple[int, Any, bool]]:
        """(position, raw sample or Corrupt, valid) for the ``need``-ed positions of ``pieces``,
        ascending. Shards with no needed position are not opened; other members are skipped unread."""
        pos0 = 0
        for p in pieces:
            idx = [i for i in range(len(p)) if pos0 + i in need]
            if idx:
                url = self.shard_urls[p.shard]
                done = 0
                try:
                    info = self.manifest.shards[p.shard]
                    for j, raw in iter_members(url, [p.members[i] for i in idx], info.count, self.exts,
                                               info.offsets, info.bytes):
                        if info.crc32:
                            raw["__crc32__"] = info.crc32[j]
                        yield pos0 + idx[done], raw, p.valid
                        done += 1
                except ShardError as e:
                    if self.on_corrupt == "raise":
                        raise
                    for i in idx[done:]:  # the rest of this shard is unreadable: keep the positions
                        yield pos0 + i, Corrupt(url, "(rest of shard)", str(e)), p.valid
            pos0 += len(p)

    def _decode(self, raw: Any, valid: bool) -> dict | Corrupt:
        if isinstance(raw, Corrupt):
            return raw
        url, key = raw["__url__"], raw["__key__"]
        try:
            missing = sorted(self.exts - raw.keys())
            if missing:
                raise ShardError(f"{url}: sample {key}: members {', '.join(key + '.' + m for m in missing)} missing "
                                 f"(the manifest says every sample has them)")
            check_members(raw)
            members = {k: v for k, v in raw.items() if k not in ("__url__", "__crc32__")}
            sample = schema.decode_sample(members, where=url)
        except (ShardError, schema.SchemaError) as e:
            if self.on_corrupt == "raise":
                raise
            return Corrupt(url, key, str(e))
        if self.transform is not None:
            g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, key))
            sample = self.transform(sample, g)
        sample["__key__"] = key
        sample["__valid__"] = valid
        return sample

    def _iter_batches(self, worker: int | None = None, num_workers: int | None = None) -> Iterator[list[dict]]:
        """This consumer's remaining batches (lists of decoded samples) under the current plan.

        ``worker``/``num_workers`` default to the DataLoader worker info (0/1 in-process).
        A corrupt position (skip policy) becomes a copy of a good sample with ``__valid__``
        False, so batch counts and shapes never change; the skip is counted and reported.
        """
        plan = self._plan
        if worker is None:
            info = get_worker_info()
            worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        nw = max(1, num_workers or 1)
        if plan.num_workers is not None and max(1, plan.num_workers) != nw:
            raise RuntimeError(f"ShardStream planned for {plan.num_workers} workers but runs in {nw}")
        chunks = layout.worker_chunks(self.num_samples(), plan.batch_size, plan.drop_last, nw)
        # After a resume at batch `start`, consumer i serves the batches j >= start with
        # (j - start) % nw == i, i.e. the rest of layout worker (start + i) % nw's batches, so the
        # DataLoader's round-robin collection gives them in the uninterrupted order.
        yield from self._chunk_batches(chunks[(plan.start_batch + worker) % nw], plan.start_batch)

    def _chunk_batches(self, chunk: layout.WorkerChunk, start: int) -> Iterator[list[dict]]:
        """A layout worker's batches from ``start`` on. The shuffle buffer is a permutation of
        positions computed up front, so batches consumed before a resume are not even read."""
        rank_pieces = self._rank_pieces()
        pieces = layout.take(rank_pieces, chunk.offset, chunk.offset + chunk.count) if chunk.count else []
        g = layout.rng(self.seed, self.epoch, self.rank, chunk.worker, 0xB0F)
        order = layout.buffer_order(chunk.count, self.shuffle_buffer if self.shuffle else 0, g)
        k = sum(size for j, size in zip(chunk.batches, chunk.sizes) if j < start)
        reader = self._iter_positions(pieces, set(order[k:]))
        held: dict[int, tuple[Any, bool]] = {}  # read ahead of their turn: at most ~shuffle_buffer items

        def item(pos: int) -> tuple[Any, bool]:
            while pos not in held:
                got = next(reader, None)
                if got is None:
                    raise ShardError(f"split {self.split!r}: shards hold fewer samples than the manifest says "
                                     f"(rank {self.rank}); run `python -m data_shards verify`")
                held[got[0]] = got[1:]
            return held.pop(pos)

        last_good: dict | None = None
        for j, size in zip(chunk.batches, chunk.sizes):
            if j < start:
                continue  # consumed before the resume
            raw_batch = [item(pos) for pos in order[k:k + size]]
            k += size
            batch = [self._decode(raw, valid) for raw, valid in raw_batch]
            good = [s for s in batch if not isinstance(s, Corrupt)]
            if good:
                last_good = good[-1]
            out = []
            for s in batch:
                if isinstance(s, Corrupt):
                    if last_good is None:
                        raise ShardError(f"{s} (and no good sample seen yet to stand in for it)")
                    self._report(s)
                    stand_in = dict(last_good)
                    stand_in["__valid__"] = False
                    stand_in["__skipped__"] = str(s)
                    s = stand_in
                out.append(s)
            yield out

    def _report(self, c: Corrupt) -> None:
        self.corrupt_count += 1
        self.skipped.append(str(c))
        log.warning("skipping corrupt sample (on_corrupt='skip'): %s", c)


def collate(samples: list[dict]) -> dict:
    """Stack a batch: tensors along dim 0, ``meta``/``__key__`` as lists, ``__valid__`` as bool."""
    out: dict[str, Any] = {
        "__key__": [s["__key__"] for s in samples],
        "__valid__": torch.tensor([bool(s["__valid__"]) for s in samples], dtype=torch.bool),
        "__skipped__": [s["__skipped__"] for s in samples if "__skipped__" in s],
    }
    for k, v in samples[0].items():
        if k in out:
            continue
        if isinstance(v, torch.Tensor):
            try:
                out[k] = torch.stack([s[k] for s in samples])
            except (KeyError, RuntimeError) as e:
                raise ValueError(f"cannot batch key {k!r} over samples {out['__key__']}: {e}") from None
        else:
            out[k] = [s.get(k) for s in samples]
    return out


class _BatchView(IterableDataset):
    """Yields collated batches from a ShardStream; what the DataLoader workers iterate."""

    def __init__(self, stream: ShardStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict]:
        for batch in self.stream._iter_batches():
            yield collate(batch)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM / SIGINT / SIGHUP: torchrun signals a rank's whole process group
    on shutdown, and the rank must outlive its save (workers exit when the loader closes or the
    rank dies)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _as_is(batch: dict) -> dict:
    return batch


class ResumableLoader:
    """Batches of a ShardStream with an exact, tiny resume state ``{"epoch", "batches"}``."""

    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                 pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.stream, self.batch_size, self.num_workers, self.drop_last = stream, batch_size, num_workers, drop_last
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.batches_per_epoch = layout.num_batches(stream.num_samples(), batch_size, drop_last)
        if self.batches_per_epoch == 0:
            raise ValueError(f"split {stream.split!r}: {stream.num_samples()} samples per rank give no full batch "
                             f"of {batch_size} with drop_last=True")
        self.epoch = stream.epoch
        self.batches = 0
        self.corrupt_count = 0
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return self.batches_per_epoch

    def layout(self) -> dict:
        """What fixes the order of an epoch's batches besides the epoch number."""
        s = self.stream
        return {"world_size": s.world_size, "rank": s.rank, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "drop_last": self.drop_last, "seed": s.seed,
                "samples": s.total, "shuffle_buffer": s.shuffle_buffer, "tail": s.tail}

    def state_dict(self) -> dict:
        """The data position: epoch and batches handed out in it, plus the layout (JSON-able)."""
        return {"epoch": self.epoch, "batches": self.batches, "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position from :meth:`state_dict`.

        Mid-epoch (``batches > 0``) the layout must be the checkpoint's: with another world
        size, worker count or batch size the consumed batches would be other samples, and
        exactly-once would silently break. At an epoch boundary any layout may resume.
        """
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if epoch < 0 or not 0 <= batches <= self.batches_per_epoch:
            raise ValueError(f"data state {state}: batches must be in [0, {self.batches_per_epoch}] "
                             f"(the run's world size, batch size and split must match the checkpoint's)")
        if batches > 0 and "layout" in state:
            now = self.layout()
            diff = {k: (v, now.get(k)) for k, v in state["layout"].items() if now.get(k) != v}
            if diff:
                raise ValueError(f"cannot resume mid-epoch ({batches} batches into epoch {epoch}) with a different "
                                 f"data layout: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in diff.items())}; "
                                 f"use the checkpoint's settings or resume from an epoch boundary")
        self.epoch, self.batches = epoch, batches

    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch; then epoch += 1 and position 0."""
        stream = self.stream
        stream.set_epoch(self.epoch)
        stream._plan = _Plan(self.batch_size, self.drop_last, self.num_workers, self.batches)
        if self.batches < self.batches_per_epoch:
            if self.num_workers == 0 and not self.pin_memory:
                source: Any = (collate(b) for b in stream._iter_batches(0, 1))
            else:
                source = DataLoader(_BatchView(stream), batch_size=None, num_workers=self.num_workers,
                                    collate_fn=_as_is, pin_memory=self.pin_memory,
                                    worker_init_fn=_ignore_stop_signals)
            for batch in source:
                for msg in batch.pop("__skipped__"):
                    self.corrupt_count += 1
                    self.skipped.append(msg)
                    if self.num_workers:  # in-process streams counted it already
                        stream.corrupt_count += 1
                        stream.skipped.append(msg)
                self.batches += 1
                yield batch
        self.epoch += 1
        self.batches = 0


def build_loader(stream: ShardStream, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                 pin_memory: bool = False) -> ResumableLoader:
    """A resumable batch loader over ``stream`` (every rank yields ``batches_per_epoch`` batches).

    ``pin_memory`` pins batches for faster host-to-GPU copies (ignored without CUDA)."""
    return ResumableLoader(stream, batch_size, num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory)
