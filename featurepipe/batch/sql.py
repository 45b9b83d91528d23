"""DuckDB SQL for a windowed-aggregate view, generated from its declaration.

:func:`aggregate_sql` gives the view's feature rows: one row per *change point* ``v`` of
an entity (see :mod:`featurepipe.core.windows`, the kernel that computes them), with
``event_timestamp = v`` and the values of every aggregate asked at any ``t`` with
``v <= t`` until the entity's next row. A windowed aggregate asked at ``t`` covers the
events in ``[floor(t, hop) - window, t)``: events at ``t`` itself are out. So a
point-in-time join (feature time ``<=`` the entity row's time) returns the value at the
entity row's time exactly, whatever that time is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from featurepipe.core.sql import DUCKDB, Dialect, literal
from featurepipe.core.windows import ViewShape, change_point_sql, history, validate
from featurepipe.definitions import AggregateView
from featurepipe.errors import InvalidInput


@dataclass(frozen=True)
class SourceColumns:
    """Column names and DuckDB types of a view's input, from the Parquet schema."""

    types: dict[str, str]

    def require(self, view: AggregateView) -> None:
        needed = [*view.join_keys, view.timestamp_field, *(a.column for a in view.aggregations)]
        missing = sorted({c for c in needed if c not in self.types})
        if missing:
            raise InvalidInput(
                f"feature view {view.name!r}: input {view.input_path} has no column(s) {missing}; "
                f"it has {sorted(self.types)}. Fix the source data or the aggregation's column"
            )


def input_start(view: AggregateView, start: datetime) -> datetime | None:
    """The first event time the rows from ``start`` on depend on, or None (every event:
    an aggregate without a window that is not ``last`` counts the whole history)."""
    reach = history(view.aggregations)
    return None if reach is None else start - reach


def aggregate_sql(
    view: AggregateView,
    columns: SourceColumns,
    start: datetime | None = None,
    end: datetime | None = None,
    extra_input: str | None = None,
    source: str | None = None,
    dialect: Dialect = DUCKDB,
) -> str:
    """SELECT of the view's change-point rows with ``event_timestamp`` in ``[start, end)``,
    ordered by time then key.

    Reads the input's events in ``[start - horizon, end)`` (every event before ``end`` when
    an aggregate without a window is not ``last``): exactly what those rows depend on, so a
    partial recompute gives the rows a full one gives in its range. ``extra_input``, when
    given, is a relation (table name) unioned with the Parquet input (the push path uses
    it for events not yet on disk). ``source``, when given, is the relation read instead of
    the Parquet input (the quality gate's rows that passed). ``dialect``: the engine the SQL
    is for (Spark: ``source`` is required, the name of a temporary view of the input).
    """
    columns.require(view)
    validate(view.aggregations, view.name)
    quote = dialect.quote
    keys = [quote(k) for k in view.join_keys]
    ts = quote(view.timestamp_field)
    needed = dict.fromkeys([*keys, ts, *(quote(a.column) for a in view.aggregations)])
    select_cols = ", ".join(needed)
    where = []
    first = input_start(view, start) if start is not None else None
    if first is not None:
        where.append(f"{ts} >= {dialect.ts_literal(first)}")
    if end is not None:
        where.append(f"{ts} < {dialect.ts_literal(end)}")
    if source is None and dialect is not DUCKDB:
        raise ValueError(f"{dialect.name} SQL reads a named relation: pass source")
    source = source or f"read_parquet({literal(view.input_path)}, hive_partitioning = true, union_by_name = true)"
    inputs = f"SELECT {select_cols} FROM {source}"
    if extra_input:
        inputs += f" UNION ALL SELECT {select_cols} FROM {extra_input}"
    events = f"(SELECT * FROM ({inputs}) {'WHERE ' + ' AND '.join(where) if where else ''})"
    shape = ViewShape(view.join_keys, view.timestamp_field, view.aggregations, columns.types, dialect)
    return change_point_sql(shape, events, start, end)

