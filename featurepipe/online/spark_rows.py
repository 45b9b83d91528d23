"""A view's rows to materialise, computed in Spark: window schedules and latest rows.

What :mod:`featurepipe.online.schedule_scan` and :mod:`featurepipe.online.latest` compute
with DuckDB, in Spark SQL, to the same values (:mod:`featurepipe.online.spark_materialize`
writes them):

* :func:`scan_schedules`: each entity's window schedule, from the raw events of the entities
  with an event in ``[start, end]`` (their events from ``newest - horizon`` on, kept in memory
  partitioned by key), by the kernel's SQL in Spark's dialect
  (:func:`featurepipe.core.windows.schedule_sql`), less the raw rows the gate leaves out
  (``kernel.exclude``);
* :func:`scan_latest`: the latest row per entity of a plain view's offline table in
  ``[start, end]``, each value cast to its declared type (a value that does not fit is
  flagged in ``__reason``, not cast half-way).

Both count the entities, their rows and the rows without a join key first, as the DuckDB
scans do, and evaluate the contract's row conditions (written in Spark's SQL by
:mod:`featurepipe.quality.checks` for a gate opened with the Spark dialect) on the same
rows; a blocking condition's failures are counted before anything is written.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from featurepipe.core.sql import SPARK, literal
from featurepipe.core.windows import SCHEDULE_GROUP, ViewShape, history, micros, schedule_sql
from featurepipe.errors import InvalidInput
from featurepipe.online.latest import (
    CHECK,
    EVENT_US,
    REASON,
    Column,
    LatestQuery,
    RowCondition,
    connect,
    pinned_files,
)
from featurepipe.online.schedule_scan import KernelInput, scoped_conditions

# Spark type of each Feast ValueType name a value is checked and cast to (DUCKDB_TYPES' twin)
SPARK_TYPES = {
    "INT64": "BIGINT", "INT32": "INT", "DOUBLE": "DOUBLE", "FLOAT": "FLOAT", "STRING": "STRING",
    "BYTES": "BINARY", "BOOL": "BOOLEAN", "UNIX_TIMESTAMP": "TIMESTAMP",
}
_FRACTIONAL = ("DOUBLE", "FLOAT", "DECIMAL")


@dataclass
class SparkScan:
    """What a view's rows are, before any write: the rows to write (a Spark DataFrame in the
    columns :func:`~featurepipe.online.spark_materialize.write_partition` reads), the counts, and
    the blocking checks' failures."""

    rows: DataFrame
    entities: int
    window_rows: int
    null_key_rows: int
    files: list[str]
    partitions: int  # how many tasks write
    null_keys: DataFrame | None = None  # the range's rows without a join key, with quarantine_reason
    blocked: dict[str, int] = field(default_factory=dict)
    blocked_sample: dict[str, list[dict[str, object]]] = field(default_factory=dict)


def scan_schedules(spark: SparkSession, query: LatestQuery, kernel: KernelInput, start: datetime,
                   end: datetime, views: TempViews, partitions: int | None = None) -> SparkScan:
    """Each entity's schedule (see the module documentation) in the columns of
    :func:`~featurepipe.online.schedule_scan.open_schedules` (but :data:`FIRST`), with its
    ``__reason`` and ``__check``; ``partitions``: how many the writes take (default: by entity
    count)."""
    q = SPARK.quote
    keys = [k.source for k in query.join_keys]
    files, source = _read(spark, kernel.path)
    types = {f.name: f.dataType.simpleString() for f in source.schema.fields}
    columns = sorted({a.column for a in kernel.aggregations})
    _require(kernel.path, types, [kernel.timestamp, *keys, *columns], "the view's input source and its aggregations")
    src = views.add(source)
    ts, key_list = q(kernel.timestamp), ", ".join(q(k) for k in keys)
    not_null = " AND ".join(f"{q(k)} IS NOT NULL" for k in keys)
    excluded = "".join(f" AND NOT coalesce(({c}), FALSE)" for c in kernel.exclude)
    in_range = f"{ts} >= {SPARK.ts_literal(start)} AND {ts} <= {SPARK.ts_literal(end)}"
    needed = ", ".join(q(c) for c in dict.fromkeys([*keys, kernel.timestamp, *columns]))
    raw = views.add(spark.sql(f"SELECT {needed} FROM {src} WHERE {ts} IS NOT NULL{excluded}"))
    groups = spark.sql(f"SELECT {key_list}, max({ts}) AS __last, count(*) AS __rows FROM {raw} "
                       f"WHERE {in_range} GROUP BY {key_list}").persist()
    views.keep(groups)
    entities, window_rows, null_rows = groups.selectExpr(
        f"count_if({not_null})", f"coalesce(sum(CASE WHEN {not_null} THEN __rows END), 0)",
        f"coalesce(sum(CASE WHEN NOT ({not_null}) THEN __rows END), 0)").first() or (0, 0, 0)
    ents = views.add(groups.where(not_null))
    on = " AND ".join(f"r.{q(k)} = e.{q(k)}" for k in keys)
    back = history(kernel.aggregations)
    reach = "" if back is None else f" AND {SPARK.epoch_us(f'r.{ts}')} >= {SPARK.epoch_us('e.__last')} - {micros(back)}"
    parts = partitions or _partitions(spark, int(entities))
    # the events the schedules depend on, kept (in memory, computed once by the first task that
    # reads a partition) partitioned by key: the kernel's windows and groups, all by key, then
    # need no shuffle of their own
    staged = spark.sql(f"SELECT r.* FROM {raw} r JOIN {ents} e ON {on} WHERE r.{ts} <= e.__last{reach}")
    staged = staged.repartition(parts, *(q(k) for k in keys)).persist()
    views.keep(staged)
    events = views.add(staged)
    shape = ViewShape(tuple(keys), kernel.timestamp, kernel.aggregations, types)
    names = [f.name for f in query.features]
    conditions = scoped_conditions(query.conditions, kernel.aggregations, keys, names)
    computed = views.add(spark.sql(
        f"SELECT {key_list}, {SCHEDULE_GROUP}, {SPARK.epoch_us('event_timestamp')} AS {EVENT_US}, "
        f"{', '.join(q(n) for n in names)} FROM ({schedule_sql(shape, events, dialect=SPARK)})"))
    null_keys = None
    if null_rows:
        null = " OR ".join(f"{q(k)} IS NULL" for k in keys)
        message = literal("join key " + ", ".join(k.name for k in query.join_keys) + " is null")
        null_keys = spark.sql(f"SELECT *, {message} AS quarantine_reason FROM {src} "
                              f"WHERE ({null}) AND {in_range}{excluded}")
    rows, blocked, sample = _checked(spark, computed, conditions, [*keys, SCHEDULE_GROUP, EVENT_US, *names])
    return SparkScan(rows, int(entities), int(window_rows), int(null_rows), files, parts, null_keys, blocked, sample)


def scan_latest(spark: SparkSession, query: LatestQuery, start: datetime, end: datetime, views: TempViews,
                partitions: int | None = None) -> SparkScan:
    """The latest row per entity (see the module documentation) in the columns of
    :func:`~featurepipe.online.latest.open_latest`, with ``__reason`` (and, with row
    conditions, ``__check``)."""
    q = SPARK.quote
    files, source = _read(spark, query.path)
    types = {f.name: f.dataType.simpleString().upper() for f in source.schema.fields}
    _require(query.path, types, [query.timestamp, *(c.source for c in (*query.join_keys, *query.features)),
                                 *([query.created] if query.created else [])],
             "the feature view's schema and its source's field_mapping")
    src = views.add(source)
    ts = f"CAST({q(query.timestamp)} AS TIMESTAMP)"
    key_names = [f"__k{i}" for i in range(len(query.join_keys))]
    keys = ", ".join(f"{_cast(k, types[k.source])[0]} AS {n}" for k, n in zip(query.join_keys, key_names))
    created = f", CAST({q(query.created)} AS TIMESTAMP) AS __created" if query.created else ""
    window = views.add(spark.sql(
        f"SELECT {keys}, {ts} AS __ts{created}, * FROM {src} "
        f"WHERE {ts} >= {SPARK.ts_literal(start)} AND {ts} <= {SPARK.ts_literal(end)}"))
    not_null = " AND ".join(f"{k} IS NOT NULL" for k in key_names)
    null_rows, window_rows, entities = spark.sql(
        f"SELECT count_if(NOT ({not_null})), count_if({not_null}), count(DISTINCT {', '.join(key_names)}) "
        f"FROM {window}").first() or (0, 0, 0)
    by_key = f"PARTITION BY {', '.join(key_names)}"
    latest = (f"SELECT * FROM (SELECT *, max(__ts) OVER ({by_key}) AS __max_ts FROM {window} WHERE {not_null}) "
              "WHERE __ts = __max_ts")
    if query.created:  # ties on the event time: the greatest created time (all of an exact tie, as DuckDB)
        latest = (f"SELECT * FROM (SELECT *, max(__created) OVER ({by_key}) AS __max_created FROM ({latest})) "
                  "WHERE __created <=> __max_created")
    selects = [f"{n} AS {q(k.name)}" for k, n in zip(query.join_keys, key_names)]
    selects.append(f"{SPARK.epoch_us('__ts')} AS {EVENT_US}")
    reasons = []
    for col in query.features:
        expr, bad = _cast(col, types[col.source])
        selects.append(f"{expr} AS {q(col.name)}")
        if bad is not None:
            reasons.append(f"CASE WHEN {bad} THEN {literal(f'{col.name}: value does not fit {col.value_type}')} END")
    selects.append(f"concat_ws('; ', {', '.join(reasons)}) AS {REASON}" if reasons else f"'' AS {REASON}")
    rows = views.add(spark.sql(f"SELECT {', '.join(selects)} FROM ({latest})"))
    null_keys = None
    if null_rows:
        message = literal("join key " + ", ".join(k.name for k in query.join_keys) + " is null or does not fit its type")
        private = [*key_names, "__ts", *(["__created"] if query.created else [])]
        null_keys = spark.sql(f"SELECT *, {message} AS quarantine_reason FROM {window} "
                              f"WHERE NOT ({not_null})").drop(*private)
    names = [k.name for k in query.join_keys] + [EVENT_US] + [f.name for f in query.features]
    out, blocked, sample = _checked(spark, rows, query.conditions, names, reason=REASON if reasons else None)
    parts = partitions or _partitions(spark, int(entities))
    return SparkScan(out, int(entities), int(window_rows), int(null_rows), files, parts, null_keys, blocked, sample)


def _checked(spark: SparkSession, rows: str, conditions: Sequence[RowCondition], columns: Sequence[str],
             reason: str | None = None) -> tuple[DataFrame, dict[str, int], dict[str, list[dict[str, object]]]]:
    """The ``columns`` of temp view ``rows`` with ``__reason`` (column ``reason``'s, then the
    failing conditions') and, with conditions, ``__check``; when a condition blocks, its
    failing rows counted and a few sampled first (the rows are then kept for the write)."""
    q = SPARK.quote
    selected = ", ".join(q(c) for c in columns)
    if not conditions:
        return spark.sql(f"SELECT {selected}, {reason or literal('')} AS {REASON} FROM {rows}"), {}, {}
    reasons = ", ".join(f"CASE WHEN {c.fails} THEN {c.reason} END" for c in conditions)
    checks = ", ".join(f"CASE WHEN {c.fails} THEN {literal(c.name)} END" for c in conditions)
    earlier = f"NULLIF({reason}, ''), " if reason else ""
    out = spark.sql(f"SELECT {selected}, concat_ws('; ', {earlier}{reasons}) AS {REASON}, "
                    f"concat_ws(',', {checks}) AS {CHECK} FROM {rows}")
    blocking = [c for c in conditions if c.block]
    if not blocking:
        return out, {}, {}
    out = out.persist()  # counted now, written next: computed once
    counts = spark.sql("SELECT " + ", ".join(f"count_if({c.fails})" for c in blocking) + f" FROM {rows}").first()
    blocked = {c.name: int(n) for c, n in zip(blocking, counts or ()) if n}
    sample = {c.name: [row.asDict() for row in spark.sql(f"SELECT * FROM {rows} WHERE {c.fails} LIMIT 3").collect()]
              for c in blocking if c.name in blocked}
    return out, blocked, sample


class TempViews:
    """Temporary views of one materialisation, under names no other run uses; dropped (and
    what was kept in memory released) at the end."""

    def __init__(self, spark: SparkSession) -> None:
        self.spark, self.prefix = spark, f"fp_{uuid.uuid4().hex[:10]}"
        self.names: list[str] = []
        self.kept: list[DataFrame] = []

    def add(self, frame: DataFrame) -> str:
        name = f"{self.prefix}_{len(self.names)}"
        frame.createOrReplaceTempView(name)
        self.names.append(name)
        return name

    def keep(self, frame: DataFrame) -> None:
        self.kept.append(frame)

    def __enter__(self) -> TempViews:
        return self

    def __exit__(self, *exc: object) -> None:
        for frame in self.kept:
            frame.unpersist()
        for name in self.names:
            self.spark.catalog.dropTempView(name)


def _read(spark: SparkSession, path: str) -> tuple[list[str], DataFrame]:
    """The Parquet files matching ``path`` now (the glob as DuckDB expands it, so both engines
    read the same files) and a DataFrame of them. When their footers agree, the schema is
    given (Spark would run a job to infer it); when they differ, Spark merges them by name."""
    con = connect(1)
    try:
        files = pinned_files(con, path)
    finally:
        con.close()
    schemas = {pq.read_schema(f).remove_metadata() for f in files}
    if len(schemas) == 1:
        try:
            return files, spark.read.schema(from_arrow_schema(schemas.pop())).parquet(*files)
        except (TypeError, ValueError, NotImplementedError):  # a type Spark maps only by itself
            pass
    return files, spark.read.option("mergeSchema", "true").parquet(*files)


def _partitions(spark: SparkSession, entities: int) -> int:
    """Tasks for ``entities``: one per ~1,000 entities, at most Spark's shuffle partitions."""
    return max(1, min(int(spark.conf.get("spark.sql.shuffle.partitions") or 1), math.ceil(entities / 1_000)))


def _require(path: str, types: Mapping[str, str], needed: Sequence[str], what: str) -> None:
    missing = sorted({c for c in needed if c not in types})
    if missing:
        raise InvalidInput(f"{path} has no column(s) {missing}; it has {sorted(types)}. Check {what}, "
                           "then run `feast apply`")


def _cast(col: Column, source_type: str) -> tuple[str, str | None]:
    """Spark SQL for the value cast to its declared type, and SQL true when it does not fit
    (:func:`featurepipe.online.latest._cast` in Spark's dialect)."""
    src = SPARK.quote(col.source)
    target = SPARK_TYPES.get(col.value_type)
    if target is None or source_type.upper() == target:
        return src, None
    cast = f"try_cast({src} AS {target})"
    bad = f"({src} IS NOT NULL AND {cast} IS NULL)"
    if target in ("BIGINT", "INT") and source_type.upper().startswith(_FRACTIONAL):
        bad = f"({bad} OR ({src} IS NOT NULL AND {cast} <> {src}))"
        cast = f"CASE WHEN {cast} = {src} THEN {cast} END"
    return cast, bad
