"""The Redis round trip of a request: every HMGET of a plan in one write and one read.

The commands are prepacked RESP (the plan holds each hash's command head and fields, so a
request adds only its keys) and sent on a pooled connection; the replies are read
straight from hiredis. At 200 keys this is half the time of a redis-py pipeline.

A Redis that does not answer becomes ``BackendUnavailable`` within the client's timeout
(one immediate retry on a broken connection, so a Redis restart costs no failed request);
a Redis that answers with an error becomes ``FeaturepipeError``.

:class:`Fetcher` is the interface the reader uses; :class:`RedisFetcher` reads one Redis,
:class:`serving.cluster_fetch.ClusterFetcher` a Redis Cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import redis

from featurepipe.errors import BackendUnavailable, FeaturepipeError
from serving.columns import Replies
from serving.plan import Plan

try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # another redis-py layout: read_response per reply (see read_replies)
    _NOT_ENOUGH_DATA = object()


class Fetcher(Protocol):
    """Reads the HMGET replies of a request: what :class:`serving.lookup.OnlineReader` needs."""

    on_fetch: Callable[[float], None] | None  # receives the seconds of each request's reads

    def fetch(self, plan: Plan, keys: list[list[bytes]]) -> Replies:
        """The HMGET reply of every key of every hash of ``plan``, in that order."""
        ...

    def ping(self) -> bool:
        """True when every Redis node the data lives on answers a PING."""
        ...

    @property
    def node_health(self) -> Mapping[str, bool]:
        """``host:port`` of each node, and whether it answered the last PING (or request)."""
        ...

    def close(self) -> None:
        """Close the pooled connections."""
        ...


class RedisFetcher:
    """Sends a plan's HMGETs for a request's entity keys and reads the replies."""

    def __init__(self, client: redis.Redis, on_fetch: Callable[[float], None] | None = None) -> None:
        self.client = client
        self.on_fetch = on_fetch  # receives the seconds of each Redis round trip
        kwargs = client.connection_pool.connection_kwargs
        self._where = f"{kwargs.get('host')}:{kwargs.get('port')}"
        self._up: bool | None = None

    def ping(self) -> bool:
        """True when Redis answers a PING."""
        try:
            self._up = bool(self.client.ping())
        except redis.RedisError:
            self._up = False
        return self._up

    @property
    def node_health(self) -> Mapping[str, bool]:
        """The one node, and whether it answered the last PING (empty before the first)."""
        return {} if self._up is None else {self._where: self._up}

    def close(self) -> None:
        """Close the pooled connections."""
        self.client.close()

    def fetch(self, plan: Plan, keys: list[list[bytes]]) -> Replies:
        """The HMGET reply of every key of every hash of ``plan`` (``keys``: per hash, the
        distinct entity keys), in that order."""
        packed = b"".join([
            b"".join([h.hmget_head, b"$%d\r\n" % len(key), key, b"\r\n", h.hmget_fields])
            for h, hash_keys in zip(plan.hashes, keys, strict=True)
            for key in hash_keys
        ])
        count = sum(len(k) for k in keys)
        started = time.perf_counter()
        pool = self.client.connection_pool
        for attempt in (0, 1):  # one retry on a broken (e.g. pre-restart) connection
            try:
                connection = pool.get_connection()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise self._unavailable(exc) from exc
            try:
                connection.send_packed_command([packed])
                replies = read_replies(connection, count)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                connection.disconnect()
                if attempt == 0 and isinstance(exc, redis.ConnectionError) \
                        and not isinstance(exc, redis.TimeoutError):
                    continue
                raise self._unavailable(exc) from exc
            except redis.RedisError as exc:
                connection.disconnect()  # replies may be left unread on it
                raise FeaturepipeError(f"Redis refused the read: {exc}") from exc
            except BaseException:
                connection.disconnect()
                raise
            finally:
                pool.release(connection)
            if self.on_fetch is not None:
                self.on_fetch(time.perf_counter() - started)
            return replies
        raise AssertionError("unreachable")

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        self._up = False
        return BackendUnavailable(
            f"Redis at {self._where} did not answer ({type(exc).__name__}: {exc}); retry shortly, "
            "and check that redis-server is up and REDIS_URL points at it"
        )


def read_replies(connection: Any, count: int, keep_errors: bool = False) -> list[Any]:
    """``count`` replies from ``connection``. With hiredis (a pinned dependency) the
    replies are taken straight from its reader, one C call each: redis-py's per-reply
    ``read_response`` costs about 10 us of Python, 1.5 ms of a 100-entity request.

    An error reply raises its ``redis.ResponseError``, or with ``keep_errors`` is returned
    in its place (the rest are still read, so the connection stays in step: a Redis
    Cluster's ``MOVED`` for one key is not the end of the others)."""
    parser = getattr(connection, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if reader is None or not hasattr(parser, "read_from_socket") \
            or getattr(parser, "_next_response", _NOT_ENOUGH_DATA) is not _NOT_ENOUGH_DATA:
        if keep_errors:
            return [_response_or_error(connection) for _ in range(count)]
        return [connection.read_response() for _ in range(count)]
    gets, fill = reader.gets, parser.read_from_socket  # type: ignore[union-attr]
    replies: list[Any] = []
    append = replies.append
    while len(replies) < count:
        reply = gets()
        if reply is _NOT_ENOUGH_DATA:
            try:
                fill()
            except TimeoutError as exc:  # socket.timeout; redis-py's own error types below
                raise redis.TimeoutError(f"Timeout reading from Redis: {exc}") from exc
            except OSError as exc:
                raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
        elif isinstance(reply, Exception) and not keep_errors:
            raise reply
        else:
            append(reply)
    return replies


def _response_or_error(connection: Any) -> Any:
    try:
        return connection.read_response()
    except redis.ResponseError as exc:
        return exc
