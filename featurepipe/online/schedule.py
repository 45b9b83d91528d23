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

Pure NumPy and the standard library: the serving process imports it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featurepipe.core.errors import InvalidInput
from featurepipe.core.windows import KERNEL_VERSION

MAGIC = b"FPS"
_HEAD = struct.Struct("<3sBIHI")


def schedule_field(view: str) -> bytes:
    """The entity-hash field holding ``view``'s schedule."""
    return f"_fp_sched:{view}".encode()


def names_crc(names: Sequence[str]) -> int:
    """The checksum of a view's feature names, in column order."""
    return zlib.crc32(",".join(names).encode())


def encode(v: np.ndarray, columns: Sequence[np.ndarray], names: Sequence[str]) -> bytes:
    """One entity's schedule: change points ``v`` (int64 microseconds, ascending) and one
    column per feature (int64, or float64 with NaN for null), in ``names`` order."""
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
        return int(np.searchsorted(self.v, t_us, side="right")) - 1


class StaleSchedule(InvalidInput):
    """A schedule written by another kernel version or for other feature names."""


def decode(data: bytes, names: Sequence[str] | None = None) -> Schedule:
    """Read a schedule; with ``names``, check it was written for exactly these features."""
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
