"""The one reader every task uses: exactly-once, resumable streaming of a split's shards.

``ShardStream`` reads ``<root>/<split>/manifest.json`` (root: folder, http(s) URL or
``s3://bucket/prefix``), lays the epoch out with :mod:`data_shards.split`, reads only the
shards overlapping this consumer's range (:mod:`data_shards.reader`), shuffles with a seeded
buffer, skips already-consumed batches without reading them, decodes with
``schema.decode_sample`` (never webdataset's image decoder, which drops 16-bit depth to 8
bits), then applies the per-sample transform with a generator seeded by (seed, epoch, key).

``data_shards.loader.build_loader`` wraps it in a ``ResumableLoader`` whose ``state_dict()`` is the number
of batches handed out in the current epoch; after ``load_state_dict`` the rest of the epoch is
exactly the unseen batches, in the uninterrupted order, for any number of workers.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_shards import schema
from data_shards import split as layout
from data_shards import stages
from data_shards.manifest import MANIFEST_NAME, Manifest, ManifestError
from data_shards.openers import OpenError, join, read_bytes
from data_shards.reader import Corrupt, ShardError
from data_shards.stages import check_members  # noqa: F401 (public here too)

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


@dataclass(frozen=True)
class Plan:
    """How a consumer groups its samples into batches (the loader passes one per iteration)."""

    batch_size: int = 1
    drop_last: bool = False
    num_workers: int | None = None
    """Consumers per rank; None: as many as the DataLoader running the stream has (1 in-process)."""
    start_batch: int = 0
    """First batch of the epoch to produce (the ones before it were consumed before a resume)."""


@dataclass
class CorruptLog:
    """Corrupt samples skipped under ``on_corrupt="skip"``, counted in one place: where the batches
    are consumed (the loader in the training process; DataLoader workers only mark stand-ins)."""

    count: int = 0
    messages: list[str] = field(default_factory=list)

    def record(self, message: str) -> None:
        self.count += 1
        self.messages.append(message)


class ShardStream(IterableDataset):
    """A split's samples for one rank: exactly once per epoch, seeded order, exact resume.

    Iterating yields decoded sample dicts (``__key__``, ``__valid__``, the requested schema
    keys without extension, ``meta``, ``K``/``baseline`` when present); :meth:`iter_batches`
    yields a consumer's batches under a :class:`Plan`. See module docstring and ``docs/data.md``
    for the tail, corrupt and resampled policies.
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
        self.corrupt = CorruptLog()

    # ---------------------------------------------------------------- public API
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle buffer and transforms are seeded by it."""
        self.epoch = int(epoch)

    def num_samples(self) -> int:
        """Samples this rank yields per epoch (identical on every rank)."""
        return layout.per_rank_count(self.total, self.world_size, self.tail)

    @property
    def corrupt_count(self) -> int:
        """Corrupt samples skipped so far (``on_corrupt="skip"``), wherever they were consumed."""
        return self.corrupt.count

    @property
    def skipped(self) -> list[str]:
        """One line per skipped sample: shard, member, reason."""
        return self.corrupt.messages

    def __iter__(self) -> Iterator[dict]:
        """Yield this consumer's decoded samples for the current epoch (one sample per batch)."""
        for batch in self.iter_batches(Plan()):
            for sample in batch:
                if "__skipped__" in sample:
                    self.corrupt.record(sample["__skipped__"])
                yield sample

    def iter_batches(self, plan: Plan, worker: int | None = None, num_workers: int | None = None
                     ) -> Iterator[list[dict]]:
        """This consumer's remaining batches (lists of decoded samples) under ``plan``.

        ``worker``/``num_workers`` default to the DataLoader worker info (0/1 in-process).
        A corrupt position (skip policy) becomes a stand-in with ``__valid__`` False and
        ``__skipped__`` set (see :func:`stages.stand_in`); the consumer counts it.
        """
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

    # ---------------------------------------------------------------- internals
    def _rank_pieces(self) -> list[layout.Piece]:
        per_rank = self.num_samples()
        if self.resampled:
            return layout.resampled_pieces(self.counts, per_rank, self.seed, self.epoch, self.rank, 0x2E5)
        pieces = layout.epoch_pieces(self.counts, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                                    subset=self.subset)
        return layout.take(pieces, self.rank * per_rank, (self.rank + 1) * per_rank)

    def _chunk_batches(self, chunk: layout.WorkerChunk, start: int) -> Iterator[list[dict]]:
        """A layout worker's batches from ``start`` on, composed from :mod:`data_shards.stages`.
        The shuffle buffer is a permutation of positions computed up front, so batches consumed
        before a resume are not even read."""
        pieces = layout.take(self._rank_pieces(), chunk.offset, chunk.offset + chunk.count) if chunk.count else []
        g = layout.rng(self.seed, self.epoch, self.rank, chunk.worker, 0xB0F)
        order = layout.buffer_order(chunk.count, self.shuffle_buffer if self.shuffle else 0, g)
        k = sum(size for j, size in zip(chunk.batches, chunk.sizes) if j < start)
        sizes = [size for j, size in zip(chunk.batches, chunk.sizes) if j >= start]
        read = stages.read_positions(pieces, set(order[k:]), self.manifest, self.shard_urls, self.exts,
                                     self.on_corrupt)
        ordered = stages.in_order(read, order[k:], f"split {self.split!r} (rank {self.rank})")
        decoded = stages.decode_all(ordered, self._decode)
        yield from stages.stand_in(stages.batches_of(decoded, sizes))

    def _decode(self, raw: Any, valid: bool) -> dict | Corrupt:
        if isinstance(raw, Corrupt):
            return raw
        url, key = raw["__url__"], raw["__key__"]
        try:
            missing = sorted(self.exts - raw.keys())
            if missing:
                raise ShardError(f"{url}: sample {key}: members {', '.join(key + '.' + m for m in missing)} missing "
                                 f"(the manifest says every sample has them)")
            stages.check_members(raw)
            members = {k: v for k, v in raw.items() if k not in ("__url__", "__crc32__")}
            sample = schema.decode_sample(members, where=url, image_hw=schema.declared_image_hw(self.manifest.source))
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
