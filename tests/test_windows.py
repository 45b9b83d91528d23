"""The window kernel against its oracle: change-point rows equal brute force, bit for bit.

``change_point_sql`` (featurepipe/core/windows.py) gives one row per change point; a reader
takes the row in force at ``t`` (greatest ``v <= t``). tests/window_oracle.py computes every
aggregate at ``t`` straight from the raw events. Random events (hypothesis: ties, second and
microsecond times, several and compound keys, null values and keys, 1h/24h/7d/30d windows,
unbounded aggregates) are checked at every instant where a value can change and either side
of it, and at random instants; hand-made cases pin the edges one by one. DuckDB in-process,
no servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurepipe.core import db
from featurepipe.core.errors import InvalidInput
from featurepipe.core.windows import (
    ViewShape,
    change_point_sql,
    hop_for,
    horizon,
    micros,
    schedule_groups,
    schedule_sql,
    validate,
    window_start_us,
)
from tests.window_oracle import ChangePoints, Event, differences, empty_values, epoch_us, values_at

US = 1
SECOND = 1_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
T0 = epoch_us(datetime(2024, 3, 1, tzinfo=timezone.utc))
H, D = timedelta(hours=1), timedelta(days=1)
WINDOWS = {"1h": H, "24h": D, "7d": 7 * D, "30d": 30 * D}


@dataclass(frozen=True)
class Agg:
    """An aggregate as the kernel sees it (the shape of definitions.AggregateSpec)."""

    name: str
    function: str
    column: str
    window: timedelta | None


TYPES = {"uid": "BIGINT", "region": "VARCHAR", "ts": "TIMESTAMP WITH TIME ZONE", "amount": "DOUBLE",
         "qty": "BIGINT", "flag": "BOOLEAN"}
WINDOWED = tuple(
    [Agg(f"{f}_amount_{s}", f, "amount", w) for s, w in WINDOWS.items() for f in ("count", "sum", "mean", "min", "max")]
    + [Agg(f"{f}_qty_{s}", f, "qty", WINDOWS[s]) for s in ("1h", "7d") for f in ("count", "sum", "mean", "max")]
    + [Agg("mean_flag_30d", "mean", "flag", 30 * D), Agg("last_ts", "last", "ts", None)]
)
UNBOUNDED = (Agg("count_amount_all", "count", "amount", None), Agg("sum_qty_all", "sum", "qty", None),
             Agg("min_amount_all", "min", "amount", None), Agg("max_amount_all", "max", "amount", None))
ALL = WINDOWED + UNBOUNDED


def table(events: Sequence[Event], join_keys: Sequence[str]) -> pa.Table:
    """The raw events as Arrow (one column per join key, ``ts``, the value columns)."""
    columns: dict[str, pa.Array] = {
        k: pa.array([e.key[i] for e in events], pa.int64() if k == "uid" else pa.string())
        for i, k in enumerate(join_keys)
    }
    columns["ts"] = pa.array([e.t_us for e in events], pa.timestamp("us", tz="UTC"))
    columns["amount"] = pa.array([e.values["amount"] for e in events], pa.float64())
    columns["qty"] = pa.array([e.values["qty"] for e in events], pa.int64())
    columns["flag"] = pa.array([e.values["flag"] for e in events], pa.bool_())
    return pa.table(columns)


def run(events: Sequence[Event], aggs: Sequence[Agg] = ALL, join_keys: Sequence[str] = ("uid",),
        start: int | None = None, end: int | None = None) -> tuple[ChangePoints, list[tuple[Any, ...]]]:
    """change_point_sql over ``events`` in DuckDB: the rows as a reader sees them, and raw."""
    shape = ViewShape(tuple(join_keys), "ts", tuple(aggs), TYPES)
    con = db.connect("deterministic")
    try:
        con.register("events", table(events, join_keys))
        sql = change_point_sql(shape, "events", start=_dt(start), end=_dt(end))
        rows = con.execute(sql).fetchall()
        columns = [d[0] for d in con.description]
    finally:
        con.close()
    assert columns == [*join_keys, "event_timestamp", *(a.name for a in aggs)]
    return ChangePoints.from_rows(rows, columns, join_keys), rows


def _dt(t_us: int | None) -> datetime | None:
    return None if t_us is None else datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=t_us)


def drop_us(x: int, window: timedelta) -> int:
    """When an event at ``x`` leaves ``window``: the end of its hop bucket plus the window."""
    hop = hop_for(window)
    return x - x % hop + hop + micros(window)


def change_points(events: Sequence[Event], key: tuple[Any, ...], aggs: Sequence[Agg]) -> set[int]:
    """Where a key's values can change: just after each event, and where a bucket leaves a window."""
    windows = {a.window for a in aggs if a.window is not None}
    xs = {e.t_us for e in events if e.key == key}
    return {x + 1 for x in xs} | {drop_us(x, w) for x in xs for w in windows}


def probe_instants(events: Sequence[Event], key: tuple[Any, ...], aggs: Sequence[Agg]) -> set[int]:
    """Instants where a value can be wrong: at, before and after each event and change
    point, at ``x + W`` (the event exactly ``W`` before), and on the hop grid around events."""
    windows = {a.window for a in aggs if a.window is not None}
    out: set[int] = set()
    for e in events:
        if e.key != key:
            continue
        x = e.t_us
        out |= {x - 1, x, x + 1}
        for w in windows:
            hop = hop_for(w)
            out |= {x + micros(w), x + micros(w) + 1, drop_us(x, w) - 1, drop_us(x, w), x - x % hop + hop}
    return out


def check(events: Sequence[Event], aggs: Sequence[Agg], join_keys: Sequence[str],
          extra_instants: Sequence[int] = ()) -> ChangePoints:
    """Run the kernel and compare every key at every probe instant with the oracle."""
    points, rows = run(events, aggs, join_keys)
    keys = {e.key for e in events if all(k is not None for k in e.key)}
    # one row per key and change point, nothing else; ordered by time
    assert len({(tuple(r[: len(join_keys)]), r[len(join_keys)]) for r in rows}) == len(rows)
    assert [r[len(join_keys)] for r in rows] == sorted(r[len(join_keys)] for r in rows)
    assert set(points.v_us) <= keys
    for key in keys:
        assert set(points.v_us[key]) == change_points(events, key, aggs), key
    absent = (0,) * len(join_keys) if join_keys == ("uid",) else (0, "zz")
    for key in [*sorted(keys, key=repr), absent]:
        for t in sorted(probe_instants(events, key, aggs) | set(extra_instants)):
            want = values_at(events, aggs, TYPES, key, t)
            got = points.at(key, t)
            if got is None:  # no row yet: the key had no event before t
                assert not any(e.key == key and e.t_us < t for e in events), (key, t)
                got = empty_values(aggs)
            assert differences(got, want) == {}, (key, t, _dt(t))
    return points


# --- random events -------------------------------------------------------------------------

FLOATS = st.one_of(
    st.none(),
    st.integers(-10**8, 10**8).map(lambda cents: cents / 100),
    st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False).map(lambda v: v + 0.0),  # no -0.0
)
VALUES = st.fixed_dictionaries({
    "amount": FLOATS,
    "qty": st.one_of(st.none(), st.integers(-10**6, 10**12)),
    "flag": st.one_of(st.none(), st.booleans()),
})
GRID = [5 * MINUTE, HOUR, DAY]


@st.composite
def event_times(draw: st.DrawFn, n: int) -> list[int]:
    """``n`` event times around T0: whole seconds, microseconds, on and next to the hop grid,
    and near earlier times (ties, a window or a hop apart), mostly within a few days."""
    times: list[int] = []
    for _ in range(n):
        span = draw(st.sampled_from([3 * DAY, 3 * DAY, 40 * DAY]))
        kind = draw(st.sampled_from(["second", "micro", "grid", "near", "near"]))
        if kind == "near" and times:
            base = draw(st.sampled_from(times))
            step = draw(st.sampled_from([0, 0, 1, 2, SECOND, 5 * MINUTE, HOUR, DAY, 7 * DAY, 30 * DAY]))
            t = base + draw(st.sampled_from([-1, 1])) * step
        elif kind == "grid":
            hop = draw(st.sampled_from(GRID))
            t = T0 + draw(st.integers(0, span // hop)) * hop + draw(st.sampled_from([0, 0, -1, 1]))
        elif kind == "second":
            t = T0 + draw(st.integers(0, span // SECOND)) * SECOND
        else:
            t = T0 + draw(st.integers(0, span))
        times.append(t)
    return times


@st.composite
def scenarios(draw: st.DrawFn, compound: bool) -> tuple[list[Event], list[int]]:
    """Random events of a few keys (null keys now and then) and random query instants."""
    n = draw(st.integers(0, 30))
    times = draw(event_times(n))
    uids = st.sampled_from([1, 1, 2, 3, None])
    regions = st.sampled_from(["a", "b", None])
    events = [
        Event((draw(uids), draw(regions)) if compound else (draw(uids),), t, draw(VALUES))
        for t in times
    ]
    instants = draw(st.lists(st.integers(T0 - DAY, T0 + 75 * DAY), max_size=20))
    return events, instants


RANDOM = settings(max_examples=60, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@RANDOM
@given(case=scenarios(compound=False))
def test_random_events_match_the_oracle(case: tuple[list[Event], list[int]]) -> None:
    events, instants = case
    check(events, ALL, ("uid",), instants)


@RANDOM
@given(case=scenarios(compound=True))
def test_random_events_with_compound_keys_match_the_oracle(case: tuple[list[Event], list[int]]) -> None:
    events, instants = case
    check(events, ALL, ("uid", "region"), instants)


@st.composite
def bounded(draw: st.DrawFn) -> tuple[list[Event], int, int]:
    events, _ = draw(scenarios(compound=False))
    edges = sorted(change_points(events, (1,), WINDOWED)) or [T0]
    lo = draw(st.one_of(st.sampled_from(edges), st.integers(T0 - DAY, T0 + 60 * DAY)))
    hi = draw(st.one_of(st.sampled_from(edges), st.integers(T0 - DAY, T0 + 80 * DAY)))
    return events, min(lo, hi), max(lo, hi) + draw(st.sampled_from([0, 1]))


@RANDOM
@given(case=bounded())
def test_start_and_end_bound_the_rows_and_match_the_full_run(case: tuple[list[Event], int, int]) -> None:
    """A backfill of [start, end) reads events from start - horizon and writes the rows with
    v in [start, end): exactly the full run's rows there."""
    events, start, end = case
    _, full = run(events, WINDOWED)
    since = start - micros(horizon(WINDOWED))
    part_events = [e for e in events if since <= e.t_us < end]
    _, part = run(part_events, WINDOWED, start=start, end=end)
    v = [epoch_us(r[1]) for r in part]
    assert all(start <= x < end for x in v)
    expected = [r for r in full if start <= epoch_us(r[1]) < end]
    assert sorted(part, key=repr) == sorted(expected, key=repr)
    bits = ChangePoints.from_rows(part, ["uid", "event_timestamp", *(a.name for a in WINDOWED)], ["uid"])
    whole = ChangePoints.from_rows(expected, ["uid", "event_timestamp", *(a.name for a in WINDOWED)], ["uid"])
    for key, vs in whole.v_us.items():
        for t in vs:
            assert differences(bits.at(key, t) or {}, whole.at(key, t) or {}) == {}


def expand_schedule(rows: Sequence[tuple[Any, ...]], n_keys: int, aggs: Sequence[Agg]) -> list[tuple[Any, ...]]:
    """schedule_sql's grouped rows (keys, __g, event_timestamp, values) as whole rows: one per
    distinct ``v`` of a key, each aggregate's value from the latest row of its key's
    ``__g = -1`` or of its own group at or before ``v``; sorted by key then ``v``."""
    groups = schedule_groups(aggs)
    by_key: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    for r in rows:
        by_key.setdefault(tuple(r[:n_keys]), []).append(r)
    out = []
    for key in sorted(by_key):
        mine = sorted(by_key[key], key=lambda r: (r[n_keys + 1], r[n_keys]))
        assert mine[0][n_keys] == -1 and sum(r[n_keys] == -1 for r in mine) == 1, key
        current = list(mine[0][n_keys + 2:])
        for j, r in enumerate(mine):
            if r[n_keys] >= 0:
                for c, g in enumerate(groups):
                    if g == r[n_keys]:
                        current[c] = r[n_keys + 2 + c]
            if j + 1 == len(mine) or mine[j + 1][n_keys + 1] != r[n_keys + 1]:
                out.append((*key, r[n_keys + 1], *current))
    return out


@RANDOM
@given(case=scenarios(compound=True))
def test_schedules_are_the_change_point_rows_from_each_keys_newest_event_on(
        case: tuple[list[Event], list[int]]) -> None:
    """schedule_sql (what materialisation and the stream write online), its groups expanded
    to whole rows, gives exactly change_point_sql's rows with v >= the key's newest event +
    1 us, bit for bit; also when the events reach back further than the horizon."""
    events, _ = case
    shape = ViewShape(("uid", "region"), "ts", ALL, TYPES)
    _, full = run(events, ALL, ("uid", "region"))
    newest: dict[tuple[Any, ...], int] = {}
    for e in events:
        newest[e.key] = max(newest.get(e.key, e.t_us), e.t_us)
    expected = sorted((r for r in full if epoch_us(r[2]) > newest[(r[0], r[1])]), key=lambda r: (r[0], r[1], r[2]))
    con = db.connect("deterministic")
    try:
        con.register("events", table(events, ("uid", "region")))
        got = con.execute(f"SELECT * FROM ({schedule_sql(shape, 'events')})").fetchall()
    finally:
        con.close()
    assert [repr(r) for r in expand_schedule(got, 2, ALL)] == [repr(r) for r in expected]


# --- hand-made cases -----------------------------------------------------------------------

COUNT_1H = Agg("n", "count", "amount", H)
ONE_HOUR = (COUNT_1H, Agg("s", "sum", "amount", H), Agg("m", "mean", "amount", H),
            Agg("lo", "min", "amount", H), Agg("hi", "max", "amount", H), Agg("last", "last", "ts", None))
TEN = T0 + 10 * HOUR  # 10:00, on every hop grid


def ev(t_us: int, amount: float | None = 1.0, uid: int = 1) -> Event:
    return Event((uid,), t_us, {"amount": amount, "qty": None, "flag": None})


def at(events: Sequence[Event], t_us: int, aggs: Sequence[Agg] = ONE_HOUR) -> dict[str, Any]:
    """The row in force at ``t_us`` (checked against the oracle too)."""
    points = check(events, aggs, ("uid",), [t_us])
    row = points.at((1,), t_us)
    return row if row is not None else empty_values(aggs)


def test_an_event_exactly_at_t_is_not_in_its_own_window() -> None:
    events = [ev(TEN - MINUTE, 2.0), ev(TEN, 5.0)]
    assert at(events, TEN) == {"n": 1, "s": 2.0, "m": 2.0, "lo": 2.0, "hi": 2.0, "last": (TEN - MINUTE) / 1e6}
    assert at(events, TEN + 1)["n"] == 2
    # asked exactly at a change point that is also an event: that event is still out
    assert at([ev(TEN, 2.0), ev(TEN + 1, 5.0)], TEN + 1) == {
        "n": 1, "s": 2.0, "m": 2.0, "lo": 2.0, "hi": 2.0, "last": TEN / 1e6}
    assert at([ev(TEN)], TEN) == {"n": 0, "s": 0.0, "m": None, "lo": None, "hi": None, "last": None}


def test_an_event_at_the_window_start_is_in_and_one_microsecond_before_is_out() -> None:
    # asked at 11:04:59.999999, the 1h window starts at floor(t, 5 min) - 1h = 10:00
    t = TEN + HOUR + 5 * MINUTE - 1
    assert window_start_us(t, H) == TEN
    assert at([ev(TEN)], t)["n"] == 1
    assert at([ev(TEN)], t + 1)["n"] == 0  # 11:05: the window starts at 10:05
    assert at([ev(TEN - 1)], TEN + HOUR)["n"] == 0  # 09:59:59.999999 is before 10:00
    assert at([ev(TEN - 1)], TEN + HOUR - 1)["n"] == 1


def test_an_event_leaves_the_window_when_its_whole_bucket_does() -> None:
    # 10:04:59.999999 and 10:05:00 are in different 5-minute buckets: they leave 5 minutes apart
    early, late = ev(TEN + 5 * MINUTE - 1, 1.0), ev(TEN + 5 * MINUTE, 10.0)
    assert at([early, late], TEN + HOUR + 5 * MINUTE - 1) == {
        "n": 2, "s": 11.0, "m": 5.5, "lo": 1.0, "hi": 10.0, "last": late.t_us / 1e6}
    assert at([early, late], TEN + HOUR + 5 * MINUTE) == {
        "n": 1, "s": 10.0, "m": 10.0, "lo": 10.0, "hi": 10.0, "last": late.t_us / 1e6}
    assert at([early, late], TEN + HOUR + 10 * MINUTE)["n"] == 0
    # so the 1h window covers 60 to 65 minutes: an event at 10:00 is in until 11:05
    points, _ = run([ev(TEN)], ONE_HOUR)
    assert points.v_us[(1,)] == [TEN + 1, TEN + HOUR + 5 * MINUTE]


def test_longer_windows_hop_by_the_hour_and_the_day() -> None:
    aggs = [Agg(f"n{s}", "count", "amount", w) for s, w in WINDOWS.items()]
    x = TEN + 30 * MINUTE
    points, _ = run([ev(x)], aggs)
    assert points.v_us[(1,)] == [x + 1, TEN + HOUR + 35 * MINUTE, TEN + HOUR + DAY,
                                 TEN + HOUR + 7 * DAY, T0 + DAY + 30 * DAY]
    assert at([ev(x)], TEN + HOUR + DAY - 1, aggs) == {"n1h": 0, "n24h": 1, "n7d": 1, "n30d": 1}
    assert at([ev(x)], TEN + HOUR + DAY, aggs) == {"n1h": 0, "n24h": 0, "n7d": 1, "n30d": 1}
    assert at([ev(x)], T0 + 31 * DAY - 1, aggs)["n30d"] == 1
    assert at([ev(x)], T0 + 31 * DAY, aggs)["n30d"] == 0


def test_an_empty_window_counts_zero_sums_zero_and_has_no_mean_min_or_max() -> None:
    aggs = (*ONE_HOUR, Agg("n24", "count", "amount", D))
    row = at([ev(TEN, 3.0)], TEN + 3 * HOUR, aggs)
    assert row == {"n": 0, "s": 0.0, "m": None, "lo": None, "hi": None, "last": TEN / 1e6, "n24": 1}
    assert type(row["n"]) is int and type(row["s"]) is float


def test_null_values_are_not_counted_but_the_event_still_makes_a_row() -> None:
    events = [ev(TEN, None), ev(TEN + MINUTE, 4.0), ev(TEN + 2 * MINUTE, None)]
    assert at(events, TEN + 1) == {"n": 0, "s": 0.0, "m": None, "lo": None, "hi": None, "last": TEN / 1e6}
    assert at(events, TEN + 3 * MINUTE) == {
        "n": 1, "s": 4.0, "m": 4.0, "lo": 4.0, "hi": 4.0, "last": (TEN + 2 * MINUTE) / 1e6}


def test_events_at_the_same_instant_arrive_together_in_one_row() -> None:
    events = [ev(TEN, 1.0), ev(TEN, 2.0), ev(TEN, 4.0), ev(TEN, 1.0, uid=2)]
    points, rows = run(events, ONE_HOUR)
    assert [r[:2] for r in rows].count((1, _dt(TEN + 1))) == 1
    assert points.at((1,), TEN) is None
    assert points.at((1,), TEN + 1) == {"n": 3, "s": 7.0, "m": 7.0 / 3.0, "lo": 1.0, "hi": 4.0, "last": TEN / 1e6}
    assert points.at((2,), TEN + 1) == {"n": 1, "s": 1.0, "m": 1.0, "lo": 1.0, "hi": 1.0, "last": TEN / 1e6}


def test_null_keys_and_times_are_skipped() -> None:
    events = [Event((None,), TEN, {"amount": 1.0, "qty": 1, "flag": True}), ev(TEN + 1, 2.0)]
    points, rows = run(events, ONE_HOUR)
    assert {r[0] for r in rows} == {1}
    con = db.connect("deterministic")
    con.register("events", pa.table({"uid": [1, 1], "ts": pa.array([None, TEN], pa.timestamp("us", tz="UTC")),
                                     "amount": [5.0, 2.0]}))
    shape = ViewShape(("uid",), "ts", (COUNT_1H,), TYPES)
    assert con.execute(change_point_sql(shape, "events")).fetchall() == [
        (1, _dt(TEN + 1), 1), (1, _dt(TEN + HOUR + 5 * MINUTE), 0)]


def test_last_of_another_timestamp_column_is_its_value_on_the_latest_event() -> None:
    # the view's event time is ts; last(seen) reads seen on the events at the latest instant
    # before t (the greatest of them; null when they have none)
    seen = [TEN + 5 * MINUTE, None, TEN - DAY, None]
    times = [TEN, TEN + MINUTE, TEN + MINUTE, TEN + 2 * MINUTE]
    aggs = (Agg("last_seen", "last", "seen", None), Agg("last_ts", "last", "ts", None))
    types = {**TYPES, "seen": "TIMESTAMP WITH TIME ZONE"}
    con = db.connect("deterministic")
    con.register("events", pa.table({"uid": [1] * 4, "ts": pa.array(times, pa.timestamp("us", tz="UTC")),
                                     "seen": pa.array(seen, pa.timestamp("us", tz="UTC"))}))
    rows = con.execute(change_point_sql(ViewShape(("uid",), "ts", aggs, types), "events")).fetchall()
    points = ChangePoints.from_rows(rows, ["uid", "event_timestamp", "last_seen", "last_ts"], ["uid"])
    events = [Event((1,), t, {"seen": s}) for t, s in zip(times, seen)]
    for t in [TEN, TEN + 1, TEN + MINUTE + 1, TEN + 2 * MINUTE + 1]:
        want = values_at(events, aggs, types, (1,), t)
        assert differences(points.at((1,), t) or empty_values(aggs), want) == {}, t
    assert points.at((1,), TEN + MINUTE + 1) == {"last_seen": (TEN - DAY) / 1e6, "last_ts": (TEN + MINUTE) / 1e6}
    assert points.at((1,), TEN + 2 * MINUTE + 1) == {"last_seen": None, "last_ts": (TEN + 2 * MINUTE) / 1e6}


def test_last_of_a_column_that_is_not_a_timestamp_is_refused() -> None:
    shape = ViewShape(("uid",), "ts", (Agg("last_amount", "last", "amount", None),), TYPES)
    with pytest.raises(InvalidInput, match="'last_amount'.*timestamp"):
        change_point_sql(shape, "events")


def test_no_events_no_rows() -> None:
    _, rows = run([], ALL)
    assert rows == []


def test_sums_are_exact_whatever_the_order() -> None:
    # running double sums would give 0.0 once 1e17 leaves (1e17 + 3.0 + 0.1 - 1e17, Feast's
    # cumulative subtraction); exact decimals give 3.1
    events = [ev(TEN - MINUTE, 1e17), ev(TEN + MINUTE, 3.0), ev(TEN + 2 * MINUTE, 0.1)]
    assert at(events, TEN + HOUR - 1)["s"] == 1e17
    assert at(events, TEN + HOUR) == {"n": 2, "s": 3.1, "m": 3.1 / 2, "lo": 0.1, "hi": 3.0,
                                      "last": (TEN + 2 * MINUTE) / 1e6}


def test_bounds_keep_only_rows_in_start_end() -> None:
    events = [ev(TEN), ev(TEN + 2 * HOUR)]
    _, rows = run(events, ONE_HOUR, start=TEN + HOUR + 5 * MINUTE, end=TEN + 2 * HOUR + 2)
    assert [epoch_us(r[1]) for r in rows] == [TEN + HOUR + 5 * MINUTE, TEN + 2 * HOUR + 1]
    _, rows = run(events, ONE_HOUR, start=TEN + HOUR + 5 * MINUTE + 1, end=TEN + 2 * HOUR + 1)
    assert rows == []


# --- the rules -----------------------------------------------------------------------------

@pytest.mark.parametrize(("window", "hop"), [
    (H, 5 * MINUTE), (timedelta(minutes=90), 5 * MINUTE), (timedelta(hours=11, minutes=55), 5 * MINUTE),
    (timedelta(hours=12), HOUR), (D, HOUR), (7 * D, HOUR), (timedelta(days=11, hours=23), HOUR),
    (timedelta(days=12), DAY), (30 * D, DAY),
])
def test_hops_and_windows_that_are_multiples_of_them(window: timedelta, hop: int) -> None:
    assert hop_for(window) == hop
    validate([Agg("x", "count", "amount", window)], "v")


@pytest.mark.parametrize("window", [
    timedelta(hours=1, minutes=2, seconds=30), timedelta(minutes=1), timedelta(hours=12, minutes=5),
    timedelta(days=7, minutes=30), timedelta(days=12, hours=1), timedelta(hours=1, microseconds=1),
])
def test_a_window_that_is_not_a_multiple_of_its_hop_is_refused(window: timedelta) -> None:
    with pytest.raises(InvalidInput, match=r"'v'.*'x'.*not a multiple of its hop"):
        validate([Agg("ok", "count", "amount", H), Agg("x", "count", "amount", window)], "v")


def test_horizon_is_the_longest_window_plus_its_hop() -> None:
    assert horizon(ONE_HOUR) == timedelta(minutes=65)
    assert horizon(WINDOWED) == timedelta(days=31)
    assert horizon([Agg("last", "last", "ts", None)]) == timedelta(0)


def test_window_start_floors_to_the_hop_also_before_1970() -> None:
    assert window_start_us(-1, H) == -5 * MINUTE - HOUR
    assert window_start_us(0, H) == -HOUR
    assert window_start_us(DAY + 3 * HOUR + 1, 7 * D) == DAY + 3 * HOUR - 7 * DAY


def _declare(window: timedelta) -> Any:
    from feast import Entity, FileSource, ValueType
    from feast.aggregation import Aggregation

    from featurepipe.definitions import WindowedFeatures

    return WindowedFeatures(
        name="user_stats", entity=Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64),
        source=FileSource(name="transactions", path="transactions.parquet", timestamp_field="ts"),
        aggregations=[Aggregation(column="amount", function="count", time_window=H, name="txn_count_1h"),
                      Aggregation(column="amount", function="sum", time_window=window, name="amount_sum_x")],
        ttl=7 * D, offline_root=Path("offline"),
    )


def test_a_declaration_with_a_window_off_its_hop_is_refused() -> None:
    assert _declare(timedelta(minutes=90)).feature_view().name == "user_stats"
    with pytest.raises(InvalidInput, match=r"'user_stats'.*'amount_sum_x'.*1:02:30.*0:05:00.*1:00:00 or 1:05:00"):
        _declare(timedelta(hours=1, minutes=2, seconds=30))


def test_shape_gives_the_kernel_what_it_needs_of_a_registered_view() -> None:
    from featurepipe.definitions import AggregateSpec, AggregateView, shape

    specs = (AggregateSpec("txn_count_1h", "count", "amount", H),)
    view = AggregateView(name="user_stats", join_keys=("user_id",), input_path="in", timestamp_field="ts",
                         aggregations=specs, offline_path=Path("out"), push_source="push", ttl=None)
    assert shape(view, {"amount": "DOUBLE"}) == ViewShape(("user_id",), "ts", specs, {"amount": "DOUBLE"})
