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

from featurepipe.config import redis_connection_kwargs


def parse_connection_string(connection_string: str) -> dict[str, Any]:
    """redis-py keyword arguments for a Feast Redis connection string.

    >>> parse_connection_string("10.0.0.5:6380,db=2,password=s3cret")
    {'host': '10.0.0.5', 'port': 6380, 'db': 2, 'password': 's3cret'}
    """
    return redis_connection_kwargs(connection_string)


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
