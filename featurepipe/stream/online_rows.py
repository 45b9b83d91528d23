"""What a micro-batch writes online for one view: each touched key's row in force and its schedule.

The state gives, per touched key, its schedule: the kernel's row at the key's newest event
+ 1 us, then each window's later change points, sorted by key, group, then ``v``
(:meth:`featurepipe.stream.state.WindowState.update`). Of those, the first row of each
key goes into Feast's own fields, its ``v`` as Feast's event timestamp; all of them go,
encoded (:mod:`featurepipe.online.schedule`), into the ``_fp_sched:<view>`` field, in the
same atomic write. The server then picks the row in force at the request's clock.

Why the newest event + 1 us and not the wall clock: the rows written depend on the events
only, so a replay after a crash writes the same bytes, and the timestamp grows with the
key's events, so the writer's newest-wins rule keeps an older write from overwriting a
newer one (a late event within the lateness rewrites the same timestamp with the rows
recomputed: the writer replaces an equal timestamp).
"""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurepipe.core.sql import quote
from featurepipe.core.windows import SCHEDULE_GROUP, ViewShape, schedule_sql
from featurepipe.online.latest import EVENT_US
from featurepipe.online.schedule_writer import encode_schedules, schedule_columns
from featurepipe.online.window import ViewPlan, encode
from featurepipe.online.writer import EncodedRows

POSITION = "__j"  # a row's place among its key's rows (0: the row in force)


def online_batches(table: pa.Table, plan: ViewPlan, keys_per_write: int = 2_000) -> Iterator[EncodedRows]:
    """:func:`online_rows` of ``table`` in writes of at most ``keys_per_write`` keys, keys
    with schedules of similar lengths together (a write pads every schedule to its
    longest one); a key's rows are never split."""
    position = np.asarray(table.column(POSITION).to_numpy(zero_copy_only=False))
    firsts = np.flatnonzero(position == 0)
    lengths = np.diff(np.append(firsts, len(position)))
    order = np.argsort(lengths, kind="stable")
    for k in range(0, len(order), keys_per_write):
        chosen = np.sort(order[k:k + keys_per_write])
        n = lengths[chosen]
        rows = np.repeat(firsts[chosen] - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
        yield online_rows(table.take(pa.array(rows)), plan)


def schedule_rows(con: duckdb.DuckDBPyConnection, shape: ViewShape, events: str) -> pa.Table:
    """The schedule of every key in the relation ``events`` (:func:`~featurepipe.core.windows.schedule_sql`):
    keys, :data:`~featurepipe.core.windows.SCHEDULE_GROUP`, ``event_timestamp``, the
    features, ``v`` in microseconds (``__event_us``) and :data:`POSITION` (0: the row at the
    key's newest event), sorted by key, group, then ``v``."""
    keys = ", ".join(quote(k) for k in shape.join_keys)
    table = con.sql(f"SELECT *, epoch_us(event_timestamp) AS {EVENT_US} FROM ({schedule_sql(shape, events)}) "
                    f"ORDER BY {keys}, {SCHEDULE_GROUP}, event_timestamp").to_arrow_table()
    return with_positions(table, list(shape.join_keys))


def with_positions(table: pa.Table, keys: list[str]) -> pa.Table:
    """``table`` (sorted by ``keys``) with :data:`POSITION`: each row's place among its key's rows."""
    n = table.num_rows
    new = np.zeros(n, dtype=bool)
    if n:
        new[0] = True
        for k in keys:
            column = table.column(k).combine_chunks()
            new[1:] |= np.asarray(pc.not_equal(column.slice(1), column.slice(0, n - 1)).to_numpy(zero_copy_only=False))
    starts = np.flatnonzero(new)
    position = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    return table.append_column(POSITION, pa.array(position.astype(np.int32)))


def online_rows(table: pa.Table, plan: ViewPlan) -> EncodedRows:
    """Feast's bytes of each key's row at its newest event plus its schedule, one row per
    key. ``table``: the state's rows (keys, :data:`~featurepipe.core.windows.SCHEDULE_GROUP`,
    features, ``__event_us``, :data:`POSITION`), sorted by key, group, then change point (at
    least one row)."""
    position = np.asarray(table.column(POSITION).to_numpy(zero_copy_only=False))
    firsts = np.flatnonzero(position == 0)
    offsets = np.append(firsts, len(position))
    names = [f.name for f in plan.features]
    v = np.asarray(table.column(EVENT_US).to_numpy(zero_copy_only=False), dtype=np.int64)
    row_groups = np.asarray(table.column(SCHEDULE_GROUP).to_numpy(zero_copy_only=False), dtype=np.int64)
    groups, k = plan.schedule_groups
    schedules = encode_schedules(v, row_groups, schedule_columns(table, names), offsets, groups, names, k)
    in_force = table.take(pa.array(firsts)).combine_chunks().to_batches()[0]
    rows = encode(in_force, plan)
    return EncodedRows(keys=rows.keys, timestamps=rows.timestamps, values=[*rows.values, schedules])
