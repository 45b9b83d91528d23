"""Writes encoded rows into Redis hashes, Feast's layout, newest value wins.

One ``EVAL`` per batch runs :data:`WRITE_SCRIPT` on the server: for every key it reads
``_ts:<view>`` and writes the row (``HSET`` of the timestamp then the features, in Feast's
order, and ``EXPIRE`` when ``key_ttl_seconds`` is set) only when the row is newer, or the
key has no timestamp for the view. The check and the write happen atomically per batch,
so a value streamed in meanwhile is never overwritten by an older offline row, and
writing the same rows twice changes nothing (the comparison is Feast's: equal event
times are not rewritten). A batch is one command, so a crash leaves each batch either
applied or not; rerunning the window completes it.

The command is built as raw RESP bytes (:mod:`featurepipe.online.rows`) and sent on a
redis-py connection; the next batch is encoded while the server runs the previous one.
``EVAL`` (not ``EVALSHA``) carries the 1.5 kB script in every batch of thousands of rows,
so a server that lost its script cache (restart, ``SCRIPT FLUSH``) needs no retry logic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis

from featurepipe.errors import BackendUnavailable
from featurepipe.online import rows
from featurepipe.online.rows import Piece

WRITE_SCRIPT = r"""
-- KEYS: hash keys. ARGV: ts field, feature count m, ttl seconds (0: none), m field names,
-- then for each key its Timestamp proto and m Value protos. Returns {written, new keys}.
local tsf, m, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function decode(s)  -- google.protobuf.Timestamp -> seconds, nanos
  local sec, nanos, i, len = 0, 0, 1, #s
  while i <= len do
    local tag = string.byte(s, i)
    i = i + 1
    local v, mul = 0, 1
    while true do
      local b = string.byte(s, i)
      i = i + 1
      if b < 128 then v = v + b * mul break end
      v = v + (b - 128) * mul
      mul = mul * 128
    end
    if tag == 8 then sec = v elseif tag == 16 then nanos = v end
  end
  if sec >= 9223372036854775808 then sec = sec - 18446744073709551616 end
  return sec, nanos
end
local args = {tsf}
for j = 1, m do args[2 * j + 1] = ARGV[3 + j] end
local base, stride, written, fresh = 3 + m, m + 1, 0, 0
for i = 1, #KEYS do
  local off = base + (i - 1) * stride
  local ts = ARGV[off + 1]
  local old = redis.call('HGET', KEYS[i], tsf)
  local newer = true
  if old then
    local os, on = decode(old)
    local ns, nn = decode(ts)
    if (os ~= 0 or on ~= 0) and (ns < os or (ns == os and nn <= on)) then newer = false end
  else
    fresh = fresh + 1
  end
  if newer then
    args[2] = ts
    for j = 1, m do args[2 * j + 2] = ARGV[off + 1 + j] end
    redis.call('HSET', KEYS[i], unpack(args))
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
    written = written + 1
  end
end
return {written, fresh}
"""
_CRLF = b"\r\n"
_SCRIPT = WRITE_SCRIPT.encode()


@dataclass(frozen=True)
class EncodedRows:
    """Rows ready to write: Redis keys, Timestamp protos, one Value proto piece per feature."""

    keys: Piece
    timestamps: Piece
    values: Sequence[Piece]

    @property
    def count(self) -> int:
        return self.keys.rows


@dataclass
class WriteCounts:
    """What the writer did so far."""

    written: int = 0
    skipped: int = 0  # not newer than what Redis holds


def bulk(piece: Piece) -> list[Piece]:
    """Pieces giving every row as a RESP bulk string: ``$<len>\\r\\n<bytes>\\r\\n``."""
    n = piece.rows
    return [rows.decimal(piece.row_lengths(), b"$", _CRLF), piece, rows.constant(_CRLF, n)]


def _bulk_const(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class HashWriter:
    """Writes one view's rows into Redis; use as a context manager, then :meth:`write` batches."""

    def __init__(
        self,
        client: redis.Redis,
        ts_field: bytes,
        feature_fields: Sequence[bytes],
        ttl_seconds: int | None = None,
        max_rows_per_second: float | None = None,
    ) -> None:
        self.client = client
        self.counts = WriteCounts()
        self._head_args = [ts_field, str(len(feature_fields)).encode(), str(int(ttl_seconds or 0)).encode(),
                           *feature_fields]
        self._max_rate = max_rows_per_second
        self._started = time.monotonic()
        self._sent_rows = 0
        self._pending: int | None = None
        self._conn: redis.connection.AbstractConnection | None = None

    def __enter__(self) -> HashWriter:
        try:
            self._conn = self.client.connection_pool.get_connection()
            self._conn.connect()
        except redis.ConnectionError as exc:
            raise BackendUnavailable(f"cannot reach Redis: {exc}; check REDIS_URL / online_store") from exc
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            if self._conn is not None:
                if exc_type is not None:
                    self._conn.disconnect()
                self.client.connection_pool.release(self._conn)
                self._conn = None

    def command(self, batch: EncodedRows) -> bytes:
        """The ``EVAL`` command writing ``batch``, as RESP bytes."""
        n = batch.count
        head = [b"EVAL", _SCRIPT, str(n).encode()]
        nargs = len(head) + n + len(self._head_args) + n * (1 + len(batch.values))
        keys, _ = rows.join(bulk(batch.keys))
        row_pieces = [p for v in (batch.timestamps, *batch.values) for p in bulk(v)]
        args, _ = rows.join(row_pieces)
        return b"".join([
            b"*%d\r\n" % nargs,
            *(_bulk_const(h) for h in head),
            keys.tobytes(),
            *(_bulk_const(a) for a in self._head_args),
            args.tobytes(),
        ])

    def write(self, batch: EncodedRows) -> None:
        """Send ``batch``; the reply of the previous batch is read meanwhile."""
        if batch.count == 0:
            return
        payload = self.command(batch)
        assert self._conn is not None, "use HashWriter as a context manager"
        self._conn.send_packed_command([payload], check_health=False)
        previous, self._pending = self._pending, batch.count
        if previous is not None:
            self._collect(previous)
        self._throttle(batch.count)

    def flush(self) -> None:
        """Wait for the last batch."""
        if self._pending is not None:
            previous, self._pending = self._pending, None
            self._collect(previous)

    def _collect(self, n: int) -> None:
        assert self._conn is not None
        reply = self._conn.read_response()
        written = int(reply[0])
        self.counts.written += written
        self.counts.skipped += n - written

    def _throttle(self, n: int) -> None:
        self._sent_rows += n
        if self._max_rate:
            ahead = self._sent_rows / self._max_rate - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)


def split_rows(batch: EncodedRows, keep: np.ndarray) -> EncodedRows:
    """The rows of ``batch`` where ``keep`` is true."""
    index = np.flatnonzero(keep)
    return EncodedRows(
        keys=batch.keys.take(index),
        timestamps=batch.timestamps.take(index),
        values=[v.take(index) for v in batch.values],
    )
