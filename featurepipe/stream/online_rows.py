"""What a micro-batch writes online for one view: each touched key's row in force and its schedule.

The state gives, per touched key, the kernel's change-point rows from the key's row in
force on (``v >= newest event + 1 us``), sorted by key then ``v``
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

import numpy as np
import pyarrow as pa

from featurepipe.online.latest import EVENT_US
from featurepipe.online.schedule_writer import encode_schedules, schedule_columns
from featurepipe.online.window import ViewPlan, encode
from featurepipe.online.writer import EncodedRows

POSITION = "__j"  # a row's place among its key's rows (0: the row in force)


def online_batches(table: pa.Table, plan: ViewPlan, keys_per_write: int = 5_000) -> Iterator[EncodedRows]:
    """:func:`online_rows` of ``table`` in writes of at most ``keys_per_write`` keys (a
    key's rows are never split)."""
    position = np.asarray(table.column(POSITION).to_numpy(zero_copy_only=False))
    firsts = np.flatnonzero(position == 0)
    for k in range(0, len(firsts), keys_per_write):
        lo = int(firsts[k])
        hi = int(firsts[k + keys_per_write]) if k + keys_per_write < len(firsts) else table.num_rows
        yield online_rows(table.slice(lo, hi - lo), plan)


def online_rows(table: pa.Table, plan: ViewPlan) -> EncodedRows:
    """Feast's bytes of each key's row in force plus its schedule, one row per key.
    ``table``: the state's rows (keys, features, ``__event_us``, :data:`POSITION`),
    sorted by key then change point (at least one row)."""
    position = np.asarray(table.column(POSITION).to_numpy(zero_copy_only=False))
    firsts = np.flatnonzero(position == 0)
    offsets = np.append(firsts, len(position))
    names = [f.name for f in plan.features]
    v = np.asarray(table.column(EVENT_US).to_numpy(zero_copy_only=False), dtype=np.int64)
    schedules = encode_schedules(v, schedule_columns(table, names), offsets, names)
    in_force = table.take(pa.array(firsts)).combine_chunks().to_batches()[0]
    rows = encode(in_force, plan)
    return EncodedRows(keys=rows.keys, timestamps=rows.timestamps, values=[*rows.values, schedules])
