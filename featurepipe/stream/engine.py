"""The streaming engine: the batch engine's feature definitions, computed from live events.

``StreamJob`` reads JSON events from an :class:`~featurepipe.stream.source.EventSource`
in micro-batches and keeps every windowed-aggregate view fed by that source up to date,
online (Redis, Feast's layout) within one micro-batch and offline (Parquet in the view's
feature table) once the rows are final.

**Same definitions, same kernel.** The aggregates are the views' ``Aggregation``
declarations read back from the registry, computed with the very SQL the batch engine
generates (:func:`featurepipe.batch.sql.aggregate_sql`) over the job's state: the events
of each key inside the view's longest window. Sums run over exact decimals, so a value
does not depend on the order events arrived in, and stream and batch agree to the bit.

**Event time.** Each partition's watermark is its greatest event time so far minus the
allowed lateness; an event older than the watermark of its partition *when it arrives*
is late: it goes to the dead letters with the reason and changes nothing (decided per
event in arrival order, so it does not depend on how messages were cut into batches).
An event within the lateness updates every window it falls into: the entity's latest row
is recomputed and written online (a row replaces one of the same event time); rows older
than the job's watermark (the least over partitions) can no longer change and are
written to the offline log.

**Exactly-once effect.** Every ``checkpoint_seconds`` the job writes, in this order, the
final offline rows, the dead letters and the archived raw events (files named by the
checkpoint's sequence number), a snapshot of its state, and last a manifest with the
source positions (atomic rename). On start it loads the newest manifest, deletes files
of later sequence numbers (a checkpoint the crash interrupted) and replays the source
from the manifest's positions. Redis writes are idempotent (newest event time wins;
equal time replaces with the value computed from the same events), so replayed
micro-batches leave Redis as an uninterrupted run does.

**Several workers.** Worker ``w`` of ``n`` reads the whole stream and owns the keys with
``hash(key) % n == w`` for every view (an event updates a user's and a merchant's
aggregates, so no single partitioning of the stream splits both). Decoding and checks
run on every worker; only worker 0 writes dead letters and the raw archive.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurepipe.batch.sql import (
    SourceColumns,
    aggregate_sql,
    latest_sql,
    literal,
    quote,
    ts_literal,
)
from featurepipe.config import resolve_source_path
from featurepipe.definitions import AggregateView, aggregate_views
from featurepipe.errors import InvalidInput, NotFound
from featurepipe.stream.decode import MSG, Decoder, arrow_schema
from featurepipe.stream.history import check_raw_history, unreadable_history
from featurepipe.stream.source import EventSource, RawBatch

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

US = 1_000_000
NEG_INF = -(2**62)
POS_INF = 2**62
MANIFEST = "checkpoint.json"
DEAD_COLUMNS = ("message_id", "partition", "payload", "quality_check", "quality_reason", "worker", "received_at")


@dataclass
class StreamOptions:
    """How a stream job runs. See ``featurepipe stream run --help``."""

    job: str = "stream"
    source: str = "transactions"  # the Feast data source whose events the stream carries
    views: Sequence[str] | None = None
    allowed_lateness: timedelta = timedelta(minutes=5)
    max_batch: int = 50_000
    poll_timeout: float = 0.05
    checkpoint_seconds: float = 5.0
    worker: int = 0
    workers: int = 1
    threads: int = 1
    archive_raw: bool = True
    max_events: int | None = None  # stop once this many messages are done (over all runs)
    idle_seconds: float | None = None  # stop after this long without a message
    final: bool = False  # at the stop, the input is complete: finalise every row
    progress: bool = True
    state_dir: Path | None = None
    dead_letter_dir: Path | None = None
    latency_samples: int = 0  # keep up to this many event-to-online latencies (benchmarks)
    prefetch: bool = True  # poll the next micro-batch on a thread while this one is processed
    bootstrap: bool = False  # a new job loads its state from the source's Parquet history

    def __post_init__(self) -> None:
        if self.workers < 1 or not 0 <= self.worker < self.workers:
            raise InvalidInput(f"worker must be in [0, workers); got worker {self.worker} of {self.workers}")
        if self.allowed_lateness < timedelta(0):
            raise InvalidInput("allowed lateness must be >= 0")
        if self.max_batch < 1:
            raise InvalidInput("max_batch must be >= 1")


@dataclass
class Counters:
    """Messages by outcome, over every run of the job (restored from the checkpoint)."""

    messages: int = 0
    accepted: int = 0
    dead: int = 0  # could not be decoded or failed a contract check
    late: int = 0
    duplicate: int = 0
    online_rows: int = 0
    offline_rows: int = 0
    checkpoints: int = 0


@dataclass
class StreamResult:
    """What a run did (counters are totals over all runs of the job)."""

    counters: Counters
    seconds: float
    run_messages: int
    watermark: datetime | None
    latencies: np.ndarray = field(default_factory=lambda: np.empty(0))
    loop_seconds: float = 0.0  # until the last message was processed (online), before the last checkpoint

    @property
    def events_per_second(self) -> float:
        return self.run_messages / self.seconds if self.seconds else 0.0

    @property
    def sustained_events_per_second(self) -> float:
        """Messages per second until the last one was online (checkpoints ran meanwhile)."""
        return self.run_messages / self.loop_seconds if self.loop_seconds else 0.0


@dataclass
class _Checkpoint:
    """A checkpoint being written: what to write and, once done, what was written."""

    seq: int
    lo: int
    hi: int
    finalise: bool
    dead: list[pa.Table]
    raw: list[pa.Table]
    manifest: dict[str, Any]
    written: list[Path] = field(default_factory=list)
    offline: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: BaseException | None = None
    thread: threading.Thread | None = None


@dataclass
class _View:
    spec: AggregateView
    table: str
    columns: SourceColumns
    plan: Any  # featurepipe.online.window.ViewPlan
    writer: Any = None  # HashWriter
    keys_sql: str = ""


def _us(value: datetime | None) -> int:
    if value is None:
        return NEG_INF
    return int(value.timestamp() * US) if value.tzinfo else int(value.replace(tzinfo=timezone.utc).timestamp() * US)


def _dt(us: int) -> datetime | None:
    if us <= NEG_INF or us >= POS_INF:
        return None
    return datetime.fromtimestamp(us / US, tz=timezone.utc)


def _ts_sql(us: int) -> str:
    return ts_literal(datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=us))


class StreamJob:
    """One worker of a stream job. Use :meth:`run`; :meth:`stop` (thread-safe) ends it."""

    def __init__(self, store: FeatureStore, source: EventSource, redis_client: Any,
                 options: StreamOptions | None = None) -> None:
        from featurepipe.config import data_dir, find_repo

        self.store = store
        self.source = source
        self.redis = redis_client
        self.options = options or StreamOptions()
        self._stop = threading.Event()
        repo = find_repo(store.repo_path)
        self.repo = repo
        self.data = data_dir(repo)
        o = self.options
        self.state_dir = Path(o.state_dir or self.data / "stream" / o.job) / f"w{o.worker}"
        self.dead_dir = Path(o.dead_letter_dir or self.data / "quarantine" / "stream" / o.job)
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        self.con.execute(f"SET threads = {int(o.threads)}")
        self.con.execute("SET preserve_insertion_order = true")
        self._resolve(repo)
        self.counters = Counters()
        self.seq = 0
        self.positions: dict[str, str] = {}
        self.partition_max: dict[str, int] = {}
        self.finalised_to = NEG_INF  # rows with event time < this are in the offline log
        self._dead: list[pa.Table] = []
        self._raw: list[pa.Table] = []
        self._latencies: list[np.ndarray] = []
        self._latency_kept = 0
        self._pending: _Checkpoint | None = None
        from featurepipe.stream.metrics import StreamMetrics

        self.metrics = StreamMetrics(o.job, o.worker)

    # ------------------------------------------------------------ setup

    def _resolve(self, repo: Path) -> None:
        from featurepipe.online.engine import view_plan
        from featurepipe.quality.checks import row_checks
        from featurepipe.quality.contracts import load_contracts

        o = self.options
        try:
            source = self.store.get_data_source(o.source)
        except Exception as exc:  # feast raises DataSourceObjectNotFoundException
            raise InvalidInput(f"the registry has no data source {o.source!r}; check --source or run feast apply") from exc
        source_glob = resolve_source_path(repo, source.path) if hasattr(source, "path") else None
        views = [v for v in aggregate_views(self.store, o.views)
                 if v.input_path == source_glob
                 and v.timestamp_field == source.timestamp_field]
        if not views:
            raise InvalidInput(
                f"no windowed-aggregate view reads source {o.source!r} by {source.timestamp_field!r}; "
                "nothing to compute from this stream"
            )
        self.source_ref = source
        self.source_glob = str(source_glob)
        self.timestamp = source.timestamp_field
        self.input_root = Path(self.source_glob.split("/**")[0])
        contracts = load_contracts(repo)
        contract = contracts.sources.get(o.source)
        # each raw file's own schema, before its types are taken or its rows bootstrapped
        check_raw_history(self.con, self.source_glob, o.source, contracts, who=f"stream job {o.job!r}",
                          then="restart the job")
        types = self._source_types(self.source_glob, contract)
        self.types = types
        self.decoder = Decoder(arrow_schema(types))
        self.contract = contract
        self.checks = [c for c in row_checks(contract, types) if "__dup_rank" not in c.fails] if contract else []
        self.unique = tuple(contract.unique) if contract and contract.unique else ()
        key_cols = sorted({k for v in views for k in v.join_keys})
        missing = [c for c in [*key_cols, self.timestamp] if c not in types]
        if missing:
            raise InvalidInput(f"source {o.source!r} has no column(s) {missing}")
        self.key_columns = key_cols
        columns = SourceColumns(types)
        self.views: list[_View] = []
        for i, spec in enumerate(views):
            columns.require(spec)
            if any(a.window is None and a.function != "last" for a in spec.aggregations):
                raise InvalidInput(f"view {spec.name!r}: streaming needs a time window on every aggregation but 'last'")
            fv = self.store.get_feature_view(spec.name)
            plan = view_plan(fv, self.store.config, self.store.project)
            needed = [*spec.join_keys, self.timestamp,
                      *sorted({a.column for a in spec.aggregations} - {self.timestamp, *spec.join_keys})]
            table = f"state_{i}"
            cols = ", ".join(f"{quote(c)} {types[c]}" for c in needed)
            self.con.execute(f"CREATE TABLE {table} ({cols})")
            self.views.append(_View(spec, table, columns, plan, keys_sql=", ".join(quote(k) for k in spec.join_keys)))
        self.needed = {v.spec.name: [c for c in self.con.execute(f"DESCRIBE {v.table}").fetchall()] for v in self.views}
        if self.unique:
            cols = ", ".join(f"{quote(c)} {types[c]}" for c in self.unique)
            self.con.execute(f"CREATE TABLE seen ({cols}, __ts TIMESTAMPTZ)")

    def _source_types(self, path: str, contract: Any) -> dict[str, str]:
        try:
            rows = self.con.execute(
                f"DESCRIBE SELECT * FROM read_parquet({literal(path)}, hive_partitioning = true, union_by_name = true)"
            ).fetchall()
            types = {r[0]: str(r[1]) for r in rows if r[0] != "date"}
        except duckdb.IOException:
            types = {}
        if not types and contract is not None:
            types = {c.name: c.type for c in contract.columns if c.type}
        if not types:
            raise NotFound(
                f"cannot tell the schema of source {self.options.source!r}: no Parquet files match {path} "
                "and contracts.yaml declares no column types for it"
            )
        return types

    # ------------------------------------------------------------ checkpoint files

    def _tag(self, seq: int) -> str:
        return f"stream-{self.options.job}-w{self.options.worker}-{seq:08d}"

    def _own_files(self) -> list[Path]:
        o = self.options
        pattern = f"stream-{o.job}-w{o.worker}-*.parquet"
        roots = [v.spec.offline_path for v in self.views]
        if o.worker == 0:
            roots += [self.dead_dir, self.input_root]
        files: list[Path] = []
        for root in roots:
            files += list(Path(root).glob(f"date=*/{pattern}")) + list(Path(root).glob(pattern))
        return files

    @staticmethod
    def _seq_of(path: Path) -> int:
        return int(path.stem.rsplit("-", 1)[1])

    def _restore(self) -> None:
        manifest = self.state_dir / MANIFEST
        if manifest.exists():
            m = json.loads(manifest.read_text())
            want = self._fingerprint()
            if m["fingerprint"] != want:
                raise InvalidInput(
                    f"stream job {self.options.job!r} worker {self.options.worker}: the checkpoint in "
                    f"{self.state_dir} was written for other definitions or worker count "
                    f"({m['fingerprint']} vs {want}); start a new --job or delete that folder"
                )
            self.seq = int(m["seq"])
            self.positions = dict(m["positions"])
            self.partition_max = {k: int(v) for k, v in m["partition_max"].items()}
            self.finalised_to = int(m["finalised_to"])
            self.counters = Counters(**m["counters"])
            snap = self.state_dir / f"seq-{self.seq:08d}"
            for v in self.views:
                f = snap / f"{v.table}.parquet"
                if f.exists():
                    self.con.execute(f"INSERT INTO {v.table} SELECT * FROM read_parquet({literal(str(f))})")
            if self.unique and (snap / "seen.parquet").exists():
                self.con.execute(f"INSERT INTO seen SELECT * FROM read_parquet({literal(str(snap / 'seen.parquet'))})")
        removed = 0
        for f in self._own_files():
            if self._seq_of(f) > self.seq:
                f.unlink()
                removed += 1
        if removed:
            log.warning("stream %s: removed %d file(s) of an interrupted checkpoint", self.options.job, removed)
        if not manifest.exists() and self.options.bootstrap:
            self._bootstrap()

    def _bootstrap(self) -> None:
        """A new job starts from history: the source's Parquet events inside each view's
        longest window before the newest of them become the state, and rows up to that
        newest event count as final (the batch engine wrote them). Rows that fail the
        source contract's checks are left out, as the batch gate leaves them out. Each file's
        own schema was checked when the job was set up; a file that still cannot be read
        (the contract's schema checks only warn) stops it with InvalidInput naming the file."""
        con = self.con
        ts = quote(self.timestamp)
        source = f"read_parquet({literal(self.source_glob)}, hive_partitioning = true, union_by_name = true)"
        try:
            (newest,) = con.execute(f"SELECT max({ts}) FROM {source}").fetchall()[0]
        except duckdb.IOException:
            newest = None
        except duckdb.ConversionException as exc:  # a file that passed the schema check (warn severity)
            raise self._unreadable_history(exc) from exc
        if newest is None:
            return
        newest_us = _us(newest)
        bad = " OR ".join(f"({c.fails})" for c in self.checks) or "FALSE"
        loaded = 0
        for v in self.views:
            maxw = int(v.spec.max_window / timedelta(microseconds=1))
            cols = ", ".join(quote(c[0]) for c in self.needed[v.spec.name])
            keys_ok = " AND ".join(f"{quote(k)} IS NOT NULL" for k in v.spec.join_keys)
            try:
                con.execute(
                    f"INSERT INTO {v.table} SELECT {cols} FROM {source} WHERE {ts} >= {_ts_sql(newest_us - maxw)} "
                    f"AND {keys_ok} AND NOT coalesce({bad}, FALSE) AND {self._owned(v)}"
                )
            except duckdb.ConversionException as exc:
                raise self._unreadable_history(exc) from exc
            loaded += con.execute(f"SELECT count(*) FROM {v.table}").fetchall()[0][0]
        self.finalised_to = newest_us + 1
        log.info("stream %s: bootstrapped %d state rows from %s (history up to %s)",
                 self.options.job, loaded, self.source_glob, newest)

    def _unreadable_history(self, exc: duckdb.Error) -> InvalidInput:
        from featurepipe.quality.contracts import load_contracts

        return unreadable_history(self.con, self.source_glob, self.options.source, load_contracts(self.repo), exc,
                                  who=f"stream job {self.options.job!r}", then="restart the job")

    def _fingerprint(self) -> str:
        import hashlib

        spec = {
            "views": [asdict(v.spec) | {"offline_path": str(v.spec.offline_path)} for v in self.views],
            "workers": self.options.workers,
            "lateness_us": int(self.options.allowed_lateness / timedelta(microseconds=1)),
            "types": self.types,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------ the loop

    def stop(self) -> None:
        """Ask the job to finish its micro-batch, checkpoint and return."""
        self._stop.set()

    def run(self) -> StreamResult:
        """Process until stopped (``stop``, ``max_events``, ``idle_seconds``); checkpoint on the way out."""
        from featurepipe.online.layout import feature_field, timestamp_field
        from featurepipe.online.writer import HashWriter

        o = self.options
        self._restore()
        self._recorded_counters: dict[str, int] | None = asdict(self.counters)
        self.source.open(self.positions or None)
        started = time.monotonic()
        run_messages = 0
        last_message = time.monotonic()
        last_checkpoint = time.monotonic()
        last_progress = 0.0
        for v in self.views:
            v.writer = HashWriter(
                self.redis, timestamp_field(v.plan.view),
                [feature_field(v.plan.view, f.name) for f in v.plan.features],
                ttl_seconds=v.plan.key_ttl_seconds, replace_equal=True,
            ).__enter__()
        budget = None if o.max_events is None else max(0, o.max_events - self.counters.messages)
        poller = _Prefetcher(self.source, o.max_batch, o.poll_timeout, budget) if o.prefetch else None
        loop_seconds = 0.0
        try:
            while not self._stop.is_set():
                if o.max_events is not None and self.counters.messages >= o.max_events:
                    break
                if poller is not None:
                    raw = poller.next(o.poll_timeout)
                else:
                    want = o.max_batch
                    if o.max_events is not None:
                        want = min(want, o.max_events - self.counters.messages)
                    raw = self.source.poll(want, o.poll_timeout)
                now = time.monotonic()
                if len(raw):
                    self._process(raw)
                    run_messages += len(raw)
                    last_message = now
                elif o.idle_seconds is not None and now - last_message >= o.idle_seconds:
                    break
                if self._pending is not None and self._checkpoint_done():
                    self._finish_checkpoint()
                if now - last_checkpoint >= o.checkpoint_seconds and self._checkpoint_done():
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
            for v in self.views:
                if v.writer is not None:
                    v.writer.__exit__(None, None, None)
                    v.writer = None
            if o.progress:
                self._progress(run_messages, time.monotonic() - started, end="\n")
        lat = np.concatenate(self._latencies) if self._latencies else np.empty(0)
        return StreamResult(self.counters, time.monotonic() - started, run_messages,
                            _dt(self._watermark()), lat, loop_seconds=loop_seconds)

    def close(self) -> None:
        self.source.close()
        self.con.close()
        self.metrics.close()

    # ------------------------------------------------------------ one micro-batch

    def _process(self, raw: RawBatch) -> None:
        t0 = time.perf_counter()
        o = self.options
        self.counters.messages += len(raw)
        decoded = self.decoder.decode(raw.payloads)
        events = decoded.events
        dead_index = [decoded.dead_index]
        dead_check = ["decode"] * len(decoded.dead_reason)
        dead_reason = list(decoded.dead_reason)
        con = self.con
        con.register("__events", events)
        # contract row checks (warn: dead-letter the row; block: stop before anything is written)
        ts = quote(self.timestamp)
        builtin = [(f"{ts} IS NULL", "event_time.not_null", f"'{self.timestamp} is null'")]
        builtin += [(f"{quote(k)} IS NULL", f"{k}.not_null", f"'{k} is null (a join key)'") for k in self.key_columns]
        conds = [(c.fails, c.name, c.reason, c.severity) for c in self.checks] + [(a, b, r, "warn") for a, b, r in builtin]
        if conds and events.num_rows:
            first = "CASE " + " ".join(f"WHEN {f} THEN {literal(n)}" for f, n, _, _ in conds) + " END"
            reasons = "concat_ws('; ', " + ", ".join(f"CASE WHEN {f} THEN {r} END" for f, _, r, _ in conds) + ")"
            bad = con.execute(
                f"SELECT {MSG}, {first} AS c, {reasons} AS r FROM __events WHERE {' OR '.join(f'({f})' for f, *_ in conds)}"
            ).fetchall()
            if bad:
                blocking = {n for _, n, _, s in conds if s == "block"}
                blocked = [b for b in bad if b[1] in blocking]
                if blocked:
                    sample = [raw.payloads[int(b[0])].decode(errors="replace") for b in blocked[:3]]
                    raise InvalidInput(
                        f"stream {self.source.name}: blocking check {blocked[0][1]} failed on {len(blocked)} of "
                        f"{len(raw)} events in this micro-batch ({blocked[0][2]}); sample: {sample}. Nothing of "
                        "this batch was written; fix the producer or the contract and restart (the job resumes "
                        "from its last checkpoint)"
                    )
                idx = np.asarray([b[0] for b in bad], dtype=np.int64)
                dead_index.append(idx)
                dead_check += [b[1] for b in bad]
                dead_reason += [b[2] for b in bad]
                keep = np.ones(events.num_rows, dtype=bool)
                keep[np.isin(events.column(MSG).to_numpy(), idx)] = False
                events = events.filter(pa.array(keep))
        # lateness: per partition, in arrival order
        if events.num_rows:
            msg = events.column(MSG).to_numpy()
            part = raw.partitions[msg]
            tsu = events.column(self.timestamp).cast(pa.int64()).to_numpy()
            bound = np.empty(len(msg), dtype=np.int64)  # the event's partition watermark on arrival
            lateness = int(o.allowed_lateness / timedelta(microseconds=1))
            for p in np.unique(part):
                name = raw.partition_names[int(p)]
                sel = np.nonzero(part == p)[0]
                prev = self.partition_max.get(name, NEG_INF)
                run_max = np.maximum.accumulate(np.concatenate([[prev], tsu[sel]]))
                bound[sel] = run_max[:-1] - lateness
                self.partition_max[name] = int(run_max[-1])
            late = tsu < bound
            # rows before finalised_to are in the offline log already: nothing may change them
            # (only a partition the job had not heard of when it finalised can get here)
            behind = (tsu < self.finalised_to) & ~late
            late |= behind
            if late.any():
                li = np.nonzero(late)[0]
                dead_index.append(msg[li])
                for i in li:
                    dead_check.append("late")
                    if behind[i] and self.finalised_to >= POS_INF:
                        dead_reason.append("late: this job ended with --final (its input was complete); "
                                           "run new events under a new --job")
                        continue
                    if behind[i]:
                        dead_reason.append(
                            f"late: event time {_dt(int(tsu[i])):%Y-%m-%d %H:%M:%S.%f} is before rows the job "
                            f"has already made final ({_dt(self.finalised_to):%Y-%m-%d %H:%M:%S})"
                        )
                        continue
                    dead_reason.append(
                        f"late: event time {_dt(int(tsu[i])):%Y-%m-%d %H:%M:%S.%f} is more than the allowed "
                        f"lateness {o.allowed_lateness} behind its partition's newest event"
                        f" (its watermark was {_dt(int(bound[i])):%Y-%m-%d %H:%M:%S.%f})"
                    )
                self.counters.late += len(li)
                events = events.filter(pa.array(~late))
        # duplicates of the contract's unique columns (an at-least-once producer resending)
        if self.unique and events.num_rows:
            con.register("__events", events)
            ucols = ", ".join(quote(c) for c in self.unique)
            dup = con.execute(
                f"SELECT {MSG} FROM (SELECT {MSG}, {ucols}, row_number() OVER (PARTITION BY {ucols} ORDER BY {MSG}) AS r "
                f"FROM __events) e WHERE r > 1 OR EXISTS (SELECT 1 FROM seen s WHERE "
                + " AND ".join(f"s.{quote(c)} = e.{quote(c)}" for c in self.unique) + ")"
            ).fetchnumpy()[MSG]
            if len(dup):
                dead_index.append(np.asarray(dup, dtype=np.int64))
                dead_check += ["duplicate"] * len(dup)
                dead_reason += [f"duplicate of an earlier event with the same ({', '.join(self.unique)})"] * len(dup)
                self.counters.duplicate += len(dup)
                events = events.filter(pc.invert(pc.is_in(events.column(MSG), pa.array(dup, pa.int64()))))
            con.register("__events", events)
            con.execute(f"INSERT INTO seen SELECT {ucols}, {ts} FROM __events")
        all_dead = np.concatenate(dead_index) if dead_index else np.empty(0, np.int64)
        self.counters.dead += len(all_dead)
        self.counters.accepted += events.num_rows
        if len(all_dead) and o.worker == 0:
            self._dead.append(self._dead_letters(raw, all_dead, dead_check, dead_reason))
        con.register("__events", events)
        if events.num_rows:
            for v in self.views:
                self.counters.online_rows += self._update_view(v)
            for v in self.views:  # Redis runs one view's writes while the next is computed
                v.writer.flush()
            if o.archive_raw and o.worker == 0:
                self._raw.append(events.drop_columns([MSG]))
            self._observe_latency(raw, events)
        con.unregister("__events")
        self.positions.update(raw.positions)
        self.metrics.batch(len(raw), events.num_rows, len(all_dead), time.perf_counter() - t0)

    def _dead_letters(self, raw: RawBatch, index: np.ndarray, checks: list[str], reasons: list[str]) -> pa.Table:
        now = datetime.now(timezone.utc)
        return pa.table({
            "message_id": [raw.ids[int(i)] if raw.ids else str(int(i)) for i in index],  # its position in the partition
            "partition": [raw.partition_names[int(raw.partitions[int(i)])] for i in index],
            "payload": [raw.payloads[int(i)].decode("utf-8", errors="replace") for i in index],
            "quality_check": checks,  # the column names of the batch gates' quarantine
            "quality_reason": reasons,
            "worker": pa.array([self.options.worker] * len(index), pa.int32()),
            "received_at": pa.array([now] * len(index), pa.timestamp("us", tz="UTC")),
        })

    def _owned(self, v: _View) -> str:
        if self.options.workers == 1:
            return "TRUE"
        return f"hash({v.keys_sql}) % {self.options.workers} = {self.options.worker}"

    def _update_view(self, v: _View) -> int:
        """Insert the batch's events of owned keys into the view's state and write each
        touched key's latest row online. Returns the rows written."""
        from featurepipe.online.latest import EVENT_US
        from featurepipe.online.window import encode

        con = self.con
        spec = v.spec
        cols = ", ".join(quote(c[0]) for c in self.needed[spec.name])
        con.execute(f"INSERT INTO {v.table} SELECT {cols} FROM __events WHERE {self._owned(v)}")
        keys = v.keys_sql
        join = " AND ".join(f"s.{quote(k)} = a.{quote(k)}" for k in spec.join_keys)
        touched = (f"(SELECT s.* FROM {v.table} s SEMI JOIN "
                   f"(SELECT DISTINCT {keys} FROM __events WHERE {self._owned(v)}) a ON {join})")
        rows = con.sql(
            f"SELECT *, epoch_us(event_timestamp) AS {EVENT_US} FROM ({latest_sql(spec, v.columns, touched)})"
        ).to_arrow_table()
        for batch in rows.to_batches(max_chunksize=10_000):
            v.writer.write(encode(batch, v.plan))  # flushed once per micro-batch, for every view
        return rows.num_rows

    def _observe_latency(self, raw: RawBatch, events: pa.Table) -> None:
        publish = getattr(raw, "publish_ms", None)
        if publish is None or not len(publish):
            return
        now_ms = time.time() * 1000
        lat = (now_ms - np.asarray(publish)[events.column(MSG).to_numpy()]) / 1000.0
        self.metrics.latency(lat)
        cap = self.options.latency_samples
        if cap and self._latency_kept < cap:
            take = lat[: cap - self._latency_kept]
            self._latencies.append(take)
            self._latency_kept += len(take)

    # ------------------------------------------------------------ checkpoint

    def _watermark(self) -> int:
        """The least partition watermark; a partition that delivered nothing yet holds it back."""
        assigned = getattr(self.source, "assigned", lambda: None)()
        partitions = set(assigned or ()) | set(self.partition_max)
        if not partitions or any(p not in self.partition_max for p in partitions):
            return NEG_INF
        lateness = int(self.options.allowed_lateness / timedelta(microseconds=1))
        return min(self.partition_max[p] for p in partitions) - lateness

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
        con = self.con
        for v in self.views:
            con.execute(f"CREATE OR REPLACE TABLE ck_{v.table} AS SELECT * FROM {v.table}")
        if self.unique:
            con.execute("CREATE OR REPLACE TABLE ck_seen AS SELECT * FROM seen")
        lo, finalise = self.finalised_to, wm > self.finalised_to
        if finalise:
            self.finalised_to = wm
            if wm < POS_INF:
                for v in self.views:
                    maxw = int(v.spec.max_window / timedelta(microseconds=1))
                    con.execute(f"DELETE FROM {v.table} WHERE {quote(self.timestamp)} < {_ts_sql(wm - maxw)}")
                if self.unique:
                    con.execute(f"DELETE FROM seen WHERE __ts < {_ts_sql(wm)}")
        self.counters.checkpoints += 1
        job = _Checkpoint(
            seq=seq, lo=lo, hi=wm, finalise=finalise, dead=self._dead, raw=self._raw,
            manifest={
                "seq": seq, "job": o.job, "worker": o.worker, "fingerprint": self._fingerprint(),
                "positions": dict(self.positions), "partition_max": dict(self.partition_max),
                "finalised_to": self.finalised_to, "counters": asdict(self.counters),
            },
        )
        self._dead, self._raw = [], []
        self.seq = seq
        if wait:
            self._write_checkpoint(job)
            self._pending = job
            self._finish_checkpoint()
        else:
            self._pending = job
            job.thread = threading.Thread(target=self._write_checkpoint, args=(job,),
                                          name=f"checkpoint-{seq}", daemon=True)
            job.thread.start()

    def _write_checkpoint(self, job: _Checkpoint) -> None:
        t0 = time.perf_counter()
        try:
            cur = self.con.cursor()
            try:
                tag = self._tag(job.seq)
                offline = 0
                if job.finalise:
                    lo = None if job.lo <= NEG_INF else _dt(job.lo)
                    hi = None if job.hi >= POS_INF else _dt(job.hi)
                    for v in self.views:
                        sql = aggregate_sql(v.spec, v.columns, lo, hi, source=f"ck_{v.table}")
                        table = cur.sql(sql).to_arrow_table()
                        offline += table.num_rows
                        job.offline[v.spec.name] = table.num_rows
                        job.written += _write_by_day(table, "event_timestamp", v.spec.offline_path, tag)
                if job.dead:
                    self.dead_dir.mkdir(parents=True, exist_ok=True)
                    job.written.append(_atomic_parquet(pa.concat_tables(job.dead), self.dead_dir / f"{tag}.parquet"))
                if job.raw:
                    job.written += _write_by_day(pa.concat_tables(job.raw), self.timestamp, self.input_root, tag)
                snap = self.state_dir / f"seq-{job.seq:08d}"
                snap.mkdir(parents=True, exist_ok=True)
                for v in self.views:
                    cur.execute(f"COPY ck_{v.table} TO {literal(str(snap / (v.table + '.parquet')))} (FORMAT parquet)")
                if self.unique:
                    cur.execute(f"COPY ck_seen TO {literal(str(snap / 'seen.parquet'))} (FORMAT parquet)")
            finally:
                cur.close()
            job.manifest["counters"]["offline_rows"] += offline
            job.manifest["written_at"] = datetime.now(timezone.utc).isoformat()
            tmp = self.state_dir / (MANIFEST + ".tmp")
            with open(tmp, "w") as fh:
                json.dump(job.manifest, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_dir / MANIFEST)
            for old in self.state_dir.glob("seq-*"):
                if old != snap:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException as exc:  # re-raised by the main thread
            job.error = exc
        job.seconds = time.perf_counter() - t0

    def _finish_checkpoint(self) -> None:
        """Wait for the checkpoint in flight, if any; then commit, count and record it."""
        job = self._pending
        if job is None:
            return
        if job.thread is not None:
            job.thread.join()
        self._pending = None
        if job.error is not None:
            raise job.error
        for view, rows in job.offline.items():
            self.counters.offline_rows += rows
            self.metrics.offline(view, rows)
        self.source.commit(job.manifest["positions"])
        try:
            lag = self.source.lag()
        except Exception:  # lag is advisory: a broker that cannot say is not an error
            lag = None
        self.metrics.checkpoint(job.seconds, lag, self._watermark(), self.counters)
        self._record(job, lag)

    def _checkpoint_done(self) -> bool:
        return self._pending is None or (self._pending.thread is not None and not self._pending.thread.is_alive())

    def _record(self, job: _Checkpoint, lag: int | None) -> None:
        """Append the checkpoint's :class:`RunRecord`: the messages it admitted since the
        previous checkpoint, the dead letters, the offline rows per view, the positions."""
        from featurepipe.quality.records import (
            KIND_STREAM,
            RunInput,
            RunOutput,
            RunRecord,
            StreamInfo,
        )
        from featurepipe.quality.runlog import append_run, code_version

        manifest, counters = job.manifest, job.manifest["counters"]
        before = self._recorded_counters or {}
        delta = {k: int(v) - int(before.get(k, 0)) for k, v in counters.items()}
        self._recorded_counters = dict(counters)
        dead_files = [str(p) for p in job.written if Path(p).is_relative_to(self.dead_dir)]
        raw_files = [str(p) for p in job.written if Path(p).is_relative_to(self.input_root)]
        finished = manifest["written_at"]
        started = (datetime.fromisoformat(finished) - timedelta(seconds=job.seconds)).isoformat()
        append_run(self.data, RunRecord(
            run_id=f"{self.options.job}-w{self.options.worker}-{manifest['seq']:08d}",
            kind=KIND_STREAM, status="ok", started=started, finished=finished, seconds=round(job.seconds, 4),
            code_version=code_version(), definitions_hash=manifest["fingerprint"],
            inputs=(RunInput(
                name=self.source.name, path=str(self.input_root), files=tuple(raw_files),
                rows=delta.get("messages", 0), passed=delta.get("accepted", 0), quarantined=delta.get("dead", 0),
                quarantine_file=dead_files[0] if dead_files else None,
                views=tuple(v.spec.name for v in self.views), positions=dict(manifest["positions"]),
            ),),
            outputs=tuple(RunOutput(
                view=v.spec.name, path=str(v.spec.offline_path), input_path=v.spec.input_path,
                rows=job.offline.get(v.spec.name, 0),
                files=tuple(str(p) for p in job.written if Path(p).is_relative_to(v.spec.offline_path)),
                partitions=tuple(sorted({Path(p).parent.name for p in job.written
                                         if Path(p).is_relative_to(v.spec.offline_path)})),
            ) for v in self.views),
            stream=StreamInfo(
                job=self.options.job, worker=self.options.worker, source=self.source.name,
                counters=dict(counters), lag=lag,
                watermark=None if (w := _dt(self._watermark())) is None else w.isoformat(),
            ),
        ))

    def _progress(self, run_messages: int, seconds: float, end: str = "\r") -> None:
        c = self.counters
        rate = run_messages / seconds if seconds else 0.0
        wm = _dt(self._watermark())
        line = (f"stream {self.options.job} w{self.options.worker}: {c.messages:,} events "
                f"({rate:,.0f}/s this run) · accepted {c.accepted:,} · dead {c.dead:,} (late {c.late:,}, "
                f"duplicate {c.duplicate:,}) · online rows {c.online_rows:,} · watermark "
                f"{wm:%Y-%m-%d %H:%M:%S}" if wm else
                f"stream {self.options.job} w{self.options.worker}: {c.messages:,} events ({rate:,.0f}/s) · waiting")
        stream = sys.stderr
        if not stream.isatty():
            end = "\n"
        stream.write(line + ("\x1b[K" if end == "\r" else "") + end)
        stream.flush()


class _Prefetcher:
    """Polls the source on a thread of its own.

    While there is a backlog (the last poll returned a full batch) it reads one micro-batch
    ahead, so parsing the next batch (which holds the GIL) overlaps the engine's DuckDB and
    Arrow work on this one (which does not). Otherwise it polls only when the engine asks,
    so a live stream's events do not wait behind a batch read ahead. Never reads more than
    ``budget`` messages (when set). Messages read but not processed when the job stops are
    not lost: the checkpoint's positions are before them, and a restart reads them again.
    """

    def __init__(self, source: EventSource, max_batch: int, timeout: float, budget: int | None) -> None:
        import queue

        self.source, self.max_batch, self.timeout, self.budget = source, max_batch, timeout, budget
        self.queue: queue.Queue[RawBatch | BaseException] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._need = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stream-poll", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import queue

        ahead = False
        try:
            while not self._stop.is_set():
                if not ahead:
                    if not self._need.wait(0.1):
                        continue
                self._need.clear()
                want = self.max_batch if self.budget is None else min(self.max_batch, self.budget)
                if want <= 0:
                    return
                raw = self.source.poll(want, self.timeout)
                ahead = len(raw) >= want
                if not len(raw):
                    continue
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
        import queue

        self._need.set()
        try:
            item = self.queue.get(timeout=max(timeout, 0.001) * 2)
        except queue.Empty:
            return RawBatch([], np.empty(0, np.int32), [])
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)


def _atomic_parquet(table: pa.Table, path: Path) -> Path:
    tmp = path.with_name("." + path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def _write_by_day(table: pa.Table, ts_column: str, root: Path, tag: str) -> list[Path]:
    """Write ``table`` as ``root/date=YYYY-MM-DD/<tag>.parquet`` files, one per UTC day."""
    if table.num_rows == 0:
        return []
    day_us = 86_400 * US
    micros = table.column(ts_column).cast(pa.int64()).to_numpy()
    days = micros // day_us
    out = []
    for d in np.unique(days):
        part = table.filter(pa.array(days == d))
        folder = Path(root) / f"date={_dt(int(d) * day_us):%Y-%m-%d}"
        folder.mkdir(parents=True, exist_ok=True)
        out.append(_atomic_parquet(part, folder / f"{tag}.parquet"))
    return out
