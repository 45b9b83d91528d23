"""Two byte loops NumPy cannot express without a pass per byte: compiled with Numba.

* :func:`compact` squeezes the padding out of a padded row layout (every row's pieces
  concatenated, row after row);
* :func:`crc64` computes the CRC-64 Redis appends to a ``DUMP`` payload, for many
  segments of one buffer.

Both run over bytes already laid out by :mod:`featurepipe.online.rows`; they know nothing
of Redis or Feast. Compiled on first use and cached beside this file.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_CRC64_REFLECTED_POLY = 0x95AC9329AC4BC9B5


def _crc_tables() -> np.ndarray:
    """Slicing-by-8 tables: ``t[0]`` the classic byte table, ``t[k]`` byte then k zero bytes."""
    tables = np.zeros((8, 256), dtype=np.uint64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (_CRC64_REFLECTED_POLY if c & 1 else 0)
        tables[0, i] = c
    for k in range(1, 8):
        for i in range(256):
            prev = int(tables[k - 1, i])
            tables[k, i] = int(tables[0, prev & 0xFF]) ^ (prev >> 8)
    return tables


CRC_TABLES = _crc_tables()


@njit(cache=True, nogil=True)
def _compact(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> None:
    n, k = lengths.shape
    pos = 0
    for r in range(n):
        for j in range(k):
            s = starts[j]
            for b in range(lengths[r, j]):
                out[pos] = buf[r, s + b]
                pos += 1


def compact(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row ``r`` = ``buf[r, starts[j]:starts[j] + lengths[r, j]]`` for every piece ``j``, joined.

    Returns the flat bytes and the row offsets (rows + 1).
    """
    totals = lengths.sum(axis=1)
    offsets = np.zeros(len(totals) + 1, dtype=np.int64)
    np.cumsum(totals, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    _compact(np.ascontiguousarray(buf), starts.astype(np.int64), np.ascontiguousarray(lengths, dtype=np.int64), out)
    return out, offsets


@njit(cache=True, nogil=True)
def _crc64(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, t: np.ndarray, out: np.ndarray) -> None:
    byte = np.uint64(0xFF)
    for r in range(len(starts)):
        crc = np.uint64(0)
        i = starts[r]
        end = i + lengths[r]
        while i + 8 <= end:  # eight bytes at a time, eight independent lookups
            word = np.uint64(0)
            for b in range(8):
                word |= np.uint64(flat[i + b]) << np.uint64(8 * b)
            x = crc ^ word
            crc = (t[7, x & byte] ^ t[6, (x >> np.uint64(8)) & byte] ^ t[5, (x >> np.uint64(16)) & byte]
                   ^ t[4, (x >> np.uint64(24)) & byte] ^ t[3, (x >> np.uint64(32)) & byte]
                   ^ t[2, (x >> np.uint64(40)) & byte] ^ t[1, (x >> np.uint64(48)) & byte]
                   ^ t[0, x >> np.uint64(56)])
            i += 8
        while i < end:
            crc = t[0, (crc ^ np.uint64(flat[i])) & byte] ^ (crc >> np.uint64(8))
            i += 1
        out[r] = crc


def crc64(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC-64/Redis (Jones polynomial, reflected, init 0) of ``flat[starts[i]:starts[i]+lengths[i]]``."""
    out = np.empty(len(starts), dtype=np.uint64)
    _crc64(flat, np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64), CRC_TABLES, out)
    return out
