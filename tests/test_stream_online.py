"""What the stream job writes online per key, without Redis: the row in force and its schedule.

Oracle: :func:`featurepipe.online.schedule.encode`, one entity at a time, against the
vectorised encoder the job uses; and the kernel's rows against what the encoded write says.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurepipe.online.schedule import decode, encode
from featurepipe.online.schedule_writer import encode_schedules, schedule_columns


def random_schedules(rng: np.random.Generator, sizes: list[list[int]], groups: list[int], k: int, skip: int
                     ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Rows as schedule_sql gives them for entities with ``sizes[e][g]`` rows in group g:
    ``skip`` rows of junk first, then per entity its row of group -1 and each group's rows
    (v ascending, after the first row's)."""
    v: list[int] = list(rng.integers(0, 9, skip))
    row_groups: list[int] = [0] * skip
    offsets = [skip]
    for counts in sizes:
        v0 = int(rng.integers(-(10**12), 10**12))
        v.append(v0)
        row_groups.append(-1)
        for g, n in enumerate(counts):
            v += sorted(v0 + 1 + rng.choice(10**9, n, replace=False))
            row_groups += [g] * n
        offsets.append(len(v))
    total = len(v)
    cols: list[np.ndarray] = []
    for c in range(len(groups)):
        if c % 2:
            col = rng.normal(size=total)
            col[rng.random(total) < 0.3] = np.nan
            cols.append(col)
        else:
            cols.append(rng.integers(-(2**40), 2**40, total))
    return np.array(v, dtype=np.int64), np.array(row_groups, dtype=np.int64), cols, np.array(offsets, dtype=np.int64)


@contextmanager
def monkeypatch_compiled_cells(value: Any) -> Iterator[None]:
    """The schedule reader's compiled part replaced by ``value`` (None: the Python path)."""
    from featurepipe.online import schedule

    saved = schedule._compiled_cells
    schedule._compiled_cells = value
    try:
        yield
    finally:
        schedule._compiled_cells = saved


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 4), extra=st.integers(0, 3), seed=st.integers(0, 2**31),
       use_compiled=st.booleans(), skip=st.integers(0, 3))
def test_encode_schedules_is_encode_per_entity(data: st.DataObject, k: int, extra: int, seed: int,
                                               use_compiled: bool, skip: int) -> None:
    """The compiled and the NumPy paths both give each entity's ``encode`` bytes (also for
    offsets that do not start at row 0), and every column read back at any instant, by the
    NumPy decoder and by the server's reader, is the value of the latest row of the first
    row or its own group at or before it (brute force)."""
    from featurepipe.online.schedule import cells_in_force, names_crc, row_in_force

    rng = np.random.default_rng(seed)
    groups = list(range(k)) + data.draw(st.lists(st.integers(0, k - 1), min_size=extra, max_size=extra))
    sizes = data.draw(st.lists(st.lists(st.integers(0, 5), min_size=k, max_size=k), max_size=6))
    v, row_groups, cols, offsets = random_schedules(rng, sizes, groups, k, skip)
    names = [f"f{c}" for c in range(len(groups))]
    piece = encode_schedules(v, row_groups, cols, offsets, groups, names, k, use_compiled=use_compiled)
    assert piece.rows == len(sizes)
    for e in range(len(sizes)):
        lo, hi = offsets[e], offsets[e + 1]
        got = bytes(piece.data[e, :piece.row_lengths()[e]])
        assert got == encode(v[lo:hi], row_groups[lo:hi], [c[lo:hi] for c in cols], groups, names, k)
        decoded = decode(got, names)
        for t in sorted({int(x) + d for x in v[lo:hi] for d in (-1, 0, 1)}):
            mine = [i for i in range(lo, hi) if v[i] <= t]
            found = row_in_force(got, names_crc(names), t)
            if not mine:
                assert found.row == -1 and decoded.row_at(t) == -1
                assert cells_in_force(got, names_crc(names), t, [0]) is None
                continue
            r = decoded.row_at(t)
            assert found.v_us == max(v[i] for i in mine) == decoded.v[r]
            # the server's read: compiled and in Python, the same as row_in_force
            every = list(range(len(groups)))
            assert cells_in_force(got, names_crc(names), t, every) == (found.v_us, found.cells(every))
            with monkeypatch_compiled_cells(None):
                assert cells_in_force(got, names_crc(names), t, every) == (found.v_us, found.cells(every))
            for c, g in enumerate(groups):
                latest = max((i for i in mine if row_groups[i] in (-1, g)), key=lambda i: v[i])
                want = cols[c][latest]
                for value in (found.value(c), decoded.columns[c][r]):
                    assert (value is None or value != value) if want != want else value == want


def test_encode_refuses_rows_out_of_group_order() -> None:
    from featurepipe.core.errors import InvalidInput

    v = np.array([10, 20, 15], dtype=np.int64)
    col = np.array([1, 2, 3], dtype=np.int64)
    for row_groups in ([0, 0, 1], [-1, 1, 0], [-1, 0, 2]):
        with pytest.raises(InvalidInput, match="group"):
            encode(v, np.array(row_groups), [col, col], [0, 1], ["a", "b"])
        with pytest.raises(ValueError, match="group"):
            encode_schedules(v, np.array(row_groups), [col, col], np.array([0, 3]), [0, 1], ["a", "b"])


def test_schedule_columns_kinds() -> None:
    table = pa.table({"n": pa.array([1, 2], pa.int64()), "x": pa.array([1.5, None]), "bad": pa.array([1, None])})
    n, x = schedule_columns(table, ["n", "x"])
    assert n.dtype == np.int64 and x.dtype == np.float64
    assert x[0] == 1.5 and np.isnan(x[1])
    from featurepipe.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="integer feature 'bad' has nulls"):
        schedule_columns(table, ["bad"])


def test_online_rows_write_the_row_in_force_and_the_schedule() -> None:
    """Each key: Feast's fields from its first row (timestamp = its change point), and the
    schedule field with all of its rows, each window's values in its own group, in the
    view's feature order."""
    from datetime import timedelta

    from featurepipe.core.windows import SCHEDULE_GROUP
    from featurepipe.definitions import AggregateSpec
    from featurepipe.online import codec
    from featurepipe.online.latest import EVENT_US, Column, LatestQuery
    from featurepipe.online.schedule_scan import KernelInput
    from featurepipe.online.window import ViewPlan
    from featurepipe.stream.online_rows import POSITION, online_batches, online_rows

    aggs = (AggregateSpec("m", "max", "amount", timedelta(days=1)),
            AggregateSpec("n", "count", "amount", timedelta(hours=1)))
    plan = ViewPlan(view="v", project="p", query=LatestQuery(
        path="", timestamp="ts", created=None, join_keys=[Column("user_id", "user_id", "INT64")],
        features=[Column("n", "n", "INT64"), Column("m", "m", "DOUBLE")]),
        kernel=KernelInput(path="", timestamp="ts", aggregations=aggs))
    assert plan.schedule_groups == ([0, 1], 2)  # n: the 1h window (group 0), m: 24h (group 1)
    table = pa.table({
        "user_id": pa.array([1, 1, 1, 2, 2, 2], pa.int64()),
        SCHEDULE_GROUP: pa.array([-1, 0, 1, -1, 0, 1], pa.int64()),
        "n": pa.array([3, 0, 0, 7, 0, 0], pa.int64()),
        "m": pa.array([2.5, None, None, 4.0, None, None]),
        EVENT_US: pa.array([100, 200, 300, 150, 160, 400], pa.int64()),
        POSITION: pa.array([0, 1, 2, 0, 1, 2], pa.int32()),
    })
    rows = online_rows(table, plan)
    assert rows.count == 2 and len(rows.values) == 3
    expected_ts = codec.encode_timestamps(np.array([100, 150]))
    assert [bytes(expected_ts.data[i, :expected_ts.row_lengths()[i]]) for i in range(2)] == \
        [bytes(rows.timestamps.data[i, :rows.timestamps.row_lengths()[i]]) for i in range(2)]
    sched = rows.values[-1]
    first = decode(bytes(sched.data[0, :sched.row_lengths()[0]]), ["n", "m"])
    assert first.v.tolist() == [100, 200, 300]
    assert first.columns[0].tolist() == [3, 0, 0]
    assert first.columns[1][:2].tolist() == [2.5, 2.5] and np.isnan(first.columns[1][2])
    assert first.row_at(250) == 1 and first.row_at(99) == -1
    second = decode(bytes(sched.data[1, :sched.row_lengths()[1]]), ["n", "m"])
    assert second.v.tolist() == [150, 160, 400]
    # split into writes at key boundaries only, shortest schedules first
    parts = list(online_batches(table, plan, keys_per_write=1))
    assert [p.count for p in parts] == [1, 1]
    assert {_cell(p.keys, 0): _cell(p.values[-1], 0) for p in parts} == \
        {_cell(rows.keys, i): _cell(sched, i) for i in range(2)}


def _cell(piece: Any, i: int) -> bytes:
    return bytes(piece.data[i, :piece.row_lengths()[i]])


def test_with_positions_numbers_each_keys_rows() -> None:
    from featurepipe.stream.online_rows import POSITION, with_positions

    table = pa.table({"a": [1, 1, 1, 2, 2, 2], "b": ["x", "x", "y", "y", "y", "y"], "v": [1, 2, 3, 4, 5, 6]})
    assert with_positions(table, ["a", "b"]).column(POSITION).to_pylist() == [0, 1, 0, 0, 1, 2]
    assert with_positions(table, ["a"]).column(POSITION).to_pylist() == [0, 1, 2, 0, 1, 2]
    assert with_positions(table.slice(0, 0), ["a"]).column(POSITION).to_pylist() == []


def test_a_malformed_schedule_is_refused_by_both_readers() -> None:
    """Cut short, or with a row count beyond the field: StaleSchedule from the compiled and
    the Python reader alike (never a crash or a read past the end)."""
    from featurepipe.online import schedule
    from featurepipe.online.schedule import StaleSchedule, cells_in_force, names_crc

    assert schedule._compiled_cells is not None  # the C part is built by `make install`
    names = ["a", "b"]
    good = encode(np.array([10, 20, 30]), np.array([-1, 0, 1]), [np.array([1, 0, 0]), np.array([1.5, 2.5, np.nan])],
                  [0, 1], names)
    assert cells_in_force(good, names_crc(names), 25, [0, 1]) is not None
    bad_count = bytearray(good)
    bad_count[24:32] = (10**6).to_bytes(8, "little")  # the first group's row count (after a 24-byte head)
    for data in (good[:-8], good[:-3], bytes(bad_count)):
        for python in (False, True):
            with monkeypatch_compiled_cells(None) if python else nullcontext():
                with pytest.raises(StaleSchedule, match="malformed|materialize"):
                    cells_in_force(data, names_crc(names), 25, [0, 1])
