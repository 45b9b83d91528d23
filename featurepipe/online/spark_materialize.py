"""Materialise one view from Spark: the rows computed in Spark, written to Redis by the executors.

The Spark counterpart of :func:`featurepipe.online.window.materialize_window`: the same
inputs (a :class:`~featurepipe.online.window.ViewPlan`, a range, run options), the same
outcome (a :class:`~featurepipe.online.window.ViewMaterialization`) and the same bytes in
Redis. The rows (a windowed view's schedules, a plain view's latest rows) are computed in
Spark (:mod:`featurepipe.online.spark_rows`), repartitioned by join key (a schedule's rows
also sorted by key, group, time, so a partition holds whole entities in order), and each
partition is handed as Arrow batches (``mapInArrow``) to :func:`write_partition` on an
executor: featurepipe's encoder, its monotonic writer on the task's own Redis connection,
the rows with a reason quarantined (Parquet, one file per partition), one row of counts
back; the driver adds them up. A blocking check stops the view before any write, as in
DuckDB.

The executors' Python must have featurepipe installed (on ``local`` masters: the driver's
own interpreter, see :func:`_worker_python`), and the quarantine folder must be one they
can write (a shared file system on a cluster).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import SparkSession

from featurepipe.config import RedisTarget
from featurepipe.core.sql import SPARK
from featurepipe.core.windows import SCHEDULE_GROUP
from featurepipe.online.cluster_writer import open_hash_writer
from featurepipe.online.latest import CHECK, EVENT_US, REASON
from featurepipe.online.layout import timestamp_field
from featurepipe.online.schedule_scan import FIRST, whole_entities
from featurepipe.online.spark_rows import SparkScan, TempViews, scan_latest, scan_schedules
from featurepipe.online.window import (
    MaterializationBlocked,
    QuarantineFiles,
    ViewMaterialization,
    ViewPlan,
    WindowOptions,
    encode,
    encode_with_schedules,
)

_COUNTS = pa.schema([("entities", pa.int64()), ("written", pa.int64()), ("skipped", pa.int64()),
                     ("restored", pa.int64()), ("quarantined", pa.int64()), ("schedule_rows", pa.int64()),
                     ("newest_us", pa.int64()), ("checks", pa.string()), ("files", pa.string())])
_COUNTS_DDL = ("entities long, written long, skipped long, restored long, quarantined long, schedule_rows long, "
               "newest_us long, checks string, files string")


def materialize_view_spark(spark: SparkSession, plan: ViewPlan, start: datetime, end: datetime,
                           target: RedisTarget, options: WindowOptions = WindowOptions(),
                           partitions: int | None = None) -> ViewMaterialization:
    """Write the latest value (windowed views: the window schedule) of every entity with a row
    (an event) in ``[start, end]`` of one view into Redis from Spark's executors, which
    connect to ``target`` (one server or a Redis Cluster). ``partitions``:
    how many tasks write (default: one per ~1,000 entities, at most Spark's shuffle
    partitions)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    start, end = _utc(start), _utc(end)
    result = ViewMaterialization(view=plan.view, start=start, end=end)
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    folder = options.quarantine_dir / plan.view if options.quarantine_dir is not None else None
    null_key_file = folder / f"{stamp}-null-keys.parquet" if folder is not None else None
    _worker_python(spark)
    with TempViews(spark) as views:
        if plan.kernel is not None:
            scan = scan_schedules(spark, plan.query, plan.kernel, start, end, views, partitions)
        else:
            scan = scan_latest(spark, plan.query, start, end, views, partitions)
        views.keep(scan.rows)  # (kept in memory when a blocking check counted them)
        result.window_rows, result.entities, result.files = scan.window_rows, scan.entities, scan.files
        result.null_key_rows = result.quarantined = scan.null_key_rows
        if scan.null_key_rows and null_key_file is not None and scan.null_keys is not None:
            null_key_file.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(scan.null_keys.toArrow(), null_key_file)
            result.quarantine_files.append(str(null_key_file))
        _stop_if_blocked(plan, scan, result, null_key_file)
        keys = [SPARK.quote(k.name) for k in plan.query.join_keys]
        parts = scan.partitions
        rows = scan.rows.repartition(parts, *keys)
        if plan.kernel is not None:  # whole entities, each in key, group, time order
            rows = rows.sortWithinPartitions(*keys, SCHEDULE_GROUP, EVENT_US)
        rate = options.max_rows_per_second / parts if options.max_rows_per_second else None
        job = PartitionWrite(plan, target, stamp, str(options.quarantine_dir or "") or None,
                             options.restore, rate)
        with tqdm(total=scan.entities, desc=plan.view, unit="rows", unit_scale=True,
                  disable=not options.progress, leave=True) as bar:
            outcomes = rows.mapInArrow(partial(write_partition, job), _COUNTS_DDL).collect()
            bar.update(scan.entities)
    for row in outcomes:
        result.written += row.written
        result.skipped += row.skipped
        result.restored += row.restored
        result.quarantined += row.quarantined
        result.schedule_rows += row.schedule_rows
        result.quarantine_files += json.loads(row.files)
        for name, n in json.loads(row.checks).items():
            result.check_failures[name] = result.check_failures.get(name, 0) + n
    newest = max((row.newest_us for row in outcomes if row.newest_us is not None), default=None)
    if newest is not None:
        result.newest_event = datetime.fromtimestamp(newest / 1e6, timezone.utc)
    result.seconds = time.perf_counter() - t0
    return result


def _stop_if_blocked(plan: ViewPlan, scan: SparkScan, result: ViewMaterialization, null_key_file: Path | None) -> None:
    """Raise :class:`MaterializationBlocked` when a blocking check fails (before any write),
    as :func:`featurepipe.online.window.materialize_window` does."""
    failures = dict(scan.blocked)
    lines = [f"check {name!r} failed: {n:,} of {scan.entities:,} latest rows; sample: "
             f"{[{k: v for k, v in row.items() if k != EVENT_US} for row in scan.blocked_sample.get(name, [])]}"
             for name, n in scan.blocked.items()]
    if plan.block_null_keys and scan.null_key_rows:
        keys = ", ".join(k.name for k in plan.query.join_keys)
        failures[f"{keys}.not_null"] = scan.null_key_rows
        lines.append(f"check '{keys}.not_null' failed: {scan.null_key_rows:,} rows of the window have a null "
                     f"join key ({keys})" + (f", kept in {null_key_file}" if null_key_file else ""))
    if failures:
        raise MaterializationBlocked(
            f"quality gate materialize/{plan.view} blocked the view: " + "; ".join(lines)
            + ". Nothing of this view was written to Redis. Fix the offline table (rerun `featurepipe backfill`) "
            "or the view's contract in contracts.yaml, then materialise again", result, failures)


# ------------------------------------------------------------ on the executors


@dataclass(frozen=True)
class PartitionWrite:
    """What a task needs to write its partition (pickled to the executors)."""

    plan: ViewPlan
    target: RedisTarget
    stamp: str  # the run's quarantine file stamp
    quarantine_dir: str | None
    restore: bool = True
    max_rows_per_second: float | None = None  # this task's share


def write_partition(job: PartitionWrite, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Encode and write one partition's rows (Arrow batches of whole entities, sorted, for a
    windowed view), quarantining the rows with a reason; yield one row of counts."""
    from pyspark import TaskContext

    plan = job.plan
    context = TaskContext.get()
    part = context.partitionId() if context is not None else 0
    folder = Path(job.quarantine_dir) if job.quarantine_dir else None
    quarantine = QuarantineFiles(folder, plan.view, f"{job.stamp}-p{part:05d}")
    checks: dict[str, int] = {}
    written = skipped = restored = schedule_rows = entities = 0
    newest: int | None = None
    first = next(batches, None)
    if first is not None:
        reader = pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], batches))
        windowed = plan.kernel is not None
        keys = [k.name for k in plan.query.join_keys]
        rows = whole_entities(reader, keys, bool(plan.query.conditions)) if windowed else iter(reader)
        to_bytes = encode_with_schedules if windowed else encode
        client = job.target.client(socket_timeout=300)
        writer = open_hash_writer(client, timestamp_field(plan.view), plan.fields, ttl_seconds=plan.key_ttl_seconds,
                            max_rows_per_second=job.max_rows_per_second, restore=job.restore)
        try:
            with writer:
                for batch in rows:
                    entities += batch.num_rows if not windowed else int(pc.sum(batch.column(FIRST)).as_py() or 0)
                    bad = pc.not_equal(batch.column(REASON), "")
                    if pc.any(bad).as_py():
                        rejected = batch.filter(bad)
                        quarantine.add(rejected)
                        if CHECK in batch.schema.names:
                            _count_checks(rejected.column(CHECK), checks)
                        batch = batch.filter(pc.invert(bad))
                    if batch.num_rows:
                        writer.write(to_bytes(batch, plan))
                        stamps = batch.column(EVENT_US)
                        if windowed:  # the entities' first change points: newest event + 1 us
                            schedule_rows += batch.num_rows
                            stamps = pc.filter(stamps, batch.column(FIRST))
                        top = pc.max(stamps).as_py()
                        newest = top if newest is None or top > newest else newest
            written, skipped, restored = writer.counts.written, writer.counts.skipped, writer.counts.restored
        finally:
            quarantine.close()
            client.close()
    yield pa.RecordBatch.from_pylist([{
        "entities": entities, "written": written, "skipped": skipped, "restored": restored,
        "quarantined": quarantine.rows, "schedule_rows": schedule_rows, "newest_us": newest,
        "checks": json.dumps(checks), "files": json.dumps(quarantine.files)}], schema=_COUNTS)


def _count_checks(names: pa.Array, counts: dict[str, int]) -> None:
    """Add the comma-separated check names of rejected rows to ``counts``."""
    flat = pc.list_flatten(pc.split_pattern(names, ","))
    for item in pc.value_counts(flat).to_pylist():
        if item["values"]:
            counts[item["values"]] = counts.get(item["values"], 0) + int(item["counts"])


# ------------------------------------------------------------ Spark plumbing


def _worker_python(spark: SparkSession) -> None:
    """On a ``local`` master, run the Python workers with this interpreter (featurepipe is
    installed in it) unless ``PYSPARK_PYTHON`` says otherwise; Spark's default is whatever
    ``python3`` is on the PATH."""
    context = spark.sparkContext
    if (context.master or "").startswith("local") and not os.environ.get("PYSPARK_PYTHON"):
        context.pythonExec = sys.executable


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
