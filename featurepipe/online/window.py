"""Materialise one feature view's time window: latest rows → Feast bytes → Redis.

:func:`materialize_window` streams the latest row per entity from the offline Parquet
(:mod:`featurepipe.online.latest`), or, for a windowed-aggregate view, each entity's window
schedule computed from the raw events (:mod:`featurepipe.online.schedule_scan`: Feast's
fields hold the schedule's first row, the ``_fp_sched:<view>`` field the whole schedule,
written together), encodes each Arrow batch into Feast's bytes
(:mod:`featurepipe.online.codec`) and writes it with the monotonic Redis writer
(:mod:`featurepipe.online.writer`). Rows that cannot be written as declared (a null join
key, a value that does not fit its type) are counted and copied, with the reason, to
Parquet files under the quarantine folder; they are never written in part. So are rows
that fail a warn check of the view's data contract (``RowCondition`` in the plan's query);
a failing ``block`` check stops the view before anything is written
(:class:`MaterializationBlocked`).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurepipe.core.threads import prefetch
from featurepipe.core.windows import SCHEDULE_GROUP, feature_groups
from featurepipe.errors import GateBlocked
from featurepipe.online import codec
from featurepipe.online.cluster_writer import open_hash_writer
from featurepipe.online.latest import (
    CHECK,
    EVENT_US,
    REASON,
    Column,
    LatestQuery,
    LatestScan,
    open_latest,
)
from featurepipe.online.layout import feature_field, timestamp_field
from featurepipe.online.schedule import schedule_field
from featurepipe.online.schedule_scan import FIRST, KernelInput, open_schedules
from featurepipe.online.schedule_writer import encode_schedules, schedule_columns
from featurepipe.online.writer import EncodedRows

if TYPE_CHECKING:
    import redis


@dataclass(frozen=True)
class ViewPlan:
    """Everything needed to materialise one view, resolved from Feast's objects."""

    view: str  # the name in Redis fields (Feast's versioned name)
    project: str
    query: LatestQuery
    key_ttl_seconds: int | None = None
    block_null_keys: bool = False  # the contract says a null join key blocks the view
    kernel: KernelInput | None = None  # a windowed-aggregate view: computed from raw events

    @property
    def fields(self) -> list[bytes]:
        """The hash fields one row writes after ``_ts:<view>``, in order: the features, then
        the schedule of a windowed-aggregate view."""
        names = [feature_field(self.view, f.name) for f in self.features]
        return names + ([schedule_field(self.view)] if self.kernel is not None else [])

    @property
    def schedule_groups(self) -> tuple[list[int], int]:
        """Each feature's group in the schedule of a windowed-aggregate view, and the number
        of groups (:func:`featurepipe.core.windows.feature_groups`)."""
        assert self.kernel is not None, "only a windowed-aggregate view has a schedule"
        return feature_groups(self.kernel.aggregations, [f.name for f in self.features])

    @property
    def join_keys(self) -> list[codec.JoinKeySpec]:
        return [codec.JoinKeySpec(k.name, k.value_type) for k in self.query.join_keys]

    @property
    def features(self) -> Sequence[Column]:
        return self.query.features


@dataclass(frozen=True)
class WindowOptions:
    """How to run: batch size, rate limit, threads, quarantine folder, progress bar."""

    batch_rows: int = 5_000
    max_rows_per_second: float | None = None
    threads: int | None = None
    quarantine_dir: Path | None = None
    progress: bool = True
    restore: bool = True  # new keys via RESTORE (see featurepipe.online.writer)


@dataclass
class ViewMaterialization:
    """What materialising one view's window did."""

    view: str
    start: datetime
    end: datetime
    window_rows: int = 0  # offline rows (windowed views: raw events) with event time in the window and a join key
    entities: int = 0  # latest rows (windowed views: schedules), one per entity
    written: int = 0  # hashes updated
    skipped: int = 0  # Redis already held a value at least as new
    restored: int = 0  # of written: new keys created whole with RESTORE
    quarantined: int = 0  # rows not written: null join key, a value that does not fit, a failed check
    seconds: float = 0.0
    quarantine_files: list[str] = field(default_factory=list)
    null_key_rows: int = 0  # of quarantined: window rows without a join key
    check_failures: dict[str, int] = field(default_factory=dict)  # rows (latest or schedule) failing each check
    newest_event: datetime | None = None  # newest event time among the rows written or kept
    files: list[str] = field(default_factory=list)  # the offline files read (raw files: windowed views)
    schedule_rows: int = 0  # windowed views: change-point rows in the schedules sent
    prepared: bool = False  # windowed views: schedules read as the backfill prepared them (not computed)

    @property
    def rows_per_second(self) -> float:
        return self.entities / self.seconds if self.seconds else 0.0


class MaterializationBlocked(GateBlocked):
    """A blocking contract check failed on the rows about to be written: nothing was written."""

    def __init__(self, message: str, result: ViewMaterialization, failures: dict[str, int]) -> None:
        super().__init__(message, stage="materialize", table=result.view, failures=failures)
        self.result = result


def encode(batch: pa.RecordBatch, plan: ViewPlan) -> EncodedRows:
    """Feast's bytes of every row of a batch from :func:`open_latest` (good rows only)."""
    columns = {k.name: batch.column(k.name) for k in plan.query.join_keys}
    keys = codec.encode_entity_keys(columns, plan.join_keys, plan.project)
    micros = np.asarray(batch.column(EVENT_US).to_numpy(zero_copy_only=False), dtype=np.int64)
    values = [codec.encode_values(batch.column(f.name), f.value_type) for f in plan.features]
    return EncodedRows(keys=keys, timestamps=codec.encode_timestamps(micros), values=values)


def encode_with_schedules(batch: pa.RecordBatch, plan: ViewPlan) -> EncodedRows:
    """Feast's bytes of each entity's first change point, and its whole schedule appended as
    the last value (:attr:`ViewPlan.fields`), from a batch of
    :func:`~featurepipe.online.schedule_scan.open_schedules` (whole entities, good rows only)."""
    first = np.asarray(batch.column(FIRST).to_numpy(zero_copy_only=False), dtype=bool)
    starts = np.flatnonzero(first)
    rows = encode(batch.take(pa.array(starts)), plan)
    names = [f.name for f in plan.features]
    v = np.asarray(batch.column(EVENT_US).to_numpy(zero_copy_only=False), dtype=np.int64)
    row_groups = np.asarray(batch.column(SCHEDULE_GROUP).to_numpy(zero_copy_only=False), dtype=np.int64)
    groups, k = plan.schedule_groups
    schedules = encode_schedules(v, row_groups, schedule_columns(batch, names), np.append(starts, len(first)),
                                 groups, names, k)
    return EncodedRows(keys=rows.keys, timestamps=rows.timestamps, values=[*rows.values, schedules])


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class QuarantineFiles:
    """Bad rows of one run, appended to one Parquet file (created on the first bad row)."""

    def __init__(self, folder: Path | None, view: str, stamp: str) -> None:
        self.folder = folder / view if folder is not None else None
        self.stamp = stamp
        self.rows = 0
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None

    def path(self, kind: str) -> Path | None:
        if self.folder is None:
            return None
        path = self.folder / f"{self.stamp}-{kind}.parquet"
        self.files.append(str(path))
        return path

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        target = None if self._writer is not None else self.path("bad-values")
        names = {REASON: "quarantine_reason", CHECK: "quality_check"}
        table = pa.Table.from_batches([batch]).rename_columns([names.get(c, c) for c in batch.schema.names])
        if self._writer is None and target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(target, table.schema)
        if self._writer is not None:
            self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def materialize_window(
    plan: ViewPlan,
    start: datetime,
    end: datetime,
    client: redis.Redis,
    options: WindowOptions = WindowOptions(),
) -> ViewMaterialization:
    """Write the latest value (windowed views: the window schedule) of every entity with a
    row (an event) in ``[start, end]`` of one view into Redis."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    start, end = _utc(start), _utc(end)
    result = ViewMaterialization(view=plan.view, start=start, end=end)
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    quarantine = QuarantineFiles(options.quarantine_dir, plan.view, stamp)
    null_key_file = quarantine.folder / f"{stamp}-null-keys.parquet" if quarantine.folder else None
    if plan.kernel is not None:
        scan = open_schedules(plan.query, plan.kernel, start, end, batch_rows=options.batch_rows,
                              threads=options.threads, null_key_file=null_key_file)
    else:
        scan = open_latest(plan.query, start, end, batch_rows=options.batch_rows, threads=options.threads,
                           null_key_file=null_key_file)
    to_bytes = encode_with_schedules if plan.kernel is not None else encode
    try:
        result.window_rows, result.entities = scan.window_rows, scan.entities
        result.files, result.null_key_rows = scan.files, scan.null_key_rows
        result.prepared = scan.prepared
        if scan.null_key_rows:
            quarantine.rows += scan.null_key_rows
            if null_key_file is not None:
                quarantine.files.append(str(null_key_file))
        result.quarantined, result.quarantine_files = quarantine.rows, quarantine.files
        _stop_if_blocked(plan, scan, result, null_key_file)
        writer = open_hash_writer(
            client,
            timestamp_field(plan.view),
            plan.fields,
            ttl_seconds=plan.key_ttl_seconds,
            max_rows_per_second=options.max_rows_per_second,
            restore=options.restore,
        )
        batches = prefetch(iter(scan.reader))
        with tqdm(total=scan.entities, desc=plan.view, unit="rows", unit_scale=True,
                  disable=not options.progress, leave=True) as bar, writer, contextlib.closing(batches):
            # (closing: the reading thread stops before the DuckDB connection closes)
            newest = None
            for batch in batches:
                read = batch.num_rows if plan.kernel is None else int(pc.sum(batch.column(FIRST)).as_py() or 0)
                bad = pc.not_equal(batch.column(REASON), "")
                if pc.any(bad).as_py():
                    rejected = batch.filter(bad)
                    quarantine.add(rejected)
                    if CHECK in batch.schema.names:
                        _count_checks(rejected.column(CHECK), result.check_failures)
                    batch = batch.filter(pc.invert(bad))
                if batch.num_rows:
                    writer.write(to_bytes(batch, plan))
                    stamps = batch.column(EVENT_US)
                    if plan.kernel is not None:  # the entities' first change points: newest event + 1 us
                        result.schedule_rows += batch.num_rows
                        stamps = pc.filter(stamps, batch.column(FIRST))
                    top = pc.max(stamps).as_py()
                    newest = top if newest is None or top > newest else newest
                bar.update(read)
        result.written, result.skipped = writer.counts.written, writer.counts.skipped
        result.restored = writer.counts.restored
        if newest is not None:
            result.newest_event = datetime.fromtimestamp(newest / 1e6, timezone.utc)
    finally:
        quarantine.close()
        scan.close()
    result.quarantined = quarantine.rows
    result.quarantine_files = quarantine.files
    result.seconds = time.perf_counter() - t0
    return result


def _count_checks(names: pa.Array, counts: dict[str, int]) -> None:
    """Add the comma-separated check names of rejected rows to ``counts`` (vectorised)."""
    flat = pc.list_flatten(pc.split_pattern(names, ","))
    for item in pc.value_counts(flat).to_pylist():
        if item["values"]:
            counts[item["values"]] = counts.get(item["values"], 0) + int(item["counts"])


def _stop_if_blocked(plan: ViewPlan, scan: LatestScan, result: ViewMaterialization,
                     null_key_file: Path | None) -> None:
    """Raise :class:`MaterializationBlocked` when a blocking check fails (before any write)."""
    failures = dict(scan.blocked)
    lines = [f"check {name!r} failed: {n:,} of {scan.entities:,} latest rows; sample: "
             f"{[{k: v for k, v in row.items() if k != EVENT_US} for row in scan.blocked_sample.get(name, [])]}"
             for name, n in scan.blocked.items()]
    if plan.block_null_keys and scan.null_key_rows:
        keys = ", ".join(k.name for k in plan.query.join_keys)
        failures[f"{keys}.not_null"] = scan.null_key_rows
        lines.append(f"check '{keys}.not_null' failed: {scan.null_key_rows:,} rows of the window have a null "
                     f"join key ({keys})" + (f", kept in {null_key_file}" if null_key_file else ""))
    if not failures:
        return
    raise MaterializationBlocked(
        f"quality gate materialize/{plan.view} blocked the view: " + "; ".join(lines)
        + ". Nothing of this view was written to Redis. Fix the offline table (rerun `featurepipe backfill`) "
        "or the view's contract in contracts.yaml, then materialise again",
        result, failures,
    )
