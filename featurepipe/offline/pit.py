"""Point-in-time joins: through each view's sorted index, or one DuckDB ASOF join per view.

:func:`build_join` uses the index (:mod:`featurepipe.offline.index`) where it can; the
rest of this docstring is about the scan, used where it cannot.

For every entity row and view, the matching feature row is the newest one with the same
join keys and event time at or before the row's as-of time; among rows with the same
event time, the newest created timestamp wins. With a TTL, a match older than
``as_of - ttl`` counts as no match (the newest row is the only candidate: every older one
is older still, which is what Feast's filter-then-deduplicate gives).

For a windowed-aggregate view the rows are change points (``featurepipe backfill``), so the
newest row at or before the as-of time ``t`` holds the request-time values at ``t``, events
at ``t`` excluded; such a view has no TTL cutoff (:mod:`featurepipe.offline.view`) and its
table must come from this featurepipe's kernel version (:mod:`featurepipe.offline.versions`).

Each view's result goes into a temp table keyed by the entity row number; the final
SELECT joins them back onto the entity rows in their original order. (Chaining several
ASOF joins in one query made DuckDB plan a huge intermediate; one at a time streams.)

With ``filter_by_created_timestamp`` a feature row also needs ``created <= as_of``. That
is no longer a single inequality, so those views use a range join plus ``arg_max``: exact
and slower, and only used when asked for.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from featurepipe.core.sql import literal, quote
from featurepipe.errors import InvalidInput
from featurepipe.offline.entity import ROW, EntityFrame, check_join_key_types
from featurepipe.offline.index import (
    SortedIndex,
    entity_sort_keys,
    locate,
    open_or_build,
    verify_keys,
)
from featurepipe.offline.versions import require_current_kernel
from featurepipe.offline.view import ViewRequest, source_types

ENTITY = "__fp_entity"
# a feature row's position: file number in the pinned list, row number in the file
POSITION = "((CAST(file_index AS BIGINT) << 40) | file_row_number)"


def _check_columns(view: ViewRequest, types: dict[str, str]) -> None:
    wanted = [*view.join_keys, view.timestamp, *([view.created] if view.created else []), *view.features]
    missing = [c for c in wanted if c not in types]
    if missing:
        raise InvalidInput(
            f"feature view {view.name!r}: its offline table {view.path} has no column(s) {missing} "
            f"(it has {sorted(types)}); fix the view's schema/field_mapping or the source data"
        )


# below this many entity rows, pruning feature rows to the requested keys (a semi join) pays
# for itself; above it most keys are requested anyway and the join only costs time
SEMI_JOIN_MAX_ENTITY_ROWS = 250_000


def _feature_rows(view: ViewRequest, lo: str, hi: str, narrow: bool, prune_keys: bool = True) -> str:
    """The view's rows that can match some entity row, join keys renamed ``__k<i>``.

    ``narrow``: only keys, times and the row's position (file, row number); the features
    are fetched later for the matched rows alone. Sorting the narrow rows for the ASOF
    join is what costs, so the fewer bytes per row the better. Rows whose keys appear in
    no entity row, or outside the entity rows' time range, are dropped first.
    """
    ts = f"CAST(s.{quote(view.timestamp)} AS TIMESTAMPTZ)"
    cols = [f"s.{quote(src)} AS __k{i}" for i, src in enumerate(view.join_keys)]
    cols.append(f"{ts} AS __fp_ts")
    if view.created:
        cols.append(f"CAST(s.{quote(view.created)} AS TIMESTAMPTZ) AS __fp_created")
    if narrow:
        cols.append(f"{POSITION.replace('file_', 's.file_')} AS __fp_pos")
    else:
        cols += [f"s.{quote(src)} AS {quote(out)}" for src, out in view.features.items()]
    # rows older than the earliest as-of time minus the TTL can match nothing (no TTL: all can)
    where = [f"{ts} <= {hi}"]
    if view.ttl:
        where.append(f"{ts} >= {lo} - INTERVAL ({_micros(view.ttl)}) MICROSECONDS")
    semi = " AND ".join(f"s.{quote(src)} = __fp_keys.{quote(ent)}" for src, ent in view.join_keys.items())
    keys = ", ".join(quote(e) for e in view.join_keys.values())
    prune = f"SEMI JOIN (SELECT DISTINCT {keys} FROM {ENTITY}) __fp_keys ON {semi} " if prune_keys else ""
    return f"SELECT {', '.join(cols)} FROM {view.scan()} s {prune}WHERE {' AND '.join(where)}"


def _micros(delta: timedelta | None) -> int:
    return int((delta or timedelta(0)) / timedelta(microseconds=1))


def _ttl_condition(view: ViewRequest, as_of: str) -> str | None:
    if view.ttl is None:
        return None
    return f"f.__fp_ts >= {as_of} - INTERVAL ({_micros(view.ttl)}) MICROSECONDS"


# above this many entity rows the result is assembled in DuckDB (it can stream and spill)
# rather than from the sorted index in memory
INDEX_MAX_ENTITY_ROWS = 4_000_000
# below this many entity rows the views are looked up one after the other (threads cost more)
PARALLEL_LOOKUPS_ABOVE = 50_000


@dataclass(frozen=True, eq=False)
class IndexedLookup:
    """A view matched through its sorted index: what :func:`_look_up` searches, per view.

    ``keys`` and ``known`` are the entity rows' sort keys and whether each can be in the
    index at all (:func:`featurepipe.offline.index.entity_sort_keys`).
    """

    alias: str  # the view's name in the result plan (``__fp_v<i>``)
    index: SortedIndex
    view: ViewRequest
    keys: np.ndarray  # uint64, one per entity row
    known: np.ndarray  # bool, one per entity row


def build_join(
    con: duckdb.DuckDBPyConnection,
    frame: EntityFrame,
    views: list[ViewRequest],
    filter_by_created_timestamp: bool = False,
    index_directory: Path | None = None,
) -> JoinPlan:
    """Match every view and return the plan that assembles the result.

    With ``index_directory``, a view is matched through its sorted index
    (:mod:`featurepipe.offline.index`, built there when missing or stale); otherwise, or when
    the index cannot serve the request, by an ASOF join over the files into a temp table.
    ``con`` is opened on first use: a warm indexed retrieval with integer keys needs no DuckDB.
    """
    entity_registered = False

    def register_entity() -> None:
        nonlocal entity_registered
        if not entity_registered:
            con.register(ENTITY, frame.table)
            entity_registered = True

    # where the indexes are, or None: match by scans (no index, or too many entity rows)
    indexes = index_directory if frame.table.num_rows <= INDEX_MAX_ENTITY_ROWS else None
    lookups: list[IndexedLookup] = []
    as_of = f"e.{quote(frame.timestamp_column)}"
    lo_scalar, hi_scalar = frame.time_range()
    if not lo_scalar.is_valid:  # no entity rows: any bound works
        lo = hi = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"
    else:
        lo = f"TIMESTAMPTZ {literal(lo_scalar.as_py().isoformat())}"
        hi = f"TIMESTAMPTZ {literal(hi_scalar.as_py().isoformat())}"
    selects = [f"e.{quote(c)}" for c in frame.columns]
    matched: list[tuple[str, list[str]]] = []
    prune = frame.table.num_rows <= SEMI_JOIN_MAX_ENTITY_ROWS
    taken = set(frame.columns)
    joins = []
    for i, view in enumerate(views):
        view = view.pinned(con)
        require_current_kernel(view, con)
        where = locate(view, indexes) if indexes is not None else None
        types = where.meta["types"] if where and where.meta else source_types(con, view)
        _check_columns(view, types)
        check_join_key_types(frame, {ent: types[src] for src, ent in view.join_keys.items()}, view.name)
        clash = sorted(taken & set(view.features.values()))
        if clash:
            raise InvalidInput(
                f"feature view {view.name!r}: output column(s) {clash} already exist in the result "
                "(in entity_df or another view); pass full_feature_names=True or rename them"
            )
        taken |= set(view.features.values())
        alias = f"__fp_v{i}"
        index = None
        if where is not None and not (filter_by_created_timestamp and view.created):
            index = open_or_build(con, view, types, where)
        if index is not None:
            if index.packing is None:  # hashed keys: DuckDB hashes the entity keys too
                register_entity()
            keys, known = entity_sort_keys(con, frame, view, index, types)
            lookups.append(IndexedLookup(alias, index, view, keys, known))
            selects += [f"{alias}.{quote(o)}" for o in view.features.values()]
            joins.append(f"LEFT JOIN {alias} ON {alias}.{ROW} = e.{ROW}")
            matched.append((alias, list(view.features.values())))
            continue
        register_entity()
        key_match = [f"e.{quote(ent)} = f.__k{j}" for j, ent in enumerate(view.join_keys.values())]
        ttl = _ttl_condition(view, as_of)
        if filter_by_created_timestamp and view.created:
            conds = [*key_match, f"f.__fp_ts <= {as_of}", f"f.__fp_created <= {as_of}"]
            if ttl:
                conds.append(ttl)
            outs = ", ".join(f"f.{quote(o)}" for o in view.features.values())
            con.execute(
                f"CREATE TEMP TABLE {alias} AS SELECT {ROW}, {', '.join(quote(o) for o in view.features.values())} FROM ("
                f"SELECT e.{ROW}, {outs}, row_number() OVER (PARTITION BY e.{ROW} "
                f"ORDER BY f.__fp_ts DESC, f.__fp_created DESC NULLS LAST) AS __rn "
                f"FROM {ENTITY} e JOIN ({_feature_rows(view, lo, hi, narrow=False, prune_keys=prune)}) f ON {' AND '.join(conds)}"
                f") WHERE __rn = 1"
            )
            join_kind = "LEFT JOIN"
        else:
            # 1. ASOF over narrow rows: which feature row (file, position) each entity row gets
            rows = _feature_rows(view, lo, hi, narrow=True, prune_keys=prune)
            if view.created:  # ties on event time: the newest created time wins
                rows = (
                    f"SELECT * FROM ({rows}) QUALIFY row_number() OVER (PARTITION BY "
                    f"{', '.join(f'__k{j}' for j in range(len(view.join_keys)))}, __fp_ts "
                    f"ORDER BY __fp_created DESC NULLS LAST) = 1"
                )
            valid = f"({ttl})" if ttl else "f.__fp_ts IS NOT NULL"
            on = " AND ".join([*key_match, f"{as_of} >= f.__fp_ts"])
            con.execute(
                f"CREATE TEMP TABLE {alias}_m AS SELECT e.{ROW}, f.__fp_pos "
                f"FROM {ENTITY} e ASOF JOIN ({rows}) f ON {on} WHERE {valid}"
            )
            # 2. fetch the features of the matched rows only
            outs = ", ".join(f"g.{quote(src)} AS {quote(out)}" for src, out in view.features.items())
            con.execute(
                f"CREATE TEMP TABLE {alias} AS SELECT m.{ROW}, {outs or 'NULL AS __none'} FROM {alias}_m m "
                f"JOIN (SELECT *, {POSITION} AS __fp_pos FROM {view.scan()}) g ON g.__fp_pos = m.__fp_pos"
            )
            join_kind = "LEFT JOIN"
        selects += [f"{alias}.{quote(o)}" for o in view.features.values()]
        joins.append(f"{join_kind} {alias} ON {alias}.{ROW} = e.{ROW}")
        matched.append((alias, list(view.features.values())))
    return JoinPlan(
        frame=frame,
        views=matched,
        aligned=_look_up(frame, lookups),
        final_sql=f"SELECT {', '.join(selects)} FROM {ENTITY} e {' '.join(joins)} ORDER BY e.{ROW}",
    )


def _look_up(frame: EntityFrame, lookups: list[IndexedLookup]) -> dict[str, pa.Table]:
    """Each indexed view's features aligned with the entity rows, the views in parallel threads.

    The searches (C) and takes (Arrow) release the GIL, so the views share the cores.
    """
    as_of = frame.table.column(frame.timestamp_column).cast(pa.int64()).to_numpy()

    def one(item: IndexedLookup) -> pa.Table:
        view = item.view
        rows = item.index.lookup(item.keys, item.known, as_of, _micros(view.ttl) if view.ttl else None)
        rows = verify_keys(item.index, frame, view, rows)
        return item.index.take(rows, list(view.features)).rename_columns(list(view.features.values()))

    if len(lookups) > 1 and frame.table.num_rows >= PARALLEL_LOOKUPS_ABOVE:
        with ThreadPoolExecutor(max_workers=min(len(lookups), os.cpu_count() or 1)) as pool:
            parts = list(pool.map(one, lookups))
    else:
        parts = [one(item) for item in lookups]
    return {item.alias: part for item, part in zip(lookups, parts)}


@dataclass(frozen=True)
class SqlPlan:
    """A result that is one SELECT."""

    final_sql: str

    def sql(self) -> str:
        return self.final_sql

    def prepare(self, con: duckdb.DuckDBPyConnection) -> None:
        """Make ``sql()`` runnable in ``con`` (nothing to do for one SELECT)."""

    def to_arrow(self, con: duckdb.DuckDBPyConnection) -> pa.Table:
        return con.sql(self.final_sql).to_arrow_table()


@dataclass(frozen=True)
class JoinPlan(SqlPlan):
    """A prepared point-in-time join: one temp table of matches per view.

    ``sql()`` assembles the result in DuckDB (``COPY`` streams it to Parquet without
    holding it in memory); ``to_arrow`` assembles it in Arrow instead: the entity columns
    as given, each view's matched rows scattered to their entity row with one ``take``,
    no join and no sort.
    """

    frame: EntityFrame | None = None
    views: list[tuple[str, list[str]]] = field(default_factory=list)
    aligned: dict[str, pa.Table] = field(default_factory=dict)  # views matched through an index

    def prepare(self, con: duckdb.DuckDBPyConnection) -> None:
        """Register the indexed views' results, which ``sql()`` joins like the scanned ones."""
        assert self.frame is not None
        con.register(ENTITY, self.frame.table)
        rows = pa.array(np.arange(self.frame.table.num_rows, dtype=np.int64))
        for alias, part in self.aligned.items():
            con.register(alias, part.append_column(ROW, rows))

    def to_arrow(self, con: duckdb.DuckDBPyConnection) -> pa.Table:
        assert self.frame is not None
        n = self.frame.table.num_rows
        result = self.frame.table.drop_columns([ROW])
        for alias, outputs in self.views:
            if alias in self.aligned:
                for name in outputs:
                    result = result.append_column(name, self.aligned[alias].column(name))
                continue
            part = con.sql(f"SELECT {ROW}, {', '.join(quote(o) for o in outputs)} FROM {alias}").to_arrow_table()
            index = np.full(n, -1, dtype=np.int64)
            index[part.column(ROW).to_numpy()] = np.arange(part.num_rows, dtype=np.int64)
            aligned = part.drop_columns([ROW]).take(pa.array(index, mask=index < 0))
            for name in outputs:
                result = result.append_column(name, aligned.column(name))
        return result
