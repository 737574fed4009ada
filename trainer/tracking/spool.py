"""Offline tracking spool: an append-only, fsync'd JSON-lines log of tracking operations.

When the MLflow server cannot be reached, the run tracker (``trainer.tracking.tracker``)
appends each operation (metrics, params, tags, artifacts, run status) here instead of
dropping it, and ``trainer.tracking.replay`` sends the log when the server is back. Replay
progress is a byte offset kept beside the log (``<spool>.done``, written atomically), so a
replay interrupted half way resumes where it stopped and nothing is sent twice by design
(MLflow also de-duplicates identical metrics).
This module knows nothing of MLflow: it only stores and hands back plain dicts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from data_shards.atomic import atomic_write_text


class SpoolError(RuntimeError):
    """A spool file that cannot be read back (names the file and line)."""


class Spool:
    """Append-only JSONL log of tracking records plus its replay offset."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.done_path = self.path.with_name(self.path.name + ".done")

    def append(self, record: dict) -> None:
        """Append one record as a JSON line and fsync it, so a crash right after loses nothing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def offset(self) -> int:
        """Byte offset up to which records have been replayed (0 if never)."""
        try:
            text = self.done_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return 0
        try:
            return int(text)
        except ValueError as e:
            raise SpoolError(f"{self.done_path}: replay offset is not an integer: {text!r}") from e

    def set_offset(self, offset: int) -> None:
        """Record that everything before ``offset`` has been replayed (atomic write)."""
        atomic_write_text(self.done_path, str(int(offset)), fsync=True)

    def pending(self) -> Iterator[tuple[dict, int]]:
        """Yield ``(record, end_offset)`` for every record not yet replayed, oldest first.

        A torn last line (a crash in the middle of ``append``) is not yielded: it is
        incomplete, so it was never acknowledged to the caller either.
        """
        if not self.path.exists():
            return
        start = self.offset()
        with open(self.path, "rb") as f:
            f.seek(start)
            pos = start
            lineno = 0
            for raw in f:
                lineno += 1
                end = pos + len(raw)
                if not raw.endswith(b"\n"):
                    break
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise SpoolError(f"{self.path}: unreadable record at byte {pos}: {e}") from e
                if not isinstance(record, dict) or "op" not in record:
                    raise SpoolError(f"{self.path}: record at byte {pos} has no 'op' key")
                yield record, end
                pos = end

    def count_pending(self) -> int:
        """Number of records not replayed yet."""
        return sum(1 for _ in self.pending())

    def all_records(self) -> list[dict]:
        """Every complete record in the file, replayed or not (for inspection and tests)."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            for raw in f:
                if raw.endswith(b"\n"):
                    out.append(json.loads(raw.decode("utf-8")))
        return out
