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

The commands are built by ``featurepipe/core/_native.c`` (compiled when featurepipe is
installed: one C loop per row, the GIL released) and, where it is not compiled, by the NumPy
code below, column by column (about 6x slower; the tests check both against a plain-Python
construction from the specs).

Redis stores a string that reads as a 64-bit integer (``"123"``) as an integer entry;
rows holding such an entry are left to ``HSET`` (:func:`integer_like`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from featurepipe.core.native import NativeKernels, kernels
from featurepipe.online import rows
from featurepipe.online.rows import Piece

compiled: NativeKernels | None = kernels  # None: not compiled (no C compiler at install time), the NumPy path

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
    """CRC-64/Redis of every row of a flat buffer (the checksum ``DUMP`` appends)."""
    lengths = np.diff(offsets)
    n = len(lengths)
    width = int(lengths.max(initial=0))
    mask = np.arange(width) < lengths[:, None]
    buf = np.zeros((n, width), dtype=np.uint8)
    buf[mask] = flat[offsets[0]:offsets[-1]]
    return crc64_matrix(rows.right_aligned(buf, mask, lengths, multiple=8))


def crc64_matrix(matrix: np.ndarray) -> np.ndarray:
    """CRC-64/Redis of every row of a right-aligned, zero-padded matrix (width a multiple of 8).

    Leading zeros leave a CRC with initial value 0 unchanged; all rows are processed
    together, 8 bytes at a time (slicing-by-8 tables).
    """
    n = matrix.shape[0]
    words = np.ascontiguousarray(matrix.view("<u8").T)  # (width / 8, n)
    t = _CRC_TABLES
    crc = np.zeros(n, dtype=np.uint64)
    x = np.empty(n, dtype=np.uint64)
    byte = np.uint64(0xFF)
    idx = np.empty(n, dtype=np.intp)
    for word in words:
        np.bitwise_xor(crc, word, out=x)
        np.bitwise_and(x, byte, out=idx, casting="unsafe")
        crc = t[7].take(idx)
        for k in range(1, 8):
            np.bitwise_and(x >> np.uint64(8 * k), byte, out=idx, casting="unsafe")
            crc ^= t[7 - k].take(idx)
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


def field_and_value(field: bytes, value: Piece) -> Piece:
    """A hash field (a constant) and its value, as the two listpack entries Redis stores."""
    head = constant_entry(field)
    lengths = value.row_lengths()
    n, w = value.rows, value.width
    if int(lengths.max(initial=0)) >= 64:
        return rows.pack([rows.constant(head, n), entry(value)])
    h = len(head)
    out = np.empty((n, h + w + 2), dtype=np.uint8)  # field entry, header, value, backlen
    out[:, :h] = np.frombuffer(head, dtype=np.uint8)
    out[:, h] = 0x80 | lengths
    out[:, h + 1:h + 1 + w] = value.data
    out[np.arange(n), h + 1 + lengths] = lengths + 1
    return Piece(out, lengths + (h + 2))


@functools.lru_cache(maxsize=4096)
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


def unsigned_payload(entries: Sequence[Piece], count: int | None = None) -> list[Piece]:
    """A ``RESTORE`` payload, less its CRC, of hashes whose listpack holds ``entries``.

    ``entries`` are listpack entries (see :func:`entry`, :func:`field_and_value`);
    ``count`` is how many entries they hold (default: one per piece).
    """
    n = entries[0].rows
    count = len(entries) if count is None else count
    lp_len = sum((e.row_lengths() for e in entries), np.full(n, 7, dtype=np.int64))
    head = np.empty((n, 6), dtype=np.uint8)
    head[:, :4] = lp_len.astype("<u4").view(np.uint8).reshape(n, 4)
    head[:, 4:] = np.frombuffer(min(count, 65535).to_bytes(2, "little"), dtype=np.uint8)
    trailer = bytes([0xFF]) + RDB_VERSION.to_bytes(2, "little")
    return [
        rows.constant(bytes([RDB_TYPE_HASH_LISTPACK]), n),
        _rdb_length(lp_len),
        rows.fixed(head),
        *entries,
        rows.constant(trailer, n),
    ]


def restore_commands(keys: Piece, fields: Sequence[bytes], values: Sequence[Piece], ttl_ms: int,
                     use_compiled: bool = True) -> bytes:
    """``RESTORE key ttl payload`` (RESP) of every row, as one buffer: row ``i`` restores the
    hash ``{fields[j]: values[j][i]}``, its fields in this order."""
    if compiled is None or not use_compiled:
        entries = [field_and_value(f, v) for f, v in zip(fields, values)]
        return restore_commands_numpy(keys, entries, 2 * len(entries), ttl_ms).tobytes()
    return compiled.restore_commands(
        np.ascontiguousarray(keys.data, dtype=np.uint8), np.ascontiguousarray(keys.row_lengths(), dtype=np.int64),
        list(fields),
        [(np.ascontiguousarray(v.data, dtype=np.uint8), np.ascontiguousarray(v.row_lengths(), dtype=np.int64))
         for v in values],
        str(int(ttl_ms)).encode(),
    )


def restore_commands_numpy(keys: Piece, entries: Sequence[Piece], count: int, ttl_ms: int) -> np.ndarray:
    """``RESTORE key ttl payload`` (RESP) for every row, as one buffer, with NumPy.

    Laid out once; each payload's CRC is computed from that layout and written into it.
    """
    n = keys.rows
    payload = unsigned_payload(entries, count)
    plen = sum((p.row_lengths() for p in payload), np.full(n, 8, dtype=np.int64))
    ttl = str(int(ttl_ms)).encode()
    head = [
        rows.constant(b"*4\r\n$7\r\nRESTORE\r\n", n),
        rows.decimal(keys.row_lengths(), b"$", b"\r\n"),
        keys,
        rows.constant(b"\r\n$%d\r\n%s\r\n" % (len(ttl), ttl), n),
        rows.decimal(plen, b"$", b"\r\n"),
    ]
    buf, mask, lengths = rows.layout([*head, *payload, rows.constant(bytes(8) + b"\r\n", n)])
    first = sum(p.width for p in head)
    last = buf.shape[1] - 10  # where the CRC goes
    part = buf[:, first:last]
    part_mask = None if mask is None else mask[:, first:last]
    crc = crc64_matrix(rows.right_aligned(part, part_mask, plen - 8, multiple=8))
    buf[:, last:last + 8] = crc.astype("<u8").view(np.uint8).reshape(n, 8)
    flat, _ = rows.compact(buf, mask, lengths)
    return flat


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
    first = data[:, 0]
    if not bool((((first >= 0x30) & (first <= 0x39)) | (first == 0x2D)).any()):
        return np.zeros(n, dtype=bool)  # no row starts like a number (the usual case)
    inside = np.arange(width) < lengths[:, None]
    digit = (data >= 0x30) & (data <= 0x39)
    minus = data[:, 0] == 0x2D
    # every byte after the first (sign) position is a digit
    rest_digits = np.where(inside[:, 1:], digit[:, 1:], True).all(axis=1) if width > 1 else np.ones(n, bool)
    first_digit = digit[:, 0]
    second = data[:, 1] if width > 1 else np.zeros(n, np.uint8)
    positive = first_digit & rest_digits & ((data[:, 0] != 0x30) | (lengths == 1))
    negative = minus & (lengths >= 2) & rest_digits & (second >= 0x31) & (second <= 0x39)
    integer: np.ndarray = (lengths >= 1) & (lengths <= 20) & (positive | negative)
    return integer
