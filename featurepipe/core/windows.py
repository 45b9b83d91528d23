"""Request-time windows: what a windowed aggregate means, and the one SQL that computes it.

**Semantics (kernel version 2).** A windowed aggregate with window ``W`` asked at time ``t``
covers the entity's events with event time in ``[start(t), t)``: events at exactly ``t``
are out (the event being scored is not in its own features). ``start(t)`` is Chronon's
sawtooth, ``floor(t, hop) - W``, where ``floor`` rounds down to a multiple of the hop since
the Unix epoch (:func:`hop_for`: 5 minutes for windows under 12 hours, 1 hour under 12
days, 1 day beyond). So a 1h window covers 60 to 65 minutes, 24h covers 24 to 25 hours, 7d
covers 7 days to 7 days 1 hour, 30d covers 30 to 31 days. A window that is not a multiple
of its hop is refused. ``last`` (no window) is the latest event before ``t``.

Empty window: ``count`` and ``sum`` are 0, ``mean``, ``min`` and ``max`` are null.

**Change points.** The value at ``t`` only changes at two kinds of instants: just after an
event (``x + 1 us``: the event is now before ``t``), and when a hop bucket with events
leaves a window (``floor(x, hop) + hop + W``). Every engine computes one *row per change
point* ``v`` with the values valid for ``v <= t < next v``; a point-in-time lookup is then
the latest row with ``v <= t``, which is what Feast's as-of join already does (feature
time ``<=`` the entity row's time). Offline, the feature table holds these rows; online,
each entity keeps its *schedule*: the row in force now and the rows of the drops still to
come (at most one per non-empty bucket), so the server picks the row for the request's
clock with no arithmetic on aggregates at all, and online equals offline to the bit.

Sums and means of fractional columns run over ``DECIMAL(38, 9)`` (exact, so order-free);
``mean`` is ``CAST(sum AS DOUBLE) / CAST(count AS DOUBLE)``, the form DuckDB and Spark
compute to the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from featurepipe.core.errors import InvalidInput
from featurepipe.core.sql import quote

KERNEL_VERSION = 2
"""Bumped when the meaning of a stored feature row changes (1: as of each event)."""

US = 1_000_000
_MINUTE = 60 * US
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR

_SQL_FUNCTION = {"count": "count", "sum": "sum", "min": "min", "max": "max"}
_INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
                  "HUGEINT"}


class Aggregate(Protocol):
    """One aggregate as the kernel needs it (``featurepipe.definitions.AggregateSpec``)."""

    @property
    def name(self) -> str: ...
    @property
    def function(self) -> str: ...
    @property
    def column(self) -> str: ...
    @property
    def window(self) -> timedelta | None: ...


def micros(delta: timedelta) -> int:
    """A duration in whole microseconds."""
    return delta // timedelta(microseconds=1)


def hop_for(window: timedelta) -> int:
    """The hop of a window, in microseconds: 5 min under 12 h, 1 h under 12 days, 1 day beyond."""
    w = micros(window)
    if w < 12 * _HOUR:
        return 5 * _MINUTE
    if w < 12 * _DAY:
        return _HOUR
    return _DAY


def validate(aggregations: Sequence[Aggregate], view: str) -> None:
    """Refuse a window its hop does not divide (the window would silently be another one)."""
    for agg in aggregations:
        if agg.window is not None:
            w, h = micros(agg.window), hop_for(agg.window)
            if w % h:
                near = [timedelta(microseconds=m) for m in (w - w % h, w - w % h + h) if m > 0]
                raise InvalidInput(
                    f"feature view {view!r}: aggregate {agg.name!r} has a window of {agg.window}, which is not "
                    f"a multiple of its hop ({timedelta(microseconds=h)}; windows hop by 5 minutes under 12 "
                    f"hours, by the hour under 12 days, by the day beyond); use a multiple of the hop, e.g. "
                    f"{' or '.join(str(n) for n in near)}"
                )


def window_start_us(t_us: int, window: timedelta) -> int:
    """``start(t)`` in microseconds: the first instant a window asked at ``t`` covers."""
    h = hop_for(window)
    return t_us - t_us % h - micros(window)  # Python's % floors, also before 1970


def horizon(aggregations: Sequence[Aggregate]) -> timedelta:
    """How long after an event it can still change a value: the longest window plus its hop.
    A recompute of rows from ``start`` on reads events from ``start - horizon``."""
    spans = [micros(a.window) + hop_for(a.window) for a in aggregations if a.window is not None]
    return timedelta(microseconds=max(spans, default=0))


def value_expr(agg: Aggregate, column_type: str) -> str:
    """The expression an aggregate runs over (exact decimals for fractional sums and means;
    epoch seconds for a timestamp column)."""
    col = quote(agg.column)
    column_type = column_type.upper()
    if "TIMESTAMP" in column_type:
        return f"(epoch_us({col}) / 1e6)"
    if agg.function == "count" or column_type in _INTEGER_TYPES:
        return col
    if agg.function in ("sum", "mean"):
        return f"CAST({col} AS DECIMAL(38, 9))"
    return f"CAST({col} AS DOUBLE)"


def _floor(expr: str, hop: int) -> str:
    return f"({expr} - ((({expr}) % {hop}) + {hop}) % {hop})"


def _frame(keys: str, agg: Aggregate) -> str:
    if agg.window is None:
        return f"(PARTITION BY {keys} ORDER BY __o RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"
    offset = f"(__v - {_floor('__v', hop_for(agg.window))} + {micros(agg.window)})"
    return f"(PARTITION BY {keys} ORDER BY __o RANGE BETWEEN COALESCE({offset}, 0) PRECEDING AND 1 PRECEDING)"


def output(agg: Aggregate, column_type: str, keys: str) -> str:
    """One aggregate's column at a change point: merge the events of its frame, finalise."""
    expr = value_expr(agg, column_type)
    frame = _frame(keys, agg)
    if agg.function == "last":
        return f"max(__a_{agg.name}) OVER {frame} AS {quote(agg.name)}"
    if agg.function == "count":
        return f"CAST(count(__a_{agg.name}) OVER {frame} AS BIGINT) AS {quote(agg.name)}"
    if agg.function == "sum":
        return f"CAST(COALESCE(sum(__a_{agg.name}) OVER {frame}, 0) AS DOUBLE) AS {quote(agg.name)}"
    if agg.function == "mean":
        return (f"CAST(sum(__a_{agg.name}) OVER {frame} AS DOUBLE) / "
                f"CAST(NULLIF(count(__a_{agg.name}) OVER {frame}, 0) AS DOUBLE) AS {quote(agg.name)}")
    del expr
    return f"CAST({_SQL_FUNCTION[agg.function]}(__a_{agg.name}) OVER {frame} AS DOUBLE) AS {quote(agg.name)}"


@dataclass(frozen=True)
class ViewShape:
    """What the kernel's SQL needs of a view: keys, event time column, aggregates, column types."""

    join_keys: tuple[str, ...]
    timestamp_field: str
    aggregations: tuple[Aggregate, ...]
    types: dict[str, str]


def change_point_sql(view: ViewShape, events: str, start: datetime | None = None,
                     end: datetime | None = None) -> str:
    """SELECT of the view's rows at every change point ``v`` in ``[start, end)``: the join keys,
    ``event_timestamp`` (= ``v``, as TIMESTAMPTZ) and one column per aggregate, valid for
    ``v <= t`` until the key's next row.

    ``events`` is a relation of raw events (the view's input); rows with a null key or
    event time are skipped. It must hold every event from ``start - horizon`` (or all of
    them when an aggregate has no window and is not ``last``), which the caller filters.

    How: counts and sums are differences of exact running totals (``DECIMAL``, so the
    difference is exact), each read with an as-of join at ``v`` and at the window's start;
    ``last`` is the as-of event itself; only ``min`` and ``max``, which do not subtract, use
    a window frame whose start moves with ``v``.
    """
    keys = [quote(k) for k in view.join_keys]
    key_list = ", ".join(keys)
    on = " AND ".join(f"p.{k} = c.{k}" for k in keys)
    ts = quote(view.timestamp_field)
    aggs = view.aggregations
    not_null = " AND ".join([f"{ts} IS NOT NULL", *(f"{k} IS NOT NULL" for k in keys)])
    # one value column per distinct (column, expression)
    exprs: dict[str, str] = {}
    col_of: dict[str, str] = {}
    for a in aggs:
        e = value_expr(a, view.types[a.column])
        if a.function != "last":
            col_of[a.name] = exprs.setdefault(e, f"__c{len(exprs)}")
    values = ", ".join(f"{e} AS {c}" for e, c in exprs.items())
    windows = sorted({a.window for a in aggs if a.window is not None})
    wname = {w: f"__w{i}" for i, w in enumerate(windows)}
    drops = [f"SELECT DISTINCT {key_list}, {_floor('__x', hop_for(w))} + {hop_for(w) + micros(w)} AS __v FROM src"
             for w in windows]
    bounds = []
    if start is not None:
        bounds.append(f"__v >= {_epoch_us(start)}")
    if end is not None:
        bounds.append(f"__v < {_epoch_us(end)}")
    probes = " UNION ".join([f"SELECT DISTINCT {key_list}, __x + 1 AS __v FROM src", *drops])
    starts = ", ".join(f"{_floor('__v', hop_for(w))} - {micros(w)} AS {wname[w]}" for w in windows)
    # running totals per key, one row per distinct event time (ties at x all count from x + 1)
    summed = sorted({c for a in aggs if a.function in ("count", "sum", "mean") for c in [col_of[a.name]]})
    running = ", ".join(
        f"count({c}) OVER w AS {c}_n, sum({c}) OVER w AS {c}_s" for c in summed
    )
    cum = (f"SELECT DISTINCT ON ({key_list}, __x) {key_list}, __x + 1 AS __x1, __x"
           f"{', ' + running if running else ''} FROM src "
           f"WINDOW w AS (PARTITION BY {key_list} ORDER BY __x RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)")
    joins = [f"ASOF LEFT JOIN cum c ON {on} AND c.__x1 <= p.__v"]
    picked = ["c.__x AS __last"] + [f"c.{c}_n AS {c}_n_v, c.{c}_s AS {c}_s_v" for c in summed]
    for w in windows:
        alias = f"c{wname[w]}"
        joins.append(f"ASOF LEFT JOIN cum {alias} ON {on.replace('c.', alias + '.')} AND {alias}.__x1 <= p.{wname[w]}")
        picked += [f"{alias}.{c}_n AS {c}_n{wname[w]}, {alias}.{c}_s AS {c}_s{wname[w]}" for c in summed]
    # min / max: a frame over events and probes together, starting at the window's start
    extremes = [a for a in aggs if a.function in ("min", "max")]
    outputs = []
    for a in aggs:
        name = quote(a.name)
        if a.function == "last":
            outputs.append(f"__last / 1e6 AS {name}" if "TIMESTAMP" in view.types[a.column].upper()
                           else f"__last_{a.name} AS {name}")
            continue
        if a.function in ("min", "max"):
            outputs.append(f"__e_{a.name} AS {name}")
            continue
        c = col_of[a.name]
        suffix = wname[a.window] if a.window is not None else None
        n = f"(COALESCE({c}_n_v, 0) - COALESCE({c}_n{suffix}, 0))" if suffix else f"COALESCE({c}_n_v, 0)"
        total = (f"(COALESCE({c}_s_v, 0) - COALESCE({c}_s{suffix}, 0))" if suffix else f"COALESCE({c}_s_v, 0)")
        if a.function == "count":
            outputs.append(f"CAST({n} AS BIGINT) AS {name}")
        elif a.function == "sum":
            outputs.append(f"CAST({total} AS DOUBLE) AS {name}")
        else:
            outputs.append(f"CAST({total} AS DOUBLE) / CAST(NULLIF({n}, 0) AS DOUBLE) AS {name}")
    extreme_sql = ""
    if extremes:
        frames = []
        for a in extremes:
            c = col_of[a.name]
            if a.window is None:
                frame = "RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING"
            else:
                off = f"(__v - {_floor('__v', hop_for(a.window))} + {micros(a.window)})"
                frame = f"RANGE BETWEEN COALESCE({off}, 0) PRECEDING AND 1 PRECEDING"
            frames.append(f"CAST({a.function}({c}) OVER (PARTITION BY {key_list} ORDER BY __o {frame}) AS DOUBLE)"
                          f" AS __e_{a.name}")
        extreme_cols = sorted({col_of[a.name] for a in extremes})
        extreme_sql = f""",
u AS (
  SELECT {key_list}, __x AS __o, NULL::BIGINT AS __v, {", ".join(extreme_cols)} FROM src
  UNION ALL BY NAME
  SELECT {key_list}, __v AS __o, __v FROM probes
),
ext AS (SELECT * FROM (SELECT {key_list}, __v, {", ".join(frames)} FROM u) WHERE __v IS NOT NULL)"""
    last_other = [a for a in aggs if a.function == "last" and "TIMESTAMP" not in view.types[a.column].upper()]
    if last_other:
        raise InvalidInput(f"last of a non-timestamp column is not supported yet: {[a.name for a in last_other]}")
    ext_join = f" JOIN ext USING ({key_list}, __v)" if extremes else ""
    return f"""
WITH src AS (SELECT {key_list}, epoch_us({ts}) AS __x{", " + values if values else ""} FROM {events} WHERE {not_null}),
probes AS (SELECT * FROM ({probes}) {"WHERE " + " AND ".join(bounds) if bounds else ""}),
cum AS ({cum}),
pv AS (SELECT p.{key_list.replace(", ", ", p.")}, p.__v, {", ".join(picked)}
       FROM (SELECT *{", " + starts if starts else ""} FROM probes) p {" ".join(joins)}){extreme_sql}
SELECT {key_list}, make_timestamptz(__v) AS event_timestamp,
    {(","+chr(10)+"    ").join(outputs)}
FROM pv{ext_join}
ORDER BY event_timestamp, {key_list}
""".strip()


def _epoch_us(value: datetime) -> int:
    return micros(value - datetime(1970, 1, 1, tzinfo=value.tzinfo))
