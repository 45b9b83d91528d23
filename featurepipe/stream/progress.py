"""How a stream job shows it is alive: the progress line, and event-to-online latencies.

The progress line goes to stderr (rewritten in place on a terminal, one line each
otherwise). A latency is the time from a message entering the broker (when the source
knows it) to its features being written online; every micro-batch's go to the metrics,
and the first ``cap`` are kept for benchmarks.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime

import numpy as np
import pyarrow as pa

from featurepipe.stream.decode import MSG
from featurepipe.stream.options import Counters
from featurepipe.stream.source import RawBatch


def progress_line(job: str, worker: int, counters: Counters, run_messages: int, seconds: float,
                  watermark: datetime | None) -> str:
    """One line: messages so far and this run's rate, outcomes, online rows, the watermark."""
    c = counters
    rate = run_messages / seconds if seconds else 0.0
    if watermark is None:
        return f"stream {job} w{worker}: {c.messages:,} events ({rate:,.0f}/s) · waiting"
    return (f"stream {job} w{worker}: {c.messages:,} events "
            f"({rate:,.0f}/s this run) · accepted {c.accepted:,} · dead {c.dead:,} (late {c.late:,}, "
            f"duplicate {c.duplicate:,}) · online rows {c.online_rows:,} · watermark "
            f"{watermark:%Y-%m-%d %H:%M:%S}")


def show_progress(line: str, end: str = "\r") -> None:
    """Write ``line`` to stderr: rewritten in place (``end="\\r"``) on a terminal, else a line each."""
    stream = sys.stderr
    if not stream.isatty():
        end = "\n"
    stream.write(line + ("\x1b[K" if end == "\r" else "") + end)
    stream.flush()


def latencies(raw: RawBatch, events: pa.Table) -> np.ndarray | None:
    """Seconds from each event's message entering the broker until now (None: the source
    does not say when)."""
    publish = getattr(raw, "publish_ms", None)
    if publish is None or not len(publish):
        return None
    now_ms = time.time() * 1000
    return np.asarray((now_ms - np.asarray(publish)[events.column(MSG).to_numpy()]) / 1000.0)


class LatencySamples:
    """Keeps the first ``cap`` latencies of a run (0: none)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._parts: list[np.ndarray] = []
        self._kept = 0

    def keep(self, seconds: np.ndarray) -> None:
        if self.cap and self._kept < self.cap:
            take = seconds[: self.cap - self._kept]
            self._parts.append(take)
            self._kept += len(take)

    def all(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.empty(0)
