"""The stream's per-sample stages, and the stages a user inserts without editing ``stream.py``.

Every sample a consumer reads goes through one :class:`SamplePipeline`:

    raw stages        user ``Stage(raw=True)``: on the raw members (bytes), before any check
    checks + decode   missing members, crc32 against the manifest, ``schema.decode_sample`` (each
                      image's header checked against the split's size before it is decoded)
    transform         the task's ``transform(sample, generator)``
    stages            user ``Stage``s, in order, on the decoded sample

A stage is ``fn(sample, generator) -> sample | None`` (None drops the sample: :func:`select`);
like webdataset's ``map`` / ``select`` but per sample, with a generator seeded by (seed, epoch,
sample key, stage name). So a stage's output depends only on its sample, never on which rank or
worker read it or what came before: stages survive an exact resume on any layout. Order and
batching belong to the plan (:mod:`data_shards.deal`), not to stages. A sample keeps its place in
the batch whatever happens, so batch counts and shapes never change: dropped by a stage after
decoding, it is itself with ``__valid__`` False (as it entered the stage that dropped it); dropped
by a raw stage or unreadable (``on_corrupt="skip"``), a copy of a neighbour stands in for it
(:mod:`data_shards.assemble`). Losses that must not see dropped samples mask by ``__valid__``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from data_shards import schema
from data_shards.manifest import member_crc32
from data_shards.reader import Corrupt, ShardError

SampleFn = Callable[[dict, torch.Generator], Optional[dict]]


@dataclass(frozen=True)
class Stage:
    """A named per-sample step: ``fn(sample, generator)`` returns the sample (changed or not) or
    None to drop it; ``raw=True`` runs it on the raw members (bytes) before decoding."""

    name: str
    fn: SampleFn
    raw: bool = False


class _Select:
    """``pred(sample) -> bool`` as a stage function (a class, so DataLoader workers can pickle it)."""

    def __init__(self, pred: Callable[[dict], bool]):
        self.pred = pred

    def __call__(self, sample: dict, generator: torch.Generator) -> Optional[dict]:
        return sample if self.pred(sample) else None


def select(pred: Callable[[dict], bool], name: str = "select", raw: bool = False) -> Stage:
    """A stage keeping the samples for which ``pred(sample)`` is true (the others become stand-ins)."""
    return Stage(name, _Select(pred), raw)


@dataclass(frozen=True)
class Filtered:
    """Stands in for a sample a stage dropped."""

    url: str
    key: str
    stage: str

    def __str__(self) -> str:
        return f"{self.url}: sample {self.key}: dropped by stage {self.stage!r}"


def sample_seed(seed: int, epoch: int, key: str, stage: str = "") -> int:
    """The generator seed of one sample's transform (``stage`` empty) or of one stage."""
    text = f"{seed}:{epoch}:{key}" + (f":{stage}" if stage else "")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


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


class SamplePipeline:
    """raw sample -> decoded sample, or a :class:`Corrupt` / :class:`Filtered` marker (module docstring)."""

    def __init__(self, exts: frozenset[str], on_corrupt: str, seed: int,
                 transform: Optional[SampleFn], stages: Iterable[Stage], image_hw: Optional[tuple[int, int]] = None,
                 encoded_rgb: bool = False):
        self.exts, self.on_corrupt, self.seed, self.transform = exts, on_corrupt, seed, transform
        self.image_hw = image_hw
        """The split's image size, checked in each image's header before decoding (None: its own size)."""
        self.encoded_rgb = encoded_rgb
        """RGB frames left encoded (header-checked) for the trainer's device to decode."""
        stages = tuple(stages)
        self.raw_stages = [s for s in stages if s.raw]
        self.stages = [s for s in stages if not s.raw]

    def __call__(self, raw: Any, epoch: int, valid: bool) -> dict | Corrupt | Filtered:
        if isinstance(raw, Corrupt):
            return raw
        url, key = raw["__url__"], raw["__key__"]
        raw = self._run(self.raw_stages, raw, epoch, key)
        if isinstance(raw, Filtered):  # dropped before decoding: a neighbour stands in for it
            return raw
        try:
            missing = sorted(self.exts - raw.keys())
            if missing:
                raise ShardError(f"{url}: sample {key}: members {', '.join(key + '.' + m for m in missing)} missing "
                                 f"(the manifest says every sample has them)")
            check_members(raw)
            members = {k: v for k, v in raw.items() if k not in ("__url__", "__crc32__")}
            sample = schema.decode_sample(members, where=url, image_hw=self.image_hw, encoded_rgb=self.encoded_rgb)
        except (ShardError, schema.SchemaError) as e:
            if self.on_corrupt == "raise":
                raise
            return Corrupt(url, key, str(e))
        if self.transform is not None:
            sample = self.transform(sample, torch.Generator().manual_seed(sample_seed(self.seed, epoch, key)))
        out = self._run(self.stages, sample, epoch, key)
        if isinstance(out, Filtered):  # dropped after decoding: it stands in for itself
            out, valid = sample, False
        out["__key__"], out["__valid__"] = key, valid
        return out

    def _run(self, stages: list[Stage], sample: dict, epoch: int, key: str) -> dict | Filtered:
        for st in stages:
            out = st.fn(sample, torch.Generator().manual_seed(sample_seed(self.seed, epoch, key, st.name)))
            if out is None:
                return Filtered(sample.get("__url__", ""), key, st.name)
            sample = out
        return sample


def with_stand_ins(items: Iterable[dict | Corrupt | Filtered], record: Callable[[str], None]) -> Iterator[dict]:
    """Samples, each marker replaced by a copy of the last good sample (``__valid__`` False; a
    Corrupt one also ``__skipped__``, passed to ``record``): one consumer's samples in order."""
    last_good: dict | None = None
    for s in items:
        if isinstance(s, dict):
            last_good = s
            yield s
            continue
        if last_good is None:
            raise ShardError(f"{s} (and no good sample seen yet to stand in for it)")
        extra = {}
        if isinstance(s, Corrupt):
            record(str(s))
            extra["__skipped__"] = str(s)
        yield {**last_good, "__valid__": False, **extra}
