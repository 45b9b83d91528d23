"""One worker of a stream job: the loop that polls, admits, updates and checkpoints.

Each micro-batch is decoded (:mod:`~featurepipe.stream.decode`), admitted
(:mod:`~featurepipe.stream.admission`), added to the keyed window state
(:mod:`~featurepipe.stream.state`) whose touched keys' rows in force and schedules are
written online (:mod:`~featurepipe.stream.online_rows`), and
counted; every ``checkpoint_seconds`` the state and outputs are checkpointed
(:mod:`~featurepipe.stream.checkpoint`) while the next micro-batches go on. See
:mod:`featurepipe.stream.engine` for the design as a whole.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from featurepipe.config import data_dir, find_repo
from featurepipe.core.db import connect
from featurepipe.online.layout import feature_field, timestamp_field
from featurepipe.online.schedule import schedule_field
from featurepipe.online.writer import HashWriter
from featurepipe.quality.contracts import load_contracts
from featurepipe.stream.admission import AdmissionRules, admit, check_rows, dead_letter_table
from featurepipe.stream.checkpoint import Checkpoint, CheckpointWriter, fingerprint, read_manifest
from featurepipe.stream.decode import MSG, Decoder, arrow_schema
from featurepipe.stream.history import unreadable_history
from featurepipe.stream.metrics import StreamMetrics
from featurepipe.stream.online_rows import online_batches
from featurepipe.stream.options import Counters, StreamOptions, StreamResult
from featurepipe.stream.prefetch import Prefetcher
from featurepipe.stream.progress import LatencySamples, latencies, progress_line, show_progress
from featurepipe.stream.record import CheckpointRecorder
from featurepipe.stream.source import EventSource, RawBatch
from featurepipe.stream.spec import resolve_spec
from featurepipe.stream.state import WindowState
from featurepipe.stream.watermark import NEG_INF, POS_INF, duration_us, from_us, job_watermark

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)


class StreamJob:
    """One worker of a stream job. Use :meth:`run`; :meth:`stop` (thread-safe) ends it."""

    def __init__(self, store: FeatureStore, source: EventSource, redis_client: Any,
                 options: StreamOptions) -> None:
        self.store, self.source, self.redis = store, source, redis_client
        self.options = o = options
        self._stop = threading.Event()
        self.repo = find_repo(store.repo_path)
        self.data = data_dir(self.repo)
        self.state_dir = Path(o.state_dir or self.data / "stream" / o.job) / f"w{o.worker}"
        self.dead_dir = Path(o.dead_letter_dir or self.data / "quarantine" / "stream" / o.job)
        self.con = connect("default", threads=o.threads)  # UTC, insertion order kept
        self.spec = spec = resolve_spec(store, o, self.con, self.repo)
        self.decoder = Decoder(arrow_schema(spec.types))
        self.rules = AdmissionRules(source.name, spec.timestamp, spec.key_columns, o.allowed_lateness,
                                    spec.checks, spec.unique)
        self.state = WindowState(self.con, spec.views, spec.types, spec.timestamp, spec.unique, o.worker, o.workers)
        self.writer = CheckpointWriter(o.job, o.worker, self.state, self.state_dir, self.dead_dir,
                                       spec.input_root, spec.timestamp)
        self.fingerprint = fingerprint(self.state, o.workers, o.allowed_lateness, spec.types)
        self.counters = Counters()
        self.seq = 0
        self.positions: dict[str, str] = {}
        self.partition_max: dict[str, int] = {}
        self.finalised_to = NEG_INF  # rows with event time < this are in the offline log
        self._dead: list[pa.Table] = []
        self._raw: list[pa.Table] = []
        self._latencies = LatencySamples(o.latency_samples)
        self._pending: Checkpoint | None = None
        self._writers: list[Any] = []  # a HashWriter per view, while running
        self._recorder = CheckpointRecorder(self.data, o.job, o.worker, spec.views, spec.input_root, self.dead_dir)
        self.metrics = StreamMetrics(o.job, o.worker)
        self._views = ThreadPoolExecutor(max_workers=max(1, len(spec.views)), thread_name_prefix="stream-view")

    # ------------------------------------------------------------ start

    def _restore(self) -> None:
        """Resume from the newest checkpoint (deleting files of an interrupted later one),
        or, for a new job with ``bootstrap``, start from the source's Parquet history."""
        o = self.options
        m = read_manifest(self.state_dir, self.fingerprint, o.job, o.worker)
        if m is not None:
            self.seq = int(m["seq"])
            self.positions = dict(m["positions"])
            self.partition_max = {k: int(v) for k, v in m["partition_max"].items()}
            self.finalised_to = int(m["finalised_to"])
            self.counters = Counters(**m["counters"])
            self.state.load(self.writer.snapshot(self.seq))
        self.writer.remove_after(self.seq)
        if m is None and o.bootstrap:
            self._bootstrap()

    def _bootstrap(self) -> None:
        """A new job starts from history: the source's Parquet events within each view's
        horizon before the newest of them become the state, and rows up to that newest
        event (change points ``v <= newest``) count as final (the batch engine wrote them). Rows that fail the
        source contract's checks are left out, as the batch gate leaves them out. Each file's
        own schema was checked when the job was set up; a file that still cannot be read
        (the contract's schema checks only warn) stops it with InvalidInput naming the file."""
        try:
            newest_us, loaded = self.state.bootstrap(self.spec.source_glob, self.spec.checks)
        except duckdb.ConversionException as exc:  # a file that passed the schema check (warn severity)
            raise unreadable_history(self.con, self.spec.source_glob, self.options.source, load_contracts(self.repo),
                                     exc, who=f"stream job {self.options.job!r}", then="restart the job") from exc
        if newest_us is None:
            return
        self.finalised_to = newest_us + 1
        log.info("stream %s: bootstrapped %d state rows from %s (history up to %s)",
                 self.options.job, loaded, self.spec.source_glob, from_us(newest_us))

    # ------------------------------------------------------------ the loop

    def stop(self) -> None:
        """Ask the job to finish its micro-batch, checkpoint and return."""
        self._stop.set()

    def run(self) -> StreamResult:
        """Process until stopped (``stop``, ``max_events``, ``idle_seconds``); checkpoint on the way out."""
        o = self.options
        self._restore()
        self._recorder.since(asdict(self.counters))
        self.source.open(self.positions or None)
        started = last_message = last_checkpoint = time.monotonic()
        run_messages, last_progress, loop_seconds = 0, 0.0, 0.0
        self._writers = [HashWriter(
            self.redis, timestamp_field(v.plan.view),
            [*(feature_field(v.plan.view, f.name) for f in v.plan.features), schedule_field(v.plan.view)],
            ttl_seconds=v.plan.key_ttl_seconds, replace_equal=True,
        ).__enter__() for v in self.spec.views]
        budget = None if o.max_events is None else max(0, o.max_events - self.counters.messages)
        poller = Prefetcher(self.source, o.max_batch, o.poll_timeout, budget) if o.prefetch else None
        try:
            while not self._stop.is_set():
                if o.max_events is not None and self.counters.messages >= o.max_events:
                    break
                if poller is not None:
                    raw = poller.next(o.poll_timeout)
                else:
                    want = o.max_batch if o.max_events is None else min(o.max_batch, o.max_events - self.counters.messages)
                    raw = self.source.poll(want, o.poll_timeout)
                now = time.monotonic()
                if len(raw):
                    self._process(raw)
                    run_messages += len(raw)
                    last_message = now
                elif o.idle_seconds is not None and now - last_message >= o.idle_seconds:
                    break
                if self._pending is not None and self._pending.done():
                    self._finish_checkpoint()
                if now - last_checkpoint >= o.checkpoint_seconds and (self._pending is None or self._pending.done()):
                    self.checkpoint(wait=False)
                    last_checkpoint = time.monotonic()
                if o.progress and now - last_progress >= 1.0:
                    self._progress(run_messages, now - started)
                    last_progress = now
            loop_seconds = time.monotonic() - started
            if poller is not None:
                poller.close()
                poller = None
            self.checkpoint(final=o.final)
        finally:
            if poller is not None:
                poller.close()
            for writer in self._writers:
                writer.__exit__(None, None, None)
            self._writers = []
            if o.progress:
                self._progress(run_messages, time.monotonic() - started, end="\n")
        return StreamResult(self.counters, time.monotonic() - started, run_messages,
                            from_us(self._watermark()), self._latencies.all(), loop_seconds=loop_seconds)

    def close(self) -> None:
        self._views.shutdown(wait=True)
        self.source.close()
        self.con.close()
        self.metrics.close()

    def _process(self, raw: RawBatch) -> None:
        """One micro-batch: admit it, update every view and write the touched keys online."""
        t0 = time.perf_counter()
        o = self.options
        self.counters.messages += len(raw)
        decoded = self.decoder.decode(raw.payloads)
        failures = check_rows(self.con, decoded.events, self.rules.conditions())
        seen = self.state.seen_among(decoded.events) if self.rules.unique else None
        result = admit(raw, decoded, failures, self.rules, self.partition_max, self.finalised_to, seen)
        self.partition_max = result.partition_max
        events = result.events
        if events.num_rows:
            self.state.remember(events)  # the seen set of the contract's unique columns
        self.counters.late += result.late
        self.counters.duplicate += result.duplicate
        self.counters.dead += len(result.dead)
        self.counters.accepted += events.num_rows
        if len(result.dead) and o.worker == 0:
            self._dead.append(dead_letter_table(raw, result.dead, o.worker, datetime.now(timezone.utc)))
        if events.num_rows:
            # every view's state at once (DuckDB, off the GIL), each written as it is ready
            updates = [self._views.submit(self.state.update, i, events) for i in range(len(self.spec.views))]
            for v, writer, update in zip(self.spec.views, self._writers, updates):
                rows = update.result()
                if rows is None:
                    continue
                for batch in online_batches(rows, v.plan):
                    writer.write(batch)  # flushed once per micro-batch, for every view
                    self.counters.online_rows += batch.count
            for writer in self._writers:  # Redis runs one view's writes while the next is computed
                writer.flush()
            if o.archive_raw and o.worker == 0:
                self._raw.append(events.drop_columns([MSG]))
            lat = latencies(raw, events)
            if lat is not None:
                self.metrics.latency(lat)
                self._latencies.keep(lat)
        self.positions.update(raw.positions)
        self.metrics.batch(len(raw), events.num_rows, len(result.dead), time.perf_counter() - t0)

    # ------------------------------------------------------------ checkpoints

    def _watermark(self) -> int:
        """The least partition watermark; a partition that delivered nothing yet holds it back."""
        assigned = getattr(self.source, "assigned", lambda: None)()
        return job_watermark(self.partition_max, assigned, duration_us(self.options.allowed_lateness))

    def checkpoint(self, final: bool = False, wait: bool = True) -> None:
        """Checkpoint: final offline rows, dead letters, raw archive, state, then the manifest.

        The state is copied (in memory) and the watermark advanced here; the files are
        written by a background thread on a DuckDB cursor of its own unless ``wait``, so
        micro-batches go on meanwhile (one checkpoint in flight at most). Until its manifest
        is renamed into place, a checkpoint does not exist: a crash before that replays
        from the previous one.
        """
        self._finish_checkpoint()
        o = self.options
        seq = self.seq + 1
        wm = POS_INF if final else self._watermark()
        self.state.freeze()
        lo, finalise = self.finalised_to, wm > self.finalised_to
        if finalise:
            self.finalised_to = wm
            if wm < POS_INF:
                self.state.prune(wm)
        self.counters.checkpoints += 1
        ck = Checkpoint(
            seq=seq, lo=lo, hi=wm, finalise=finalise, dead=self._dead, raw=self._raw,
            manifest={
                "seq": seq, "job": o.job, "worker": o.worker, "fingerprint": self.fingerprint,
                "positions": dict(self.positions), "partition_max": dict(self.partition_max),
                "finalised_to": self.finalised_to, "counters": asdict(self.counters),
            },
        )
        self._dead, self._raw = [], []
        self.seq = seq
        self._pending = ck
        if wait:
            self.writer.write(ck, self.con)
            self._finish_checkpoint()
        else:
            self.writer.start(ck, self.con)

    def _finish_checkpoint(self) -> None:
        """Wait for the checkpoint in flight, if any; then commit, count and record it."""
        ck = self._pending
        if ck is None:
            return
        if ck.thread is not None:
            ck.thread.join()
        self._pending = None
        if ck.error is not None:
            raise ck.error
        for view, rows in ck.offline.items():
            self.counters.offline_rows += rows
            self.metrics.offline(view, rows)
        self.source.commit(ck.manifest["positions"])
        try:
            lag = self.source.lag()
        except Exception:  # lag is advisory: a broker that cannot say is not an error
            lag = None
        self.metrics.checkpoint(ck.seconds, lag, self._watermark(), self.counters)
        self._recorder.record(ck, self.source.name, lag, from_us(self._watermark()))

    def _progress(self, run_messages: int, seconds: float, end: str = "\r") -> None:
        o = self.options
        show_progress(progress_line(o.job, o.worker, self.counters, run_messages, seconds,
                                    from_us(self._watermark())), end)

