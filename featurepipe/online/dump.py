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

import functools
from collections.abc import Sequence

import numpy as np
from numba import njit

from featurepipe.online import kernels, rows
from featurepipe.online.rows import Piece

RDB_TYPE_HASH_LISTPACK = 16
RDB_VERSION = 10  # Redis 7.0, the first to store hashes as listpacks; later ones load it


def crc64(flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """CRC-64/Redis of every row of a flat buffer (the checksum ``DUMP`` appends)."""
    return kernels.crc64(flat, offsets[:-1], np.diff(offsets))


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
    lp_len = sum(e.row_lengths() for e in entries) + 7
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


def hash_payloads(entries: Sequence[Piece], count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Complete ``RESTORE`` payloads (with CRC) as a flat buffer and offsets."""
    pieces = unsigned_payload(entries, count)
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
    return (lengths >= 1) & (lengths <= 20) & (positive | negative)


# ---------------------------------------------------------------- compiled: whole RESTORE commands

_RESTORE_HEAD = np.frombuffer(b"*4\r\n$7\r\nRESTORE\r\n", dtype=np.uint8)


@njit(cache=True, nogil=True)
def _digits(value: int) -> int:
    d = 1
    while value >= 10:
        value //= 10
        d += 1
    return d


@njit(cache=True, nogil=True)
def _put_bulk_header(out: np.ndarray, pos: int, value: int) -> int:
    """Write ``$<value>\\r\\n``; return the next position."""
    out[pos] = 36  # $
    d = _digits(value)
    for i in range(d):
        out[pos + d - i] = 48 + value % 10
        value //= 10
    out[pos + d + 1] = 13
    out[pos + d + 2] = 10
    return pos + d + 3


@njit(cache=True, nogil=True)
def _entry_size(length: int) -> int:
    header = 1 if length < 64 else (2 if length < 4096 else 5)
    body = header + length
    back = 1 if body <= 127 else (2 if body < 16383 else (3 if body < 2097151 else (4 if body < 268435455 else 5)))
    return body + back


@njit(cache=True, nogil=True)
def _put_entry(out: np.ndarray, pos: int, src: np.ndarray, row: int, length: int) -> int:
    """Write one listpack string entry holding ``src[row, :length]``."""
    start = pos
    if length < 64:
        out[pos] = 0x80 | length
        pos += 1
    elif length < 4096:
        out[pos] = 0xE0 | (length >> 8)
        out[pos + 1] = length & 0xFF
        pos += 2
    else:
        out[pos] = 0xF0
        for k in range(4):
            out[pos + 1 + k] = (length >> (8 * k)) & 0xFF
        pos += 5
    for b in range(length):
        out[pos + b] = src[row, b]
    pos += length
    body = pos - start
    size = 1 if body <= 127 else (2 if body < 16383 else (3 if body < 2097151 else (4 if body < 268435455 else 5)))
    for j in range(size):  # big-endian 7-bit groups, high bit on all but the first
        group = (body >> (7 * (size - 1 - j))) & 0x7F
        out[pos + j] = group | (0x80 if j > 0 else 0)
    return pos + size


@njit(cache=True, nogil=True)
def _listpack_size(ts_field_len: int, ts_len: int, field_lens: np.ndarray, value_lens: np.ndarray, row: int) -> int:
    lp = 6 + _entry_size(ts_field_len) + _entry_size(ts_len) + 1
    for j in range(len(field_lens)):
        lp += _entry_size(field_lens[j]) + _entry_size(value_lens[j, row])
    return lp


@njit(cache=True, nogil=True)
def _restore_sizes(keys_len, ts_field_len, ts_len, field_lens, value_lens, ttl_len, out_sizes, out_plen, out_lp):
    for r in range(len(keys_len)):
        lp = _listpack_size(ts_field_len, ts_len[r], field_lens, value_lens, r)
        plen = 1 + (1 if lp < 64 else (2 if lp < 16384 else 5)) + lp + 2 + 8
        out_lp[r] = lp
        out_plen[r] = plen
        k = keys_len[r]
        out_sizes[r] = 17 + (3 + _digits(k)) + k + 2 + ttl_len + (3 + _digits(plen)) + plen + 2


@njit(cache=True, nogil=True)
def _restore_heads(out, offsets, plens, lps, keys, keys_len, ts_field, ts, ts_len, ttl_elem, head,
                   n_entries, cursor, payload_start):
    """Per row: RESP head, key, ttl, payload length, RDB type and length, listpack header, ts entry."""
    for r in range(len(keys_len)):
        pos = offsets[r]
        for b in range(len(head)):
            out[pos + b] = head[b]
        pos += len(head)
        pos = _put_bulk_header(out, pos, keys_len[r])
        for b in range(keys_len[r]):
            out[pos + b] = keys[r, b]
        pos += keys_len[r]
        out[pos] = 13
        out[pos + 1] = 10
        pos += 2
        for b in range(len(ttl_elem)):
            out[pos + b] = ttl_elem[b]
        pos += len(ttl_elem)
        pos = _put_bulk_header(out, pos, plens[r])
        payload_start[r] = pos
        lp = lps[r]
        out[pos] = 16  # RDB type: hash as listpack
        pos += 1
        if lp < 64:
            out[pos] = lp
            pos += 1
        elif lp < 16384:
            out[pos] = 0x40 | (lp >> 8)
            out[pos + 1] = lp & 0xFF
            pos += 2
        else:
            out[pos] = 0x80
            for k in range(4):
                out[pos + 1 + k] = (lp >> (8 * (3 - k))) & 0xFF
            pos += 5
        for k in range(4):  # listpack header: total bytes, entry count
            out[pos + k] = (lp >> (8 * k)) & 0xFF
        out[pos + 4] = n_entries & 0xFF
        out[pos + 5] = n_entries >> 8
        pos += 6
        for b in range(len(ts_field)):
            out[pos + b] = ts_field[b]
        pos += len(ts_field)
        cursor[r] = _put_entry(out, pos, ts, r, ts_len[r])


@njit(cache=True, nogil=True)
def _restore_field(out, cursor, field_entry, values, lengths):
    """One field and its value, for every row, at each row's cursor."""
    w = len(field_entry)
    for r in range(len(cursor)):
        pos = cursor[r]
        for b in range(w):
            out[pos + b] = field_entry[b]
        cursor[r] = _put_entry(out, pos + w, values, r, lengths[r])


@njit(cache=True, nogil=True)
def _restore_tails(out, cursor, payload_start, tables):
    """Per row: listpack end, RDB version, CRC-64 of the payload, CRLF."""
    byte = np.uint64(0xFF)
    for r in range(len(cursor)):
        pos = cursor[r]
        out[pos] = 0xFF
        out[pos + 1] = RDB_VERSION & 0xFF
        out[pos + 2] = RDB_VERSION >> 8
        pos += 3
        crc = np.uint64(0)
        i = payload_start[r]
        while i + 8 <= pos:  # slicing-by-8
            word = np.uint64(0)
            for b in range(8):
                word |= np.uint64(out[i + b]) << np.uint64(8 * b)
            x = crc ^ word
            crc = (tables[7, x & byte] ^ tables[6, (x >> np.uint64(8)) & byte] ^ tables[5, (x >> np.uint64(16)) & byte]
                   ^ tables[4, (x >> np.uint64(24)) & byte] ^ tables[3, (x >> np.uint64(32)) & byte]
                   ^ tables[2, (x >> np.uint64(40)) & byte] ^ tables[1, (x >> np.uint64(48)) & byte]
                   ^ tables[0, x >> np.uint64(56)])
            i += 8
        while i < pos:
            crc = tables[0, (crc ^ np.uint64(out[i])) & byte] ^ (crc >> np.uint64(8))
            i += 1
        for k in range(8):
            out[pos + k] = (crc >> np.uint64(8 * k)) & byte
        out[pos + 8] = 13
        out[pos + 9] = 10


def restore_commands_compiled(
    keys: Piece, ts_field: bytes, timestamps: Piece, fields: Sequence[bytes], values: Sequence[Piece], ttl_ms: int
) -> np.ndarray:
    """``RESTORE key ttl payload`` (RESP) for every row, written and checksummed by compiled loops.

    Same bytes as :func:`restore_commands` over :func:`field_and_value` entries.
    """
    n = keys.rows
    keys_len = keys.row_lengths()
    ts_len = timestamps.row_lengths()
    value_lens = np.empty((len(values), n), dtype=np.int64)
    for j, v in enumerate(values):
        value_lens[j] = v.row_lengths()
    field_lens = np.array([len(f) for f in fields], dtype=np.int64)
    ttl = str(int(ttl_ms)).encode()
    ttl_elem = np.frombuffer(b"$%d\r\n%s\r\n" % (len(ttl), ttl), dtype=np.uint8)
    sizes = np.empty(n, dtype=np.int64)
    plens = np.empty(n, dtype=np.int64)
    lps = np.empty(n, dtype=np.int64)
    _restore_sizes(keys_len, len(ts_field), ts_len, field_lens, value_lens, len(ttl_elem), sizes, plens, lps)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    cursor = np.empty(n, dtype=np.int64)
    payload_start = np.empty(n, dtype=np.int64)
    _restore_heads(
        out, offsets, plens, lps, np.ascontiguousarray(keys.data), keys_len,
        np.frombuffer(constant_entry(ts_field), dtype=np.uint8), np.ascontiguousarray(timestamps.data), ts_len,
        ttl_elem, _RESTORE_HEAD, min(2 * (len(fields) + 1), 65535), cursor, payload_start,
    )
    for j, (field, value) in enumerate(zip(fields, values)):
        _restore_field(out, cursor, np.frombuffer(constant_entry(field), dtype=np.uint8),
                       np.ascontiguousarray(value.data), value_lens[j])
    _restore_tails(out, cursor, payload_start, kernels.CRC_TABLES)
    return out
