"""Many entities' schedules at once, as one more field of the rows a writer sends.

:func:`featurepipe.online.schedule.encode` builds one entity's schedule; a writer has
thousands per batch. :func:`encode_schedules` builds them all in one pass of the compiled
part over NumPy arrays (no Python per entity), byte for byte what ``encode`` gives each
entity, as a
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

from featurepipe.core.errors import InvalidInput
from featurepipe.core.native import NativeKernels, kernels
from featurepipe.online.rows import Piece
from featurepipe.online.schedule import KIND_INT, encode, header, kinds_of

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
            # Arrow gives a float column's nulls as NaN
            out.append(np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64))
    return out


def encode_schedules(v: np.ndarray, row_groups: np.ndarray, columns: Sequence[np.ndarray], offsets: np.ndarray,
                     groups: Sequence[int], names: Sequence[str], k: int | None = None,
                     use_compiled: bool = True) -> Piece:
    """One schedule per entity: entity ``e`` has rows ``offsets[e]:offsets[e + 1]`` of the
    change points ``v`` (int64 microseconds), of ``row_groups`` (-1 on its first row, then
    each group's rows in group then ``v`` order: :func:`~featurepipe.core.windows.schedule_sql`)
    and of every column (int64, or float64 with NaN for null), in ``names`` order, column
    ``c`` in group ``groups[c]`` of ``k`` (:func:`~featurepipe.online.schedule.header`). Each is the bytes ``schedule.encode`` gives for those rows,
    written straight into the padded matrix of the returned
    :class:`~featurepipe.online.rows.Piece` (entities of similar lengths together waste the
    least padding). The compiled part (``_native.c``) builds them when it was built;
    ``use_compiled=False`` takes the NumPy path (the tests' second opinion)."""
    if len(columns) != len(names):
        raise InvalidInput(f"schedule: {len(columns)} columns for {len(names)} feature names")
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    kinds = kinds_of(columns)
    head = header(groups, kinds, names, k)
    rows = max(len(offsets) - 1, 0)
    if use_compiled and compiled is not None:
        cols = [np.ascontiguousarray(c, dtype="<i8" if kind == KIND_INT else "<f8") for c, kind in zip(columns, kinds)]
        data, lengths = compiled.schedules(np.ascontiguousarray(v, dtype="<i8"),
                                           np.ascontiguousarray(row_groups, dtype="<i8"), cols, kinds, offsets, head)
        return Piece(np.frombuffer(data, dtype=np.uint8).reshape(rows, len(data) // rows if rows else 0),
                     np.frombuffer(lengths, dtype=np.int64))
    # one entity at a time with the reference encoder (slow, but only without a C compiler)
    v, row_groups = np.asarray(v), np.asarray(row_groups)
    each = [encode(v[lo:hi], row_groups[lo:hi], [c[lo:hi] for c in columns], groups, names, k)
            for lo, hi in zip(offsets[:-1], offsets[1:])]
    sizes = np.array([len(b) for b in each], dtype=np.int64)
    out = np.zeros((rows, int(sizes.max()) if rows else 0), dtype=np.uint8)
    for e, data in enumerate(each):
        out[e, :len(data)] = np.frombuffer(data, dtype=np.uint8)
    return Piece(out, sizes)
