"""What the stream job writes online per key, without Redis: the row in force and its schedule.

Oracle: :func:`featurepipe.online.schedule.encode`, one entity at a time, against the
vectorised encoder the job uses; and the kernel's rows against what the encoded write says.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurepipe.online.schedule import decode, encode
from featurepipe.online.schedule_writer import encode_schedules, schedule_columns


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), max_size=8), columns=st.integers(0, 4), seed=st.integers(0, 2**31),
       use_compiled=st.booleans(), skip=st.integers(0, 3))
def test_encode_schedules_is_encode_per_entity(sizes: list[int], columns: int, seed: int, use_compiled: bool,
                                               skip: int) -> None:
    """The compiled and the NumPy paths both give each entity's ``encode`` bytes, also for
    offsets that do not start at row 0."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64) + skip
    total = int(offsets[-1])
    v = np.concatenate([rng.integers(0, 9, skip)] + [np.sort(rng.choice(10**12, n, replace=False)) - 5 * 10**11
                                                    for n in sizes]).astype(np.int64)
    cols: list[np.ndarray] = []
    for c in range(columns):
        if c % 2:
            col = rng.normal(size=total)
            col[rng.random(total) < 0.3] = np.nan
            cols.append(col)
        else:
            cols.append(rng.integers(-(2**40), 2**40, total))
    names = [f"f{c}" for c in range(columns)]
    piece = encode_schedules(v, cols, offsets, names, use_compiled=use_compiled)
    assert piece.rows == len(sizes)
    for g in range(len(sizes)):
        lo, hi = offsets[g], offsets[g + 1]
        got = bytes(piece.data[g, :piece.row_lengths()[g]])
        assert got == encode(v[lo:hi], [c[lo:hi] for c in cols], names)


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
    schedule field with all of its rows, in the view's feature order."""
    from featurepipe.online import codec
    from featurepipe.online.latest import EVENT_US, Column, LatestQuery
    from featurepipe.online.window import ViewPlan
    from featurepipe.stream.online_rows import POSITION, online_batches, online_rows

    plan = ViewPlan(view="v", project="p", query=LatestQuery(
        path="", timestamp="ts", created=None, join_keys=[Column("user_id", "user_id", "INT64")],
        features=[Column("n", "n", "INT64"), Column("m", "m", "DOUBLE")]))
    table = pa.table({
        "user_id": pa.array([1, 1, 1, 2], pa.int64()),
        "n": pa.array([3, 1, 0, 7], pa.int64()),
        "m": pa.array([2.5, 1.0, None, 4.0]),
        EVENT_US: pa.array([100, 200, 300, 150], pa.int64()),
        POSITION: pa.array([0, 1, 2, 0], pa.int32()),
    })
    rows = online_rows(table, plan)
    assert rows.count == 2 and len(rows.values) == 3
    expected_ts = codec.encode_timestamps(np.array([100, 150]))
    assert [bytes(expected_ts.data[i, :expected_ts.row_lengths()[i]]) for i in range(2)] == \
        [bytes(rows.timestamps.data[i, :rows.timestamps.row_lengths()[i]]) for i in range(2)]
    sched = rows.values[-1]
    first = decode(bytes(sched.data[0, :sched.row_lengths()[0]]), ["n", "m"])
    assert first.v.tolist() == [100, 200, 300]
    assert first.columns[0].tolist() == [3, 1, 0]
    assert first.columns[1][:2].tolist() == [2.5, 1.0] and np.isnan(first.columns[1][2])
    assert first.row_at(250) == 1 and first.row_at(99) == -1
    second = decode(bytes(sched.data[1, :sched.row_lengths()[1]]), ["n", "m"])
    assert second.v.tolist() == [150]
    # split into writes at key boundaries only, shortest schedules first
    parts = list(online_batches(table, plan, keys_per_write=1))
    assert [p.count for p in parts] == [1, 1]
    assert {_cell(p.keys, 0): _cell(p.values[-1], 0) for p in parts} == \
        {_cell(rows.keys, i): _cell(sched, i) for i in range(2)}
    assert parts[0].values[-1].row_lengths()[0] < parts[1].values[-1].row_lengths()[0]


def _cell(piece: Any, i: int) -> bytes:
    return bytes(piece.data[i, :piece.row_lengths()[i]])


def test_with_positions_numbers_each_keys_rows() -> None:
    from featurepipe.stream.online_rows import POSITION, with_positions

    table = pa.table({"a": [1, 1, 1, 2, 2, 2], "b": ["x", "x", "y", "y", "y", "y"], "v": [1, 2, 3, 4, 5, 6]})
    assert with_positions(table, ["a", "b"]).column(POSITION).to_pylist() == [0, 1, 0, 0, 1, 2]
    assert with_positions(table, ["a"]).column(POSITION).to_pylist() == [0, 1, 2, 0, 1, 2]
    assert with_positions(table.slice(0, 0), ["a"]).column(POSITION).to_pylist() == []
