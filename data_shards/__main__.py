"""``python -m data_shards build | inspect | verify``: make shards, look at them, check them.

``build synthetic`` renders the embedded synthetic world (one shard per sequence, written
in parallel, idempotent); ``build kitti|cityscapes|nyuv2|kitti_semantics|imagefolder`` dispatch to
``data_shards.sources.<name>`` (its ``add_arguments(parser)`` and ``build(args)``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from functools import partial
from typing import Any, Iterator

SOURCES = {
    "synthetic": "the embedded procedural driving world (no download)",
    "kitti": "KITTI raw (video + stereo + LiDAR/annotated depth)",
    "kitti_semantics": "KITTI semantic segmentation benchmark",
    "cityscapes": "Cityscapes (leftImg8bit + gtFine, optional sequence/disparity)",
    "nyuv2": "NYU Depth V2 labelled set (.mat)",
    "imagefolder": "ImageNet-style class folders <root>/<split>/<class>/*.jpg (single-label classification)",
}


#: keys ``build synthetic --without`` may leave out (rgb, rgb_prev, rgb_next are always written)
DROPPABLE = ("rgb_right", "depth", "seg", "flow")


def _synthetic_chunk(cfg: Any, split: str, sequence: int, without: tuple[str, ...] = ()) -> Iterator[dict]:
    """One synthetic sequence's samples (one shard; picklable for the writer's processes),
    without the keys in ``without``."""
    from data_shards.sources.synthetic import iter_sequence

    for sample in iter_sequence(cfg, split, sequence):
        for key in without:
            sample.pop(key, None)
        yield sample


def _synthetic_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_shards build synthetic",
                                description="Render the synthetic world into shards (idempotent).")
    p.add_argument("--out", default="data/synthetic", help="output folder (one sub-folder per split)")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--palette", default="default", help="colour domain: default | gbr (SyntheticConfig.palette)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the world's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the world's)")
    p.add_argument("--splits", nargs="+", default=None, help="splits to build (default: all)")
    p.add_argument("--sequences", nargs="+", default=[], metavar="SPLIT=N",
                   help="sequences per split, e.g. train=4 val=1 (default: the world's)")
    p.add_argument("--frames-per-sequence", type=int, default=None, help="frames rendered per sequence")
    p.add_argument("--without", nargs="+", default=[], choices=DROPPABLE, metavar="KEY",
                   help=f"leave these keys out of the shards ({', '.join(DROPPABLE)}), e.g. "
                        "--without depth seg flow for video-only data like KITTI raw without LiDAR")
    p.add_argument("--workers", type=int, default=2, help="parallel render processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    """Render each requested split of the synthetic world; returns the manifests."""
    from data_shards.sources.synthetic import SyntheticConfig
    from data_shards.writer import write_split_parallel

    cfg = SyntheticConfig(seed=args.seed, palette=getattr(args, "palette", "default"))
    changes: dict[str, Any] = {}
    if args.height is not None:
        changes["height"] = args.height
    if args.width is not None:
        changes["width"] = args.width
    if args.frames_per_sequence is not None:
        changes["frames_per_sequence"] = args.frames_per_sequence
    if args.sequences:
        seqs = dict(cfg.sequences)
        for spec in args.sequences:
            name, _, n = spec.partition("=")
            if not n.isdigit():
                raise SystemExit(f"--sequences {spec!r}: expected SPLIT=N")
            seqs[name] = int(n)
        changes["sequences"] = seqs
    cfg = dataclasses.replace(cfg, **changes)
    splits = args.splits or list(cfg.sequences)
    results = {}
    for split in splits:
        if split not in cfg.sequences:
            raise SystemExit(f"split {split!r}: the synthetic world has {sorted(cfg.sequences)}")
        without = tuple(args.without)
        chunks = [partial(_synthetic_chunk, cfg, split, s, without) for s in range(cfg.sequences[split])]
        source = {"dataset": "synthetic", "config": dataclasses.asdict(cfg),
                  "resolution": [cfg.height, cfg.width], "resize": "rendered at resolution"}
        if without:
            source["without"] = list(without)
        results[split] = write_split_parallel(chunks, args.out, split, source=source, workers=args.workers,
                                              progress=not args.no_progress)
    return results


def cmd_build(argv: list[str]) -> int:
    """``build <source> ...``."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SOURCES:
        print("usage: python -m data_shards build <source> [options]\n\nsources:")
        for name, text in SOURCES.items():
            print(f"  {name:<16} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown source {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    if name == "synthetic":
        manifests = build_synthetic(_synthetic_parser().parse_args(rest))
    else:
        modname = f"data_shards.sources.{name}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            print(f"error: source {name!r} is not available: module {modname} does not exist", file=sys.stderr)
            return 2
        if not (hasattr(mod, "add_arguments") and hasattr(mod, "build")):
            print(f"error: {modname} does not provide add_arguments(parser) and build(args)", file=sys.stderr)
            return 2
        parser = argparse.ArgumentParser(prog=f"python -m data_shards build {name}", description=SOURCES[name],
                                         epilog=getattr(mod, "DOWNLOAD", None),
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(parser)
        manifests = mod.build(parser.parse_args(rest)) or {}
    for split, m in manifests.items():
        if hasattr(m, "num_samples"):
            print(f"{split}: {m.num_samples} samples in {len(m.shards)} shards, keys {', '.join(m.keys)}")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    """``inspect DIR[/SPLIT] [--sheet PNG] [-n N]``: one split, or every split of a dataset root."""
    from data_shards.inspect import inspect_split
    from data_shards.locate import splits_at

    p = argparse.ArgumentParser(prog="python -m data_shards inspect",
                                description="Counts, keys and sizes of a split (or of every split of a dataset "
                                            "root), and a PNG contact sheet of a few samples.")
    p.add_argument("split", help="DIR/SPLIT or URL/SPLIT (e.g. data/synthetic/train), or a dataset root DIR "
                                 "holding split folders (e.g. data/synthetic)")
    p.add_argument("--sheet", default=None, help="contact sheet path (default: contact_<split>.png; for a dataset "
                                                 "root, <sheet stem>_<split>.png per split)")
    p.add_argument("-n", type=int, default=4, help="samples on the contact sheet (0: none)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (a list for a dataset root)")
    a = p.parse_args(argv)
    found = splits_at(a.split)
    infos = []
    for root, split in found:
        sheet = f"contact_{split}.png" if not a.sheet else a.sheet if len(found) == 1 else \
            f"{os.path.splitext(a.sheet)[0]}_{split}.png"
        infos.append(inspect_split(f"{root}/{split}", sheet if a.n > 0 else None, a.n))
    if a.json:
        print(json.dumps(infos[0] if len(found) == 1 else infos, indent=1, sort_keys=True))
        return 0
    for info in infos:
        _print_summary(info)
    return 0


def _print_summary(info: dict) -> None:
    print(f"split {info['split']}: {info['samples']} samples in {info['shards']} shards "
          f"({info['min_shard']}..{info['max_shard']} per shard), {info['bytes'] / 2**20:.1f} MiB")
    print(f"keys: {', '.join(info['keys'])}")
    if info["layout"] == "compact":
        print(f"layout: compact, {info['frames_stored']} frame images stored for the "
              f"{info['images_referenced']} images its samples hold")
    print(f"meta fields: {', '.join(info['meta_fields'])}")
    print(f"source: {json.dumps(info['source'], sort_keys=True)[:300]}")
    if "contact_sheet" in info:
        print(f"contact sheet: {info['contact_sheet'] or 'none (the split has no rgb.png in every sample)'}")


def cmd_verify(argv: list[str]) -> int:
    """``verify DIR[/SPLIT]``: exit 1 (naming shard and member) if anything is wrong, in any split."""
    from data_shards.locate import splits_at

    p = argparse.ArgumentParser(prog="python -m data_shards verify",
                                description="sha256 of every shard and a full decode of every sample, of one "
                                            "split or of every split of a dataset root; exit 1 if anything is bad.")
    p.add_argument("split", help="DIR/SPLIT or URL/SPLIT, or a dataset root DIR holding split folders "
                                 "(e.g. data/synthetic: train, val, test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    found = splits_at(a.split)
    bad = 0
    for root, split in found:
        bad += not _verify_one(f"{root}/{split}", progress=not a.no_progress)
    if len(found) > 1:
        print(f"{a.split}: {len(found)} splits, {'OK' if not bad else f'{bad} with problems'}")
    return 1 if bad else 0


def _verify_one(path: str, progress: bool) -> bool:
    """Verify one split with a progress bar over its samples; prints its result line."""
    from tqdm import tqdm

    from data_shards.inspect import split_location, verify_split
    from data_shards.stream import load_manifest

    total = load_manifest(*split_location(path)).num_samples
    # on a terminal only (disable=None): logs and captured output get the result lines alone
    bar = tqdm(total=total, unit="sample", desc=f"verify {path}", disable=None if progress else True, leave=False,
               dynamic_ncols=True)

    def on_shard(m, rep) -> None:
        bar.update(rep.samples - bar.n)

    try:
        rep = verify_split(path, on_shard)
    finally:
        bar.close()
    for line in rep.notes:
        print(f"note: {line}")
    for line in rep.problems:
        print(f"BAD: {line}", file=sys.stderr)
    print(f"{path}: {rep.shards} shards, {rep.samples} samples decoded, "
          f"{'OK' if rep.ok else f'{len(rep.problems)} problem(s)'}")
    return rep.ok


COMMANDS = {"build": (cmd_build, "build shards from a source (synthetic, kitti, cityscapes, nyuv2, ...)"),
            "inspect": (cmd_inspect, "counts, keys, sizes and a contact sheet of a split or of a dataset root"),
            "verify": (cmd_verify, "checksums and full decode of a split or of every split of a dataset root; "
                                   "non-zero exit if anything is bad")}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``python -m data_shards <command>``; errors print one clear line, exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m data_shards <command> [args]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    from data_shards.manifest import ManifestError
    from data_shards.openers import OpenError
    from data_shards.reader import ShardError
    from data_shards.schema import SchemaError
    from data_shards.writer import WriteError

    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except (ManifestError, OpenError, ShardError, SchemaError, WriteError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
