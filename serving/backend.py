"""The Redis connection the server reads through, with short timeouts.

Built from the online store's ``connection_string`` in Feast's form
(``host:port,db=0,password=...,ssl=true``), which featurepipe derives from ``$REDIS_URL``
(see ``featurepipe.config``). Timeouts are short and retries few, so that a Redis outage
turns into a quick UNAVAILABLE rather than a hung request.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from featurepipe.errors import InvalidInput

# Feast connection-string options that map one to one onto redis-py arguments.
_OPTIONS: dict[str, type] = {
    "db": int,
    "password": str,
    "username": str,
    "ssl": bool,
    "ssl_cert_reqs": str,
    "ssl_ca_certs": str,
    "client_name": str,
}


def _parse_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def parse_connection_string(connection_string: str) -> dict[str, Any]:
    """redis-py keyword arguments for a Feast Redis connection string.

    >>> parse_connection_string("10.0.0.5:6380,db=2,password=s3cret")
    {'host': '10.0.0.5', 'port': 6380, 'db': 2, 'password': 's3cret'}
    """
    nodes = [part for part in connection_string.split(",") if part and "=" not in part]
    if len(nodes) != 1 or ":" not in nodes[0]:
        raise InvalidInput(
            f"Redis connection string {connection_string!r} must name exactly one host:port "
            "(Redis Cluster and Sentinel are not supported by featurepipe serve yet); "
            "set REDIS_URL=redis://host:port/db"
        )
    host, _, port = nodes[0].rpartition(":")
    kwargs: dict[str, Any] = {"host": host, "port": int(port)}
    for part in connection_string.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            continue
        name = name.strip()
        kind = _OPTIONS.get(name)
        if kind is None:
            continue  # Feast-only options (e.g. skip_full_coverage_check) do not apply
        kwargs[name] = _parse_bool(value) if kind is bool else kind(value)
    return kwargs


def connect(connection_string: str, timeout: float = 1.0, max_connections: int = 64) -> redis.Redis:
    """A redis-py client for reads: ``timeout`` seconds per connect and per reply.

    One immediate retry on a broken connection (so a Redis restart costs no failed
    request), none on a timeout (so a hung Redis fails within ``timeout``).
    """
    return redis.Redis(
        **parse_connection_string(connection_string),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), retries=1, supported_errors=(redis.ConnectionError,)),
        max_connections=max_connections,
        health_check_interval=0,
    )
