"""Byte strings for many rows at once, built column by column with NumPy.

A :class:`Piece` holds one byte string per row as a padded matrix: row ``i`` is
``data[i, :lengths[i]]``. Encoders produce pieces (a varint, a length header, a value)
and :func:`join` lays them side by side and squeezes out the padding in one pass, giving
every row's concatenation as one flat buffer plus offsets, the layout of an Arrow
binary array. No Python runs per row.

Example: the RESP bulk string ``$<len>\\r\\n<bytes>\\r\\n`` of every value is
``join([decimal(lengths, b"$", b"\\r\\n"), value, constant(b"\\r\\n", n)])``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

_POW10 = 10 ** np.arange(20, dtype=np.uint64)


@dataclass(frozen=True)
class Piece:
    """One byte string per row: ``data[i, :lengths[i]]`` (``lengths`` None: all of ``data[i]``)."""

    data: np.ndarray  # (n, width) uint8; may be a read-only broadcast for constants
    lengths: np.ndarray | None = None  # (n,) int64

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def width(self) -> int:
        return int(self.data.shape[1])

    def row_lengths(self) -> np.ndarray:
        """Byte length of every row (int64)."""
        if self.lengths is None:
            return np.full(self.rows, self.width, dtype=np.int64)
        return self.lengths

    def take(self, index: np.ndarray) -> Piece:
        """The rows at ``index``, in that order."""
        return Piece(self.data[index], None if self.lengths is None else self.lengths[index])


def constant(value: bytes, rows: int) -> Piece:
    """The same bytes in every row (no copy: a broadcast view)."""
    row = np.frombuffer(value, dtype=np.uint8)
    return Piece(np.broadcast_to(row, (rows, len(value))))


def fixed(data: np.ndarray, present: np.ndarray | None = None) -> Piece:
    """``data[i]`` for rows where ``present`` is true, nothing for the others."""
    data = np.asarray(data, dtype=np.uint8)
    if present is None or bool(present.all()):
        return Piece(data)
    return Piece(data, np.where(present, data.shape[1], 0).astype(np.int64))


def layout(pieces: Sequence[Piece]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pieces side by side in one padded matrix: ``(buffer, valid-byte mask or None, row lengths)``."""
    rows = pieces[0].rows
    width = sum(p.width for p in pieces)
    buf = np.empty((rows, width), dtype=np.uint8)
    mask: np.ndarray | None = None
    total = np.zeros(rows, dtype=np.int64)
    pos = 0
    for p in pieces:
        w = p.width
        buf[:, pos:pos + w] = p.data
        if p.lengths is not None:
            if mask is None:
                mask = np.ones((rows, width), dtype=bool)
            np.less(np.arange(w), p.lengths[:, None], out=mask[:, pos:pos + w])
            total += p.lengths
        else:
            total += w
        pos += w
    return buf, mask, total


def compact(buf: np.ndarray, mask: np.ndarray | None, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The valid bytes of a :func:`layout`, row after row, and the row offsets."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (buf.reshape(-1) if mask is None else buf[mask]), offsets


def right_aligned(buf: np.ndarray, mask: np.ndarray | None, lengths: np.ndarray, multiple: int = 1) -> np.ndarray:
    """The valid bytes of each row at the right end of a zero-padded matrix."""
    width = int(lengths.max(initial=0))
    width += (-width) % multiple
    out = np.zeros((len(lengths), width), dtype=np.uint8)
    target = np.arange(width) >= (width - lengths)[:, None]
    out[target] = buf.reshape(-1) if mask is None else buf[mask]
    return out


def join(pieces: Sequence[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """Every row's pieces concatenated: a flat uint8 buffer and int64 offsets (rows + 1)."""
    return compact(*layout(pieces))


def prepend(head: np.ndarray | np.uint8, piece: Piece, present: np.ndarray | None = None) -> Piece:
    """One byte ``head[i]`` (a scalar or one per row) before every row, cheaply.

    Rows where ``present`` is false become empty.
    """
    n = piece.rows
    out = np.empty((n, piece.width + 1), dtype=np.uint8)
    out[:, 0] = head
    out[:, 1:] = piece.data
    lengths = piece.row_lengths() + 1
    if present is not None:
        lengths = np.where(present, lengths, 0)
    elif piece.lengths is None:
        return Piece(out)
    return Piece(out, lengths.astype(np.int64))


def append(piece: Piece, tail: Piece) -> Piece:
    """``tail`` after every row of ``piece``, placed column by column (cheap when ``tail`` is narrow)."""
    n = piece.rows
    out = np.zeros((n, piece.width + tail.width), dtype=np.uint8)
    out[:, :piece.width] = piece.data
    if piece.lengths is None:
        out[:, piece.width:] = tail.data
    else:
        index = np.arange(n)
        for j in range(tail.width):
            out[index, piece.lengths + j] = tail.data[:, j]
    if piece.lengths is None and tail.lengths is None:
        return Piece(out)
    return Piece(out, piece.row_lengths() + tail.row_lengths())


def pack(pieces: Sequence[Piece]) -> Piece:
    """Like :func:`join`, but kept as one padded :class:`Piece` (to nest in other pieces)."""
    if all(p.lengths is None for p in pieces):
        return Piece(np.concatenate([np.asarray(p.data) for p in pieces], axis=1))
    flat, offsets = join(pieces)
    return from_flat(flat, offsets, sum(p.width for p in pieces))


def from_flat(flat: np.ndarray, offsets: np.ndarray, width: int | None = None) -> Piece:
    """A padded piece from a flat buffer and offsets (an Arrow binary array's layout)."""
    lengths = np.diff(offsets).astype(np.int64)
    rows = len(lengths)
    width = int(lengths.max(initial=0)) if width is None else width
    out = np.zeros((rows, max(width, 0)), dtype=np.uint8)
    total = int(offsets[-1] - offsets[0])
    if total:
        starts = offsets[:-1] - offsets[0]
        dest = np.arange(total, dtype=np.int64) + np.repeat(
            np.arange(rows, dtype=np.int64) * width - starts, lengths
        )
        out.reshape(-1)[dest] = flat[offsets[0]:offsets[-1]]
    return Piece(out, lengths)


def from_arrow_binary(array: pa.Array) -> Piece:
    """A padded piece from an Arrow binary/string array (nulls: empty)."""
    offset_type: type[np.int64] | type[np.int32]
    if pa.types.is_large_binary(array.type) or pa.types.is_large_string(array.type):
        offset_type = np.int64
    else:
        array = array.cast(pa.binary()) if pa.types.is_string(array.type) else array
        offset_type = np.int32
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[array.offset:array.offset + len(array) + 1]
    flat = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return from_flat(flat, offsets.astype(np.int64))


def varint(values: np.ndarray) -> Piece:
    """Protobuf base-128 varints of uint64 values (negative int64: pass ``.view(np.uint64)``)."""
    v = np.asarray(values, dtype=np.uint64)
    n = len(v)
    top = int(v.max(initial=0))
    width = max(1, (top.bit_length() + 6) // 7)
    lengths = np.ones(n, dtype=np.int64)
    for k in range(1, width):
        lengths += v >= np.uint64(1 << (7 * k))
    out = np.empty((n, width), dtype=np.uint8)
    seven, low = np.uint64(7), np.uint64(0x7F)
    rest = v.copy()
    for i in range(width):
        group = (rest & low).astype(np.uint8)
        if i + 1 < width:
            group |= (lengths > i + 1).astype(np.uint8) << 7
        out[:, i] = group
        rest >>= seven
    return Piece(out, lengths)


def decimal(values: np.ndarray, prefix: bytes = b"", suffix: bytes = b"") -> Piece:
    """``prefix + str(value) + suffix`` for non-negative integers, as bytes."""
    v = np.asarray(values, dtype=np.uint64)
    rows = len(v)
    digits = np.ones(rows, dtype=np.int64)
    for k in range(1, 20):
        digits += v >= _POW10[k]
    width = int(digits.max(initial=1))
    pos = np.arange(width)
    # digit j (from the left) of a d-digit number is (v // 10**(d-1-j)) % 10
    exponent = np.clip(digits[:, None] - 1 - pos, 0, 19)
    body = ((v[:, None] // _POW10[exponent]) % np.uint64(10) + np.uint64(48)).astype(np.uint8)
    core = Piece(body, digits)
    if not prefix and not suffix:
        return core
    parts = [constant(prefix, rows)] if prefix else []
    parts.append(core)
    if suffix:
        parts.append(constant(suffix, rows))
    return pack(parts)
