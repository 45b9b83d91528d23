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

On a Redis Cluster node a command may touch keys of one slot only, so the per-key mode
(``per_key=True``, driven by :mod:`featurepipe.online.cluster_writer`) sends one ``EVALSHA``
of :data:`WRITE_SCRIPT_PER_KEY` per row instead, each answering one line like ``RESTORE``;
rows the node answers ``-MOVED``, ``-ASK``, ``-NOSCRIPT``, ``-TRYAGAIN`` or ``-CLUSTERDOWN``
are kept in :attr:`HashWriter.refused` for the caller to send again.
"""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import redis

from featurepipe.errors import BackendUnavailable
from featurepipe.online import dump, rows
from featurepipe.online.rows import Piece
from featurepipe.online.schedule import is_schedule_field

WRITE_SCRIPT = r"""
-- KEYS: hash keys. ARGV: ts field, value count m, ttl seconds (0: none), schedule position s
-- among the m values (0: none), the 4 bytes of a schedule's magic and version and its 6
-- bytes of column count and names checksum, m field names, then for each key its Timestamp
-- proto and m values. Returns {written, new keys}.
local tsf, m, ttl, s = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local sched_version, sched_names = ARGV[5], ARGV[6]
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
for j = 1, m do args[2 * j + 1] = ARGV[6 + j] end
local sched_field = s > 0 and ARGV[6 + s] or nil
local base, stride, written, fresh = 6 + m, m + 1, 0, 0
for i = 1, #KEYS do
  local off = base + (i - 1) * stride
  local ts = ARGV[off + 1]
  local old = redis.call('HGET', KEYS[i], tsf)
  local newer = true
  if old then
    local os, on = decode(old)
    local ns, nn = decode(ts)
    if (os ~= 0 or on ~= 0) and (ns < os or (ns == os and nn <= on)) then newer = false end
    if not newer and sched_field then
      -- not newer, but the stored schedule is missing or of another kernel or feature list:
      -- rewrite it (readers refuse it)
      local stored = redis.call('HGET', KEYS[i], sched_field)
      if not stored or string.sub(stored, 1, 4) ~= sched_version or string.sub(stored, 9, 14) ~= sched_names then
        newer = true
      end
    end
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
# The streaming engine recomputes a row when a late event lands in its window and writes it
# again with the same event time: there a row replaces one of equal event time.
WRITE_SCRIPT_REPLACE_EQUAL = WRITE_SCRIPT.replace("nn <= on", "nn < on")
# One key per call (cluster nodes): the reply is one integer, written + 2 * (the key was new).
WRITE_SCRIPT_PER_KEY = WRITE_SCRIPT.replace("return {written, fresh}", "return written + 2 * fresh")
WRITE_SCRIPT_PER_KEY_REPLACE_EQUAL = WRITE_SCRIPT_PER_KEY.replace("nn <= on", "nn < on")
_CRLF = b"\r\n"
_OK = b"+OK\r\n"
_SCRIPT = WRITE_SCRIPT.encode()
_SCRIPT_REPLACE_EQUAL = WRITE_SCRIPT_REPLACE_EQUAL.encode()
_SCRIPT_PER_KEY = WRITE_SCRIPT_PER_KEY.encode()
_SCRIPT_PER_KEY_REPLACE_EQUAL = WRITE_SCRIPT_PER_KEY_REPLACE_EQUAL.encode()
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
# A cluster node's answers that name a row to send again (elsewhere, later, after SCRIPT LOAD).
RETRY_ERRORS = (b"-MOVED ", b"-ASK ", b"-NOSCRIPT", b"-TRYAGAIN", b"-CLUSTERDOWN")


class ConnectionLost(BackendUnavailable):
    """The connection to Redis failed or closed: the server is down or unreachable."""


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
    restored: int = 0  # of written: new keys created with RESTORE


@dataclass(frozen=True)
class RefusedRows:
    """Rows a cluster node did not write, each with the error line it answered (``-MOVED 12 host:port``)."""

    batch: EncodedRows
    errors: list[bytes]


def bulk(piece: Piece) -> list[Piece]:
    """Pieces giving every row as a RESP bulk string: ``$<len>\\r\\n<bytes>\\r\\n``."""
    n = piece.rows
    return [rows.decimal(piece.row_lengths(), b"$", _CRLF), piece, rows.constant(_CRLF, n)]


def _bulk_const(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class _ReplyLines:
    """Line-based RESP replies (``+OK``, ``-ERR ...``, ``*2``, ``:12``) read straight from a socket.

    Every reply the writer expects is one or more single lines, so replies are counted by
    their line ends instead of parsed one Python call each (100,000 ``RESTORE`` replies in
    one pass).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def lines(self, count: int) -> list[bytes] | None:
        """The next ``count`` lines; None when they are all ``+OK`` (the common case)."""
        while self.buf.count(b"\r\n") < count:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionLost("Redis closed the connection while replies were pending")
            self.buf += chunk
        if self.buf.startswith(_OK * count) if count <= 64 else self.buf[:5 * count] == _OK * count:
            del self.buf[:5 * count]
            return None
        out = []
        pos = 0
        for _ in range(count):
            end = self.buf.index(b"\r\n", pos)
            out.append(bytes(self.buf[pos:end]))
            pos = end + 2
        del self.buf[:pos]
        return out

    def digits(self, count: int) -> np.ndarray | None:
        """The next ``count`` replies when they are all one-digit integers (``:0`` .. ``:9``),
        as an array; None (nothing consumed) when any is not: then read :meth:`lines`."""
        size = 4 * count
        while len(self.buf) < size and self.buf.count(b"\r\n") < count:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionLost("Redis closed the connection while replies were pending")
            self.buf += chunk
        if len(self.buf) < size:
            return None
        block = np.frombuffer(bytes(self.buf[:size]), dtype=np.uint8).reshape(count, 4)
        digit = block[:, 1].astype(np.int64) - 0x30
        if not ((block[:, 0] == 0x3A) & (block[:, 2] == 0x0D) & (block[:, 3] == 0x0A)
                & (digit >= 0) & (digit <= 9)).all():
            return None
        del self.buf[:size]
        return digit


@dataclass
class _Sent:
    """A command on the wire whose replies are still to be read."""

    kind: str  # "restore": one reply per row; "lua": one reply (per-key mode: one per row); "asking": two per row
    batch: EncodedRows


class HashWriter:
    """Writes one view's rows into Redis; use as a context manager, then :meth:`write` batches.

    Keys that do not exist yet are created with ``RESTORE`` of a ready-made hash (see
    :mod:`featurepipe.online.dump`; about twice cheaper for Redis than ``HSET``, and it
    refuses to touch an existing key); keys that exist, and rows ``RESTORE`` cannot
    carry, go through the compare-and-set script. The writer starts with ``RESTORE`` and
    switches to the script while most keys already exist (a rerun, an incremental run),
    and back. ``RESTORE`` is used only if a probe shows the server builds, from our
    payload, exactly the hash that ``HSET`` builds.

    ``per_key=True`` (a Redis Cluster primary, see :mod:`featurepipe.online.cluster_writer`):
    one ``EVALSHA`` per row instead of one ``EVAL`` per batch, the script loaded at the start;
    rows the node redirects are kept in :attr:`refused`, not raised. ``probe_tag``: a hash
    tag of a slot the node owns, for the ``RESTORE`` probe's two keys.
    """

    def __init__(
        self,
        client: redis.Redis,
        ts_field: bytes,
        feature_fields: Sequence[bytes],
        ttl_seconds: int | None = None,
        max_rows_per_second: float | None = None,
        restore: bool = True,
        replace_equal: bool = False,
        per_key: bool = False,
        probe_tag: bytes | None = None,
    ) -> None:
        self.client = client
        self.counts = WriteCounts()
        self.ts_field, self.feature_fields = ts_field, list(feature_fields)
        self.ttl_seconds = int(ttl_seconds or 0)
        # a window schedule among the values: longer than a listpack's usual limit, and checked
        # by the script when the timestamp is not newer (see WRITE_SCRIPT)
        self._schedule = next((j for j, f in enumerate(self.feature_fields) if is_schedule_field(f)), None)
        self._head_args = [ts_field, str(len(feature_fields)).encode(), str(self.ttl_seconds).encode(),
                           str(0 if self._schedule is None else self._schedule + 1).encode(),
                           b"", b"", *feature_fields]
        self._max_rate = max_rows_per_second
        self._started = time.monotonic()
        self._sent_rows = 0
        self._queue: deque[_Sent] = deque()
        self._conn: redis.connection.Connection | None = None
        self._sock: socket.socket | None = None
        self._replies: _ReplyLines | None = None
        self._want_restore = restore
        self._script = _SCRIPT_REPLACE_EQUAL if replace_equal else _SCRIPT
        self.per_key = per_key
        if per_key:
            self._script = _SCRIPT_PER_KEY_REPLACE_EQUAL if replace_equal else _SCRIPT_PER_KEY
        self.script_sha = hashlib.sha1(self._script).hexdigest().encode()
        self._probe_tag = probe_tag
        self.refused: list[RefusedRows] = []  # per-key mode: rows to send again (see RETRY_ERRORS)
        self.restore_available = False
        self._prefer_restore = True
        self._max_value = 64
        self._entries: list[bytes] = []

    def __enter__(self) -> HashWriter:
        try:
            self._conn = self.client.connection_pool.get_connection()
            self._conn.connect()
            # the connection is ours alone from here: raw socket I/O, no redis-py parser
            # (cast: redis-py declares _sock only by its first value, None)
            self._sock = cast("socket.socket | None", self._conn._sock)
            assert self._sock is not None
            self._replies = _ReplyLines(self._sock)
            if self.per_key:
                self.load_script()
            if self._want_restore:
                self.restore_available = self._probe_restore()
        except redis.ConnectionError as exc:
            raise ConnectionLost(f"cannot reach Redis: {exc}; check REDIS_URL / online_store") from exc
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            if self._conn is not None:
                self._conn.disconnect()  # its parser never saw our replies: start afresh
                self.client.connection_pool.release(self._conn)
                self._conn = None

    # ------------------------------------------------------------ commands

    def lua_command(self, batch: EncodedRows) -> bytes:
        """The ``EVAL`` command writing ``batch`` with the compare-and-set script, as RESP bytes."""
        n = batch.count
        head = [b"EVAL", self._script, str(n).encode()]
        nargs = len(head) + n + len(self._head_args) + n * (1 + len(batch.values))
        keys, _ = rows.join(bulk(batch.keys))
        row_pieces = [p for v in (batch.timestamps, *batch.values) for p in bulk(v)]
        args, _ = rows.join(row_pieces)
        head_args = self._batch_head_args(batch)
        return b"".join([
            b"*%d\r\n" % nargs,
            *(_bulk_const(h) for h in head),
            keys.tobytes(),
            *(_bulk_const(a) for a in head_args),
            args.tobytes(),
        ])

    def per_key_command(self, batch: EncodedRows, asking: bool = False) -> bytes:
        """One ``EVALSHA <sha> 1 <key> <head args> <ts> <values>`` per row (a cluster node
        takes one slot per command), each after ``ASKING`` when ``asking``, as RESP bytes."""
        n = batch.count
        head_args = self._batch_head_args(batch)
        nargs = 4 + len(head_args) + 1 + len(batch.values)
        head = b"".join([_ASKING if asking else b"", b"*%d\r\n" % nargs, _bulk_const(b"EVALSHA"),
                         _bulk_const(self.script_sha), _bulk_const(b"1")])
        middle = b"".join(_bulk_const(a) for a in head_args)
        flat, _ = rows.join([
            rows.constant(head, n),
            *bulk(batch.keys),
            rows.constant(middle, n),
            *(p for v in (batch.timestamps, *batch.values) for p in bulk(v)),
        ])
        return flat.tobytes()

    def _batch_head_args(self, batch: EncodedRows) -> list[bytes]:
        head_args = list(self._head_args)
        if self._schedule is not None:  # the header every schedule of this view starts with
            first = batch.values[self._schedule]
            header = bytes(first.data[0, :14])
            head_args[4], head_args[5] = header[:4], header[8:14]
        return head_args

    def restore_command(self, batch: EncodedRows) -> bytes:
        """One ``RESTORE key ttl payload`` per row (no ``REPLACE``: existing keys are refused)."""
        return dump.restore_commands(batch.keys, [self.ts_field, *self.feature_fields],
                                     [batch.timestamps, *batch.values], self.ttl_seconds * 1000)

    def _restorable(self, batch: EncodedRows) -> np.ndarray:
        """Rows whose hash RESTORE can carry exactly as HSET would build it."""
        ok = np.ones(batch.count, dtype=bool)
        for j, piece in enumerate((batch.timestamps, *batch.values)):
            if j - 1 != self._schedule:  # a schedule is long and never an integer (see __init__)
                ok &= piece.row_lengths() <= self._max_value
                ok &= ~dump.integer_like(piece)
        return ok

    # ------------------------------------------------------------ writing

    def write(self, batch: EncodedRows) -> None:
        """Send ``batch``; replies of earlier batches are read meanwhile."""
        if batch.count == 0:
            return
        self.send(batch)
        self._drain(keep=1)
        self._throttle(batch.count)

    def send(self, batch: EncodedRows) -> None:
        """Send ``batch`` without reading any reply (then :meth:`wait`; :meth:`write` does both)."""
        if self.restore_available and self._prefer_restore:
            ok = self._restorable(batch)
            if ok.all():
                self._send("restore", batch)
            else:
                self._send("restore", split_rows(batch, ok))
                self._send("lua", split_rows(batch, ~ok))
        else:
            self._send("lua", batch)

    def wait(self, pending: int = 0) -> None:
        """Read replies until at most ``pending`` commands are outstanding."""
        self._drain(keep=pending)

    def flush(self) -> None:
        """Wait for every batch sent."""
        self._drain(keep=0)

    def send_asking(self, batch: EncodedRows) -> None:
        """Per-key mode: send every row as ``ASKING`` + ``EVALSHA`` (a slot being imported here)."""
        assert self.per_key, "ASKING is for cluster nodes (per_key=True)"
        self._send("asking", batch)

    def load_script(self) -> None:
        """``SCRIPT LOAD`` the per-key script (again: after a ``-NOSCRIPT``)."""
        try:
            self.client.script_load(self._script)
        except redis.ConnectionError as exc:
            raise ConnectionLost(f"cannot reach Redis: {exc}") from exc

    def take_refused(self) -> list[RefusedRows]:
        """The rows refused so far (per-key mode), handed over once."""
        refused, self.refused = self.refused, []
        return refused

    def _send(self, kind: str, batch: EncodedRows) -> None:
        if batch.count == 0:
            return
        if kind == "restore":
            payload = self.restore_command(batch)
        elif self.per_key:
            payload = self.per_key_command(batch, asking=kind == "asking")
        else:
            payload = self.lua_command(batch)
        assert self._sock is not None, "use HashWriter as a context manager"
        self._sock.sendall(payload)
        self._queue.append(_Sent(kind, batch))

    def _drain(self, keep: int) -> None:
        replies = self._replies
        assert replies is not None
        while len(self._queue) > keep:
            sent = self._queue.popleft()
            n = sent.batch.count
            if sent.kind != "restore" and self.per_key:
                self._read_per_key(sent)
                continue
            if sent.kind == "lua":
                (head,) = replies.lines(1) or [_OK]
                if not head.startswith(b"*2"):
                    raise BackendUnavailable(f"Redis refused the write script: {head.decode(errors='replace')}")
                written, fresh = (int(line[1:]) for line in replies.lines(2) or [])
                self.counts.written += written
                self.counts.skipped += n - written
                if self.restore_available and fresh * 2 > n:
                    self._prefer_restore = True
                continue
            lines = replies.lines(n)
            busy = np.zeros(n, dtype=bool)
            again: dict[int, bytes] = {}
            if lines is not None:
                for i, line in enumerate(lines):
                    if line.startswith(b"-BUSYKEY"):
                        busy[i] = True
                    elif self.per_key and line.startswith(RETRY_ERRORS):
                        again[i] = line
                    elif not line.startswith(b"+"):
                        raise BackendUnavailable(f"Redis refused RESTORE: {line.decode(errors='replace')}")
            nbusy = int(busy.sum())
            self.counts.written += n - nbusy - len(again)
            self.counts.restored += n - nbusy - len(again)
            if again:
                self._refuse(sent.batch, again)
            if nbusy:
                self._send("lua", split_rows(sent.batch, busy))
                self._prefer_restore = nbusy * 2 <= n

    def _read_per_key(self, sent: _Sent) -> None:
        """The replies of per-key ``EVALSHA`` rows: ``:0`` .. ``:3`` (written + 2 * new), or errors."""
        replies = self._replies
        assert replies is not None
        n = sent.batch.count
        codes = replies.digits(n) if sent.kind == "lua" else None
        again: dict[int, bytes] = {}
        if codes is None:
            lines = replies.lines(2 * n if sent.kind == "asking" else n)
            if lines is None:  # +OK for every row: not the script's answer
                raise BackendUnavailable("Redis answered +OK to EVALSHA of the write script")
            if sent.kind == "asking":
                lines = lines[1::2]  # each after ASKING's +OK
            codes = np.full(n, -1, dtype=np.int64)
            for i, line in enumerate(lines):
                if line.startswith(b":"):
                    codes[i] = int(line[1:])
                elif line.startswith(RETRY_ERRORS):
                    again[i] = line
                else:
                    raise BackendUnavailable(f"Redis refused the write script: {line.decode(errors='replace')}")
        done = codes[codes >= 0]
        written, fresh = int((done & 1).sum()), int((done >> 1).sum())
        self.counts.written += written
        self.counts.skipped += len(done) - written
        if again:
            self._refuse(sent.batch, again)
        if self.restore_available and fresh * 2 > n:
            self._prefer_restore = True

    def _refuse(self, batch: EncodedRows, errors: dict[int, bytes]) -> None:
        keep = np.zeros(batch.count, dtype=bool)
        keep[list(errors)] = True
        self.refused.append(RefusedRows(split_rows(batch, keep), [errors[i] for i in sorted(errors)]))

    def _throttle(self, n: int) -> None:
        self._sent_rows += n
        if self._max_rate:
            ahead = self._sent_rows / self._max_rate - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    # ------------------------------------------------------------ probing the server

    def _probe_restore(self) -> bool:
        """True when RESTORE of our payload gives the very hash HSET gives, on this server."""
        try:
            limits = self.client.config_get("hash-max-*-entries")
            values = self.client.config_get("hash-max-*-value")
            assert isinstance(limits, dict) and isinstance(values, dict)  # a sync client's replies
            entries = min((int(v) for v in limits.values()), default=128)
            self._max_value = min((int(v) for v in values.values()), default=64)
        except redis.ResponseError:  # CONFIG disabled (managed Redis): the defaults
            entries, self._max_value = 128, 64
        if 1 + len(self.feature_fields) > entries or len(self.ts_field) > self._max_value:
            return False
        sample = [b"\x08\x01", *(b"\x29" + bytes(8) for _ in self.feature_fields)]
        sample[-1] = b""  # a null value
        if self._probe_tag is None:
            tag = uuid.uuid4().hex
            restored, built = f"featurepipe:probe:{tag}:r".encode(), f"featurepipe:probe:{tag}:h".encode()
        else:  # one hash tag: both keys in one slot of this cluster node (the 2-key DEL below)
            restored = b"featurepipe:probe:{%s}:r" % self._probe_tag
            built = b"featurepipe:probe:{%s}:h" % self._probe_tag

        def one(value: bytes) -> Piece:
            return rows.from_flat(np.frombuffer(value, np.uint8), np.array([0, len(value)]))

        probe = EncodedRows(keys=one(restored), timestamps=one(sample[0]), values=[one(v) for v in sample[1:]])
        assert self._sock is not None and self._replies is not None
        saved_ttl, self.ttl_seconds = self.ttl_seconds, 60  # the probe keys expire on their own
        try:
            # exactly the bytes the writer sends, on its own connection
            self._sock.sendall(self.restore_command(probe))
            reply = self._replies.lines(1)
            if reply is not None:  # not +OK: unknown payload version, RESTORE not allowed, ...
                return False
            # (redis-py annotates hset's key as str; bytes keys work, as everywhere else)
            self.client.hset(built, mapping=dict(zip([self.ts_field, *self.feature_fields], sample)))  # type: ignore[arg-type]
            self.client.pexpire(built, 60_000)
            if self.client.dump(restored) != self.client.dump(built):
                return False
            return self._schedule is None or self._probe_long_value(probe, sample, restored)
        except redis.ResponseError:
            return False
        finally:
            self.ttl_seconds = saved_ttl
            try:
                self.client.delete(restored, built)
            except redis.ResponseError:
                pass  # not allowed to delete: they expire in a minute


    def _probe_long_value(self, probe: EncodedRows, sample: list[bytes], key: bytes) -> bool:
        """True when a hash holding a schedule (a value longer than a listpack entry's usual
        limit, which ``HSET`` would store as a hashtable) is restored with exactly its
        fields and values (Redis keeps it a listpack: the same content in less memory)."""
        assert self._schedule is not None and self._sock is not None and self._replies is not None
        long_value = bytes(range(256)) * 20  # 5,120 bytes: the 5-byte entry header and backlen
        values = list(probe.values)
        values[self._schedule] = rows.from_flat(np.frombuffer(long_value, np.uint8), np.array([0, len(long_value)]))
        self.client.delete(key)
        self._sock.sendall(self.restore_command(EncodedRows(probe.keys, probe.timestamps, values)))
        if self._replies.lines(1) is not None:
            return False
        expected = dict(zip([self.ts_field, *self.feature_fields], sample))
        expected[self.feature_fields[self._schedule]] = long_value
        return self.client.hgetall(key) == expected  # type: ignore[arg-type]


def split_rows(batch: EncodedRows, keep: np.ndarray) -> EncodedRows:
    """The rows of ``batch`` where ``keep`` is true."""
    index = np.flatnonzero(keep)
    return EncodedRows(
        keys=batch.keys.take(index),
        timestamps=batch.timestamps.take(index),
        values=[v.take(index) for v in batch.values],
    )
