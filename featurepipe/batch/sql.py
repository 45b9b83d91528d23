"""DuckDB SQL for a windowed-aggregate view, generated from its declaration.

One query per view: window functions over the entity's events, one frame per distinct
window, ``RANGE BETWEEN <window> PRECEDING AND CURRENT ROW`` (so ``[t - window, t]``,
ties at ``t`` included). Rows of one entity at the same instant collapse to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from featurepipe.core.sql import literal, quote, ts_literal
from featurepipe.definitions import AggregateSpec, AggregateView
from featurepipe.errors import InvalidInput

_SQL_FUNCTION = {"count": "count", "sum": "sum", "mean": "avg", "min": "min", "max": "max"}


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


_INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "HUGEINT"}


def _value_expr(agg: AggregateSpec, columns: SourceColumns) -> str:
    """The expression an aggregate runs over.

    Sums and means of fractional columns run over ``DECIMAL(38, 9)``: exact, so the result
    does not depend on summation order (DuckDB's window segment trees add in an order that
    depends on which rows are read, and a partial rerun must give the same bytes as a full
    one; the streaming engine must agree with both).
    """
    col = quote(agg.column)
    column_type = columns.types[agg.column].upper()
    if "TIMESTAMP" in column_type:
        return f"(epoch_us({col}) / 1e6)"
    if agg.function == "count" or column_type in _INTEGER_TYPES:
        return col
    if agg.function in ("sum", "mean"):
        return f"CAST({col} AS DECIMAL(38, 9))"
    return f"CAST({col} AS DOUBLE)"


def _output(agg: AggregateSpec, columns: SourceColumns, over: str) -> str:
    """One aggregate's output column: the function over its value expression, then ``over``
    (a window frame or a filter), cast to the output type."""
    expr = _value_expr(agg, columns)
    if agg.function == "last":
        return f"max({expr}) {over} AS {quote(agg.name)}"
    cast = "BIGINT" if agg.function == "count" else "DOUBLE"
    return f"CAST({_SQL_FUNCTION[agg.function]}({expr}) {over} AS {cast}) AS {quote(agg.name)}"


def _frame(view: AggregateView, window: timedelta | None) -> str:
    keys = ", ".join(quote(k) for k in view.join_keys)
    if window is None:
        return f"(PARTITION BY {keys}, __ts)"
    micros = int(window / timedelta(microseconds=1))
    return (
        f"(PARTITION BY {keys} ORDER BY __ts "
        f"RANGE BETWEEN INTERVAL ({micros}) MICROSECONDS PRECEDING AND CURRENT ROW)"
    )


def aggregate_sql(
    view: AggregateView,
    columns: SourceColumns,
    start: datetime | None = None,
    end: datetime | None = None,
    extra_input: str | None = None,
    source: str | None = None,
) -> str:
    """SELECT producing the view's feature rows with event time in ``[start, end)``.

    Reads ``[start - max_window, end)`` of the input so windows at ``start`` are complete.
    ``extra_input``, when given, is a relation (table name) unioned with the Parquet input
    (the push path uses it for events not yet on disk). ``source``, when given, is the
    relation read instead of the Parquet input (the quality gate's rows that passed).
    """
    columns.require(view)
    keys = [quote(k) for k in view.join_keys]
    ts = quote(view.timestamp_field)
    needed_cols = sorted({a.column for a in view.aggregations} - {view.timestamp_field})
    select_cols = ", ".join([*keys, f"{ts} AS __ts", *(quote(c) for c in needed_cols)])
    if view.timestamp_field in {a.column for a in view.aggregations}:
        select_cols += f", {ts}"
    unbounded = any(a.window is None and a.function != "last" for a in view.aggregations)
    where = ["__ts IS NOT NULL", *(f"{k} IS NOT NULL" for k in keys)]
    if start is not None and not unbounded:
        where.append(f"__ts >= {ts_literal(start - view.max_window)}")
    if end is not None:
        where.append(f"__ts < {ts_literal(end)}")
    source = source or f"read_parquet({literal(view.input_path)}, hive_partitioning = true, union_by_name = true)"
    inputs = f"SELECT {select_cols} FROM {source}"
    if extra_input:
        inputs += f" UNION ALL BY NAME SELECT {select_cols} FROM {extra_input}"
    outputs = [_output(agg, columns, f"OVER {_frame(view, agg.window)}") for agg in view.aggregations]
    outer_where = f"WHERE event_timestamp >= {ts_literal(start)}" if start is not None else ""
    return f"""
WITH src AS (SELECT * FROM ({inputs}) WHERE {" AND ".join(where)}),
agg AS (
  SELECT {", ".join(keys)}, __ts AS event_timestamp,
    {(", " + chr(10) + "    ").join(outputs)}
  FROM src
)
SELECT DISTINCT ON ({", ".join(keys)}, event_timestamp) *
FROM agg {outer_where}
ORDER BY event_timestamp, {", ".join(keys)}
""".strip()


def latest_sql(view: AggregateView, columns: SourceColumns, source: str) -> str:
    """SELECT giving, for every key in ``source``, the row :func:`aggregate_sql` gives at the
    key's newest event time: one grouped aggregate with a filter per window instead of
    window functions over every event (the streaming engine's online update).

    Same value expressions, same casts, same inclusive window ``[t - window, t]``.
    """
    columns.require(view)
    keys = ", ".join(quote(k) for k in view.join_keys)
    ts = quote(view.timestamp_field)
    outputs = []
    for agg in view.aggregations:
        if agg.window is None:
            cond = f"{ts} = __hi"
        else:
            micros = int(agg.window / timedelta(microseconds=1))
            cond = f"{ts} >= __hi - INTERVAL ({micros}) MICROSECONDS"
        outputs.append(_output(agg, columns, f"FILTER (WHERE {cond})"))
    not_null = " AND ".join([f"{ts} IS NOT NULL", *(f"{quote(k)} IS NOT NULL" for k in view.join_keys)])
    max_window = int(view.max_window / timedelta(microseconds=1))
    return f"""
WITH src AS (SELECT * FROM {source} WHERE {not_null}),
hi AS (SELECT {keys}, max({ts}) AS __hi FROM src GROUP BY {keys})
SELECT {keys}, any_value(__hi) AS event_timestamp,
    {(", " + chr(10) + "    ").join(outputs)}
FROM src JOIN hi USING ({keys})
WHERE {ts} >= __hi - INTERVAL ({max_window}) MICROSECONDS
GROUP BY {keys}
""".strip()
