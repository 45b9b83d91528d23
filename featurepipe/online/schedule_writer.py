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
from featurepipe.core.native import NativeKernels, kernels
from featurepipe.core.windows import KERNEL_VERSION
from featurepipe.online.rows import Piece
from featurepipe.online.schedule import _HEAD, MAGIC, names_crc

_BYTES = np.arange(8)
compiled: NativeKernels | None = kernels  # None: not compiled, NumPy only


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
                     names: Sequence[str], use_compiled: bool = True) -> Piece:
    """One schedule per entity: entity ``g`` has rows ``offsets[g]:offsets[g + 1]`` of the
    change points ``v`` (int64 microseconds, ascending within an entity) and of every
    column (int64, or float64 with NaN for null), in ``names`` order. Each is the bytes
    ``schedule.encode`` gives for those rows, written straight into the padded matrix of
    the returned :class:`~featurepipe.online.rows.Piece` (entities of similar lengths
    together waste the least padding). The compiled part (``_native.c``) builds them when it
    was built; ``use_compiled=False`` takes the NumPy path (the tests' second opinion)."""
    if len(columns) != len(names):
        raise InvalidInput(f"schedule: {len(columns)} columns for {len(names)} feature names")
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if use_compiled and compiled is not None:
        kinds = bytes(b"i"[0] if np.issubdtype(c.dtype, np.integer) else b"f"[0] for c in columns)
        cols = [np.ascontiguousarray(c, dtype="<i8" if k == b"i"[0] else "<f8") for c, k in zip(columns, kinds)]
        data, lengths = compiled.schedules(np.ascontiguousarray(v, dtype="<i8"), cols, kinds, offsets,
                                           _HEAD.pack(MAGIC, KERNEL_VERSION, 0, len(columns), names_crc(names)))
        rows = max(len(offsets) - 1, 0)
        return Piece(np.frombuffer(data, dtype=np.uint8).reshape(rows, len(data) // rows if rows else 0),
                     np.frombuffer(lengths, dtype=np.int64))
    n = np.diff(offsets)  # rows per entity
    m, head = len(columns), _HEAD.size
    sizes = head + 8 * n + m * (1 + 8 * n)
    if not len(n):
        return Piece(np.zeros((0, 0), dtype=np.uint8), sizes.astype(np.int64))
    width = int(sizes.max())
    out = np.zeros((len(n), width), dtype=np.uint8)
    flat = out.reshape(-1)
    starts = np.arange(len(n), dtype=np.int64) * width  # each entity's first byte in ``flat``
    # headers: the constant part, then each entity's row count
    out[:, :head] = np.frombuffer(_HEAD.pack(MAGIC, KERNEL_VERSION, 0, m, names_crc(names)), dtype=np.uint8)
    out[:, 4:8] = n.astype("<u4").view(np.uint8).reshape(-1, 4)
    # each row's entity and place within it
    first = int(offsets[0]) if len(offsets) else 0
    entity = np.repeat(np.arange(len(n)), n)
    within = np.arange(len(entity)) - (offsets[:-1] - first)[entity]
    base = starts[entity]
    _scatter(flat, base + head + 8 * within, np.asarray(v[first:first + len(entity)], dtype="<i8"))
    block = 1 + 8 * n  # one column: its kind byte then 8 bytes a row
    for c, column in enumerate(columns):
        integer = np.issubdtype(column.dtype, np.integer)
        col_at = starts + head + 8 * n + c * block
        flat[col_at] = ord(b"i" if integer else b"f")
        values = np.asarray(column[first:first + len(entity)], dtype="<i8" if integer else "<f8")
        _scatter(flat, col_at[entity] + 1 + 8 * within, values)
    return Piece(out, sizes.astype(np.int64))


def _scatter(out: np.ndarray, at: np.ndarray, values: np.ndarray) -> None:
    """Write the 8 bytes of ``values[i]`` at ``out[at[i]:at[i] + 8]``."""
    out[at[:, None] + _BYTES] = np.ascontiguousarray(values).view(np.uint8).reshape(-1, 8)
