"""An entity's window schedule: the online form of request-time windows.

For a windowed-aggregate view, the kernel (:mod:`featurepipe.core.windows`) gives one row
per change point ``v``: values valid for ``v <= t`` until the next row. Online, each entity
keeps, in one more field of Feast's entity hash (``_fp_sched:<view>``), the row in force
when it was written and every row still to come (the drops of its non-empty hop buckets,
at most one per bucket), so that the value at the request's clock ``t`` is the row with
the greatest ``v <= t``: a binary search, no aggregate arithmetic, the same bits as the
offline join at ``t``.

Layout (little endian)::

    magic  b"FPS"   version u8 (= KERNEL_VERSION)   n rows u32   m columns u16   names crc32 u32
    v      int64[n]   microseconds since the epoch, strictly ascending
    m columns, each  kind u8 (b"i": int64, b"f": float64) then 8 * n bytes; a float NaN is null

``names crc32`` is the CRC-32 of the view's feature names joined with ``,`` in column order:
a reader whose registry orders or names the features differently refuses the schedule
rather than serve one feature's values under another's name.

:func:`encode` and :func:`decode` use NumPy (imported when first called); the reader the
server and the library call share (:func:`open_schedule`, :class:`ScheduleCells`) is the
standard library alone, so the serving process, which never imports NumPy, reads it too.
"""

from __future__ import annotations

import struct
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from featurepipe.core.errors import InvalidInput
from featurepipe.core.windows import KERNEL_VERSION

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"FPS"
_HEAD = struct.Struct("<3sBIHI")
HEADER_SIZE = _HEAD.size  # the change points start here


_FIELD_PREFIX = b"_fp_sched:"


def schedule_field(view: str) -> bytes:
    """The entity-hash field holding ``view``'s schedule."""
    return _FIELD_PREFIX + view.encode()


def is_schedule_field(field: bytes) -> bool:
    """Whether a hash field holds a view's schedule (see :func:`schedule_field`)."""
    return field.startswith(_FIELD_PREFIX)


def names_crc(names: Sequence[str]) -> int:
    """The checksum of a view's feature names, in column order."""
    return zlib.crc32(",".join(names).encode())


def encode(v: np.ndarray, columns: Sequence[np.ndarray], names: Sequence[str]) -> bytes:
    """One entity's schedule: change points ``v`` (int64 microseconds, ascending) and one
    column per feature (int64, or float64 with NaN for null), in ``names`` order."""
    import numpy as np

    if len(columns) != len(names):
        raise InvalidInput(f"schedule: {len(columns)} columns for {len(names)} feature names")
    v = np.ascontiguousarray(v, dtype="<i8")
    parts = [_HEAD.pack(MAGIC, KERNEL_VERSION, len(v), len(columns), names_crc(names)), v.tobytes()]
    for column in columns:
        if np.issubdtype(column.dtype, np.integer):
            parts += [b"i", np.ascontiguousarray(column, dtype="<i8").tobytes()]
        else:
            parts += [b"f", np.ascontiguousarray(column, dtype="<f8").tobytes()]
    return b"".join(parts)


@dataclass(frozen=True)
class Schedule:
    """A decoded schedule: change points and columns (views into the stored bytes)."""

    v: np.ndarray
    columns: tuple[np.ndarray, ...]

    def row_at(self, t_us: int) -> int:
        """The index of the row in force at ``t_us`` (the greatest ``v <= t``), or -1 when
        ``t`` is before the first row (the entity had no event before ``t`` as far as this
        schedule knows)."""
        import numpy as np

        return int(np.searchsorted(self.v, t_us, side="right")) - 1


class StaleSchedule(InvalidInput):
    """A schedule written by another kernel version or for other feature names."""


def decode(data: bytes, names: Sequence[str] | None = None) -> Schedule:
    """Read a schedule; with ``names``, check it was written for exactly these features."""
    import numpy as np

    if len(data) < _HEAD.size:
        raise StaleSchedule("schedule field too short; run `featurepipe materialize` to rebuild the online store")
    magic, version, n, m, crc = _HEAD.unpack_from(data)
    if magic != MAGIC or version != KERNEL_VERSION:
        raise StaleSchedule(
            f"online schedule of kernel version {version} (this featurepipe reads {KERNEL_VERSION}); "
            "run `featurepipe materialize` to rebuild the online store"
        )
    if names is not None and crc != names_crc(names):
        raise StaleSchedule(
            "online schedule written for other feature names (the view changed since it was materialised); "
            "run `featurepipe materialize` to rebuild the online store"
        )
    offset = _HEAD.size
    v = np.frombuffer(data, dtype="<i8", count=n, offset=offset)
    offset += 8 * n
    columns = []
    for _ in range(m):
        kind = data[offset:offset + 1]
        offset += 1
        columns.append(np.frombuffer(data, dtype="<i8" if kind == b"i" else "<f8", count=n, offset=offset))
        offset += 8 * n
    return Schedule(v, tuple(columns))


# --- the reader the server and the library call share (standard library only) -------------

_EMPTY_WINDOW: dict[str, int | float] = {"count": 0, "sum": 0.0}


def empty_value(function: str) -> int | float | None:
    """An aggregate's value over an empty window (no row in force yet): a count or a sum is
    0, anything else (mean, min, max, last) null."""
    return _EMPTY_WINDOW.get(function)


_UNPACK_DOUBLE = struct.Struct("<d").unpack_from
_UNPACK_INT = struct.Struct("<q").unpack_from
_NATIVE_LITTLE = struct.pack("=q", 1) == struct.pack("<q", 1)
KIND_INT, KIND_FLOAT = ord("i"), ord("f")


class RowInForce(NamedTuple):
    """The row of a stored schedule in force at an instant, read in place from its bytes.

    ``row`` is -1 when the instant is before the schedule's first change point (the
    schedule knows of no event before it: every window is empty). :meth:`cell` gives a
    column's kind and the offset of its 8 bytes, :meth:`value` its Python value.
    """

    data: bytes
    n: int
    row: int

    @property
    def v_us(self) -> int | None:
        """The change point of the row (microseconds), None when ``row`` is -1."""
        return _UNPACK_INT(self.data, _HEAD.size + 8 * self.row)[0] if self.row >= 0 else None

    def cell(self, column: int) -> tuple[int, int]:
        """``(kind, offset)``: the column's kind byte (:data:`KIND_INT` or :data:`KIND_FLOAT`)
        and where the row's 8 little-endian bytes start in ``data`` (``row`` >= 0)."""
        at = _HEAD.size + 8 * self.n + column * (1 + 8 * self.n)
        return self.data[at], at + 1 + 8 * self.row

    def value(self, column: int) -> int | float | None:
        """The column's value in this row as Python gives it (a float NaN is None)."""
        kind, at = self.cell(column)
        if kind == KIND_INT:
            return int(_UNPACK_INT(self.data, at)[0])
        x = float(_UNPACK_DOUBLE(self.data, at)[0])
        return None if x != x else x


def row_in_force(data: bytes, crc: int, t_us: int) -> RowInForce:
    """The row of the stored schedule ``data`` in force at ``t_us`` (the greatest ``v <= t``),
    checked first to be of this kernel version and written for the features whose
    :func:`names_crc` is ``crc`` (raises :class:`StaleSchedule`). No copy, no NumPy: a
    header unpack and a binary search over the change points."""
    if len(data) < _HEAD.size:
        raise StaleSchedule("schedule field too short; run `featurepipe materialize` to rebuild the online store")
    magic, version, n, _m, written_for = _HEAD.unpack_from(data)
    if magic != MAGIC or version != KERNEL_VERSION:
        raise StaleSchedule(
            f"online schedule of kernel version {version} (this featurepipe reads {KERNEL_VERSION}); "
            "run `featurepipe materialize` to rebuild the online store"
        )
    if written_for != crc:
        raise StaleSchedule(
            "online schedule written for other feature names (the view changed since it was materialised); "
            "run `featurepipe materialize` to rebuild the online store"
        )
    if _NATIVE_LITTLE:
        changes: Sequence[int] = memoryview(data)[_HEAD.size:_HEAD.size + 8 * n].cast("q")
    else:  # pragma: no cover (big-endian machines)
        changes = struct.unpack_from(f"<{n}q", data, _HEAD.size)
    return RowInForce(data, n, bisect_right(changes, t_us) - 1)
