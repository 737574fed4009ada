"""Progress of the long one-off phases of a run, on the logging rank: what is happening, how far.

A first training step that compiles for minutes or a final evaluation of thousands of frames
must not look like a hang. :class:`Phase` logs a line when a phase starts, one every
``every_s`` seconds while it runs (from a timer thread: a compiling step cannot report itself),
and one with its time when it ends; :func:`counted` does the same for a loader, batch by batch.
:class:`StartupTimes` collects the run's fixed costs for one summary line.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterator, Optional

log = logging.getLogger("geoprime.progress")

#: seconds between "still ..." lines of a running phase
EVERY_S = 30.0


class Phase:
    """Context manager: ``<what>...`` at the start, ``still <what> (N s)`` every ``every_s`` seconds,
    ``<what>: X s`` at the end; silent where ``enabled`` is false (ranks other than the logging one).
    ``seconds`` holds the phase's time afterwards."""

    def __init__(self, what: str, *, enabled: bool = True, every_s: float = EVERY_S, detail: str = "",
                 report_end: bool = True) -> None:
        self.what, self.enabled, self.every_s, self.detail = what, enabled, float(every_s), detail
        self.report_end = report_end
        self.seconds = 0.0
        self._start = 0.0
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Phase":
        self._start = time.perf_counter()
        if self.enabled:
            log.info("%s...%s", self.what, f" ({self.detail})" if self.detail else "")
            self._thread = threading.Thread(target=self._beat, name="geoprime-progress", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._done.wait(self.every_s):
            log.info("still %s (%.0f s)", self.what, time.perf_counter() - self._start)

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._start
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.enabled and self.report_end and exc[0] is None:
            log.info("%s: %.1f s", self.what, self.seconds)


def counted(loader: Any, what: str, *, total: int = 0, enabled: bool = True,
            every_s: float = EVERY_S) -> Iterator[Any]:
    """The batches of ``loader``, logging ``<what>: batch i/total (t s, ETA s)`` every ``every_s``
    seconds and ``<what>: n batches in t s`` at the end (``total`` 0: the loader's
    ``batches_per_epoch``, if it has one)."""
    total = int(total or getattr(loader, "batches_per_epoch", 0) or 0)
    start = last = time.perf_counter()
    if enabled:
        log.info("%s: %s batches...", what, total or "?")
    n = 0
    try:
        for n, batch in enumerate(loader, 1):
            yield batch
            now = time.perf_counter()
            if enabled and now - last >= every_s:
                last = now
                eta = f", ETA {(total - n) * (now - start) / n:.0f} s" if total else ""
                log.info("%s: batch %d/%s (%.0f s%s)", what, n, total or "?", now - start, eta)
    finally:  # also when the consumer stops early (a cap on batches)
        if enabled:
            log.info("%s: %d batches in %.1f s", what, n, time.perf_counter() - start)


class StartupTimes:
    """The run's fixed costs before the step loop, by name, in the order measured."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        """The time since the previous mark (or creation) is ``name``'s."""
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now

    def line(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
