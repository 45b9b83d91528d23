"""The latest row per entity in a time window, read with DuckDB straight from Parquet.

Pure DuckDB and Arrow (no protobuf, no Redis): :func:`open_latest` returns the number of
entities and a stream of Arrow record batches, one row per entity, each the row with the
greatest event time in ``[start, end]`` (both ends included, as Feast's offline stores
read a materialisation window), ties broken by the created timestamp when the source has
one (an exact tie on both keeps one of the rows, as Feast does).

Memory is bounded by the number of entities, not the size of the table: a first scan
keeps ``(join keys, max event time)`` per entity in a temporary table, a second streams
the table again and keeps the rows that match it (a hash join whose build side is that
small table), so rows come out while the scan runs.

Every value is cast to the type its feature declares; values that do not fit (a string
in a number column, a fraction or an out-of-range number for an integer) are flagged in
``__reason`` rather than cast half-way, and rows whose join key is null (or does not fit
the key's type) are counted and can be copied out to a Parquet file.

Row conditions (a data contract's checks, :class:`RowCondition`) are evaluated in the same
query on the values about to be written: a failing row gets its reason in ``__reason``
and the failing checks' names in ``__check``; for a ``block`` condition the rows are
counted first, before any row is read out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from featurepipe.core import db
from featurepipe.core.db import one_row
from featurepipe.core.sql import literal, quote
from featurepipe.errors import InvalidInput, NotFound

REASON = "__reason"
CHECK = "__check"
EVENT_US = "__event_us"

# DuckDB type of each Feast ValueType name we check and cast to.
DUCKDB_TYPES = {
    "INT64": "BIGINT",
    "INT32": "INTEGER",
    "DOUBLE": "DOUBLE",
    "FLOAT": "FLOAT",
    "STRING": "VARCHAR",
    "BYTES": "BLOB",
    "BOOL": "BOOLEAN",
    "UNIX_TIMESTAMP": "TIMESTAMPTZ",
}
_INTEGER_TARGETS = {"BIGINT", "INTEGER"}
_FRACTIONAL_SOURCES = ("DOUBLE", "FLOAT", "DECIMAL", "REAL")


@dataclass(frozen=True)
class Column:
    """An output column: its name, the source column it is read from, its Feast type name."""

    name: str
    source: str
    value_type: str


@dataclass(frozen=True)
class RowCondition:
    """A row-level check on the output columns: SQL true for a failing row, SQL for its
    reason, and whether a failure blocks the whole view."""

    name: str
    column: str | None
    fails: str
    reason: str
    block: bool = False


@dataclass(frozen=True)
class LatestQuery:
    """What to read: a Parquet glob, its time columns, join keys and features, and the row
    conditions the values must meet."""

    path: str
    timestamp: str
    join_keys: Sequence[Column]
    features: Sequence[Column]
    created: str | None = None
    conditions: Sequence[RowCondition] = ()


@dataclass
class LatestScan:
    """The result of :func:`open_latest`: counts, then the rows as Arrow record batches."""

    entities: int
    window_rows: int
    null_key_rows: int
    reader: pa.RecordBatchReader
    connection: duckdb.DuckDBPyConnection = field(repr=False)
    files: list[str] = field(default_factory=list)
    blocked: dict[str, int] = field(default_factory=dict)  # failing rows per blocking condition
    blocked_sample: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    prepared: bool = False  # windowed views: the schedules were read from the backfill's prepared file

    def close(self) -> None:
        """End the scan's session (its temp tables go with it); the database stays for the next."""
        self.connection.close()


def _timestamp_literal(value: datetime) -> str:
    return f"TIMESTAMPTZ {literal(value.isoformat())}"


def connect(threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB session in UTC, with at most ``threads`` threads (default: all cores): a
    cursor on this process's shared database (:func:`featurepipe.core.db.shared_cursor`,
    profile ``scan``: rows may stream out in any order, and join keys spanning up to 2^20
    values are grouped with a direct-indexed table: the latest-row scan of 100k entities
    here took 0.15 instead of 0.21 s). Close it when done.
    """
    return db.shared_cursor("scan", int(threads or os.cpu_count() or 1))


def pinned_files(con: duckdb.DuckDBPyConnection, path: str) -> list[str]:
    """The files matching ``path`` now, sorted (raises NotFound when there are none)."""
    files = [row[0] for row in con.execute(f"SELECT file FROM glob({literal(path)})").fetchall()]
    if not files:
        raise NotFound(
            f"no Parquet files match {path}; backfill the offline table first (`featurepipe backfill`)"
        )
    return sorted(files)


def pinned_source(files: Sequence[str]) -> str:
    """``read_parquet`` of exactly these files: both scans read the same files, even if a
    backfill replaces a day meanwhile."""
    listed = ", ".join(literal(f) for f in files)
    return f"read_parquet([{listed}], hive_partitioning = true, union_by_name = true)"


def _source_types(con: duckdb.DuckDBPyConnection, source_sql: str) -> dict[str, str]:
    described = con.execute(f"DESCRIBE SELECT * FROM {source_sql}").fetchall()
    return {row[0]: str(row[1]) for row in described}


def _cast(col: Column, source_type: str) -> tuple[str, str | None]:
    """SQL for the value cast to its declared type, and SQL that is true when it does not fit."""
    src = quote(col.source)
    target = DUCKDB_TYPES.get(col.value_type)
    if target is None or source_type.upper() == target:
        return src, None
    cast = f"TRY_CAST({src} AS {target})"
    bad = f"({src} IS NOT NULL AND {cast} IS NULL)"
    if target in _INTEGER_TARGETS and source_type.upper().startswith(_FRACTIONAL_SOURCES):
        bad = f"({bad} OR ({src} IS NOT NULL AND {cast} <> {src}))"
        cast = f"CASE WHEN {cast} = {src} THEN {cast} END"
    return cast, bad


def _time_sql(expr: str) -> str:
    return f"CAST({expr} AS TIMESTAMPTZ)"


def open_latest(
    query: LatestQuery,
    start: datetime,
    end: datetime,
    batch_rows: int = 10_000,
    threads: int | None = None,
    null_key_file: Path | None = None,
) -> LatestScan:
    """Start reading the latest row per entity with event time in ``[start, end]``.

    Rows of the window whose join key is null (or does not fit its type) are copied to
    ``null_key_file`` (Parquet, with a ``quarantine_reason`` column) when there are any.
    """
    con = connect(threads)
    files = pinned_files(con, query.path)
    source_sql = pinned_source(files)
    types = _source_types(con, source_sql)
    needed = [query.timestamp, *(c.source for c in (*query.join_keys, *query.features))]
    if query.created:
        needed.append(query.created)
    missing = sorted({c for c in needed if c not in types})
    if missing:
        raise InvalidInput(
            f"{query.path} has no column(s) {missing}; it has {sorted(types)}. Check the feature "
            "view's schema and its source's field_mapping, then run `feast apply`"
        )
    ts = _time_sql(quote(query.timestamp))
    window = f"{ts} >= {_timestamp_literal(start)} AND {ts} <= {_timestamp_literal(end)}"
    # join keys under private names (__k0, ...): the raw columns stay as they are in *
    key_names = [f"__k{i}" for i in range(len(query.join_keys))]
    keys = [f"{_cast(k, types[k.source])[0]} AS {n}" for k, n in zip(query.join_keys, key_names)]
    created = f", {_time_sql(quote(query.created))} AS __created" if query.created else ""
    con.execute(
        f"CREATE TEMP VIEW __window AS SELECT {', '.join(keys)}, {ts} AS __ts{created}, * "
        f"FROM {source_sql} WHERE {window}"
    )
    not_null = " AND ".join(f"{k} IS NOT NULL" for k in key_names)
    # one scan: the null-key rows form their own group(s), counted, then dropped
    con.execute(
        f"CREATE TEMP TABLE __groups AS SELECT {', '.join(key_names)}, max(__ts) AS __max_ts, "
        "count(*) AS __rows FROM __window GROUP BY ALL"
    )
    null_rows = con.execute(f"SELECT coalesce(sum(__rows), 0) FROM __groups WHERE NOT ({not_null})").fetchall()[0][0]
    con.execute(f"CREATE TEMP TABLE __latest AS SELECT * FROM __groups WHERE {not_null}")
    con.execute("DROP TABLE __groups")
    join_on = " AND ".join(f"w.{k} = l.{k}" for k in key_names) + " AND w.__ts = l.__max_ts"
    if query.created:
        con.execute(
            f"CREATE TEMP TABLE __latest_created AS SELECT {', '.join('w.' + k for k in key_names)}, "
            f"max(w.__created) AS __max_created FROM __window w JOIN __latest l ON {join_on} GROUP BY ALL"
        )
        con.execute(
            "CREATE OR REPLACE TEMP TABLE __latest AS SELECT l.*, c.__max_created FROM __latest l "
            "LEFT JOIN __latest_created c ON " + " AND ".join(f"l.{k} = c.{k}" for k in key_names)
        )
        join_on += " AND w.__created IS NOT DISTINCT FROM l.__max_created"
    entities, window_rows = con.execute("SELECT count(*), coalesce(sum(__rows), 0) FROM __latest").fetchall()[0]
    if null_rows and null_key_file is not None:
        _copy_null_key_rows(con, query.join_keys, key_names, bool(query.created), null_key_file)
    selects = [f"w.{n} AS {quote(k.name)}" for k, n in zip(query.join_keys, key_names)]
    selects.append(f"epoch_us(w.__ts) AS {EVENT_US}")
    reasons = []
    for col in query.features:
        expr, bad = _cast(col, types[col.source])
        selects.append(f"{expr} AS {quote(col.name)}")
        if bad is not None:
            message = literal(f"{col.name}: value does not fit {col.value_type}")
            reasons.append(f"CASE WHEN {bad} THEN {message} END")
    selects.append(f"concat_ws('; ', {', '.join(reasons)}) AS {REASON}" if reasons else f"'' AS {REASON}")
    sql = f"SELECT {', '.join(selects)} FROM __window w JOIN __latest l ON {join_on}"
    blocked: dict[str, int] = {}
    sample: dict[str, list[dict[str, object]]] = {}
    if query.conditions:
        sql, blocked, sample = _with_conditions(con, sql, query.conditions)
    reader = con.sql(sql).to_arrow_reader(batch_rows)
    return LatestScan(
        entities=int(entities),
        window_rows=int(window_rows),
        null_key_rows=int(null_rows),
        reader=reader,
        connection=con,
        files=files,
        blocked=blocked,
        blocked_sample=sample,
    )


def _with_conditions(con: duckdb.DuckDBPyConnection, sql: str, conditions: Sequence[RowCondition]
                     ) -> tuple[str, dict[str, int], dict[str, list[dict[str, object]]]]:
    """``sql`` with the conditions' reasons added to ``__reason`` and their names in
    ``__check``; and, when some conditions block, their failing rows counted (one pass over
    the latest rows, only then) with a few of them as a sample."""
    reasons = ", ".join(f"CASE WHEN {c.fails} THEN {c.reason} END" for c in conditions)
    names = ", ".join(f"CASE WHEN {c.fails} THEN {literal(c.name)} END" for c in conditions)
    wrapped = (f"SELECT * REPLACE (concat_ws('; ', NULLIF({REASON}, ''), {reasons}) AS {REASON}), "
               f"concat_ws(',', {names}) AS {CHECK} FROM ({sql})")
    blocking = [c for c in conditions if c.block]
    if not blocking:
        return wrapped, {}, {}
    counts = one_row(
        con, "SELECT " + ", ".join(f"coalesce(sum(CAST({c.fails} AS INTEGER)), 0)" for c in blocking) + f" FROM ({sql})"
    )
    blocked = {c.name: int(n) for c, n in zip(blocking, counts) if n}
    sample = {}
    for c in blocking:
        if c.name in blocked:
            cur = con.execute(f"SELECT * EXCLUDE ({REASON}) FROM ({sql}) WHERE {c.fails} LIMIT 3")
            cols = [d[0] for d in cur.description]
            sample[c.name] = [dict(zip(cols, row)) for row in cur.fetchall()]
    return wrapped, blocked, sample


def _copy_null_key_rows(con: duckdb.DuckDBPyConnection, join_keys: Sequence[Column],
                        key_columns: Sequence[str], has_created: bool, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    null = " OR ".join(f"{k} IS NULL" for k in key_columns)
    message = literal(
        "join key " + ", ".join(k.name for k in join_keys) + " is null or does not fit its type"
    )
    private = [*key_columns, "__ts", *(["__created"] if has_created else [])]
    con.execute(
        f"COPY (SELECT * EXCLUDE ({', '.join(private)}), {message} AS quarantine_reason "
        f"FROM __window WHERE {null}) TO {literal(str(target))} (FORMAT parquet)"
    ).fetchall()
