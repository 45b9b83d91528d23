"""Writes encoded rows into a Redis Cluster: the rows of each batch split by the primary
owning their key's slot, one per-key :class:`~featurepipe.online.writer.HashWriter` per node.
Slots and their owners (:func:`~featurepipe.online.slots.key_slots`,
:class:`~featurepipe.online.slots.SlotMap`) come from :mod:`featurepipe.online.slots`, which
the server's cluster reads share.

Feast's keys carry no hash tags, so a batch touches every slot; a cluster node refuses a
command across slots (``CROSSSLOT``), so each node's writer sends ``RESTORE`` or one
``EVALSHA`` per key (``per_key=True``): every key is still written by one atomic command,
newest value wins, exactly as on one server. Each batch is sent to every node before any
reply is read. Rows a node redirects are sent again: ``-MOVED`` refreshes the slot map,
``-ASK`` goes to the importing node after ``ASKING``, ``-NOSCRIPT`` loads the script
again, ``-TRYAGAIN`` / ``-CLUSTERDOWN`` wait a little; a key refused twice keeps its latest
row only. A node that goes away ends the write with :class:`ClusterNodeUnavailable` once
the other nodes have finished theirs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from featurepipe.errors import BackendUnavailable
from featurepipe.online import rows
from featurepipe.online.rows import Piece
from featurepipe.online.slots import SlotMap, key_slots
from featurepipe.online.writer import (
    ConnectionLost,
    EncodedRows,
    HashWriter,
    RefusedRows,
    WriteCounts,
    split_rows,
)

MAX_ROUNDS = 5  # times refused rows are sent again before giving up
_LOST = (OSError, redis.ConnectionError, redis.TimeoutError, ConnectionLost)


class ClusterNodeUnavailable(BackendUnavailable):
    """A Redis Cluster primary went away during a write; ``nodes``: "host:port" -> its slot
    ranges (:meth:`SlotMap.ranges <featurepipe.online.slots.SlotMap.ranges>`, ``"0-99,5461-10922"``)."""

    def __init__(self, nodes: dict[str, str], cause: BaseException) -> None:
        names = "; ".join(f"{name} (slots {slots})" for name, slots in nodes.items())
        super().__init__(
            f"Redis Cluster node {names} was lost while writing ({type(cause).__name__}: {cause}). "
            "The other nodes finished their rows. Each key is written by one atomic command, so no "
            "key is half-written, but keys of those slots may be missing or older than the rows sent. "
            "Bring the node back (restart it or fail over to a replica), then rerun the same command "
            "over the same range: rows already written are skipped."
        )
        self.nodes = nodes


def _concat(pieces: Sequence[Piece]) -> Piece:
    width = max(p.width for p in pieces)
    data = np.zeros((sum(p.rows for p in pieces), width), dtype=np.uint8)
    pos = 0
    for p in pieces:
        data[pos:pos + p.rows, :p.width] = p.data
        pos += p.rows
    return Piece(data, np.concatenate([p.row_lengths() for p in pieces]))


@dataclass(frozen=True)
class _Resend:
    """Refused rows to send again, each with its error line and the node that answered it."""

    batch: EncodedRows
    errors: list[bytes]
    nodes: list[str]


def _latest_per_key(refused: list[tuple[str, RefusedRows]]) -> _Resend:
    """The refused rows as one batch, only the last row of each key (an older row sent again
    after a newer one could win a ``replace_equal`` write)."""
    batches = [r.batch for _, r in refused]
    merged = EncodedRows(_concat([b.keys for b in batches]), _concat([b.timestamps for b in batches]),
                         [_concat([b.values[j] for b in batches]) for j in range(len(batches[0].values))])
    errors = [e for _, r in refused for e in r.errors]
    origins = [name for name, r in refused for _ in r.errors]
    flat, offsets = rows.join([merged.keys])
    last = {flat[a:b].tobytes(): i for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))}
    keep = np.zeros(merged.count, dtype=bool)
    keep[list(last.values())] = True
    index = np.flatnonzero(keep)
    return _Resend(split_rows(merged, keep), [errors[i] for i in index], [origins[i] for i in index])


class ClusterHashWriter:
    """:class:`~featurepipe.online.writer.HashWriter` for a Redis Cluster (same interface): use
    as a context manager, :meth:`write` batches, read :attr:`counts`.

    >>> with ClusterHashWriter(RedisCluster(host="127.0.0.1", port=7000), ts, fields) as w:  # doctest: +SKIP
    ...     w.write(batch)
    """

    def __init__(
        self,
        client: redis.cluster.RedisCluster,
        ts_field: bytes,
        feature_fields: Sequence[bytes],
        ttl_seconds: int | None = None,
        max_rows_per_second: float | None = None,
        restore: bool = True,
        replace_equal: bool = False,
    ) -> None:
        self.client = client
        self.ts_field, self.feature_fields = ts_field, list(feature_fields)
        self.ttl_seconds, self.restore, self.replace_equal = ttl_seconds, restore, replace_equal
        self.restore_available = False
        self.retries: dict[str, int] = {}  # rows sent again, by the error word (MOVED, ASK, ...)
        self._max_rate = max_rows_per_second
        self._started = time.monotonic()
        self._sent_rows = 0
        self._superseded = 0  # refused rows dropped for a later row of the same key
        self._closed = WriteCounts()  # of the node writers closed
        self._slots = SlotMap.of(client.nodes_manager)
        self._writers: dict[str, HashWriter] = {}
        self._lost: dict[str, BaseException] = {}

    @property
    def counts(self) -> WriteCounts:
        """What the node writers did so far, summed."""
        total = WriteCounts(self._closed.written, self._closed.skipped + self._superseded, self._closed.restored)
        for writer in self._writers.values():
            total.written += writer.counts.written
            total.skipped += writer.counts.skipped
            total.restored += writer.counts.restored
        return total

    def __enter__(self) -> ClusterHashWriter:
        if not self._slots.nodes:
            self.client.nodes_manager.initialize()
            self._slots = SlotMap.of(self.client.nodes_manager)
        try:
            for node in self._slots.nodes:
                self._writer(node)
            if self._lost:
                raise self._unavailable()
        except BaseException as exc:
            self._close(type(exc))
            raise
        self.restore_available = all(w.restore_available for w in self._writers.values())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        failed = exc_type
        try:
            if exc_type is None:
                self.flush()
        except BaseException as error:
            failed = type(error)
            raise
        finally:
            self._close(failed)

    def write(self, batch: EncodedRows) -> None:
        """Send ``batch`` to every node, then read the replies of earlier batches."""
        if batch.count == 0:
            return
        self._send_by_slot(batch)
        for node, writer in self._live():
            self._guard(node, writer.wait, 1)
        if self._lost or any(w.refused for _, w in self._live()):
            self._settle()
        self._throttle(batch.count)

    def flush(self) -> None:
        """Wait for every batch sent, refused rows sent again until written."""
        self._settle()

    # ------------------------------------------------------------ nodes

    def _writer(self, node: str) -> HashWriter | None:
        """The node's writer, opened on first use (None: the node is lost)."""
        if node in self._lost:
            return None
        if node not in self._writers:
            host, port = node.rsplit(":", 1)
            # no retries (as redis-py's own node clients): a node that is down is reported at once
            client = redis.Redis(host=host, port=int(port), retry=Retry(NoBackoff(), 0),
                                 **self.client.nodes_manager.connection_kwargs)
            writer = HashWriter(client, self.ts_field, self.feature_fields, ttl_seconds=self.ttl_seconds,
                                restore=self.restore, replace_equal=self.replace_equal, per_key=True,
                                probe_tag=self._slots.tag(node))
            if not self._guard(node, writer.__enter__):
                client.close()
                return None
            self._writers[node] = writer
        return self._writers[node]

    def _live(self) -> list[tuple[str, HashWriter]]:
        return [(node, w) for node, w in self._writers.items() if node not in self._lost]

    def _guard(self, node: str, action: Callable[..., object], *args: object) -> bool:
        """Run ``action``; False when it found the node gone (remembered in ``_lost``)."""
        try:
            action(*args)
        except _LOST as exc:
            self._lost.setdefault(node, exc)
            return False
        return True

    def _close(self, failed: type[BaseException] | None) -> None:
        self._closed = self.counts
        self._closed.skipped -= self._superseded
        for node, writer in self._writers.items():
            try:
                writer.__exit__(failed or (ClusterNodeUnavailable if node in self._lost else None), None, None)
            finally:
                writer.client.close()
        self._writers = {}

    def _unavailable(self) -> ClusterNodeUnavailable:
        nodes = {node: self._slots.ranges(node) for node in self._lost}
        return ClusterNodeUnavailable(nodes, next(iter(self._lost.values())))

    # ------------------------------------------------------------ sending, again

    def _send_by_slot(self, batch: EncodedRows) -> None:
        owner = self._slots.owner[key_slots(batch.keys)]
        if (owner < 0).any():
            raise BackendUnavailable(
                f"{int((owner < 0).sum())} rows map to slots no Redis Cluster primary serves "
                f"(e.g. slot {int(key_slots(batch.keys)[owner < 0][0])}); check CLUSTER SLOTS and rerun"
            )
        for index in np.unique(owner):
            node = self._slots.nodes[int(index)]
            writer = self._writer(node)
            if writer is not None:
                self._guard(node, writer.send, split_rows(batch, owner == index))

    def _settle(self) -> None:
        """Flush every node; send refused rows again (at most MAX_ROUNDS times)."""
        for attempt in range(MAX_ROUNDS + 1):
            for node, writer in self._live():
                self._guard(node, writer.flush)
            refused = [(node, r) for node, w in self._live() for r in w.take_refused()]
            if not refused:
                break
            if attempt == MAX_ROUNDS:
                if self._lost:
                    break
                sample = refused[0][1].errors[0].decode(errors="replace")
                raise BackendUnavailable(
                    f"Redis Cluster still redirected {sum(r.batch.count for _, r in refused)} rows after "
                    f"{MAX_ROUNDS} rounds (e.g. {sample}); the slots are moving or a node is failing over: "
                    "rerun the same command when CLUSTER INFO says cluster_state:ok"
                )
            self._send_again(refused, attempt)
        if self._lost:
            raise self._unavailable()

    def _send_again(self, refused: list[tuple[str, RefusedRows]], attempt: int) -> None:
        resend = _latest_per_key(refused)
        batch, errors, origins = resend.batch, resend.errors, resend.nodes
        self._superseded += sum(r.batch.count for _, r in refused) - batch.count
        words = [e[1:].split(b" ", 1)[0].decode() for e in errors]
        for word in words:
            self.retries[word] = self.retries.get(word, 0) + 1
        if {"TRYAGAIN", "CLUSTERDOWN"} & set(words):
            time.sleep(0.05 * 2 ** attempt)
        if {"MOVED", "CLUSTERDOWN"} & set(words):  # slots moved, or a failover under way
            try:
                self.client.nodes_manager.initialize()
                self._slots = SlotMap.of(self.client.nodes_manager)
            except (redis.RedisError, redis.exceptions.RedisClusterException):
                pass  # a node is down, slots uncovered: the redirections still say where slots went
            moves = {int(e.split()[1]): e.split()[2].decode() for e, w in zip(errors, words) if w == "MOVED"}
            self._slots = self._slots.moved(moves)
        for node in {o for o, word in zip(origins, words) if word == "NOSCRIPT"}:
            writer = self._writers.get(node)
            if writer is not None:
                self._guard(node, writer.load_script)
        ask = np.array([w == "ASK" for w in words], dtype=bool)
        if (~ask).any():
            self._send_by_slot(split_rows(batch, ~ask))
        targets = np.array([e.split()[2].decode() if w == "ASK" else "" for e, w in zip(errors, words)])
        for node in set(targets[ask]):
            writer = self._writer(node)
            if writer is not None:
                self._guard(node, writer.send_asking, split_rows(batch, targets == node))

    def _throttle(self, n: int) -> None:
        self._sent_rows += n
        if self._max_rate:
            ahead = self._sent_rows / self._max_rate - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)


def open_hash_writer(
    client: redis.Redis | redis.cluster.RedisCluster,
    ts_field: bytes,
    feature_fields: Sequence[bytes],
    ttl_seconds: int | None = None,
    max_rows_per_second: float | None = None,
    restore: bool = True,
    replace_equal: bool = False,
) -> HashWriter | ClusterHashWriter:
    """The writer for ``client``: :class:`ClusterHashWriter` for a Redis Cluster, else :class:`HashWriter`."""
    if isinstance(client, redis.cluster.RedisCluster):
        return ClusterHashWriter(client, ts_field, feature_fields, ttl_seconds, max_rows_per_second,
                                 restore, replace_equal)
    return HashWriter(client, ts_field, feature_fields, ttl_seconds, max_rows_per_second, restore, replace_equal)
