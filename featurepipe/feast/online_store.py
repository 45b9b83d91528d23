"""Feast's Redis online store, with featurepipe's connection resolution.

Named in ``feature_store.yaml``::

    online_store:
      type: featurepipe.feast.online_store.FeaturepipeRedisOnlineStore
      # connection_string: "host:port,db=0"   # optional; $REDIS_URL overrides it

Keys, fields and values are exactly Feast's ``redis`` store's (this class only subclasses
it), so Feast's SDK, CLI and featurepipe read and write the same hashes. The difference is
where the server is: ``$REDIS_URL`` when set, else ``connection_string`` when given, else the
repo's own local ``redis-server`` under ``<repo>/.redis/``, started on demand
(:class:`featurepipe.redis_server.LocalRedis`). ``FeatureStore(repo_path=...)`` then works
from a notebook or a shell with no variables set. With ``redis_type: redis_cluster`` the
nodes are those of ``connection_string``, as in Feast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig, RedisType
from pydantic import StrictStr

from featurepipe.config import ONLINE_STORE_TYPE, cluster_target, redis_connection_string

F = TypeVar("F", bound=Callable[..., Any])


class FeaturepipeRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """``online_store`` options: Feast's Redis options, with ``connection_string`` optional."""

    type: Literal["featurepipe.feast.online_store.FeaturepipeRedisOnlineStore"] = ONLINE_STORE_TYPE  # type: ignore[assignment]
    connection_string: StrictStr = ""
    """``host:port,db=N,...`` as Feast's; empty: ``$REDIS_URL``, else the local server."""


def _remember_repo(method: F) -> F:
    """Wrap an online-store method whose first argument is the ``RepoConfig``: note the repo
    it belongs to, so the client is made for that repo's Redis."""
    if _is_async(method):
        @functools.wraps(method)
        async def wrapper_async(self: FeaturepipeRedisOnlineStore, config: Any, *a: Any, **kw: Any) -> Any:
            self._repo_path = config.repo_path
            return await method(self, config, *a, **kw)
        return wrapper_async  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(self: FeaturepipeRedisOnlineStore, config: Any, *a: Any, **kw: Any) -> Any:
        self._repo_path = config.repo_path
        return method(self, config, *a, **kw)
    return wrapper  # type: ignore[return-value]


def _is_async(method: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(method)


class FeaturepipeRedisOnlineStore(RedisOnlineStore):
    """Feast's :class:`RedisOnlineStore`, connected to the Redis featurepipe resolves."""

    _repo_path: Any = None

    def _resolved(self, online_store_config: RedisOnlineStoreConfig) -> RedisOnlineStoreConfig:
        if online_store_config.redis_type == RedisType.redis_cluster:  # its nodes, as configured (checked)
            conn = cluster_target(online_store_config.connection_string).feast_form
        else:
            conn = redis_connection_string(self._repo_path, online_store_config.connection_string)
        return online_store_config.model_copy(update={"connection_string": conn})

    def _get_client(self, online_store_config: RedisOnlineStoreConfig) -> Any:
        return super()._get_client(self._resolved(online_store_config))

    async def _get_client_async(self, online_store_config: RedisOnlineStoreConfig) -> Any:
        return await super()._get_client_async(self._resolved(online_store_config))


def _takes_repo_config(method: Any) -> bool:
    import inspect

    try:
        params = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 and params[1] == "config"


# Every method of Feast's store (and its base) that receives the RepoConfig remembers the repo,
# whichever of them Feast's SDK calls first (get_online_features, online_read, update, ...).
for _name in dir(RedisOnlineStore):
    _method = getattr(RedisOnlineStore, _name)
    if not _name.startswith("__") and callable(_method) and _takes_repo_config(_method):
        setattr(FeaturepipeRedisOnlineStore, _name, _remember_repo(_method))
