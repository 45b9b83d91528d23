"""Redis ``DUMP`` payloads of whole hashes, for ``RESTORE`` (the fast path for new keys).

Redis spends most of an ``HSET`` of twenty fields looking up and appending each field in
the hash's listpack (≈ 10 µs here). ``RESTORE key ttl payload`` instead receives the
listpack ready-made and only checks it (≈ 4-5 µs), and without ``REPLACE`` it refuses
(``BUSYKEY``) when the key exists: an atomic "create if absent", so a restored hash can
never overwrite anything. The payload is what ``DUMP`` returns for a hash that ``HSET``
built with the same fields in the same order (the writer checks exactly that against the
server before using it, and falls back to ``HSET`` if not):

* a listpack: ``<u32 total bytes><u16 entry count>``, entries, ``0xFF``; an entry is an
  encoding header (``0x80|len`` for strings under 64 bytes, ``0xE0|len>>8, len`` under
  4096, ``0xF0 <u32 len>`` above), the bytes, then the header+bytes length as a
  "backlen" (1-5 bytes, 7 bits each, read backwards);
* wrapped as ``<type 16 = hash listpack><RDB length><listpack><u16 RDB version 10><u64
  CRC-64/Redis>`` (Jones polynomial, reflected, init 0), as Redis 7.0+ loads it.

Redis stores a string that reads as a 64-bit integer (``"123"``) as an integer entry;
rows holding such an entry are left to ``HSET`` (:func:`integer_like`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from featurepipe.online import rows
from featurepipe.online.rows import Piece

RDB_TYPE_HASH_LISTPACK = 16
RDB_VERSION = 10  # Redis 7.0, the first to store hashes as listpacks; later ones load it
_CRC64_REFLECTED_POLY = 0x95AC9329AC4BC9B5


def _crc_tables() -> np.ndarray:
    base = np.zeros(256, dtype=np.uint64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (_CRC64_REFLECTED_POLY if c & 1 else 0)
        base[i] = c
    tables = np.zeros((8, 256), dtype=np.uint64)
    tables[0] = base
    for k in range(1, 8):
        prev = tables[k - 1]
        tables[k] = base[(prev & np.uint64(0xFF)).astype(np.intp)] ^ (prev >> np.uint64(8))
    return tables


_CRC_TABLES = _crc_tables()


def crc64(flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """CRC-64/Redis of every row of a flat buffer (the checksum ``DUMP`` appends).

    Rows are right-aligned in a zero-padded matrix (leading zeros leave a CRC with
    initial value 0 unchanged) and processed 8 bytes at a time for all rows together.
    """
    lengths = np.diff(offsets)
    n = len(lengths)
    width = int(lengths.max(initial=0))
    width += (-width) % 8
    matrix = np.zeros((n, width), dtype=np.uint8)
    total = int(offsets[-1] - offsets[0])
    if total:
        starts = offsets[:-1] - offsets[0]
        dest = np.arange(total, dtype=np.int64) + np.repeat(
            np.arange(n, dtype=np.int64) * width + (width - lengths) - starts, lengths
        )
        matrix.reshape(-1)[dest] = flat[offsets[0]:offsets[-1]]
    words = np.ascontiguousarray(matrix.view("<u8").T)  # (width / 8, n)
    t = _CRC_TABLES
    crc = np.zeros(n, dtype=np.uint64)
    x = np.empty(n, dtype=np.uint64)
    xb = x.view(np.uint8).reshape(n, 8)  # little endian: xb[:, k] is byte k of x
    for word in words:
        np.bitwise_xor(crc, word, out=x)
        crc = t[7][xb[:, 0]]
        for k in range(1, 8):
            crc ^= t[7 - k][xb[:, k]]
    return crc


def _string_header(lengths: np.ndarray) -> Piece:
    n = len(lengths)
    out = np.zeros((n, 5), dtype=np.uint8)
    small, medium = lengths < 64, (lengths >= 64) & (lengths < 4096)
    large = lengths >= 4096
    out[:, 0] = np.where(small, 0x80 | (lengths & 0x3F), np.where(medium, 0xE0 | (lengths >> 8), 0xF0))
    out[:, 1] = np.where(medium, lengths & 0xFF, lengths & 0xFF)
    for k in range(1, 4):
        out[:, 1 + k] = (lengths >> (8 * k)) & 0xFF
    size = np.where(small, 1, np.where(medium, 2, 5)).astype(np.int64)
    size = np.where(large, 5, size)
    return Piece(out, size)


def _backlen(lengths: np.ndarray) -> Piece:
    """listpack's reverse-encoded entry length: big-endian 7-bit groups, high bit on all but the first."""
    n = len(lengths)
    size = 1 + (lengths > 127) + (lengths >= 16383) + (lengths >= 2097151) + (lengths >= 268435455)
    size = size.astype(np.int64)
    out = np.zeros((n, 5), dtype=np.uint8)
    for j in range(5):  # byte j of a size-s backlen holds bits 7*(s-1-j) ..
        shift = np.clip(7 * (size - 1 - j), 0, 63).astype(np.uint64)
        group = (lengths.astype(np.uint64) >> shift) & np.uint64(0x7F)
        out[:, j] = (group | np.where(j > 0, 0x80, 0).astype(np.uint64)).astype(np.uint8)
    return Piece(out, size)


def entry(piece: Piece) -> Piece:
    """Every row's bytes as one listpack string entry."""
    lengths = piece.row_lengths()
    if int(lengths.max(initial=0)) < 64:  # one-byte header, one-byte backlen: the usual case
        headed = rows.prepend((0x80 | lengths).astype(np.uint8), piece)
        return rows.append(headed, rows.fixed((lengths + 1).astype(np.uint8).reshape(-1, 1)))
    header = _string_header(lengths)
    return rows.pack([header, piece, _backlen(header.row_lengths() + lengths)])


def constant_entry(value: bytes) -> bytes:
    """One listpack string entry, for a constant (field names)."""
    one = entry(rows.constant(value, 1))
    flat, offsets = rows.join([one])
    return bytes(flat[offsets[0]:offsets[1]])


def _rdb_length(lengths: np.ndarray) -> Piece:
    n = len(lengths)
    out = np.zeros((n, 5), dtype=np.uint8)
    small, medium = lengths < 64, (lengths >= 64) & (lengths < 16384)
    out[:, 0] = np.where(small, lengths, np.where(medium, 0x40 | (lengths >> 8), 0x80))
    out[:, 1] = np.where(medium, lengths & 0xFF, (lengths >> 24) & 0xFF)
    out[:, 2] = (lengths >> 16) & 0xFF
    out[:, 3] = (lengths >> 8) & 0xFF
    out[:, 4] = lengths & 0xFF
    return Piece(out, np.where(small, 1, np.where(medium, 2, 5)).astype(np.int64))


def unsigned_payload(entries: Sequence[Piece]) -> list[Piece]:
    """A ``RESTORE`` payload, less its CRC, of hashes whose listpack holds ``entries``.

    ``entries`` alternate field and value (see :func:`entry`, :func:`constant_entry`).
    """
    n = entries[0].rows
    lp_len = sum(e.row_lengths() for e in entries) + 7
    head = np.empty((n, 6), dtype=np.uint8)
    head[:, :4] = lp_len.astype("<u4").view(np.uint8).reshape(n, 4)
    head[:, 4:] = np.frombuffer(len(entries).to_bytes(2, "little"), dtype=np.uint8)
    trailer = bytes([0xFF]) + RDB_VERSION.to_bytes(2, "little")
    return [
        rows.constant(bytes([RDB_TYPE_HASH_LISTPACK]), n),
        _rdb_length(lp_len),
        rows.fixed(head),
        *entries,
        rows.constant(trailer, n),
    ]


def hash_payloads(entries: Sequence[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """Complete ``RESTORE`` payloads (with CRC) as a flat buffer and offsets."""
    pieces = unsigned_payload(entries)
    flat, offsets = rows.join(pieces)
    crc = crc64(flat, offsets).astype("<u8").view(np.uint8).reshape(-1, 8)
    return rows.join([*pieces, rows.fixed(crc)])


def integer_like(piece: Piece) -> np.ndarray:
    """Rows whose bytes Redis could read as an integer (listpack would store it as one).

    A superset of Redis's ``string2ll``: 1-20 bytes, digits, optionally after a ``-``,
    with no leading zero (except ``"0"``).
    """
    data = np.asarray(piece.data)
    lengths = piece.row_lengths()
    n, width = data.shape
    if width == 0:
        return np.zeros(n, dtype=bool)
    inside = np.arange(width) < lengths[:, None]
    digit = (data >= 0x30) & (data <= 0x39)
    minus = data[:, 0] == 0x2D
    # every byte after the first (sign) position is a digit
    rest_digits = np.where(inside[:, 1:], digit[:, 1:], True).all(axis=1) if width > 1 else np.ones(n, bool)
    first_digit = digit[:, 0]
    second = data[:, 1] if width > 1 else np.zeros(n, np.uint8)
    positive = first_digit & rest_digits & ((data[:, 0] != 0x30) | (lengths == 1))
    negative = minus & (lengths >= 2) & rest_digits & (second >= 0x31) & (second <= 0x39)
    return (lengths >= 1) & (lengths <= 20) & (positive | negative)
