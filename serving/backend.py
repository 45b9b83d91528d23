"""The Redis connection the server reads through, with short timeouts.

Built from the online store's ``connection_string`` in Feast's form: one server
(``host:port,db=0,password=...,ssl=true``, which featurepipe derives from ``$REDIS_URL``:
see ``featurepipe.config``) or, for ``redis_type: redis_cluster``, a Redis Cluster
(``host1:port1,host2:port2,...,password=...``: any of its nodes; the rest are found with
``CLUSTER SLOTS``). Timeouts are short and retries few, so that a Redis outage turns into
a quick UNAVAILABLE rather than a hung request.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from featurepipe.config import RedisTarget, cluster_target, redis_connection_kwargs
from featurepipe.errors import BackendUnavailable
from serving.repo_config import REDIS_CLUSTER


def parse_connection_string(connection_string: str) -> dict[str, Any]:
    """redis-py keyword arguments for a Feast Redis connection string.

    >>> parse_connection_string("10.0.0.5:6380,db=2,password=s3cret")
    {'host': '10.0.0.5', 'port': 6380, 'db': 2, 'password': 's3cret'}
    """
    return redis_connection_kwargs(connection_string)


def connect(
    connection_string: str, timeout: float = 1.0, max_connections: int = 64,
    redis_type: str = "redis",
) -> redis.Redis | RedisCluster:
    """A redis-py client for reads: ``timeout`` seconds per connect and per reply.

    One Redis: one immediate retry on a broken connection (so a Redis restart costs no
    failed request), none on a timeout (so a hung Redis fails within ``timeout``).
    ``redis_type="redis_cluster"``: a :class:`~redis.cluster.RedisCluster` (its retries are
    :class:`serving.cluster_fetch.ClusterFetcher`'s), ``max_connections`` per node; it reads
    the slot map now, so it raises BackendUnavailable when no node answers.
    """
    if redis_type == REDIS_CLUSTER:
        return _connect_cluster(cluster_target(connection_string), timeout, max_connections)
    return redis.Redis(
        **parse_connection_string(connection_string),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), retries=1, supported_errors=(redis.ConnectionError,)),
        max_connections=max_connections,
        health_check_interval=0,
    )


def _connect_cluster(address: RedisTarget, timeout: float, max_connections: int) -> RedisCluster:
    try:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
            require_full_coverage=False,  # serve the slots of the nodes that are up
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
            **address.kwargs,
        )
    except (RedisClusterException, redis.RedisError) as exc:
        where = ",".join(f"{host}:{port}" for host, port in address.nodes)
        raise BackendUnavailable(
            f"no node of the Redis Cluster {where} answered CLUSTER SLOTS ({type(exc).__name__}: "
            f"{exc}); start the cluster, or fix connection_string in feature_store.yaml"
        ) from exc
