"""Many entities' schedules at once, as one more field of the rows a writer sends.

:func:`featurepipe.online.schedule.encode` builds one entity's schedule; a writer has
thousands per batch. :func:`encode_schedules` builds them all in one pass over NumPy
arrays (no Python per entity), byte for byte what ``encode`` gives each entity, as a
:class:`~featurepipe.online.rows.Piece`: append it to an
:class:`~featurepipe.online.writer.EncodedRows`' values and its field
(:func:`~featurepipe.online.schedule.schedule_field`) to the writer's feature fields, and
the schedule is written in the same atomic compare-and-set as Feast's fields (the writer
treats it as one more value: newest timestamp wins, a rewrite of the same rows changes
nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurepipe.core.errors import InvalidInput
from featurepipe.core.windows import KERNEL_VERSION
from featurepipe.online import rows
from featurepipe.online.rows import Piece
from featurepipe.online.schedule import _HEAD, MAGIC, names_crc

_BYTES = np.arange(8)


def schedule_columns(table: pa.Table | pa.RecordBatch, names: Sequence[str]) -> list[np.ndarray]:
    """The feature columns of kernel rows as a schedule stores them: an integer column as
    int64 (a count: never null), any other as float64 with NaN for null."""
    out = []
    for name in names:
        column = table.column(name)
        if pa.types.is_integer(column.type):
            if column.null_count:
                raise InvalidInput(f"schedule: integer feature {name!r} has nulls (an int64 column cannot say null)")
            out.append(np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64))
        else:
            out.append(np.asarray(pc.fill_null(column.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False),
                                  dtype=np.float64))
    return out


def encode_schedules(v: np.ndarray, columns: Sequence[np.ndarray], offsets: np.ndarray,
                     names: Sequence[str]) -> Piece:
    """One schedule per entity: entity ``g`` has rows ``offsets[g]:offsets[g + 1]`` of the
    change points ``v`` (int64 microseconds, ascending within an entity) and of every
    column (int64, or float64 with NaN for null), in ``names`` order. Each is the bytes
    ``schedule.encode`` gives for those rows."""
    if len(columns) != len(names):
        raise InvalidInput(f"schedule: {len(columns)} columns for {len(names)} feature names")
    offsets = np.asarray(offsets, dtype=np.int64)
    n = np.diff(offsets)  # rows per entity
    m = len(columns)
    head = _HEAD.size
    sizes = head + 8 * n + m * (1 + 8 * n)
    starts = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    out = np.empty(int(starts[-1]), dtype=np.uint8)
    # headers: the constant part, then each entity's row count
    const = np.frombuffer(_HEAD.pack(MAGIC, KERNEL_VERSION, 0, m, names_crc(names)), dtype=np.uint8)
    heads = np.broadcast_to(const, (len(n), head)).copy()
    heads[:, 4:8] = n.astype("<u4").view(np.uint8).reshape(-1, 4)
    out[starts[:-1, None] + np.arange(head)] = heads
    # each row's place within its entity
    total = int(offsets[-1] - offsets[0]) if len(offsets) else 0
    entity = np.repeat(np.arange(len(n)), n)
    within = np.arange(total) - np.repeat(offsets[:-1] - offsets[0], n)
    base = starts[:-1][entity]
    _scatter(out, base + head + 8 * within, np.asarray(v[offsets[0]:offsets[-1]], dtype="<i8"))
    block = 1 + 8 * n  # one column: its kind byte then 8 bytes a row
    for c, column in enumerate(columns):
        kind = b"i" if np.issubdtype(column.dtype, np.integer) else b"f"
        col_at = starts[:-1] + head + 8 * n + c * block
        out[col_at] = ord(kind)
        values = np.asarray(column[offsets[0]:offsets[-1]], dtype="<i8" if kind == b"i" else "<f8")
        _scatter(out, col_at[entity] + 1 + 8 * within, values)
    return rows.from_flat(out, starts)


def _scatter(out: np.ndarray, at: np.ndarray, values: np.ndarray) -> None:
    """Write the 8 bytes of ``values[i]`` at ``out[at[i]:at[i] + 8]``."""
    out[at[:, None] + _BYTES] = np.ascontiguousarray(values).view(np.uint8).reshape(-1, 8)
