"""A brute-force reference for request-time windows, in plain Python (no SQL).

The value of every aggregate at any instant ``t`` straight from the raw events, by the
definition in :mod:`featurepipe.core.windows`: the events of the key with event time in
``[window_start_us(t, W), t)``, sums over ``DECIMAL(38, 9)``, ``mean = float(sum) /
float(count)``. And the reader's side: the change-point row in force at ``t`` (the greatest
``v <= t``), which is what Feast's as-of join and the online schedule pick.

Tests compare the kernel's SQL against these two, value for value and bit for bit.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

from featurepipe.core.windows import Aggregate, window_start_us

Key = tuple[Any, ...]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Event:
    """One raw event: its key (one value per join key), event time in microseconds since
    the epoch, and its columns (``None`` is null; a timestamp column holds microseconds)."""

    key: Key
    t_us: int
    values: Mapping[str, Any]


def as_decimal(value: Any) -> Decimal:
    """``CAST(value AS DECIMAL(38, 9))`` as DuckDB computes it: a double is multiplied by
    1e9 in double precision, then rounded half away from zero to an integer (so
    21119906027865.375 becomes 21119906027865.376817152, not ...865.375)."""
    if isinstance(value, bool):
        return Decimal(int(value))
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        with localcontext() as ctx:
            ctx.prec = 60
            return value.quantize(Decimal("1e-9"), rounding=ROUND_HALF_UP)
    with localcontext() as ctx:
        ctx.prec = 60
        scaled = Decimal(float(value) * 1e9).quantize(Decimal(1), rounding=ROUND_HALF_UP)
        return scaled.scaleb(-9)


def _is_timestamp(column_type: str) -> bool:
    return "TIMESTAMP" in column_type.upper()


def _is_integer(column_type: str) -> bool:
    return column_type.upper() in {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT",
                                   "USMALLINT", "UINTEGER", "UBIGINT"}


def aggregate(agg: Aggregate, column_type: str, values: Sequence[Any], latest: Sequence[Event]) -> Any:
    """One aggregate over the values in its window (nulls dropped here), or, for ``last``,
    over ``latest``: the events at the latest instant before ``t``."""
    if agg.function == "last":
        if not _is_timestamp(column_type):
            raise NotImplementedError("the kernel supports last of a timestamp column only")
        stamps = [e.values[agg.column] for e in latest if e.values[agg.column] is not None]
        return max(stamps) / 1e6 if stamps else None
    present = [v for v in values if v is not None]
    if agg.function == "count":
        return len(present)
    if agg.function in ("min", "max"):
        if not present:
            return None
        pick = min if agg.function == "min" else max
        if _is_timestamp(column_type):
            return pick(present) / 1e6
        return float(pick(present))
    if _is_timestamp(column_type):
        raise NotImplementedError("sum / mean of a timestamp column (the kernel sums doubles)")
    total: int | Decimal
    if _is_integer(column_type):
        total = sum(int(v) for v in present)
    else:
        with localcontext() as ctx:
            ctx.prec = 60
            total = sum((as_decimal(v) for v in present), Decimal(0))
    if agg.function == "sum":
        return float(total)
    if agg.function == "mean":
        return float(total) / float(len(present)) if present else None
    raise ValueError(f"unknown aggregation function {agg.function!r}")


def values_at(events: Iterable[Event], aggregations: Sequence[Aggregate], types: Mapping[str, str],
              key: Key, t_us: int, timestamp_field: str = "ts") -> dict[str, Any]:
    """Every aggregate's value for ``key`` asked at ``t_us``, from the raw events (the event
    time is column ``timestamp_field``)."""
    before = [
        Event(e.key, e.t_us, {**e.values, timestamp_field: e.t_us})
        for e in events if e.key == key and e.t_us < t_us
    ]
    latest_t = max((e.t_us for e in before), default=None)
    latest = [e for e in before if e.t_us == latest_t]
    out: dict[str, Any] = {}
    for agg in aggregations:
        start = window_start_us(t_us, agg.window) if agg.window is not None else None
        inside = [e.values[agg.column] for e in before if start is None or e.t_us >= start]
        out[agg.name] = aggregate(agg, types[agg.column], inside, latest)
    return out


def empty_values(aggregations: Sequence[Aggregate]) -> dict[str, Any]:
    """The values of a key with no event before ``t``: count and sum 0, the rest null."""
    return {a.name: 0 if a.function == "count" else 0.0 if a.function == "sum" else None for a in aggregations}


def epoch_us(value: datetime) -> int:
    """Microseconds since the epoch of an aware datetime (exact, no float)."""
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass(frozen=True)
class ChangePoints:
    """The kernel's rows, per key, ordered by change point: what a point-in-time reader sees."""

    v_us: Mapping[Key, list[int]]
    rows: Mapping[Key, list[dict[str, Any]]]

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[Any]], columns: Sequence[str], join_keys: Sequence[str],
                  timestamp: str = "event_timestamp") -> ChangePoints:
        """From ``change_point_sql``'s result rows (any order) and their column names."""
        key_at = [columns.index(k) for k in join_keys]
        ts_at = columns.index(timestamp)
        feature_at = [(i, c) for i, c in enumerate(columns) if c not in join_keys and c != timestamp]
        by_key: dict[Key, list[tuple[int, dict[str, Any]]]] = {}
        for row in rows:
            key = tuple(row[i] for i in key_at)
            by_key.setdefault(key, []).append((epoch_us(row[ts_at]), {c: row[i] for i, c in feature_at}))
        for entries in by_key.values():
            entries.sort(key=lambda entry: entry[0])
        return cls({k: [v for v, _ in e] for k, e in by_key.items()}, {k: [r for _, r in e] for k, e in by_key.items()})

    def at(self, key: Key, t_us: int) -> dict[str, Any] | None:
        """The row in force for ``key`` at ``t_us`` (greatest ``v <= t``), or None before the first."""
        vs = self.v_us.get(key, [])
        i = bisect.bisect_right(vs, t_us) - 1
        return self.rows[key][i] if i >= 0 else None


def same(a: Any, b: Any) -> bool:
    """Equal as stored: both null, the same int, or the same float bit for bit (and type)."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


def differences(got: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The features whose values differ: name -> (got, expected)."""
    return {name: (got.get(name), want) for name, want in expected.items() if not same(got.get(name), want)}
