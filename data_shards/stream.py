"""The one reader every task uses: exactly-once, resumable streaming of a split's shards.

``ShardStream(StreamConfig(root, split, ...))`` reads ``<root>/<split>/manifest.json`` (root:
folder, http(s) URL or ``s3://bucket/prefix``). Each epoch has one global order that depends only
on the data, the seed and the epoch (:mod:`data_shards.epoch_order`); steps take consecutive
positions of it and deal them to ranks and workers (:mod:`data_shards.deal`). A consumer reads
its lanes forward through a bounded pool of open handles (:mod:`data_shards.lanes`) and sends
each sample through the per-sample stages (:mod:`data_shards.stages`: checks, decode with
``schema.decode_sample``, the task's transform, user stages).

``data_shards.loader.build_loader`` wraps a stream in a ``ResumableLoader`` whose state is the
number of the epoch's positions consumed: it resumes exactly under any world size, worker count
or batch size.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data_shards import schema
from data_shards.assemble import partial
from data_shards.collate import collate
from data_shards.deal import TAILS, deal, epoch_steps
from data_shards.epoch_order import DEFAULT_LANES, EpochOrder, epoch_order, subset_indices
from data_shards.handles import DEFAULT_OPEN_HANDLES, HandlePool, ReadStats
from data_shards.lanes import LaneReader
from data_shards.manifest import MANIFEST_NAME, Manifest, ManifestError
from data_shards.openers import OpenError, join, read_bytes
from data_shards.reader import Corrupt
from data_shards.stages import SamplePipeline, SampleFn, Stage, with_stand_ins

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
    missing = [s.name for s in m.shards if s.count and not s.offsets]
    if missing:
        raise ManifestError(f"{url}: shard {missing[0]} has no per-sample offsets (built by an older "
                            f"version); rebuild the split (the stream reads samples by their offsets)")
    return m


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
            field_name = META_DERIVED[k]
            if "json" not in have or (field_name and field_name not in manifest.meta_fields):
                raise KeyError(f"split {split!r} ({root}): key {k!r} needs meta field {field_name!r}, "
                               f"which not every sample has (meta fields: {manifest.meta_fields})")
            continue
        if k not in by_name:
            raise KeyError(f"key {k!r} is not a schema key (known: {sorted(by_name) + ['K', 'baseline']})")
        if by_name[k] not in have:
            raise KeyError(f"split {split!r} ({root}): key {k!r} is not in every sample "
                           f"(the manifest's keys: {sorted(have)})")
        exts.add(by_name[k])
    return frozenset(exts)


#: where RGB frames may be decoded (:attr:`StreamConfig.decode_on`)
DECODE_ON = ("loader", "device")


@dataclass(frozen=True)
class StreamConfig:
    """What a stream reads and how (validated on creation; one line per bad value)."""

    root: str
    """Folder or URL prefix (http(s)://, s3://) holding ``<split>/manifest.json`` and the shards."""
    split: str
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    """Shard order and lane slots seeded by (seed, epoch); False: manifest order, lanes in order."""
    lanes: int = DEFAULT_LANES
    """Lanes interleaved per epoch (part of the order: a resume mid-epoch needs the same value)."""
    tail: str = "drop"
    """The last positions that do not fill a step: drop | pad (see :mod:`data_shards.deal`)."""
    resampled: bool = False
    """Whole shards drawn with replacement per epoch (same size, not exactly-once)."""
    on_corrupt: str = "raise"
    """raise (naming shard and member) | skip (a stand-in, counted and reported)."""
    keys: Optional[tuple[str, ...]] = None
    """Sample keys to read and decode (None: all the split has)."""
    subset: int = 0
    """If > 0: a seeded N-shot subset of this many samples (the same every epoch)."""
    subset_seed: int = 0
    transform: Optional[SampleFn] = None
    """The task's ``transform(sample, generator)``; the generator is seeded by (seed, epoch, key)."""
    stages: tuple[Stage, ...] = ()
    """User per-sample stages after the transform (or before decoding: ``Stage(raw=True)``)."""
    open_handles: int = DEFAULT_OPEN_HANDLES
    """Open shard handles per consumer (least recently used closed first)."""
    decode_on: str = "loader"
    """Where RGB frames are decoded: loader | device (left encoded, :class:`~data_shards.schema.EncodedImage`,
    for the trainer to decode as a batch on its device; the order and the state are the same)."""

    def __post_init__(self) -> None:
        if self.decode_on not in DECODE_ON:
            raise ValueError(f"decode_on={self.decode_on!r}: must be one of {', '.join(DECODE_ON)}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}, world_size={self.world_size}: need 0 <= rank < world_size")
        if self.tail not in TAILS:
            raise ValueError(f"tail={self.tail!r}: must be 'drop' or 'pad'")
        if self.on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt={self.on_corrupt!r}: must be 'raise' or 'skip'")
        for name in ("seed", "subset", "subset_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.lanes < 1 or self.open_handles < 1:
            raise ValueError(f"lanes={self.lanes}, open_handles={self.open_handles}: must be >= 1")
        if self.keys is not None:
            object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "stages", tuple(self.stages))


@dataclass(frozen=True)
class Plan:
    """How a consumer groups its samples into steps (the loader passes one per iteration)."""

    batch_size: int = 1
    drop_last: bool = False
    num_workers: int | None = None
    """Consumers per rank; None: as many as the DataLoader running the stream has (1 in-process)."""
    start: int = 0
    """Positions of the epoch's order consumed before (by any layout): the plan starts after them."""


@dataclass
class CorruptLog:
    """Corrupt samples skipped under ``on_corrupt="skip"``, counted in one place: where the batches
    are consumed (the loader in the training process; DataLoader workers only mark stand-ins)."""

    count: int = 0
    messages: list[str] = field(default_factory=list)

    def record(self, message: str) -> None:
        log.warning("skipping corrupt sample (on_corrupt='skip'): %s", message)
        self.count += 1
        self.messages.append(message)


class ShardStream(IterableDataset):
    """A split's samples for one rank: exactly once per epoch, one global order, exact resume.

    Iterating yields decoded sample dicts (``__key__``, ``__valid__``, the requested schema
    keys without extension, ``meta``, ``K``/``baseline`` when present); :meth:`iter_partials`
    yields one consumer's share of every step under a :class:`Plan`. See ``docs/data.md``.
    """

    def __init__(self, config: StreamConfig):
        super().__init__()
        c = self.config = config
        self.manifest = load_manifest(c.root, c.split)
        self.shard_urls = [join(c.root, c.split, s.name) for s in self.manifest.shards]
        self.counts = [s.count for s in self.manifest.shards]
        self.exts = resolve_keys(self.manifest, c.keys, c.split, c.root)
        self.subset = subset_indices(self.manifest.num_samples, c.subset, c.subset_seed)
        self.total = len(self.subset) if self.subset is not None else self.manifest.num_samples
        if self.total == 0:
            raise ValueError(f"split {c.split!r} at {c.root}: no samples to read (the manifest lists "
                             f"{self.manifest.num_samples}{', subset ' + str(c.subset) if c.subset else ''})")
        if epoch_steps(self.total, 0, c.world_size, 1, False, c.tail).count == 0:
            raise ValueError(f"split {c.split!r} at {c.root}: {self.total} samples cannot give every one of "
                             f"{c.world_size} ranks a sample with tail={c.tail!r}; use tail='pad' or fewer ranks")
        self.pipeline = SamplePipeline(self.exts, c.on_corrupt, c.seed, c.transform, c.stages,
                                       image_hw=schema.declared_image_hw(self.manifest.source),
                                       encoded_rgb=c.decode_on == "device")
        self.epoch = 0
        self.corrupt = CorruptLog()
        self.read_stats = ReadStats()
        """What this process's last consumer fetched and held (bytes, opens, frames)."""
        self._order: tuple[int, EpochOrder] | None = None

    # ---------------------------------------------------------------- public API
    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def split(self) -> str:
        return self.config.split

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: its order and the transforms' generators are seeded by it."""
        self.epoch = int(epoch)

    def order_identity(self) -> dict[str, Any]:
        """What fixes every epoch's order besides the epoch number (JSON-able; a mid-epoch resume
        needs it unchanged). World size, workers and batch size are not part of it."""
        c = self.config
        shards = hashlib.sha256(repr([(s.name, s.count) for s in self.manifest.shards]).encode()).hexdigest()[:16]
        return {"samples": self.total, "shards": shards, "seed": c.seed, "shuffle": c.shuffle, "lanes": c.lanes,
                "resampled": c.resampled, "subset": c.subset, "subset_seed": c.subset_seed}

    def epoch_order(self) -> EpochOrder:
        """The current epoch's global order (computed once per epoch and process)."""
        if self._order is None or self._order[0] != self.epoch:
            c = self.config
            order = epoch_order(self.counts, seed=c.seed, epoch=self.epoch, shuffle=c.shuffle, lanes=c.lanes,
                                subset=self.subset, resampled=c.resampled)
            self._order = (self.epoch, order)
        return self._order[1]

    @property
    def corrupt_count(self) -> int:
        """Corrupt samples skipped so far (``on_corrupt="skip"``), wherever they were consumed."""
        return self.corrupt.count

    @property
    def skipped(self) -> list[str]:
        """One line per skipped sample: shard, member, reason."""
        return self.corrupt.messages

    def __iter__(self) -> Iterator[dict]:
        """This consumer's samples of the current epoch, one per step of this rank (batch 1);
        stand-ins replace unreadable or dropped samples (counted here)."""
        worker, nw = _worker()
        items = (s for step in self.iter_steps(Plan(1, False, nw), worker, nw) for _, s in step)
        yield from with_stand_ins(items, self.corrupt.record)

    def iter_partials(self, plan: Plan, worker: int | None = None, num_workers: int | None = None) -> Iterator[dict]:
        """This consumer's share of each remaining step (:func:`data_shards.assemble.partial`):
        every consumer yields one per step, possibly empty, so the loader can put steps together."""
        for t, items in enumerate(self.iter_steps(plan, worker, num_workers)):
            goods = [s for _, s in items if isinstance(s, dict)]
            bad = {p: ("corrupt" if isinstance(s, Corrupt) else "filtered", str(s))
                   for p, s in items if not isinstance(s, dict)}
            yield partial(t, [p for p, _ in items], bad, collate(goods) if goods else None)

    def iter_steps(self, plan: Plan, worker: int | None = None, num_workers: int | None = None
                   ) -> Iterator[list[tuple[int, Any]]]:
        """Per remaining step, this consumer's ``(position, sample or stand-in marker)`` in order.

        ``worker``/``num_workers`` default to the DataLoader worker info (0/1 in-process).
        """
        if worker is None:
            worker, num_workers = _worker()
        nw = max(1, num_workers or 1)
        if plan.num_workers is not None and max(1, plan.num_workers) != nw:
            raise RuntimeError(f"ShardStream planned for {plan.num_workers} workers but runs in {nw}")
        c, order = self.config, self.epoch_order()
        steps = epoch_steps(order.n, plan.start, c.world_size, plan.batch_size, plan.drop_last, c.tail)
        per_step = deal(order, steps, nw).positions(c.rank, worker)
        self.read_stats = ReadStats()
        groups, keys = group_positions(order, per_step)
        reader = LaneReader(self.manifest, self.shard_urls, self.exts, c.on_corrupt,
                            HandlePool(c.open_handles, self.read_stats), groups)
        group_of = iter(keys)
        try:
            for positions in per_step:
                yield [(p, self.pipeline(reader.next(next(group_of)), self.epoch, p < order.n))
                       for p in positions.tolist()]
        finally:
            reader.close()


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def group_positions(order: EpochOrder, per_step: Sequence[np.ndarray]
                    ) -> tuple[dict[Hashable, list[tuple[int, int]]], list[Hashable]]:
    """For a consumer's positions (per step, ascending): each reading group's (shard, member) list
    in reading order, and the group of every position in the order they are read. A group is a
    lane slot and a pass over the epoch (positions past its end are padding: a second pass)."""
    pos = np.concatenate(per_step) if len(per_step) else np.zeros(0, dtype=np.int64)
    shard, member = order.samples(pos)
    keys = list(zip(order.slot(pos).tolist(), (pos // order.n).tolist()))
    groups: dict[Hashable, list[tuple[int, int]]] = {}
    for key, s, m in zip(keys, shard.tolist(), member.tolist()):
        groups.setdefault(key, []).append((s, m))
    return groups, keys
