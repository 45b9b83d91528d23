"""The Redis round trip of a request on a Redis Cluster: one write and one read per node.

Each key's slot (CRC16 of the key, or of its ``{hash tag}``: :func:`redis.crc.key_slot`,
one key at a time, faster than the writer's vectorised form for a request's few keys)
names the primary that owns it (:class:`featurepipe.online.slots.SlotMap`, the writer's
map, from ``CLUSTER SLOTS`` through redis-py's nodes manager). A request's HMGETs are packed into one buffer per node, every node's buffer
is written first, then each node's replies are read with hiredis (the nodes work at the
same time, no thread per node), and the replies are put back in request order.

Error replies are read in their place, so one key's redirection never desyncs a
connection: ``MOVED`` (the slot has a new owner) patches the map, refreshes it and sends
the HMGET to the named node; ``ASK`` (the slot is migrating and the key already left)
sends ``ASKING`` and the HMGET to the named node, once. A node that does not answer makes
the request ``BackendUnavailable``, named with its ``host:port`` and slots, unless the
refreshed map gives its slots to a node that answers (a failover); requests whose keys
are all on live nodes go on being served. Like :class:`serving.fetch.RedisFetcher`, one
immediate retry on a broken pooled connection, none on a timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.cluster import PRIMARY, ClusterNode, RedisCluster, get_node_name
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    TryAgainError,
)

from featurepipe.errors import BackendUnavailable, FeaturepipeError
from featurepipe.online.slots import SlotMap
from serving.columns import Replies
from serving.fetch import read_replies
from serving.plan import Plan

MAX_REDIRECTS = 5  # rounds of MOVED / ASK for one request before it fails
REFRESH_SECONDS = 0.5  # at most one CLUSTER SLOTS per this many seconds
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)


@dataclass
class _Batch:
    """One node's share of a round: command indexes, and which are sent after ASKING."""

    node: str
    commands: list[int] = field(default_factory=list)
    asking: list[bool] = field(default_factory=list)
    replies: list[Any] = field(default_factory=list)
    error: Exception | None = None  # the node did not answer
    connected: bool = False  # the error came on a pooled connection (maybe a stale one)

    def add(self, command: int, asking: bool = False) -> None:
        self.commands.append(command)
        self.asking.append(asking)


class ClusterFetcher:
    """Sends a plan's HMGETs for a request's entity keys to the cluster's primaries, one
    write and one read per node, and returns the replies in request order."""

    def __init__(self, client: RedisCluster, on_fetch: Callable[[float], None] | None = None) -> None:
        self.client = client
        self.on_fetch = on_fetch  # receives the seconds of each request's round trips
        self._nodes: dict[str, ClusterNode] = {}  # host:port -> node with its connection pool
        self._up: dict[str, bool] = {}
        self._lock = threading.Lock()  # guards map and node changes (never held for I/O)
        self._refreshing = threading.Lock()
        self._refreshed_at = time.monotonic()  # the client has just read the map
        self.slot_map = self._known_map(None)

    # --- the request path ------------------------------------------------------------------

    def fetch(self, plan: Plan, keys: list[list[bytes]]) -> Replies:
        """The HMGET reply of every key of every hash of ``plan`` (``keys``: per hash, the
        distinct entity keys), in that order."""
        commands = [
            b"".join([h.hmget_head, b"$%d\r\n" % len(key), key, b"\r\n", h.hmget_fields])
            for h, hash_keys in zip(plan.hashes, keys, strict=True)
            for key in hash_keys
        ]
        slots = [key_slot(key) for hash_keys in keys for key in hash_keys]
        started = time.perf_counter()
        replies: list[Any] = [None] * len(commands)
        owners = self.slot_map.owners
        by_node: dict[str, list[int]] = {}
        for i, slot in enumerate(slots):
            by_node.setdefault(owners[slot], []).append(i)
        batches = {node: _Batch(node, indexes, [False] * len(indexes))
                   for node, indexes in by_node.items()}
        retried: set[str] = set()  # nodes given their one retry on a broken connection
        for _ in range(MAX_REDIRECTS + 1):
            try:
                self._exchange(list(batches.values()), commands)
            except redis.RedisError as exc:  # an answer that is not a reply (not a node down)
                raise FeaturepipeError(f"the Redis Cluster refused the read: {exc}") from exc
            batches = self._next_round(batches.values(), replies, slots, retried)
            if not batches:
                if self.on_fetch is not None:
                    self.on_fetch(time.perf_counter() - started)
                return replies
        raise BackendUnavailable(
            f"the Redis Cluster kept redirecting this request's keys ({MAX_REDIRECTS} rounds of "
            "MOVED/ASK): its slots are moving; retry shortly"
        )

    def _exchange(self, batches: list[_Batch], commands: list[bytes]) -> None:
        """Write every batch to its node, then read every node's replies into its batch."""
        sent: list[tuple[_Batch, Any, Any]] = []  # batch, pool, connection
        try:
            for batch in batches:
                if not batch.node:
                    batch.error = redis.ConnectionError("no node of the cluster serves these slots")
                    continue
                pool = self._node(batch.node).redis_connection.connection_pool
                packed = b"".join([
                    _ASKING + commands[i] if asking else commands[i]
                    for i, asking in zip(batch.commands, batch.asking, strict=True)
                ])
                try:
                    connection = pool.get_connection()
                except _UNAVAILABLE as exc:
                    batch.error = exc
                    continue
                sent.append((batch, pool, connection))
                batch.connected = True
                try:
                    connection.send_packed_command([packed])
                except _UNAVAILABLE as exc:
                    batch.error = exc
            while sent:
                batch, pool, connection = sent[0]
                if batch.error is None:
                    count = len(batch.commands) + sum(batch.asking)
                    try:
                        got = read_replies(connection, count, keep_errors=True)
                    except _UNAVAILABLE as exc:
                        batch.error = exc
                    else:
                        batch.replies = _without_asking_replies(got, batch.asking)
                if batch.error is not None:
                    connection.disconnect()
                sent.pop(0)
                pool.release(connection)
        finally:
            for _, pool, connection in sent:  # an unexpected error: replies left unread
                connection.disconnect()
                pool.release(connection)

    def _next_round(self, batches: Iterable[_Batch], replies: list[Any], slots: list[int],
                    retried: set[str]) -> dict[str, _Batch]:
        """Place the replies; what is left to send again, per node (MOVED, ASK, a broken
        connection retried once, a dead node's slots given to another node)."""
        again: dict[str, _Batch] = {}

        def resend(node: str, command: int, asking: bool = False) -> None:
            batch = again.get(node)
            if batch is None:
                batch = again[node] = _Batch(node)
            batch.add(command, asking)

        moves: list[MovedError] = []
        down: list[_Batch] = []
        for batch in batches:
            if batch.error is not None:
                broken = batch.connected and isinstance(batch.error, redis.ConnectionError) \
                    and not isinstance(batch.error, redis.TimeoutError)
                if broken and batch.node not in retried:
                    retried.add(batch.node)
                    for command in batch.commands:
                        resend(batch.node, command)
                else:
                    down.append(batch)
                continue
            for command, reply in zip(batch.commands, batch.replies, strict=True):
                if not isinstance(reply, Exception):
                    replies[command] = reply
                elif isinstance(reply, MovedError):  # before AskError: MOVED is a kind of ASK
                    moves.append(reply)
                    resend(get_node_name(reply.host, reply.port), command)
                elif isinstance(reply, AskError):
                    resend(get_node_name(reply.host, reply.port), command, asking=True)
                elif isinstance(reply, (ClusterDownError, TryAgainError)):
                    raise BackendUnavailable(
                        f"Redis Cluster node {batch.node} cannot serve slot {slots[command]} "
                        f"now ({reply}); retry shortly"
                    )
                else:
                    raise FeaturepipeError(f"Redis Cluster node {batch.node} refused the read: {reply}")
        if moves or down:
            self.refresh(moves)
        if down:
            owners = self.slot_map.owners
            lost = [b for b in down if any(owners[slots[c]] in ("", b.node) for c in b.commands)]
            if lost:
                for b in lost:
                    self._up[b.node] = False
                raise self._unavailable(lost, len(slots))
            for b in down:  # a failover: the slots have a new primary
                for command in b.commands:
                    resend(owners[slots[command]], command)
        return again

    def _unavailable(self, lost: list[_Batch], count: int) -> BackendUnavailable:
        slot_map = self.slot_map
        nodes = "; ".join(
            f"{b.node or '(none)'} (slots {slot_map.ranges(b.node)}, {len(b.commands)} of the "
            f"request's {count} keys): {type(b.error).__name__}: {b.error}"
            for b in lost
        )
        return BackendUnavailable(
            f"Redis Cluster node did not answer: {nodes}; requests whose keys are on the other "
            "nodes are served. Retry shortly, and check that the node is up"
        )

    # --- the slot map and the nodes ---------------------------------------------------------

    def _node(self, name: str) -> ClusterNode:
        """The node called ``name`` (``host:port``), with a connection pool."""
        node = self._nodes.get(name)
        if node is None:
            manager = self.client.nodes_manager
            host, _, port = name.rpartition(":")
            node = manager.get_node(node_name=name) or ClusterNode(host, int(port), PRIMARY)
            if node.redis_connection is None:
                manager.create_redis_connections([node])
            with self._lock:
                node = self._nodes.setdefault(name, node)
        return node

    def refresh(self, moves: Iterable[MovedError] = ()) -> SlotMap:
        """Re-read the slot map (CLUSTER SLOTS; at most once per ``REFRESH_SECONDS``, and
        not while another thread does), then apply the ``MOVED`` errors ``moves``."""
        if time.monotonic() - self._refreshed_at >= REFRESH_SECONDS \
                and self._refreshing.acquire(blocking=False):
            try:
                self.slot_map = self._read_map(self.slot_map)
                self._refreshed_at = time.monotonic()
            finally:
                self._refreshing.release()
        moves = list(moves)
        if moves:
            with self._lock:
                self.slot_map = self.slot_map.moved({m.slot_id: get_node_name(m.host, m.port) for m in moves})
        return self.slot_map

    def _read_map(self, previous: SlotMap) -> SlotMap:
        """The slot map from the nodes manager, re-initialised now (the last known owner
        stays on slots no node reports, so a dead primary is still named)."""
        manager = self.client.nodes_manager
        with manager._lock:
            for name, up in self._up.items():
                if not up:  # asked last for CLUSTER SLOTS
                    manager.move_node_to_end_of_cached_nodes(name)
        try:
            manager.initialize(disconnect_startup_nodes_pools=False)
        except (RedisClusterException, redis.RedisError):
            return previous  # no node answered: keep what we knew
        return self._known_map(previous)

    def _known_map(self, previous: SlotMap | None) -> SlotMap:
        """The slot map the nodes manager holds now, over ``previous``; its nodes' pools
        are kept for the requests."""
        manager = self.client.nodes_manager
        slot_map = SlotMap.of(manager, previous)
        with manager._lock:
            nodes = {n.name: n for n in manager.nodes_cache.values() if n.redis_connection is not None}
        with self._lock:
            for name, node in nodes.items():
                self._nodes.setdefault(name, node)
        return slot_map

    # --- health ---------------------------------------------------------------------------

    def ping(self) -> bool:
        """True while any primary answers a PING (all sent at once, each within the client's
        socket timeout): the server can still answer the requests whose keys are on the
        nodes that answer (see :mod:`serving.health`). When one does not, the map is
        refreshed and a new primary of its slots (a failover) is asked too; which nodes are
        down is in :attr:`node_health`."""
        up = self._ping(self.slot_map.primaries())
        self._up = dict(up)  # a node found down is asked last for the map
        if not all(up.values()):
            slot_map = self.refresh()
            up.update(self._ping([name for name in slot_map.primaries() if name not in up]))
            self._up = {name: up[name] for name in slot_map.primaries()}
        return any(self._up.values())

    def _ping(self, names: list[str]) -> dict[str, bool]:
        up: dict[str, bool] = {}
        sent: list[tuple[str, Any, Any]] = []
        for name in names:
            pool = self._node(name).redis_connection.connection_pool
            try:
                connection = pool.get_connection()
            except redis.RedisError:  # refused, timed out, or a wrong password
                up[name] = False
                continue
            sent.append((name, pool, connection))
            try:
                connection.send_command("PING")
            except redis.RedisError:
                up[name] = False
        for name, pool, connection in sent:
            if name not in up:
                try:
                    up[name] = connection.read_response() in (b"PONG", "PONG", True)
                except redis.RedisError:
                    up[name] = False
            if not up[name]:
                connection.disconnect()
            pool.release(connection)
        return up

    @property
    def node_health(self) -> Mapping[str, bool]:
        """Each primary, and whether it answered the last PING (False also when a request
        found it down since)."""
        return dict(self._up)

    def close(self) -> None:
        """Close every node's pooled connections."""
        for node in list(self._nodes.values()):
            if node.redis_connection is not None:
                node.redis_connection.close()
        self.client.close()


def _without_asking_replies(replies: list[Any], asking: list[bool]) -> list[Any]:
    """The HMGET replies of a batch, less the reply to the ASKING sent before some."""
    if not any(asking):
        return replies
    out: list[Any] = []
    position = 0
    for asked in asking:
        position += asked  # skip ASKING's +OK
        out.append(replies[position])
        position += 1
    return out
