"""One worker of a stream job: the loop that polls, admits, updates and checkpoints.

Each micro-batch is split among the worker's shares of the state
(:mod:`~featurepipe.stream.share`: everything it reads, or one share per partition of a
keyed topic its consumer group gave it), decoded (:mod:`~featurepipe.stream.decode`),
admitted (:mod:`~featurepipe.stream.admission`), added to the keyed window state
(:mod:`~featurepipe.stream.state`) whose touched keys' rows in force and schedules are
written online (:mod:`~featurepipe.stream.online_rows`), and counted; every
``checkpoint_seconds`` the shares are checkpointed (:mod:`~featurepipe.stream.checkpoint`)
while the next micro-batches go on. See :mod:`featurepipe.stream.engine` for the design as
a whole.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurepipe.config import data_dir, find_repo
from featurepipe.core.db import connect
from featurepipe.online.cluster_writer import open_hash_writer
from featurepipe.online.layout import feature_field, timestamp_field
from featurepipe.online.schedule import schedule_field
from featurepipe.stream.admission import AdmissionRules
from featurepipe.stream.checkpoint import Checkpoint, start_round
from featurepipe.stream.decode import Decoder, arrow_schema
from featurepipe.stream.group import GroupProgress
from featurepipe.stream.metrics import StreamMetrics
from featurepipe.stream.online_rows import online_batches
from featurepipe.stream.options import Counters, StreamOptions, StreamResult
from featurepipe.stream.placement import ShareMaker, match_topics, share_name
from featurepipe.stream.prefetch import Prefetcher
from featurepipe.stream.progress import LatencySamples, latencies, progress_line, show_progress
from featurepipe.stream.share import Placement, StateShare
from featurepipe.stream.source import EventSource, RawBatch
from featurepipe.stream.spec import resolve_spec
from featurepipe.stream.watermark import NEG_INF, POS_INF, duration_us, from_us

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)


class StreamJob:
    """One worker of a stream job. Use :meth:`run`; :meth:`stop` (thread-safe) ends it.

    With ``options.partitioned`` the source must be a Kafka source of keyed topics (its
    ``key_sets``); the job then listens to the group's partition moves (:meth:`assigned`,
    :meth:`revoked`, :meth:`lost`, called inside the source's poll on this job's thread).
    """

    def __init__(self, store: FeatureStore, source: EventSource, redis_client: Any,
                 options: StreamOptions) -> None:
        self.store, self.source, self.redis = store, source, redis_client
        self.options = o = options
        self._stop = threading.Event()
        self.repo = find_repo(store.repo_path)
        self.data = data_dir(self.repo)
        self.root = Path(o.state_dir or self.data / "stream" / o.job)
        self.dead_dir = Path(o.dead_letter_dir or self.data / "quarantine" / "stream" / o.job)
        self.con = connect("default", threads=o.threads)  # UTC, insertion order kept
        self.spec = spec = resolve_spec(store, o, self.con, self.repo)
        self.decoder = Decoder(arrow_schema(spec.types))
        self.rules = AdmissionRules(source.name, spec.timestamp, spec.key_columns, o.allowed_lateness,
                                    spec.checks, spec.unique)
        self.lateness_us = duration_us(o.allowed_lateness)
        self.shares: dict[str | None, StateShare] = {}  # by source partition (None: the whole source)
        self._made = 0
        self._latencies = LatencySamples(o.latency_samples)
        self._pending: list[tuple[StateShare, Checkpoint]] | None = None
        self._writers: list[Any] = []  # a HashWriter per view, while running
        self.metrics = StreamMetrics(o.job, o.worker)
        self._views = ThreadPoolExecutor(max_workers=max(1, len(spec.views)), thread_name_prefix="stream-view")
        self.group: GroupProgress | None = None
        if o.partitioned:
            self._views_of = match_topics(source, spec, o.job)
            topic_keys = {t: tuple(spec.views[ids[0]].spec.join_keys) for t, ids in self._views_of.items()}
            self.maker = ShareMaker(o, spec, self.con, self.root, self.data, self.dead_dir, self.repo,
                                    archive_keys=min(topic_keys.values()),
                                    partitions_of=source.partitions)  # type: ignore[attr-defined]
            self.group = GroupProgress(self.root, topic_keys, source)
            source.listen(self)  # type: ignore[attr-defined]
        else:
            self.maker = ShareMaker(o, spec, self.con, self.root, self.data, self.dead_dir, self.repo)
            self.shares[None] = self.maker.make(f"w{o.worker}", None, list(range(len(spec.views))), None)

    # ------------------------------------------------------------ partitions moving

    def assigned(self, partitions: list[str]) -> dict[str, str]:
        """The group gave this worker ``partitions``: load each one's checkpoint (or bootstrap
        it); returns the positions to read them from."""
        self._finish_round()
        positions: dict[str, str] = {}
        for partition in partitions:
            held = self.shares.get(partition)
            if held is not None:  # assigned twice: keep what it holds
                if partition in held.positions:
                    positions[partition] = held.positions[partition]
                continue
            topic, _, number = partition.rpartition(":")
            ids = self._views_of[topic]
            keys = tuple(self.spec.views[ids[0]].spec.join_keys)
            placement = Placement(keys, int(number), self.source.partitions(topic))  # type: ignore[attr-defined]
            share = self.maker.make(share_name(keys, int(number)), partition, ids, placement)
            self.maker.start(share)
            self.shares[partition] = share
            if partition in share.positions:
                positions[partition] = share.positions[partition]
        self.metrics.held(len(self.shares))
        log.info("stream %s w%d: took %s", self.options.job, self.options.worker, partitions)
        return positions

    def revoked(self, partitions: list[str]) -> None:
        """The group moves ``partitions`` away: checkpoint each (if it changed), then forget it."""
        self._finish_round()
        gone = [self.shares[p] for p in partitions if p in self.shares]
        self.checkpoint(shares=gone)
        for share in gone:
            share.drop()
            del self.shares[share.partition]
        self.metrics.held(len(self.shares))
        log.info("stream %s w%d: gave up %s", self.options.job, self.options.worker, partitions)

    def lost(self, partitions: list[str]) -> None:
        """This worker lost ``partitions`` (its session expired): another may own them
        already, so forget them without a checkpoint; their next owner replays from the last."""
        self._finish_round()
        for p in partitions:
            share = self.shares.pop(p, None)
            if share is not None:
                share.drop()
        self.metrics.held(len(self.shares))
        log.warning("stream %s w%d: lost %s", self.options.job, self.options.worker, partitions)

    # ------------------------------------------------------------ the loop

    @property
    def counters(self) -> Counters:
        """Totals over all runs of the shares this worker holds now."""
        total = Counters()
        for share in self.shares.values():
            for name, value in vars(share.counters).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def stop(self) -> None:
        """Ask the job to finish its micro-batch, checkpoint and return."""
        self._stop.set()

    def _done(self) -> bool:
        """Whether ``max_events`` messages are done: this worker's (over its runs), or, in a
        group, the group's over every partition of the job."""
        o = self.options
        if o.max_events is None:
            return False
        if self.group is not None:
            return self.group.messages(self.shares) >= o.max_events
        return self.counters.messages >= o.max_events

    def run(self) -> StreamResult:
        """Process until stopped (``stop``, ``max_events``, ``idle_seconds``); checkpoint on the way out."""
        o = self.options
        whole = self.shares.get(None)
        if whole is not None:
            self.maker.start(whole)
        self.source.open((whole.positions or None) if whole is not None else None)
        started = last_message = last_checkpoint = time.monotonic()
        run_messages, last_progress, loop_seconds = 0, 0.0, 0.0
        self._writers = [open_hash_writer(
            self.redis, timestamp_field(v.plan.view),
            [*(feature_field(v.plan.view, f.name) for f in v.plan.features), schedule_field(v.plan.view)],
            ttl_seconds=v.plan.key_ttl_seconds, replace_equal=True,
        ).__enter__() for v in self.spec.views]
        budget = None if o.max_events is None else max(0, o.max_events - self.counters.messages)
        # a group's rebalance callbacks run inside poll: on this thread, between micro-batches
        poller = (Prefetcher(self.source, o.max_batch, o.poll_timeout, budget)
                  if o.prefetch and whole is not None else None)
        try:
            while not self._stop.is_set() and not self._done():
                if poller is not None:
                    raw = poller.next(o.poll_timeout)
                else:
                    want = o.max_batch
                    if o.max_events is not None and self.group is None:
                        want = min(want, o.max_events - self.counters.messages)
                    raw = self.source.poll(want, o.poll_timeout)
                now = time.monotonic()
                if len(raw):
                    run_messages += self._process(raw)
                    last_message = now
                elif o.idle_seconds is not None and now - last_message >= o.idle_seconds:
                    break
                if self._pending is not None and self._pending[0][1].done():
                    self._finish_round()
                if now - last_checkpoint >= o.checkpoint_seconds and self._pending is None:
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
        counters = self.group.counters(self.shares) if self.group is not None else self.counters
        return StreamResult(counters, time.monotonic() - started, run_messages,
                            from_us(self._watermark()), self._latencies.all(), loop_seconds=loop_seconds)

    def close(self) -> None:
        """Leave the group (a held partition is checkpointed first, if it changed) and release everything."""
        self._views.shutdown(wait=True)
        self.source.close()
        self._finish_round()
        self.con.close()
        self.metrics.close()

    def _split(self, raw: RawBatch) -> list[tuple[StateShare, RawBatch]]:
        """The batch's messages by the share that holds their partition; messages of a
        partition this worker gave up meanwhile are left out (its next owner reads them)."""
        whole = self.shares.get(None)
        if whole is not None:
            return [(whole, raw)]
        out = []
        for index in np.unique(raw.partitions):
            share = self.shares.get(raw.partition_names[int(index)])
            if share is not None:
                out.append((share, raw.take(np.flatnonzero(raw.partitions == index))))
        return out

    def _process(self, raw: RawBatch) -> int:
        """One micro-batch: admit it, update every view and write the touched keys online;
        returns the messages processed."""
        t0 = time.perf_counter()
        received = datetime.now(timezone.utc)
        admitted, messages, accepted, dead = [], 0, 0, 0
        for share, part in self._split(raw):
            before = share.counters.dead
            events = share.admit(part, self.decoder, self.rules, received, self.options.worker)
            messages += len(part)
            accepted += events.num_rows
            dead += share.counters.dead - before
            if events.num_rows:
                admitted.append((share, events))
                lat = latencies(part, events)
                if lat is not None:
                    self.metrics.latency(lat)
                    self._latencies.keep(lat)
        # every share's views at once (DuckDB, off the GIL), each written as it is ready
        updates = [(share, i, self._views.submit(share.state.update, i, events))
                   for share, events in admitted for i in range(len(share.views))]
        for share, i, update in updates:
            rows = update.result()
            if rows is None:
                continue
            view = share.view_ids[i]
            for batch in online_batches(rows, self.spec.views[view].plan):
                self._writers[view].write(batch)  # flushed once per micro-batch, for every view
                share.counters.online_rows += batch.count
        for writer in self._writers:  # Redis runs one view's writes while the next is computed
            writer.flush()
        self.metrics.batch(messages, accepted, dead, time.perf_counter() - t0)
        return messages

    # ------------------------------------------------------------ checkpoints

    def _watermark(self) -> int:
        """The least watermark over the shares; a partition that delivered nothing yet holds it back."""
        assigned = getattr(self.source, "assigned", lambda: None)()
        marks = [s.watermark(assigned, self.lateness_us) for s in self.shares.values()]
        return min(marks) if marks else NEG_INF

    def checkpoint(self, final: bool = False, wait: bool = True, shares: list[StateShare] | None = None) -> None:
        """Checkpoint the shares (default all): final offline rows, dead letters, raw archive,
        state, then the manifest, each share's on its own.

        The state is copied (in memory) and the watermark advanced here; the files are
        written by a background thread on a DuckDB cursor of its own unless ``wait``, so
        micro-batches go on meanwhile (one round of checkpoints in flight at most). Until
        its manifest is renamed into place, a checkpoint does not exist: a crash before that
        replays from the previous one. In a group, a partition with nothing new is skipped.
        """
        self._finish_round()
        o = self.options
        assigned = getattr(self.source, "assigned", lambda: None)()
        round_ = []
        for share in self.shares.values() if shares is None else shares:
            mark = share.watermark(assigned, self.lateness_us)
            if self.group is not None and not share.dirty and share.finalised_to >= (POS_INF if final else mark):
                continue  # nothing new: in a group, a partition's checkpoint is written only when it changed
            round_.append((share, share.begin_checkpoint(final, mark, o.job, o.worker)))
        if not round_:
            return
        self._pending = round_
        if wait:
            for share, ck in round_:
                share.writer.write(ck, self.con)
            self._finish_round()
        else:
            start_round([(share.writer, ck) for share, ck in round_], self.con)

    def _finish_round(self) -> None:
        """Wait for the checkpoints in flight, if any; then commit, count and record them."""
        round_ = self._pending
        if round_ is None:
            return
        thread = round_[0][1].thread
        if thread is not None:
            thread.join()
        self._pending = None
        for _, ck in round_:
            if ck.error is not None:
                raise ck.error
        positions: dict[str, str] = {}
        for share, ck in round_:
            share.finish_checkpoint(ck)
            for view, rows in ck.offline.items():
                self.metrics.offline(view, rows)
            if share.partition is None or share.partition in self.shares:
                positions.update(ck.manifest["positions"])
        self.source.commit(positions)
        try:
            lag = self.source.lag()
        except Exception:  # lag is advisory: a broker that cannot say (or a closed source) is not an error
            lag = None
        watermark = self._watermark()
        self.metrics.checkpoint(max(ck.seconds for _, ck in round_), lag, watermark, self.counters)
        for share, ck in round_:
            share.recorder.record(ck, self.source.name, lag, from_us(watermark))

    def _progress(self, run_messages: int, seconds: float, end: str = "\r") -> None:
        o = self.options
        show_progress(progress_line(o.job, o.worker, self.counters, run_messages, seconds,
                                    from_us(self._watermark())), end)
