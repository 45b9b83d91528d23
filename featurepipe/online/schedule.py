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

Layout (little endian), aligned so that the reader sees it as one array of 8-byte words::

    magic  b"FPS"   version u8 (= LAYOUT_VERSION)   k groups u32   m columns u16   names crc32 u32
    group  u8[m]    each column's group
    kind   u8[m]    each column's kind: b"i" int64, b"f" float64 (a NaN is null)
    zero bytes up to a multiple of 8
    k groups, each   n int64 (its rows), v int64[n] (microseconds since the epoch, strictly
                     ascending), then its columns in column order, 8 * n bytes each

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
from collections.abc import Callable, Sequence
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
KIND_INT, KIND_FLOAT = ord("i"), ord("f")

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


def header(groups: Sequence[int], kinds: bytes, names: Sequence[str], k: int | None = None) -> bytes:
    """What every schedule of a view starts with, padded to a multiple of 8 bytes: the header,
    the column groups and kinds (``k`` groups, by default one past the greatest in ``groups``)."""
    if not len(groups) == len(kinds) == len(names):
        raise InvalidInput(f"schedule: {len(groups)} column groups and {len(kinds)} kinds for {len(names)} "
                           "feature names")
    k = max(groups, default=-1) + 1 if k is None else k
    if any(not 0 <= g < k for g in groups) or k > 255 or set(kinds) - {KIND_INT, KIND_FLOAT}:
        raise InvalidInput(f"schedule: column groups {list(groups)} not all within {k} groups, or kinds {kinds!r} "
                           "not all b'i' or b'f'")
    head = _HEAD.pack(MAGIC, LAYOUT_VERSION, k, len(groups), names_crc(names)) + bytes(groups) + kinds
    return head + bytes(-len(head) % 8)


def kinds_of(columns: Sequence[np.ndarray]) -> bytes:
    """The kind of each column as a schedule stores it: b"i" for integers, b"f" otherwise."""
    import numpy as np

    return bytes(KIND_INT if np.issubdtype(c.dtype, np.integer) else KIND_FLOAT for c in columns)


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
    kinds = kinds_of(columns)
    head = header(groups, kinds, names, k)
    k = _HEAD.unpack_from(head)[2]
    row_groups = np.asarray(row_groups)
    if not len(row_groups) or row_groups[0] != -1 or (row_groups[1:] < 0).any() or \
            (row_groups[1:] >= k).any() or (np.diff(row_groups[1:]) < 0).any():
        raise InvalidInput("schedule: rows must be one of group -1, then each group's in order")
    parts = [head]
    for g in range(k):
        rows = np.concatenate([[0], np.flatnonzero(row_groups == g)])
        parts += [np.array([len(rows)], dtype="<i8").tobytes(), np.ascontiguousarray(np.asarray(v)[rows], dtype="<i8").tobytes()]
        for c, column in enumerate(columns):
            if groups[c] == g:
                parts.append(np.ascontiguousarray(column[rows], dtype="<i8" if kinds[c] == KIND_INT else "<f8").tobytes())
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
    kinds = data[_HEAD.size + m:_HEAD.size + 2 * m]
    words = np.frombuffer(data, dtype="<i8", offset=_words_start(m))
    at = 0
    vs, cols = [], [np.empty(0)] * m
    for g in range(k):
        n = int(words[at])
        vs.append(words[at + 1:at + 1 + n])
        at += 1 + n
        for c in range(m):
            if groups[c] == g:
                cols[c] = words[at:at + n] if kinds[c] == KIND_INT else words[at:at + n].view("<f8")
                at += n
    v = np.unique(np.concatenate(vs)) if vs else np.zeros(0, dtype=np.int64)
    found = [np.searchsorted(g_v, v, side="right") - 1 for g_v in vs]
    return Schedule(v, tuple(cols[c][found[groups[c]]] for c in range(m)), tuple(cols),
                    1 + sum(len(g_v) - 1 for g_v in vs))


def _words_start(m: int) -> int:
    """Where the groups start: after the header, groups and kinds, at a multiple of 8."""
    head = _HEAD.size + 2 * m
    return head + -head % 8


# --- the reader the server and the library call share (standard library only) -------------

_EMPTY_WINDOW: dict[str, int | float] = {"count": 0, "sum": 0.0}


def empty_value(function: str) -> int | float | None:
    """An aggregate's value over an empty window (no row in force yet): a count or a sum is
    0, anything else (mean, min, max, last) null."""
    return _EMPTY_WINDOW.get(function)


_CellsReader = Callable[[bytes, int, Sequence[int]], "tuple[int, list[tuple[int, int]]] | None"]
_compiled_cells: _CellsReader | None
try:  # the compiled reader (featurepipe/core/_native.c); without a C compiler, row_in_force below
    from featurepipe.core._native import schedule_cells as _compiled_cells
except ImportError:  # pragma: no cover (installed without a C compiler)
    _compiled_cells = None

_MALFORMED = "schedule field malformed; run `featurepipe materialize` to rebuild the online store"
_UNPACK_DOUBLE = struct.Struct("<d").unpack_from
_UNPACK_INT = struct.Struct("<q").unpack_from
_NATIVE_LITTLE = struct.pack("=q", 1) == struct.pack("<q", 1)

# per distinct column map (one per view): each column's group, kind, place among its group's
# columns, and each group's column count
_Layout = tuple[tuple[int, ...], bytes, tuple[int, ...], tuple[int, ...]]
_LAYOUTS: dict[bytes, _Layout] = {}


def _layout(columns: bytes, k: int, m: int) -> _Layout:
    found = _LAYOUTS.get(columns)
    if found is None:
        groups, kinds = columns[:m], columns[m:]
        counts = [0] * k
        place = []
        for g in groups:
            if g >= k:
                raise StaleSchedule("schedule with a column in no group; run `featurepipe materialize` to rebuild it")
            place.append(counts[g])
            counts[g] += 1
        found = (tuple(groups), bytes(kinds), tuple(place), tuple(counts))
        if len(_LAYOUTS) < 1024:
            _LAYOUTS[bytes(columns)] = found
    return found


class RowInForce:
    """The values of a stored schedule in force at an instant, read in place from its bytes.

    ``row`` is -1 when the instant is before the schedule's first change point (the
    schedule knows of no event before it: every window is empty), else 0 or more.
    :meth:`cell` gives a column's kind and the offset of its 8 bytes, :meth:`value` its
    Python value; ``v_us`` is the latest change point at or before the instant (of any
    group): when the values in force took effect.
    """

    __slots__ = ("data", "row", "v_us", "_layout", "_at")

    def __init__(self, data: bytes, row: int, v_us: int | None, layout: _Layout, at: list[int]) -> None:
        self.data, self.row, self.v_us, self._layout, self._at = data, row, v_us, layout, at

    def cell(self, column: int) -> tuple[int, int]:
        """``(kind, offset)``: the column's kind byte (:data:`KIND_INT` or :data:`KIND_FLOAT`)
        and where its 8 little-endian bytes in force start in ``data`` (``row`` >= 0)."""
        return self.cells((column,))[0]

    def cells(self, columns: Sequence[int]) -> list[tuple[int, int]]:
        """:meth:`cell` of each of ``columns`` (one call for a request's columns: the server's
        hot loop)."""
        groups, kinds, place, _ = self._layout
        at = self._at
        return [(kinds[c], at[2 * groups[c]] + 8 * at[2 * groups[c] + 1] * place[c]) for c in columns]

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
    copy, no NumPy: a header unpack, then the words as one int64 view and a binary search per
    group."""
    k, m = _checked_head(data, crc)
    layout = _layout(data[_HEAD.size:_HEAD.size + 2 * m], k, m)
    start = (_HEAD.size + 2 * m + 7) & ~7
    at: list[int] = []  # per group: the byte offset of its first column's row in force, and n
    v_us: int | None = None
    try:
        words: Sequence[int] = memoryview(data)[start:].cast("q") if _NATIVE_LITTLE else \
            struct.unpack_from(f"<{(len(data) - start) // 8}q", data, start)  # pragma: no cover (big-endian)
        i = 0
        for count in layout[3]:
            n = words[i]
            j = bisect_right(words, t_us, i + 1, i + 1 + n)
            if j > i + 1 and (v_us is None or words[j - 1] > v_us):
                v_us = words[j - 1]
            at += (start + 8 * (j - 1 + n), n)
            i += 1 + n + count * n
    except (TypeError, IndexError):  # a length not a multiple of 8, or a count past the end
        i = -1
    if 8 * i + start != len(data):
        raise StaleSchedule(_MALFORMED)
    row = (at[0] - start) // 8 - at[1] - 1 if at else -1  # the first group's row (they all start at v0)
    return RowInForce(data, row, v_us, layout, at)


def cells_in_force(data: bytes, crc: int, t_us: int, columns: Sequence[int]
                   ) -> tuple[int, list[tuple[int, int]]] | None:
    """What the server needs of a stored schedule at ``t_us``: None before its first change
    point (every window empty), else the latest change point at or before ``t_us`` and, for
    each of ``columns``, its kind and the offset of its 8 bytes in force (as
    :meth:`RowInForce.cells`). Checked as :func:`row_in_force` checks; the compiled reader
    when it was built, else :func:`row_in_force` (the same answer: tested)."""
    if _compiled_cells is not None:
        _checked_head(data, crc)
        try:
            found: tuple[int, list[tuple[int, int]]] | None = _compiled_cells(data, t_us, columns)
        except ValueError:
            raise StaleSchedule(_MALFORMED) from None
        return found
    in_force = row_in_force(data, crc, t_us)
    return None if in_force.row < 0 else (in_force.v_us or 0, in_force.cells(columns))
