"""Entity keys as Kafka message keys, and the partition each key belongs in.

A keyed topic carries every event of a source, each in the partition of its entity key: the
message key is the view's join key value(s), serialised stably (:func:`entity_keys`: the
decimal text of an integer key, a string key as it is, several keys as a compact JSON
array), and the partition is Kafka's Java default, ``murmur2(key) & 0x7fffffff %
partitions`` (:func:`partition_of`; librdkafka's ``partitioner=murmur2_random``), so
producers in any language agree on it. A job whose views have several key sets (the demo's
``user_id`` and ``merchant_id``) reads one keyed topic per key set (:func:`keyed_topic`).

Everything here is columnar: the hash runs over NumPy arrays of a whole micro-batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KeySet = tuple[str, ...]

_M = np.uint32(0x5BD1E995)
_SEED = np.uint32(0x9747B28C)


def keyed_topic(topic: str, keys: KeySet) -> str:
    """The topic of ``topic``'s events keyed by ``keys``: ``transactions.by-user_id``."""
    return f"{topic}.by-{'.'.join(keys)}"


def entity_keys(events: pa.Table, keys: KeySet) -> pa.Array:
    """The message key (binary) of each event: the value of its one join key as text
    (integers in decimal), or the values of several as a compact JSON array (``[7,"DE"]``,
    built per row: composite keys are not on a hot path here). Null keys give null."""
    if len(keys) == 1:
        return pc.cast(pc.cast(events.column(keys[0]), pa.string()), pa.binary())
    rows = events.select(list(keys)).to_pylist()
    return pa.array([None if any(r[k] is None for k in keys) else
                     json.dumps([r[k] for k in keys], separators=(",", ":"), default=str).encode()
                     for r in rows], pa.binary())


def murmur2(keys: pa.Array) -> np.ndarray:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``) of each binary
    value, as uint32 (nulls hash as empty). Vectorised: the values are laid out in a
    zero-padded matrix and hashed four bytes at a time for every row at once."""
    arr = pc.cast(keys, pa.binary()).combine_chunks() if isinstance(keys, pa.ChunkedArray) else pc.cast(keys, pa.binary())
    n = len(arr)
    if n == 0:
        return np.empty(0, np.uint32)
    arr = pc.fill_null(arr, b"")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.empty(0, np.uint8)
    lengths = (offsets[1:] - offsets[:-1]).astype(np.int64)
    width = int(lengths.max()) + 4 if n else 4
    cols = np.arange(width)
    inside = cols[None, :] < lengths[:, None]
    index = np.where(inside, offsets[:-1, None].astype(np.int64) + cols[None, :], 0)
    padded = np.where(inside, data[index] if len(data) else 0, 0).astype(np.uint32)
    with np.errstate(over="ignore"):
        h = _SEED ^ lengths.astype(np.uint32)
        blocks = lengths // 4
        for j in range(int(blocks.max())):
            k = (padded[:, 4 * j] | (padded[:, 4 * j + 1] << 8) | (padded[:, 4 * j + 2] << 16)
                 | (padded[:, 4 * j + 3] << 24))
            k = k * _M
            k ^= k >> 24
            k = k * _M
            h = np.where(j < blocks, (h * _M) ^ k, h)
        tail = lengths % 4
        base = blocks * 4
        rows = np.arange(n)

        def byte(i: int) -> np.ndarray:
            return padded[rows, np.minimum(base + i, width - 1)]

        h = np.where(tail >= 3, h ^ (byte(2) << 16), h)
        h = np.where(tail >= 2, h ^ (byte(1) << 8), h)
        h = np.where(tail >= 1, (h ^ byte(0)) * _M, h)
        h ^= h >> 13
        h = h * _M
        h ^= h >> 15
    hashed: np.ndarray = np.asarray(h, dtype=np.uint32)
    return hashed


def partition_of(keys: pa.Array, partitions: int) -> np.ndarray:
    """The partition (int32) Kafka's default partitioner gives each key among ``partitions``."""
    placed: np.ndarray = ((murmur2(keys) & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)).astype(np.int32)
    return placed


def key_sets(join_keys: Sequence[KeySet]) -> list[KeySet]:
    """The distinct key sets among the views' join keys, in a stable order (sorted)."""
    return sorted({tuple(k) for k in join_keys})
