"""Polling the event source on a thread of its own, one micro-batch ahead while there is a backlog."""

from __future__ import annotations

import queue
import threading

import numpy as np

from featurepipe.stream.source import EventSource, RawBatch


class Prefetcher:
    """Polls the source on a thread of its own.

    While there is a backlog (the last poll returned a full batch) it reads one micro-batch
    ahead, so parsing the next batch (which holds the GIL) overlaps the engine's DuckDB and
    Arrow work on this one (which does not). Otherwise it polls only when the engine asks,
    so a live stream's events do not wait behind a batch read ahead. Never reads more than
    ``budget`` messages (when set). Messages read but not processed when the job stops are
    not lost: the checkpoint's positions are before them, and a restart reads them again.
    """

    def __init__(self, source: EventSource, max_batch: int, timeout: float, budget: int | None) -> None:
        self.source, self.max_batch, self.timeout, self.budget = source, max_batch, timeout, budget
        self.queue: queue.Queue[RawBatch | BaseException] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._need = threading.Event()
        self._asked = False  # a poll was asked for and its batch not yet taken (engine's thread only)
        self.thread = threading.Thread(target=self._run, name="stream-poll", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ahead = waiting = False  # waiting: the engine asked, and no batch was handed to it yet
        try:
            while not self._stop.is_set():
                if not ahead and not waiting:
                    if not self._need.wait(0.1):
                        continue
                self._need.clear()
                waiting = True
                want = self.max_batch if self.budget is None else min(self.max_batch, self.budget)
                if want <= 0:
                    return
                raw = self.source.poll(want, self.timeout)
                ahead = len(raw) >= want
                if not len(raw):
                    continue  # still asked for: poll again
                waiting = False
                if self.budget is not None:
                    self.budget -= len(raw)
                while not self._stop.is_set():
                    try:
                        self.queue.put(raw, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the engine's thread
            self.queue.put(exc)

    def next(self, timeout: float) -> RawBatch:
        """The next micro-batch (empty if none came within about ``timeout``); re-raises
        what the polling thread raised.

        A poll is asked for once: asking again while it is in flight would have the thread
        poll again right after it, so that the next batch would hold only what came in those
        milliseconds, and everything arriving while this batch is processed would wait one
        batch more."""
        if not self._asked:
            self._asked = True
            self._need.set()
        try:
            item = self.queue.get(timeout=max(timeout, 0.001) * 2)
        except queue.Empty:
            return RawBatch([], np.empty(0, np.int32), [])
        self._asked = False
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop polling (waits for the poll in flight)."""
        self._stop.set()
        self.thread.join(timeout=30)
