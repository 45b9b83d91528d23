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

Sums and means of fractional columns run over ``DECIMAL(38, 9)`` (exact, so order-free); a
sum is that exact total cast to DOUBLE, a ``mean`` is that sum divided by ``CAST(NULLIF(count, 0) AS DOUBLE)``; min and max normalise -0.0 to 0.0.
These are the forms DuckDB and Spark compute to the same bits; the SQL of both comes from
here, per :class:`featurepipe.core.sql.Dialect` (tested on adversarial data in
``tests/test_spark_engine.py``). One difference is left to the data: a DOUBLE input with more
than 9 decimals is rounded to ``DECIMAL(38, 9)`` differently by the two engines (by 1e-9), so
keep money at a few decimals or store it as DECIMAL. So is a single amount above 2^53 / 1e9
(9,007,199.25): DuckDB scales it by 1e9 in floating point, Spark reads its decimal text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from featurepipe.core.errors import InvalidInput
from featurepipe.core.sql import DUCKDB, Dialect

KERNEL_VERSION = 3
"""Bumped when the meaning of a stored feature row changes (1: as of each event; 2: min and
max could keep -0.0 apart from 0.0, so DuckDB and Spark could disagree on their sign)."""

KERNEL_METADATA_KEY = "featurepipe.kernel"
"""Parquet key-value metadata naming the kernel version a feature table was computed with
(written by the backfill and the stream, read back by :mod:`featurepipe.offline.versions`)."""

US = 1_000_000
_MINUTE = 60 * US
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR

_INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
                  "HUGEINT", "INT", "LONG", "SHORT", "BYTE"}  # DuckDB's names, then Spark's


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


def history(aggregations: Sequence[Aggregate]) -> timedelta | None:
    """How far before the rows it computes an engine must read events: :func:`horizon`, or
    None (every event) when an aggregate without a window is not ``last`` (it counts the
    whole history)."""
    if any(a.window is None and a.function != "last" for a in aggregations):
        return None
    return horizon(aggregations)


def value_expr(agg: Aggregate, column_type: str, dialect: Dialect = DUCKDB) -> str:
    """The expression an aggregate runs over (exact decimals for fractional sums and means;
    epoch seconds for a timestamp column; ``+ 0.0`` makes -0.0 and 0.0 one value, so min and
    max do not depend on which an engine meets first)."""
    col = dialect.quote(agg.column)
    column_type = column_type.upper()
    if "TIMESTAMP" in column_type:
        return f"({dialect.epoch_us(col)} / 1e6)"
    if agg.function == "count" or column_type in _INTEGER_TYPES:
        return col
    if agg.function in ("sum", "mean"):
        return f"CAST({col} AS DECIMAL(38, 9))"
    return f"(CAST({col} AS DOUBLE) + 0.0)"


def _drops(windows: Sequence[timedelta]) -> list[str]:
    """Per window, SQL for the instant the hop bucket holding the event at ``__x`` leaves it."""
    return [f"{_floor('__x', hop_for(w))} + {hop_for(w) + micros(w)}" for w in windows]


def _floor(expr: str, hop: int) -> str:
    """``expr`` rounded down to a multiple of ``hop`` (also below zero)."""
    return f"({expr} - ((({expr}) % {hop}) + {hop}) % {hop})"


@dataclass(frozen=True)
class ViewShape:
    """What the kernel's SQL needs of a view: keys, event time column, aggregates, column types."""

    join_keys: tuple[str, ...]
    timestamp_field: str
    aggregations: tuple[Aggregate, ...]
    types: dict[str, str]
    dialect: Dialect = DUCKDB


@dataclass(frozen=True)
class _Columns:
    """The partial aggregates a view needs, each computed once: per input column ``__k<i>``,
    its count (``_n``), exact sum (``_s``) and extremes (``_min``, ``_max``) as needed."""

    prefix: dict[str, str]  # input column -> its prefix (__k<i>)
    parts: dict[str, str]  # partial aggregate column -> its SQL over one instant's events
    windows: list[timedelta]  # the distinct windows (one lookup of a first group each)


def _columns(view: ViewShape) -> _Columns:
    d = view.dialect
    prefix: dict[str, str] = {}
    parts: dict[str, str] = {}
    for a in view.aggregations:
        column_type = view.types[a.column].upper()
        k = prefix.setdefault(a.column, f"__k{len(prefix)}")
        if a.function == "last":
            if "TIMESTAMP" not in column_type:
                raise InvalidInput(
                    f"aggregate {a.name!r}: last of {a.column!r} ({column_type}) is not supported; "
                    "last takes a timestamp column and gives its epoch seconds"
                )
            if a.column != view.timestamp_field:
                parts[f"{k}_last"] = f"max({d.epoch_us(d.quote(a.column))})"
        elif a.function in ("count", "sum", "mean", "min", "max"):
            parts.update(_partials(a, k, column_type, "", d))
        else:
            raise InvalidInput(f"aggregate {a.name!r}: unknown function {a.function!r}")
    windows = sorted({a.window for a in view.aggregations if a.window is not None})
    return _Columns(prefix, parts, windows)


def _partials(a: Aggregate, k: str, column_type: str, only: str = "", dialect: Dialect = DUCKDB) -> dict[str, str]:
    """The partial aggregates a count, sum, mean, min or max over column prefix ``k`` needs,
    each as SQL over a group of events (``only``: a FILTER clause appended to each):
    ``<k>_n`` the count of values, ``<k>_s`` their exact sum, ``<k>_min`` / ``<k>_max``."""
    out: dict[str, str] = {}
    if a.function in ("count", "sum", "mean"):
        out[f"{k}_n"] = f"count({dialect.quote(a.column)}){only}"
        if a.function != "count":
            out[f"{k}_s"] = f"sum({value_expr(a, column_type, dialect)}){only}"
    elif a.function in ("min", "max"):
        out[f"{k}_{a.function}"] = f"{a.function}({value_expr(a, column_type, dialect)}){only}"
    return out


def change_point_sql(view: ViewShape, events: str, start: datetime | None = None,
                     end: datetime | None = None, dialect: Dialect | None = None) -> str:
    """SELECT of the view's rows at every change point ``v`` in ``[start, end)``: the join keys,
    ``event_timestamp`` (= ``v``, as TIMESTAMPTZ) and one column per aggregate, valid for
    ``v <= t`` until the key's next row; ordered by ``event_timestamp``, then the keys.

    ``events`` is a relation of raw events (the view's input); rows with a null key or
    event time are skipped. It must hold every event from ``start - horizon`` (or all of
    them when an aggregate has no window and is not ``last``), which the caller filters.

    How: a key's events at one instant ``x`` form one *group* (count, exact sum, extremes),
    which arrives at ``x + 1us``; groups are numbered per key in time order. Running totals
    over a key's groups give the count and sum before any instant, so a window ``[s, v)``
    holds the totals of the latest group before ``v`` minus those before the first group at
    or after ``s``. Min and max do not subtract: ``[s, v)`` spans the end of one block of
    ``W`` (blocks aligned to multiples of ``W``) and the start of the next, so its extreme is
    the greater of the first block's extreme from that first group on and the second
    block's extreme up to that latest group: running extremes per block. Which groups those
    are at each change point is counted, not searched: each change point records how many
    groups arrive there and how many leave each window, and one running sum over a key's
    change points (the counts packed side by side into HUGEINTs) gives both numbers; equality
    joins on them fetch the two groups' totals. No window frame moves row by row, no as-of
    join.

    ``dialect`` (default: the shape's, DuckDB's) is the engine the SQL is written for.
    """
    if dialect is not None:
        view = replace(view, dialect=dialect)
    sql = _KernelSql(view)
    cols, key_list = sql.cols, sql.key_list
    # per window with a min or max: extremes of the group's block up to it (_p<i>) and from it (_s<i>)
    extremes = []
    for a in view.aggregations:
        if a.function not in ("min", "max"):
            continue
        part = f"{cols.prefix[a.column]}_{a.function}"
        if a.window is None:
            extremes.append(f"{a.function}({part}) OVER w AS {part}_all")
        else:
            i = cols.windows.index(a.window)
            block = f"PARTITION BY {key_list}, {_floor('__x', micros(a.window))} ORDER BY __x ROWS BETWEEN"
            extremes += [f"{a.function}({part}) OVER ({block} UNBOUNDED PRECEDING AND CURRENT ROW) AS {part}_p{i}",
                         f"{a.function}({part}) OVER ({block} CURRENT ROW AND UNBOUNDED FOLLOWING) AS {part}_s{i}"]

    # change points: just after each group, and where a bucket leaves a window. Each change
    # point counts the groups that arrive there (component 0) and those that leave window i
    # (component i + 1); running counts over a key's change points then give the ordinal of
    # the latest group before it and of the first group still in each window. Components are
    # packed 32 bits apiece, four to a HUGEINT, so one running sum counts them all (a key
    # may have up to 2**31 groups in the input)
    marks = [sql.mark("__x + 1", 0, 0)]
    marks += [sql.mark(drop, pack, bit) for drop, (pack, bit) in zip(sql.drops, sql.components)]
    bounds = []
    if start is not None:
        bounds.append(f"__v >= {_epoch_us(start)}")
    if end is not None:
        bounds.append(f"__v < {_epoch_us(end)}")
    return f"""
WITH {sql.groups(events, extremes)},
{sql.ranked(marks, bounds)}
{sql.select([_output(a, cols) for a in view.aggregations], "LEFT JOIN")}
ORDER BY p.__v, {", ".join(f"p.{k}" for k in sql.keys)}
""".strip()


SCHEDULE_GROUP = "__g"
"""The column of :func:`schedule_sql` naming a row's group (-1: the row at the newest event)."""


def schedule_groups(aggregations: Sequence[Aggregate]) -> list[int]:
    """Each aggregate's *group* in a schedule (:func:`schedule_sql`): the index of its window
    among the view's distinct windows, shortest first, or one past the last for an aggregate
    without a window (its value never changes after the newest event)."""
    windows = sorted({a.window for a in aggregations if a.window is not None})
    return [windows.index(a.window) if a.window is not None else len(windows) for a in aggregations]


def feature_groups(aggregations: Sequence[Aggregate], names: Sequence[str]) -> tuple[list[int], int]:
    """The group (:func:`schedule_groups`) of each feature in ``names`` (aggregate names, in
    the order a schedule stores them), and the number of groups."""
    by_name = dict(zip((a.name for a in aggregations), schedule_groups(aggregations)))
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InvalidInput(f"features {missing} are not aggregates of the view ({sorted(by_name)})")
    return [by_name[n] for n in names], max(by_name.values(), default=-1) + 1


def schedule_sql(view: ViewShape, events: str, dialect: Dialect | None = None) -> str:
    """SELECT of each key's *schedule*: the rows of :func:`change_point_sql` from the key's
    newest event ``x`` on, grouped by window. Columns: the join keys, ``__g``,
    ``event_timestamp`` (``v``) and one per aggregate; in no particular order (the caller
    sorts by the keys, ``__g``, then ``event_timestamp``).

    * ``__g = -1``: one row per key at ``v0 = x + 1 us``, every aggregate's value right after
      the newest event (the row :func:`change_point_sql` gives there).
    * ``__g = i`` (:func:`schedule_groups`): one row per hop bucket of window ``i`` still in
      that window at ``v0``, at the instant ``v`` it leaves (``floor(x, hop) + hop + W``), with
      the values of window ``i``'s aggregates from ``v`` on. The other aggregates' columns hold
      a placeholder (0 for a count, null otherwise) and mean nothing.

    The value of a window's aggregate at any ``t >= v0`` is the one in the key's latest row of
    ``__g = -1`` or of that window's group with ``v <= t``: exactly :func:`change_point_sql`'s
    value at ``t``, bit for bit (tested), as the window's value only changes where one of its
    own buckets leaves it. Stored per group (:mod:`featurepipe.online.schedule`), a schedule
    repeats no value, so it takes a fraction of the memory of whole rows.

    ``events`` must hold each key's events from ``x - horizon`` on (all of them for an
    aggregate without a window that is not ``last``); older ones change nothing.

    How: after ``x`` no event arrives, so a window's value at ``t`` is the total of its buckets
    leaving after ``t``: per window, the events grouped by the instant their bucket leaves, and
    a running total over those buckets from the last one back (excluding the bucket itself).
    """
    if dialect is not None:
        view = replace(view, dialect=dialect)
    d = view.dialect
    cols = _columns(view)
    keys = [d.quote(k) for k in view.join_keys]
    key_list = ", ".join(keys)
    ts = d.quote(view.timestamp_field)
    not_null = " AND ".join([f"{ts} IS NOT NULL", *(f"{k} IS NOT NULL" for k in keys)])
    inputs = [d.quote(c) for c in cols.prefix if c not in view.join_keys]
    drops = _drops(cols.windows)
    groups = schedule_groups(view.aggregations)
    types = {c: view.types[c].upper() for c in cols.prefix}

    def partials(aggs: Sequence[Aggregate], where: str | None) -> dict[str, str]:
        """The partial aggregates ``aggs`` need (``__k<i>_n``, ``_s``, ``_min``, ``_max``) over
        the events (those meeting ``where``)."""
        only = f" FILTER (WHERE {where})" if where else ""
        out: dict[str, str] = {}
        for a in aggs:
            out.update(_partials(a, cols.prefix[a.column], types[a.column], only, d))
        return out

    def final(a: Aggregate, part: Callable[[str], str]) -> str:
        """An aggregate's value from its partials (``part(name)``: the SQL of one)."""
        k = cols.prefix[a.column]
        if a.function == "last":
            if a.column == view.timestamp_field:
                return "(__v0 - 1) / 1e6"
            return f"max({d.epoch_us(d.quote(a.column))}) FILTER (WHERE __x = __v0 - 1) / 1e6"
        if a.function in ("min", "max"):
            return f"CAST({part(f'{k}_{a.function}')} AS DOUBLE)"
        total = f"COALESCE({part(f'{k}_s')}, 0)" if a.function != "count" else ""
        return _finalised(a.function, f"COALESCE({part(f'{k}_n')}, 0)", total)

    def placeholder(a: Aggregate) -> str:
        return "CAST(0 AS BIGINT)" if a.function == "count" else "CAST(NULL AS DOUBLE)"

    # the row at v0: every aggregate, a window's over the events whose bucket leaves after v0
    first_parts: dict[str, str] = {}
    for a, g in zip(view.aggregations, groups):
        where = drops[g] + " > __v0" if a.window is not None else None
        first_parts.update({f"{p}_{g}": sql for p, sql in partials([a], where).items()})
    def of_group(g: int) -> Callable[[str], str]:
        return lambda p: first_parts[f"{p}_{g}"]

    first = ", ".join(f"{final(a, of_group(g))} AS {d.quote(a.name)}" for a, g in zip(view.aggregations, groups))
    selects = [f"SELECT {key_list}, -1 AS __g, __v0 AS __v, {first} FROM t GROUP BY {key_list}, __v0"]
    buckets = []
    for i, drop in enumerate(drops):
        mine = [a for a, g in zip(view.aggregations, groups) if g == i]
        parts = partials(mine, None)
        buckets.append(f"b{i} AS (SELECT {key_list}, {drop} AS __v, "
                       + ", ".join(f"{sql} AS {p}" for p, sql in parts.items())
                       + f" FROM t WHERE {drop} > __v0 GROUP BY {key_list}, {drop})")
        after = f"OVER (PARTITION BY {key_list} ORDER BY __v DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"

        def running(p: str, after: str = after) -> str:
            fn = "sum" if p.endswith(("_n", "_s")) else p.rsplit("_", 1)[1]
            return f"{fn}({p}) {after}"

        values = ", ".join(f"{final(a, running) if g == i else placeholder(a)} AS {d.quote(a.name)}"
                           for a, g in zip(view.aggregations, groups))
        selects.append(f"SELECT {key_list}, {i} AS __g, __v, {values} FROM b{i}")
    union = "\n  UNION ALL ".join(selects)
    more = "".join(",\n" + b for b in buckets)
    return f"""
WITH src AS (SELECT {", ".join([*keys, f"{d.epoch_us(ts)} AS __x", *inputs])} FROM {events} WHERE {not_null}),
t AS (SELECT *, max(__x) OVER (PARTITION BY {key_list}) + 1 AS __v0 FROM src){more}
SELECT {key_list}, __g AS {SCHEDULE_GROUP}, {d.timestamp("__v")} AS event_timestamp, {", ".join(d.quote(a.name) for a in view.aggregations)}
FROM ({union})
""".strip()


class _KernelSql:
    """The parts of :func:`change_point_sql`: per key and instant the groups of events with
    their running totals (``src``, ``g``, ``e``), the ranking of change points (``probes``,
    ``ranked``: the latest group before each and the first group still in each window,
    counted) and the final select fetching those groups."""

    def __init__(self, view: ViewShape) -> None:
        self.view = view
        self.dialect = d = view.dialect
        self.cols = _columns(view)
        self.keys = [d.quote(k) for k in view.join_keys]
        self.key_list = ", ".join(self.keys)
        n = len(self.cols.windows)
        per = d.counters_per_pack
        self.packs = range(n // per + 1)
        # where each window's bucket holding __x leaves it, and its count's (pack, bit offset)
        self.drops = _drops(self.cols.windows)
        self.components = [((i + 1) // per, 32 * ((i + 1) % per)) for i in range(n)]

    def mark(self, instant: str, pack: int, bit: int) -> str:
        """A change point per group at ``instant``, counting 1 in component (``pack``, ``bit``)
        (every other pack 0: the marks line up by position in one UNION ALL)."""
        t = self.dialect.pack_type
        counts = ", ".join(f"CAST({1 << bit if j == pack else 0} AS {t}) AS __d{j}" for j in self.packs)
        return f"SELECT {self.key_list}, {instant} AS __v, {counts} FROM g"

    def groups(self, events: str, extremes: list[str]) -> str:
        """CTEs ``src`` (the events with a key and time), ``g`` (one row per key and instant:
        the partial aggregates) and ``e`` (``g`` numbered per key, ``__r``, with totals up to
        and including each group, ``_i``, and before it, ``_e``, and ``extremes``)."""
        view, cols, keys = self.view, self.cols, self.keys
        d = self.dialect
        ts = d.quote(view.timestamp_field)
        not_null = " AND ".join([f"{ts} IS NOT NULL", *(f"{k} IS NOT NULL" for k in keys)])
        inputs = [d.quote(c) for c in cols.prefix if c not in view.join_keys]
        totals = [p for p in cols.parts if p.endswith(("_n", "_s"))]
        running = ["row_number() OVER w AS __r"]
        running += [f"CAST(sum({p}) OVER w AS BIGINT) AS {p}_i" if p.endswith("_n") else f"sum({p}) OVER w AS {p}_i"
                    for p in totals]
        running = list(dict.fromkeys([*running, *extremes]))
        before = [f"{p}_i - COALESCE({p}, 0) AS {p}_e" for p in totals]
        return f"""src AS (SELECT {", ".join([*keys, f"{d.epoch_us(ts)} AS __x", *inputs])} FROM {events} WHERE {not_null}),
g AS (SELECT {", ".join([*keys, "__x", *(f"{sql} AS {p}" for p, sql in cols.parts.items())])}
      FROM src GROUP BY {self.key_list}, __x),
e AS (SELECT {", ".join(["*", *before])} FROM (
  SELECT {", ".join(["*", *running])} FROM g WINDOW w AS (PARTITION BY {self.key_list} ORDER BY __x ROWS UNBOUNDED PRECEDING)))"""

    def ranked(self, marks: list[str], bounds: list[str]) -> str:
        """CTEs ``probes`` (the change points of ``marks``, their packed counts summed) and
        ``ranked`` (per change point, ``__rc``: the number of groups before it, and ``__r<i>``:
        the number of the first group still in window i), kept where all ``bounds`` hold."""
        key_list = self.key_list
        merged = ", ".join(f"sum(__d{j}) AS __d{j}" for j in self.packs)
        sums = ", ".join(f"COALESCE(sum(__d{j}) OVER w, 0) AS __d{j}" for j in self.packs)

        per = self.dialect.counters_per_pack

        def component(j: int) -> str:
            if per == 1:
                return f"__d{j}"
            return f"CAST(((__d{j // per} >> {32 * (j % per)}) & 4294967295) AS BIGINT)"

        ranks = ", ".join([f"{component(0)} AS __rc",
                           *(f"{component(i + 1)} + 1 AS __r{i}" for i in range(len(self.cols.windows)))])
        return f"""probes AS (SELECT {key_list}, __v, {merged} FROM ({" UNION ALL ".join(marks)})
  GROUP BY {key_list}, __v),
ranked AS (SELECT {key_list}, __v, {ranks} FROM (
  SELECT {key_list}, __v, {sums} FROM probes WINDOW w AS (PARTITION BY {key_list} ORDER BY __v ROWS UNBOUNDED PRECEDING))
  {"WHERE " + " AND ".join(bounds) if bounds else ""})"""

    def select(self, outputs: list[str], join_latest: str) -> str:
        """The final SELECT: keys, ``event_timestamp`` (= ``__v``) and ``outputs`` (one per
        aggregate), from ``ranked`` with the latest group (``c``, joined by ``join_latest``)
        and each window's first group (``s<i>``)."""
        def on(alias: str, rank: str) -> str:
            return " AND ".join([*(f"p.{k} = {alias}.{k}" for k in self.keys), f"{alias}.__r = p.{rank}"])

        fetch = [f"{join_latest} e c ON {on('c', '__rc')}"]
        fetch += [f"LEFT JOIN e s{i} ON {on(f's{i}', f'__r{i}')}" for i in range(len(self.cols.windows))]
        columns = ",\n    ".join(f"{o} AS {self.dialect.quote(a.name)}" for o, a in zip(outputs, self.view.aggregations))
        return f"""SELECT {", ".join(f"p.{k}" for k in self.keys)}, {self.dialect.timestamp("p.__v")} AS event_timestamp,
    {columns}
FROM ranked p
{chr(10).join(fetch)}"""


def _output(agg: Aggregate, cols: _Columns) -> str:
    """One aggregate's value at ``p.__v`` from the latest group before it (``c``) and, for a
    window, the first group at or after the window's start (``s<i>``; all null: none);
    finalised (count BIGINT, the others DOUBLE)."""
    k = cols.prefix[agg.column]
    if agg.function == "last":
        return f"c.{k}_last / 1e6" if f"{k}_last" in cols.parts else "c.__x / 1e6"
    if agg.function in ("min", "max"):
        part = f"{k}_{agg.function}"
        if agg.window is None:
            return f"CAST(c.{part}_all AS DOUBLE)"
        i = cols.windows.index(agg.window)
        # the start's block ends where v's block begins
        block = _floor("p.__v", micros(agg.window))
        suffix = f"CASE WHEN s{i}.__x < {block} THEN s{i}.{part}_s{i} END"
        prefix = f"CASE WHEN c.__x >= {block} THEN c.{part}_p{i} END"
        return f"CAST({'greatest' if agg.function == 'max' else 'least'}({suffix}, {prefix}) AS DOUBLE)"
    if agg.window is None:
        n, total = f"COALESCE(c.{k}_n_i, 0)", f"COALESCE(c.{k}_s_i, 0)"
    else:
        i = cols.windows.index(agg.window)
        # no group at or after the start: nothing in the window
        n = f"(CASE WHEN s{i}.__x IS NULL THEN 0 ELSE COALESCE(c.{k}_n_i, 0) - s{i}.{k}_n_e END)"
        total = f"(CASE WHEN s{i}.__x IS NULL THEN 0 ELSE COALESCE(c.{k}_s_i, 0) - COALESCE(s{i}.{k}_s_e, 0) END)"
    return _finalised(agg.function, n, total)


def _finalised(function: str, n: str, total: str) -> str:
    """The value of a count, sum or mean from the SQL of its window's count ``n`` and exact
    total ``total`` (both 0 for an empty window): the one place these formulas live."""
    if function == "count":
        return f"CAST({n} AS BIGINT)"
    if function == "sum":
        return f"CAST({total} AS DOUBLE)"
    return f"CAST({total} AS DOUBLE) / CAST(NULLIF({n}, 0) AS DOUBLE)"


def _epoch_us(value: datetime) -> int:
    return micros(value - datetime(1970, 1, 1, tzinfo=value.tzinfo))
