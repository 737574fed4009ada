"""Spool replay: send a run's offline tracking records to MLflow, in order, once; and its CLI.

``python -m trainer.tracking replay <out_dir>/tracking/spool.jsonl [--uri URI]`` (also
``python -m launch study replay ...``). A ``create_run`` record made while the server was down
gets its MLflow run id on replay; the mapping (run reference -> run id) is kept beside the spool
in ``spool.jsonl.runs.json``, so a replay interrupted half way never creates the run twice.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from data_shards.atomic import atomic_write_json
from trainer.tracking.client import apply, connect, create_run, is_transient
from trainer.tracking.spool import Spool, SpoolError


def runs_map_path(spool_path: str | os.PathLike) -> Path:
    """Where the run-reference -> run-id map of a spool lives."""
    p = Path(spool_path)
    return p.with_name(p.name + ".runs.json")


def load_runs_map(path: Path) -> dict[str, str]:
    """The run-reference -> run-id map ({} when none was written yet)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _save_runs_map(path: Path, mapping: dict[str, str]) -> None:
    atomic_write_json(path, mapping)


def replay(spool: Spool, client, uri: str, runs_map: Path, default_run_id: str | None = None) -> int:
    """Send pending records in order, advancing the spool's offset after each; returns how many.

    A transient error (server gone again) propagates with the offset at the last record sent."""
    runs = load_runs_map(runs_map)
    sent = 0
    for record, end in spool.pending():
        op = record["op"]
        if op == "target":
            spool.set_offset(end)
            continue
        if op == "create_run":
            ref = record["run_ref"]
            if ref not in runs:
                runs[ref] = create_run(client, uri, record)
                _save_runs_map(runs_map, runs)
        else:
            run_id = record.get("run_id") or runs.get(record.get("run_ref") or "") or default_run_id
            if run_id is None:
                raise SpoolError(f"{spool.path}: record {op!r} belongs to no known run")
            try:
                apply(client, record, run_id)
            except Exception as e:  # noqa: BLE001
                if is_transient(e):
                    raise
                if op != "params":
                    raise SpoolError(f"{spool.path}: MLflow refused spooled {op!r} record for run {run_id}: {e}") from e
                warnings.warn(f"{spool.path}: MLflow refused spooled params for run {run_id} ({e}); "
                              f"params kept as first logged", RuntimeWarning, stacklevel=2)
        spool.set_offset(end)
        sent += 1
    return sent


def replay_spool(path: str | os.PathLike, uri: str | None = None) -> int:
    """Replay a spool file (``<out_dir>/tracking/spool.jsonl``) into MLflow; returns records sent.

    ``uri`` defaults to the tracking URI recorded in the spool itself.
    """
    spool = Spool(path)
    if not spool.path.exists():
        raise FileNotFoundError(f"no tracking spool at {spool.path}")
    if uri is None:
        targets = [r["uri"] for r in spool.all_records() if r.get("op") == "target"]
        if not targets:
            raise SpoolError(f"{spool.path}: no tracking URI recorded; pass one with --uri")
        uri = targets[-1]
    return replay(spool, connect(uri), uri, runs_map_path(spool.path))


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.tracking replay <spool> [--uri URI]``: send a spool; 0 when nothing is left."""
    parser = argparse.ArgumentParser(prog="python -m trainer.tracking", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="send a run's spooled tracking records to MLflow")
    rp.add_argument("spool", help="path of <out_dir>/tracking/spool.jsonl")
    rp.add_argument("--uri", default=None, help="tracking URI (default: the one recorded in the spool)")
    args = parser.parse_args(argv)
    try:
        sent = replay_spool(args.spool, args.uri)
    except (SpoolError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        if is_transient(e):
            print(f"error: tracking server still unreachable ({e}); the spool is kept, try again later",
                  file=sys.stderr)
            return 1
        raise
    pending = Spool(args.spool).count_pending()
    print(f"replayed {sent} records from {args.spool}; {pending} pending")
    return 0 if pending == 0 else 1
