"""Which failures a scheduler retries: a backend that is unreachable now (Redis restarting or
failing over, a network blip), and nothing else. A quality gate's block, bad input or a
backend's unusable answer gives the same result on a retry; they fail the run at once.

Nothing here imports a scheduler: the Dagster assets and an Airflow DAG ask the same question.
"""

from __future__ import annotations

import redis

from featurepipe.errors import BackendUnavailable


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception that caused it, says a backend is unreachable now:
    :class:`~featurepipe.errors.BackendUnavailable`, a connection error or a timeout
    (redis-py's own included, which are not the builtin ones)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, BackendUnavailable | ConnectionError | TimeoutError
                      | redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
