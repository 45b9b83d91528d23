"""Each entity's window schedule at a materialisation, computed with DuckDB from raw events.

A windowed-aggregate view is materialised from its *raw* input, not from its offline table:
for every entity with an event in the materialised range ``[start, end]``, the kernel
(:func:`featurepipe.core.windows.schedule_sql`: the rows of ``change_point_sql``, grouped by
window) computes the rows from the entity's newest event ``x`` on: the row right after the
event (``v0 = x + 1 us``, every value), then per window one row per hop bucket leaving it,
down to the window empty; it reads the entity's events of ``[x - horizon, x]``. Those rows
are the entity's schedule (:mod:`featurepipe.online.schedule`); the first goes into Feast's
own fields, ``v0`` as Feast's event timestamp.

Why from the newest event and not from the row in force at ``end``: the rows written then
depend on the events alone, not on when the materialisation ran, so the stream job (which
writes the same rows: :mod:`featurepipe.stream.online_rows`) and any rerun write the very
same bytes, and the writer's newest-wins rule on the timestamp (``x + 1 us``) compares
events. Rows already past when written cost a little memory and nothing else: the reader
picks the row in force at its own clock.

An entity whose newest event is older than ``end - horizon`` gets the same treatment: its
schedule ends with the all-empty row (counts 0, ``last`` its newest event), in force from
its last drop on, for ever (until its next event).

The schedules come out as Arrow batches of rows sorted by key, group, then ``v``, never
splitting an entity across two batches: the join keys, the group
(:data:`~featurepipe.core.windows.SCHEDULE_GROUP`), :data:`EVENT_US` (``v``), the features,
:data:`FIRST` (true on an entity's first row, the one at ``v0``) and ``__reason`` /
``__check`` as :mod:`featurepipe.online.latest` gives them: row conditions (the view's
contract) are checked on *every* value of a schedule (a feature's on the rows of its
window), and an entity with a failing row is quarantined whole (all its rows carry a
reason, so nothing of it is written).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurepipe.core import db
from featurepipe.core.parquet_io import atomic_parquet
from featurepipe.core.sql import literal, quote, ts_literal
from featurepipe.core.threads import prefetch
from featurepipe.core.windows import (
    KERNEL_VERSION,
    SCHEDULE_GROUP,
    Aggregate,
    ViewShape,
    change_point_sql,
    feature_groups,
    history,
    micros,
    schedule_sql,
)
from featurepipe.errors import InvalidInput
from featurepipe.online.latest import (
    CHECK,
    EVENT_US,
    REASON,
    LatestQuery,
    LatestScan,
    RowCondition,
    connect,
    pinned_files,
    pinned_source,
)
from featurepipe.online.schedule import LAYOUT_VERSION

# the schedules are computed in parts (entities split by the hash of their key), so that
# the next part is computed while the one before is encoded and written
_ENTITIES_PER_PART = 20_000
_MAX_PARTS = 8

FIRST = "__first"  # true on the first change point of an entity (the one in Feast's fields)
_OTHER_ROW_FAILED = "another change point of this entity failed a check"


@dataclass(frozen=True)
class KernelInput:
    """What a windowed-aggregate view is computed from: its raw Parquet, event time column,
    aggregates, and the SQL conditions that leave a raw row out (its source contract's row
    checks, as the backfill's gate leaves them out)."""

    path: str
    timestamp: str
    aggregations: tuple[Aggregate, ...]
    exclude: tuple[str, ...] = ()
    prepared: str | None = None  # where the backfill keeps the view's prepared schedules (see prepare_schedules)


def open_schedules(query: LatestQuery, kernel: KernelInput, start: datetime, end: datetime,
                   batch_rows: int = 5_000, threads: int | None = None,
                   null_key_file: Path | None = None) -> LatestScan:
    """Start reading the schedule of every entity with an event in ``[start, end]`` (see the
    module documentation), in batches of about ``batch_rows`` entities. ``query`` names the join keys and features (in schedule column
    order) and the row conditions; ``window_rows`` counts those entities' events in the
    range, ``null_key_rows`` the range's events without a join key (copied to
    ``null_key_file`` when given)."""
    con = connect(threads)
    keys = [k.source for k in query.join_keys]
    files, source, shape = _raw_events(con, kernel, keys)
    ts = quote(kernel.timestamp)
    key_list = ", ".join(quote(k) for k in keys)
    not_null = " AND ".join(f"{quote(k)} IS NOT NULL" for k in keys)
    excluded = "".join(f" AND NOT coalesce(({c}), FALSE)" for c in kernel.exclude)
    in_range = f"{ts} >= {ts_literal(start)} AND {ts} <= {ts_literal(end)}"
    prepared = _usable(kernel, shape, files, end)
    if prepared is None:
        con.execute(f"CREATE TEMP TABLE __ents AS SELECT {key_list}, max({ts}) AS __last, count(*) AS __rows "
                    f"FROM __raw WHERE {in_range} GROUP BY ALL")
        null_rows = con.execute(f"SELECT coalesce(sum(__rows), 0) FROM __ents WHERE NOT ({not_null})").fetchall()[0][0]
        con.execute(f"DELETE FROM __ents WHERE NOT ({not_null})")
        entities, window_rows = con.execute("SELECT count(*), coalesce(sum(__rows), 0) FROM __ents").fetchall()[0]
    else:  # the entities are the prepared file's; the events are only counted
        null_rows, window_rows = con.execute(
            f"SELECT count(*) FILTER (WHERE NOT ({not_null})), count(*) FILTER (WHERE {not_null}) "
            f"FROM __raw WHERE {in_range}").fetchall()[0]
        entities = con.execute(f"SELECT count(*) FROM read_parquet({literal(prepared)}) "
                               f"WHERE {SCHEDULE_GROUP} = -1 AND __v0 > {_epoch_us(start)}").fetchall()[0][0]
    if null_rows and null_key_file is not None:
        _copy_null_key_rows(con, source, query, keys, in_range, excluded, null_key_file)
    names = [f.name for f in query.features]
    features = ", ".join(quote(n) for n in names)
    parts = max(1, min(_MAX_PARTS, int(entities) // _ENTITIES_PER_PART))
    part = [f"hash({key_list}) % {parts} = {p}" for p in range(parts)] if parts > 1 else ["TRUE"]
    order = f" ORDER BY {key_list}, {SCHEDULE_GROUP}, __v"
    if prepared is not None:
        # the backfill's rows of these very files: those of the entities with an event in
        # [start, end] (their newest event is, as end is past the newest of all), kept in the
        # file's order (sorted) by a session that keeps insertion order
        con.close()
        con = db.connect("default", threads)
        order, part = "", ["TRUE"]  # one pass over the file, streamed (a part would read all of it)
        rows = (f"(SELECT {key_list}, {SCHEDULE_GROUP}, __v, {features} FROM read_parquet({literal(prepared)}) "
                f"WHERE __v0 > {_epoch_us(start)}")
        if any(c.block for c in query.conditions):
            con.execute(f"CREATE TEMP TABLE __sched AS SELECT * FROM {rows})")
            schedules = [f"(SELECT * FROM __sched WHERE {where})" for where in part]
        else:
            schedules = [f"{rows} AND {where})" for where in part]
    else:
        _stage_events(con, kernel, keys)

        def computed(events: str) -> str:
            return (f"(SELECT {key_list}, {SCHEDULE_GROUP}, epoch_us(event_timestamp) AS __v, {features} "
                    f"FROM ({schedule_sql(shape, events)}))")

        if any(c.block for c in query.conditions):  # all counted before anything is written
            con.execute(f"CREATE TEMP TABLE __sched AS SELECT * FROM {computed('__ev')}")
            schedules = [f"(SELECT * FROM __sched WHERE {where})" for where in part]
        else:  # streamed, each part's sort the only pass over its rows
            schedules = [computed(f"(SELECT * FROM __ev WHERE {where})") for where in part]
    conditions = scoped_conditions(query.conditions, kernel.aggregations, keys, names)
    blocked, sample = _blocked(con, conditions)
    reasons = ", ".join(f"CASE WHEN {c.fails} THEN {c.reason} END" for c in conditions)
    checks = ", ".join(f"CASE WHEN {c.fails} THEN {literal(c.name)} END" for c in conditions)
    row_reason = f"concat_ws('; ', {reasons})" if conditions else "''"
    row_check = f"concat_ws(',', {checks})" if conditions else "''"
    sqls = [f"SELECT {key_list}, {SCHEDULE_GROUP}, __v AS {EVENT_US}, {', '.join(quote(n) for n in names)}, "
            f"{row_reason} AS {REASON}, {row_check} AS {CHECK} FROM {relation}{order}"
            for relation in schedules]
    schema = con.sql(sqls[0] + " LIMIT 0").to_arrow_table().schema
    if prepared is not None:  # sorted already: streamed as DuckDB reads it
        # rows per entity, about (a batch's entities need only be about batch_rows)
        per_entity = max(1, min(1_000, pq.read_metadata(prepared).num_rows // max(1, int(entities))))
        batches = whole_entities(con.sql(sqls[0]).to_arrow_reader(batch_rows * per_entity), keys,
                                 bool(query.conditions))
    else:  # each part computed (and sorted) while the one before is encoded and written
        batches = (batch for table in prefetch((con.sql(sql).to_arrow_table() for sql in sqls), depth=1) for batch in
                   whole_entities(table.to_reader(batch_rows * _rows_per_entity(table, entities, parts)), keys,
                                  bool(query.conditions)))
    rows = pa.RecordBatchReader.from_batches(schema.append(pa.field(FIRST, pa.bool_())), batches)
    return LatestScan(entities=int(entities), window_rows=int(window_rows), null_key_rows=int(null_rows),
                      reader=rows, connection=con, files=files, blocked=blocked, blocked_sample=sample,
                      prepared=prepared is not None)


def _raw_events(con: duckdb.DuckDBPyConnection, kernel: KernelInput, keys: Sequence[str]
                ) -> tuple[list[str], str, ViewShape]:
    """Pin the view's raw files and create temp view ``__raw``: their events with an event
    time, less the rows ``kernel.exclude`` leaves out, in the columns the kernel reads.
    Returns the files, their ``read_parquet`` and the view's shape (with the files' types);
    raises when a column the view needs is missing."""
    files = pinned_files(con, kernel.path)
    source = pinned_source(files)
    types = {row[0]: str(row[1]) for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    columns = sorted({a.column for a in kernel.aggregations})
    missing = sorted({c for c in [kernel.timestamp, *keys, *columns] if c not in types})
    if missing:
        raise InvalidInput(
            f"{kernel.path} has no column(s) {missing}; it has {sorted(types)}. Check the view's input "
            "source and its aggregations, then run `feast apply`"
        )
    ts = quote(kernel.timestamp)
    excluded = "".join(f" AND NOT coalesce(({c}), FALSE)" for c in kernel.exclude)
    needed = ", ".join(quote(c) for c in dict.fromkeys([*keys, kernel.timestamp, *columns]))
    con.execute(f"CREATE TEMP VIEW __raw AS SELECT {needed} FROM {source} WHERE {ts} IS NOT NULL{excluded}")
    return files, source, ViewShape(tuple(keys), kernel.timestamp, kernel.aggregations, types)


def _stage_events(con: duckdb.DuckDBPyConnection, kernel: KernelInput, keys: Sequence[str]) -> None:
    """Temp table ``__ev``: the events each entity of ``__ents`` (keys, ``__last``: its newest
    event) has in its last horizon (all of them when an aggregate without a window is not
    ``last``: it counts the whole history), from ``__raw``; what its schedule depends on."""
    ts = quote(kernel.timestamp)
    on = " AND ".join(f"r.{quote(k)} = e.{quote(k)}" for k in keys)
    back = history(kernel.aggregations)
    reach = "" if back is None else f" AND epoch_us(r.{ts}) >= epoch_us(e.__last) - {micros(back)}"
    con.execute(f"CREATE TEMP TABLE __ev AS SELECT r.* FROM __raw r JOIN __ents e ON {on} "
                f"WHERE r.{ts} <= e.__last{reach}")


# ------------------------------------------------------------ prepared schedules

PREPARED_METADATA_KEY = b"featurepipe.prepared_schedules"
_PREPARED_FORMAT = 1


def prepared_path(offline_path: str | Path) -> Path:
    """Where a windowed view's prepared schedules live: ``.schedules/<view>.parquet`` beside
    the folder of its offline table (``offline_path``: that folder, or its Parquet glob)."""
    folder = Path(str(offline_path).split("/**")[0].rstrip("/"))
    return folder.parent / ".schedules" / f"{folder.name}.parquet"


def _identity(kernel: KernelInput, shape: ViewShape, files: Sequence[str]) -> dict[str, object]:
    """What prepared schedules are valid for: this kernel's SQL over these events (the
    view's keys, aggregates, column types, left-out rows, history) and the raw files
    exactly as they are now (path, size, modification time)."""
    sql = "\n".join([schedule_sql(shape, "__ev"), repr(history(kernel.aggregations)), *kernel.exclude])
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append(f"{f}\t{st.st_size}\t{st.st_mtime_ns}")
    return {"format": _PREPARED_FORMAT, "kernel": KERNEL_VERSION, "layout": LAYOUT_VERSION,
            "sql": hashlib.sha256(sql.encode()).hexdigest(),
            "files": hashlib.sha256("\n".join(stats).encode()).hexdigest()}


def _usable(kernel: KernelInput, shape: ViewShape, files: Sequence[str], end: datetime) -> str | None:
    """The prepared schedules' file when it holds exactly what a computation from the raw
    events would give for a materialisation up to ``end``: the same :func:`_identity`, and
    ``end`` at or after the newest event it saw. None otherwise (then the schedules are
    computed)."""
    if not kernel.prepared or not os.path.exists(kernel.prepared):
        return None
    identity = _identity(kernel, shape, files)
    try:
        metadata = pq.read_metadata(kernel.prepared).metadata or {}
        stamp = json.loads(metadata[PREPARED_METADATA_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None  # unreadable or not ours: compute
    newest = stamp.pop("newest_us", None)
    if stamp != identity or newest is None or _epoch_us(end) < newest:
        return None
    return kernel.prepared


def prepare_schedules(query: LatestQuery, kernel: KernelInput, threads: int | None = None) -> int:
    """Compute every entity's schedule from the raw events (what :func:`open_schedules`
    computes for a range reaching past the newest event) and keep it in ``kernel.prepared``
    (written atomically, sorted by key, group, ``v``; stamped with :func:`_identity`). A
    materialisation of these very files then reads it instead of computing (the backfill
    calls this after computing the offline table, so the work is done once per new data);
    any change of the files, the view or its contract makes it compute again. Returns the
    rows written (0: no events, and any earlier file removed)."""
    assert kernel.prepared, "prepare_schedules needs kernel.prepared (the file to write)"
    target = Path(kernel.prepared)
    con = db.connect("default", threads)  # keeps insertion order: the file is written sorted
    try:
        keys = [k.source for k in query.join_keys]
        files, _, shape = _raw_events(con, kernel, keys)
        identity = _identity(kernel, shape, files)
        ts = quote(kernel.timestamp)
        key_list = ", ".join(quote(k) for k in keys)
        not_null = " AND ".join(f"{quote(k)} IS NOT NULL" for k in keys)
        con.execute(f"CREATE TEMP TABLE __ents AS SELECT {key_list}, max({ts}) AS __last, count(*) AS __rows "
                    f"FROM __raw WHERE {not_null} GROUP BY ALL")
        newest = con.execute("SELECT max(epoch_us(__last)) FROM __ents").fetchall()[0][0]
        if newest is None:
            target.unlink(missing_ok=True)
            return 0
        _stage_events(con, kernel, keys)
        aggregates = ", ".join(f"s.{quote(a.name)}" for a in kernel.aggregations)
        on = " AND ".join(f"s.{quote(k)} = e.{quote(k)}" for k in keys)
        table = con.sql(
            f"SELECT {', '.join(f's.{quote(k)}' for k in keys)}, s.{SCHEDULE_GROUP}, epoch_us(s.event_timestamp) AS __v, "
            f"{aggregates}, epoch_us(e.__last) + 1 AS __v0 FROM ({schedule_sql(shape, '__ev')}) s JOIN __ents e ON {on} "
            f"ORDER BY {', '.join(f's.{quote(k)}' for k in keys)}, s.{SCHEDULE_GROUP}, __v").to_arrow_table()
        stamp = json.dumps({**identity, "newest_us": int(newest)}).encode()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PREPARED_METADATA_KEY: stamp})
        atomic_parquet(table, target)
        return int(table.num_rows)
    finally:
        con.close()


def _epoch_us(value: datetime) -> int:
    return (value - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def _rows_per_entity(table: pa.Table, entities: int, parts: int) -> int:
    """About how many schedule rows each entity of a part has (``batch_rows`` counts entities)."""
    return max(1, int(round(table.num_rows / max(1, entities / parts))))


def scoped_conditions(conditions: Sequence[RowCondition], aggregations: Sequence[Aggregate], keys: Sequence[str],
            names: Sequence[str]) -> list[RowCondition]:
    """The row conditions as they apply to schedule rows: a feature's on the row at the newest
    event and on its own window's rows (in another group's rows its column is a placeholder),
    a join key's on every row, any other on the row at the newest event."""
    groups = dict(zip(names, feature_groups(aggregations, names)[0]))
    out = []
    for c in conditions:
        if c.column in keys:
            out.append(c)
            continue
        rows = f"{SCHEDULE_GROUP} IN (-1, {groups[c.column]})" if c.column in groups else f"{SCHEDULE_GROUP} = -1"
        out.append(replace(c, fails=f"({rows} AND ({c.fails}))"))
    return out


def whole_entities(reader: pa.RecordBatchReader, keys: Sequence[str], checked: bool) -> Iterator[pa.RecordBatch]:
    """``reader``'s rows (sorted by key) re-cut so that no entity spans two batches, with
    :data:`FIRST` marking each entity's first row; with ``checked``, every row of an entity
    with a failing row gets a reason (the entity is quarantined whole)."""
    carry: pa.Table | None = None
    for batch in reader:
        table = pa.Table.from_batches([batch]) if carry is None else pa.concat_tables([carry, pa.Table.from_batches([batch])])
        first = _firsts(table, keys)
        starts = np.flatnonzero(first)
        cut = int(starts[-1]) if len(starts) else 0  # the last entity may go on in the next batch
        if cut:
            yield _marked(table.slice(0, cut), first[:cut], checked)
        carry = table.slice(cut)
    if carry is not None and carry.num_rows:
        yield _marked(carry, _firsts(carry, keys), checked)


def _firsts(table: pa.Table, keys: Sequence[str]) -> np.ndarray:
    """True where a row's key differs from the row before (and on the first row)."""
    first = np.zeros(table.num_rows, dtype=bool)
    if table.num_rows:
        first[0] = True
        for k in keys:
            column = table.column(k).combine_chunks()
            first[1:] |= np.asarray(pc.not_equal(column.slice(1), column.slice(0, len(column) - 1))
                                    .to_numpy(zero_copy_only=False), dtype=bool)
    return first


def _marked(table: pa.Table, first: np.ndarray, checked: bool) -> pa.RecordBatch:
    """One batch of whole entities, :data:`FIRST` added, a failing entity's rows all with a reason."""
    if checked:
        reason = table.column(REASON).combine_chunks()
        bad = np.asarray(pc.not_equal(reason, "").to_numpy(zero_copy_only=False), dtype=bool)
        if bad.any():
            entity = np.cumsum(first) - 1
            whole = np.isin(entity, entity[bad])
            filled = np.where(whole & ~bad, _OTHER_ROW_FAILED, np.asarray(reason.to_pylist(), dtype=object))
            index = table.schema.get_field_index(REASON)
            table = table.set_column(index, table.schema.field(index), pa.array(filled, table.schema.field(index).type))
    table = table.append_column(FIRST, pa.array(first))
    return table.combine_chunks().to_batches(max_chunksize=max(table.num_rows, 1))[0] if table.num_rows else \
        pa.RecordBatch.from_pylist([], schema=table.schema)


def schedule_types(query: LatestQuery, kernel: KernelInput) -> dict[str, str]:
    """The DuckDB type of every column the kernel computes for the view (its join keys,
    ``event_timestamp`` and features), without computing anything: what a contract's schema
    checks compare with."""
    con = connect(1)
    try:
        source = pinned_source(pinned_files(con, kernel.path))
        types = {row[0]: str(row[1]) for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        keys = tuple(k.source for k in query.join_keys)
        shape = ViewShape(keys, kernel.timestamp, kernel.aggregations, types)
        sql = change_point_sql(shape, f"(SELECT * FROM {source} LIMIT 0)")
        return {row[0]: str(row[1]) for row in con.execute(f"DESCRIBE {sql}").fetchall()}
    finally:
        con.close()


def _blocked(con: duckdb.DuckDBPyConnection, conditions: Sequence[RowCondition]
             ) -> tuple[dict[str, int], dict[str, list[dict[str, object]]]]:
    """Schedule rows failing each blocking condition (only when there are such conditions),
    and a few of them."""
    blocking = [c for c in conditions if c.block]
    if not blocking:
        return {}, {}
    counts = con.execute(
        "SELECT " + ", ".join(f"coalesce(sum(CAST({c.fails} AS INTEGER)), 0)" for c in blocking) + " FROM __sched"
    ).fetchall()[0]
    blocked = {c.name: int(n) for c, n in zip(blocking, counts) if n}
    sample = {}
    for c in blocking:
        if c.name in blocked:
            cur = con.execute(f"SELECT * EXCLUDE (__v, {SCHEDULE_GROUP}), make_timestamptz(__v) AS event_timestamp "
                              f"FROM __sched WHERE {c.fails} LIMIT 3")
            cols = [d[0] for d in cur.description]
            sample[c.name] = [dict(zip(cols, row)) for row in cur.fetchall()]
    return blocked, sample


def _copy_null_key_rows(con: duckdb.DuckDBPyConnection, source: str, query: LatestQuery, keys: Sequence[str],
                        in_range: str, excluded: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    null = " OR ".join(f"{quote(k)} IS NULL" for k in keys)
    message = literal("join key " + ", ".join(k.name for k in query.join_keys) + " is null")
    con.execute(
        f"COPY (SELECT *, {message} AS quarantine_reason FROM {source} WHERE ({null}) AND {in_range}{excluded}) "
        f"TO {literal(str(target))} (FORMAT parquet)"
    ).fetchall()
