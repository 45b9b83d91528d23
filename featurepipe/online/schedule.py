"""An entity's window schedule: the online form of request-time windows.

For a windowed-aggregate view, the kernel (:mod:`featurepipe.core.windows`) gives one row
per change point ``v``: values valid for ``v <= t`` until the next row. Online, each entity
keeps, in one more field of Feast's entity hash (``_fp_sched:<view>``), the row in force
when it was written and every change still to come, so that the value at the request's
clock ``t`` is read, not computed: the same bits as the offline join at ``t``.

A window's values only change when one of *its own* hop buckets leaves it, so the schedule
is stored per *group* (:func:`featurepipe.core.windows.schedule_groups`: one per distinct
window, and one for the aggregates without a window): each group its own change points and
its own columns, starting at the same first change point (just after the entity's newest
event). The value of a column at ``t`` is its group's row with the greatest ``v <= t``: a
binary search per group, no aggregate arithmetic. Nothing is repeated, so a schedule is a
fraction of whole rows (measured in docs/benchmarks.md).

Layout (little endian)::

    magic  b"FPS"   version u8 (= LAYOUT_VERSION)   k groups u32   m columns u16   names crc32 u32
    group  u8[m]    each column's group
    k groups, each   n rows u32   v int64[n] (microseconds since the epoch, strictly ascending)
                     then its columns in column order, each  kind u8 (b"i": int64, b"f": float64)
                     and 8 * n bytes; a float NaN is null

``names crc32`` is the CRC-32 of the view's feature names joined with ``,`` in column order:
a reader whose registry orders or names the features differently refuses the schedule
rather than serve one feature's values under another's name. The version changes with the
kernel's (:data:`~featurepipe.core.windows.KERNEL_VERSION`) or this layout; a reader refuses
any other (version 2 stored whole rows).

:func:`encode` and :func:`decode` use NumPy (imported when first called); the reader the
server and the library call share (:func:`row_in_force`, :class:`RowInForce`) is the
standard library alone, so the serving process, which never imports NumPy, reads it too.
"""

from __future__ import annotations

import struct
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from featurepipe.core.errors import InvalidInput
from featurepipe.core.windows import KERNEL_VERSION

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"FPS"
LAYOUT_VERSION = 3
"""Version byte of a schedule: 2 was kernel 2's whole rows, 3 the same kernel's groups."""
_HEAD = struct.Struct("<3sBIHI")
HEADER_SIZE = _HEAD.size  # the column groups start here
_COUNT = struct.Struct("<I")

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


def header(groups: Sequence[int], names: Sequence[str], k: int | None = None) -> bytes:
    """What every schedule of a view starts with: the header and the column groups (``k``
    groups, by default one past the greatest in ``groups``)."""
    if len(groups) != len(names):
        raise InvalidInput(f"schedule: {len(groups)} column groups for {len(names)} feature names")
    k = max(groups, default=-1) + 1 if k is None else k
    if any(not 0 <= g < k for g in groups) or k > 255:
        raise InvalidInput(f"schedule: column groups {list(groups)} not all within {k} groups")
    return _HEAD.pack(MAGIC, LAYOUT_VERSION, k, len(groups), names_crc(names)) + bytes(groups)


def encode(v: np.ndarray, row_groups: np.ndarray, columns: Sequence[np.ndarray], groups: Sequence[int],
           names: Sequence[str], k: int | None = None) -> bytes:
    """One entity's schedule from the rows of :func:`~featurepipe.core.windows.schedule_sql`
    (sorted by group then ``v``): change points ``v`` (int64 microseconds), each row's group
    ``row_groups`` (-1 on the first row, which has every column, then each group's rows) and
    one column per feature (int64, or float64 with NaN for null) in ``names`` order, each in
    group ``groups[c]`` of ``k`` (see :func:`header`)."""
    import numpy as np

    if len(columns) != len(names):
        raise InvalidInput(f"schedule: {len(columns)} columns for {len(names)} feature names")
    head = header(groups, names, k)
    k = _HEAD.unpack_from(head)[2]
    row_groups = np.asarray(row_groups)
    if not len(row_groups) or row_groups[0] != -1 or (row_groups[1:] < 0).any() or \
            (row_groups[1:] >= k).any() or (np.diff(row_groups[1:]) < 0).any():
        raise InvalidInput("schedule: rows must be one of group -1, then each group's in order")
    parts = [head]
    for g in range(k):
        rows = np.concatenate([[0], np.flatnonzero(row_groups == g)])
        parts += [_COUNT.pack(len(rows)), np.ascontiguousarray(np.asarray(v)[rows], dtype="<i8").tobytes()]
        for c, column in enumerate(columns):
            if groups[c] != g:
                continue
            if np.issubdtype(column.dtype, np.integer):
                parts += [b"i", np.ascontiguousarray(column[rows], dtype="<i8").tobytes()]
            else:
                parts += [b"f", np.ascontiguousarray(column[rows], dtype="<f8").tobytes()]
    return b"".join(parts)


@dataclass(frozen=True)
class Schedule:
    """A decoded schedule as whole rows: every distinct change point of its groups, and
    each column's value in force there."""

    v: np.ndarray
    columns: tuple[np.ndarray, ...]
    stored: tuple[np.ndarray, ...] = ()  # each column's values as stored (its group's rows)
    stored_rows: int = 0  # the kernel rows it was encoded from: the first, then every group's others

    def row_at(self, t_us: int) -> int:
        """The index of the row in force at ``t_us`` (the greatest ``v <= t``), or -1 when
        ``t`` is before the first row (the entity had no event before ``t`` as far as this
        schedule knows)."""
        import numpy as np

        return int(np.searchsorted(self.v, t_us, side="right")) - 1


class StaleSchedule(InvalidInput):
    """A schedule written by another kernel version or for other feature names."""


def _checked_head(data: bytes, crc: int | None) -> tuple[int, int]:
    """``(k, m)`` of a schedule of this layout written for the features of ``crc`` (any with
    None); raises :class:`StaleSchedule` otherwise."""
    if len(data) < _HEAD.size:
        raise StaleSchedule("schedule field too short; run `featurepipe materialize` to rebuild the online store")
    magic, version, k, m, written_for = _HEAD.unpack_from(data)
    if magic != MAGIC or version != LAYOUT_VERSION:
        raise StaleSchedule(
            f"online schedule of version {version} (this featurepipe reads {LAYOUT_VERSION}: kernel "
            f"{KERNEL_VERSION}, values per window); run `featurepipe materialize` to rebuild the online store"
        )
    if crc is not None and written_for != crc:
        raise StaleSchedule(
            "online schedule written for other feature names (the view changed since it was materialised); "
            "run `featurepipe materialize` to rebuild the online store"
        )
    return k, m


def decode(data: bytes, names: Sequence[str] | None = None) -> Schedule:
    """Read a schedule as whole rows; with ``names``, check it was written for exactly these
    features."""
    import numpy as np

    k, m = _checked_head(data, None if names is None else names_crc(names))
    groups = list(data[_HEAD.size:_HEAD.size + m])
    offset = _HEAD.size + m
    vs, cols = [], [np.empty(0)] * m
    for g in range(k):
        (n,) = _COUNT.unpack_from(data, offset)
        offset += 4
        vs.append(np.frombuffer(data, dtype="<i8", count=n, offset=offset))
        offset += 8 * n
        for c in range(m):
            if groups[c] == g:
                kind = data[offset:offset + 1]
                cols[c] = np.frombuffer(data, dtype="<i8" if kind == b"i" else "<f8", count=n, offset=offset + 1)
                offset += 1 + 8 * n
    v = np.unique(np.concatenate(vs)) if vs else np.zeros(0, dtype=np.int64)
    at = [np.searchsorted(g_v, v, side="right") - 1 for g_v in vs]
    return Schedule(v, tuple(cols[c][at[groups[c]]] for c in range(m)), tuple(cols),
                    1 + sum(len(g_v) - 1 for g_v in vs))


# --- the reader the server and the library call share (standard library only) -------------

_EMPTY_WINDOW: dict[str, int | float] = {"count": 0, "sum": 0.0}


def empty_value(function: str) -> int | float | None:
    """An aggregate's value over an empty window (no row in force yet): a count or a sum is
    0, anything else (mean, min, max, last) null."""
    return _EMPTY_WINDOW.get(function)


_UNPACK_DOUBLE = struct.Struct("<d").unpack_from
_UNPACK_INT = struct.Struct("<q").unpack_from
_UNPACK_COUNT = _COUNT.unpack_from
_NATIVE_LITTLE = struct.pack("=q", 1) == struct.pack("<q", 1)
KIND_INT, KIND_FLOAT = ord("i"), ord("f")

# per distinct column-group map (one per view): each column's group, its place among its
# group's columns, and each group's column count
_LAYOUTS: dict[bytes, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}


def _layout(groups: bytes, k: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    found = _LAYOUTS.get(groups)
    if found is None:
        counts = [0] * k
        place = []
        for g in groups:
            if g >= k:
                raise StaleSchedule("schedule with a column in no group; run `featurepipe materialize` to rebuild it")
            place.append(counts[g])
            counts[g] += 1
        found = (tuple(groups), tuple(place), tuple(counts))
        if len(_LAYOUTS) < 1024:
            _LAYOUTS[bytes(groups)] = found
    return found


class RowInForce:
    """The values of a stored schedule in force at an instant, read in place from its bytes.

    ``row`` is -1 when the instant is before the schedule's first change point (the
    schedule knows of no event before it: every window is empty), else 0 or more.
    :meth:`cell` gives a column's kind and the offset of its 8 bytes, :meth:`value` its
    Python value; ``v_us`` is the latest change point at or before the instant (of any
    group): when the values in force took effect.
    """

    __slots__ = ("data", "row", "v_us", "_group", "_place", "_kinds", "_steps", "_rows")

    def __init__(self, data: bytes, row: int, v_us: int | None, group: tuple[int, ...], place: tuple[int, ...],
                 kinds: list[int], steps: list[int], rows: list[int]) -> None:
        self.data, self.row, self.v_us = data, row, v_us
        self._group, self._place, self._kinds, self._steps, self._rows = group, place, kinds, steps, rows

    def cell(self, column: int) -> tuple[int, int]:
        """``(kind, offset)``: the column's kind byte (:data:`KIND_INT` or :data:`KIND_FLOAT`)
        and where its 8 little-endian bytes in force start in ``data`` (``row`` >= 0)."""
        g = self._group[column]
        at = self._kinds[g] + self._place[column] * self._steps[g]
        return self.data[at], at + 1 + 8 * self._rows[g]

    def value(self, column: int) -> int | float | None:
        """The column's value in force as Python gives it (a float NaN is None)."""
        kind, at = self.cell(column)
        if kind == KIND_INT:
            return int(_UNPACK_INT(self.data, at)[0])
        x = float(_UNPACK_DOUBLE(self.data, at)[0])
        return None if x != x else x


def row_in_force(data: bytes, crc: int, t_us: int) -> RowInForce:
    """The values of the stored schedule ``data`` in force at ``t_us`` (in each group, the
    row with the greatest ``v <= t``), checked first to be of this layout and written for
    the features whose :func:`names_crc` is ``crc`` (raises :class:`StaleSchedule`). No
    copy, no NumPy: a header unpack and a binary search per group."""
    k, m = _checked_head(data, crc)
    group, place, counts = _layout(data[_HEAD.size:_HEAD.size + m], k)
    at = _HEAD.size + m
    view = memoryview(data) if _NATIVE_LITTLE else None
    kinds, steps, rows = [], [], []
    v_us: int | None = None
    for g in range(k):
        (n,) = _UNPACK_COUNT(data, at)
        at += 4
        if view is not None:
            changes: Sequence[int] = view[at:at + 8 * n].cast("q")
        else:  # pragma: no cover (big-endian machines)
            changes = struct.unpack_from(f"<{n}q", data, at)
        r = bisect_right(changes, t_us) - 1
        if r >= 0 and (v_us is None or changes[r] > v_us):
            v_us = changes[r]
        at += 8 * n
        kinds.append(at)
        steps.append(1 + 8 * n)
        rows.append(r)
        at += counts[g] * (1 + 8 * n)
    if len(data) < at:
        raise StaleSchedule("schedule field cut short; run `featurepipe materialize` to rebuild the online store")
    return RowInForce(data, rows[0] if rows else -1, v_us, group, place, kinds, steps, rows)
