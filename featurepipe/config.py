"""Where things live: the feature repo, its data folder, and the Redis connection.

Every command resolves these the same way:

* feature repo: ``--repo`` option, else ``$FEATUREPIPE_REPO``, else ``./feature_repo``
  (or the current folder if it holds a ``feature_store.yaml``);
* data folder: ``$FEATUREPIPE_DATA_DIR``, else ``<repo>/data``;
* Redis (the online store): ``$REDIS_URL`` (``redis://[:password@]host:port[/db]``,
  ``rediss://`` for TLS), else the ``connection_string`` of ``feature_store.yaml``, else the
  repo's own local ``redis-server`` (:class:`featurepipe.redis_server.LocalRedis`, files under
  ``<repo>/.redis/``), started on demand and left running between commands;
* a Redis Cluster (``redis_type: redis_cluster``, as Feast configures it): the seed nodes of
  ``connection_string`` (``host1:port1,host2:port2,...``; ``$REDIS_URL``, which names one
  server, does not apply). :func:`online_target` gives either as a :class:`RedisTarget`.

The demo repo's ``feature_store.yaml`` names featurepipe's online store type
(:class:`featurepipe.feast.online_store.FeaturepipeRedisOnlineStore`, Feast's Redis store
with that resolution), so the Feast SDK and CLI reach the same Redis with no variables set.
Repos whose ``feature_store.yaml`` still reads ``${FEATUREPIPE_REDIS}`` keep working:
:func:`export_redis_env` (every featurepipe command calls it) sets it for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from featurepipe.errors import InvalidInput, NotFound
from featurepipe.redis_server import LocalRedis

if TYPE_CHECKING:
    from feast import FeatureStore

ONLINE_STORE_TYPE = "featurepipe.feast.online_store.FeaturepipeRedisOnlineStore"


def find_repo(repo: str | os.PathLike[str] | None = None) -> Path:
    """Return the feature repo folder (the one holding ``feature_store.yaml``)."""
    candidates: list[Path] = []
    if repo is not None:
        candidates.append(Path(repo))
    elif os.environ.get("FEATUREPIPE_REPO"):
        candidates.append(Path(os.environ["FEATUREPIPE_REPO"]))
    else:
        candidates += [Path.cwd() / "feature_repo", Path.cwd()]
    for path in candidates:
        if (path / "feature_store.yaml").is_file():
            return path.resolve()
    looked = ", ".join(str(p) for p in candidates)
    raise NotFound(
        f"no feature_store.yaml found (looked in: {looked}); run from the project root, "
        "pass --repo PATH or set FEATUREPIPE_REPO to the feature repo folder"
    )


def data_dir(repo: Path) -> Path:
    """The folder holding raw data, offline feature tables, registry and models."""
    env = os.environ.get("FEATUREPIPE_DATA_DIR")
    return Path(env).resolve() if env else repo / "data"


def redis_url_to_feast(url: str) -> str:
    """Convert ``redis://[:pw@]host:port[/db]`` into Feast's ``host:port,db=N,...`` form.

    >>> redis_url_to_feast("redis://:s3cret@10.0.0.5:6380/2")
    '10.0.0.5:6380,db=2,password=s3cret'
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise InvalidInput(
            f"REDIS_URL={url!r} is not a Redis URL; expected redis://[:password@]host:port[/db] "
            "(rediss:// for TLS)"
        )
    parts = [f"{parsed.hostname}:{parsed.port or 6379}"]
    db = parsed.path.lstrip("/")
    if db:
        if not db.isdigit():
            raise InvalidInput(f"REDIS_URL={url!r}: database {db!r} must be a number, e.g. /0")
        parts.append(f"db={db}")
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.username and parsed.username != "default":
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def redis_connection_string(repo: str | os.PathLike[str] | None = None, configured: str = "") -> str:
    """The online store's Redis in Feast's form (``host:port,db=N,...``).

    ``$REDIS_URL`` first, then ``configured`` (the ``connection_string`` of
    ``feature_store.yaml``), then ``$FEATUREPIPE_REDIS`` (older repos), then the repo's local
    server, started now if it is not running.
    """
    if os.environ.get("REDIS_URL"):
        return redis_url_to_feast(os.environ["REDIS_URL"])
    if configured and "${" not in configured:
        return configured
    if os.environ.get("FEATUREPIPE_REDIS"):
        return os.environ["FEATUREPIPE_REDIS"]

    return LocalRedis(find_repo(repo)).ensure().feast_form


def online_connection_string(repo_config: Any) -> str:
    """The Redis of a Feast ``RepoConfig``'s online store, in Feast's form.

    featurepipe's own online store type resolves as :func:`redis_connection_string`; Feast's
    ``redis`` type means exactly its ``connection_string``, as in Feast.
    """
    online = repo_config.online_store
    if getattr(online, "type", None) == ONLINE_STORE_TYPE:
        return redis_connection_string(repo_config.repo_path, online.connection_string)
    return str(online.connection_string)


def export_redis_env(repo: str | os.PathLike[str] | None = None) -> str | None:
    """For repos whose ``feature_store.yaml`` reads ``${FEATUREPIPE_REDIS}``: set it (from
    ``$REDIS_URL`` or the local server) and return it; None for every other repo."""
    try:
        text = (find_repo(repo) / "feature_store.yaml").read_text(encoding="utf-8")
    except (NotFound, OSError):
        return None
    if "${FEATUREPIPE_REDIS}" not in text:
        return None
    conn = redis_connection_string(repo)
    os.environ["FEATUREPIPE_REDIS"] = conn
    return conn


# Feast connection-string options that map one to one onto redis-py arguments.
_REDIS_OPTIONS: dict[str, type] = {
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


def redis_connection_kwargs(connection_string: str) -> dict[str, Any]:
    """redis-py keyword arguments for a Redis connection in either form.

    Accepts Feast's ``host:port,db=N,password=...,ssl=true`` and ``redis://`` /
    ``rediss://`` URLs.

    >>> redis_connection_kwargs("10.0.0.5:6380,db=2,password=s3cret")
    {'host': '10.0.0.5', 'port': 6380, 'db': 2, 'password': 's3cret'}
    >>> redis_connection_kwargs("redis://:pw@h:1/3")
    {'host': 'h', 'port': 1, 'db': 3, 'password': 'pw'}
    """
    if connection_string.startswith(("redis://", "rediss://")):
        connection_string = redis_url_to_feast(connection_string)
    nodes = [part for part in connection_string.split(",") if part and "=" not in part]
    if len(nodes) != 1 or ":" not in nodes[0]:
        raise InvalidInput(
            f"Redis connection string {connection_string!r} must name exactly one host:port "
            "(for a Redis Cluster set redis_type: redis_cluster in feature_store.yaml); "
            "set REDIS_URL=redis://host:port/db"
        )
    host, _, port = nodes[0].rpartition(":")
    return {"host": host, "port": int(port), **_redis_options(connection_string)}


def _redis_options(connection_string: str) -> dict[str, Any]:
    """The ``name=value`` options of a Feast connection string that redis-py takes."""
    out: dict[str, Any] = {}
    for part in connection_string.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            continue
        kind = _REDIS_OPTIONS.get(name.strip())
        if kind is None:
            continue  # Feast-only options (e.g. skip_full_coverage_check) do not apply
        out[name.strip()] = _parse_bool(value) if kind is bool else kind(value)
    return out


REDIS_CLUSTER = "redis_cluster"


@dataclass(frozen=True)
class RedisTarget:
    """Where the online store is: one Redis server, or the seed nodes of a Redis Cluster, with
    the redis-py options (password, TLS...) of the connection string. Picklable: Spark's
    executors and the stream workers build their clients from it."""

    nodes: tuple[tuple[str, int], ...]
    cluster: bool = False
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments: host and port of a single server, and the options."""
        out = dict(self.options)
        if not self.cluster:
            out = {"host": self.nodes[0][0], "port": self.nodes[0][1], **out}
        return out

    def client(self, **extra: Any) -> Any:
        """A redis-py client: ``redis.Redis`` for one server, ``redis.cluster.RedisCluster``
        for a cluster (slot map from the seed nodes; while a primary is down the others' slots
        stay usable). ``extra``: more client arguments (timeouts)."""
        if not self.cluster:
            import redis

            return redis.Redis(**self.kwargs, **extra)
        from redis.cluster import ClusterNode, RedisCluster

        extra.pop("retry", None)  # RedisCluster has its own (cluster_error_retry_attempts)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.nodes], require_full_coverage=False,
                            **self.kwargs, **extra)

    def describe(self) -> str:
        """For messages and lineage: ``redis://host:port/db`` or ``redis-cluster://h1:p1,h2:p2``."""
        if self.cluster:
            return "redis-cluster://" + ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"redis://{self.nodes[0][0]}:{self.nodes[0][1]}/{self.kwargs.get('db', 0)}"

    @property
    def feast_form(self) -> str:
        """Feast's ``connection_string`` for this target."""
        parts = [f"{h}:{p}" for h, p in self.nodes]
        parts += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.options]
        return ",".join(parts)


def redis_type(repo_config: Any) -> str:
    """The ``redis_type`` of a Feast ``RepoConfig``'s online store (``redis`` when unset)."""
    value = getattr(repo_config.online_store, "redis_type", "redis")
    return str(getattr(value, "value", value))


def cluster_target(connection_string: str) -> RedisTarget:
    """The :class:`RedisTarget` of a Redis Cluster's ``connection_string`` (Feast's form for
    ``redis_type: redis_cluster``: any of its nodes, then options).

    >>> cluster_target("10.0.0.5:7000,10.0.0.6:7000,password=s3cret").describe()
    'redis-cluster://10.0.0.5:7000,10.0.0.6:7000'
    """
    nodes: list[tuple[str, int]] = []
    for part in (p.strip() for p in connection_string.split(",")):
        if not part or "=" in part:
            continue
        host, colon, port = part.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65_536:
            raise InvalidInput(
                f"Redis Cluster connection string {connection_string!r}: {part!r} is not "
                'host:port; write redis_type: redis_cluster with connection_string: '
                '"host1:port1,host2:port2" (options after the nodes, e.g. ",password=...")')
        nodes.append((host, int(port)))
    if not nodes:
        raise InvalidInput(f"Redis Cluster connection string {connection_string!r} names no node; write "
                           'connection_string: "host1:port1,host2:port2"')
    options = _redis_options(connection_string)
    db = options.pop("db", 0)
    if db != 0:
        raise InvalidInput(f"Redis Cluster connection string {connection_string!r} asks for db={db}; cluster "
                           "nodes have only database 0: remove `db=`")
    return RedisTarget(tuple(nodes), True, tuple(options.items()))


def online_target(repo_config: Any) -> RedisTarget:
    """Where a Feast ``RepoConfig``'s online store is (see the module doc): a cluster's seed
    nodes for ``redis_type: redis_cluster``, else the one server of
    :func:`online_connection_string`."""
    kind = redis_type(repo_config)
    if kind == REDIS_CLUSTER:
        configured = str(getattr(repo_config.online_store, "connection_string", "") or "")
        if not configured or "${" in configured:
            raise InvalidInput(
                "online_store redis_type: redis_cluster needs the cluster's nodes in feature_store.yaml: "
                'connection_string: "host1:port1,host2:port2,host3:port3"')
        return cluster_target(configured)
    if kind != "redis":
        raise InvalidInput(f"online_store redis_type {kind!r} is not supported by featurepipe; use redis "
                           "(one server) or redis_cluster")
    kwargs = redis_connection_kwargs(online_connection_string(repo_config))
    host, port = kwargs.pop("host"), kwargs.pop("port")
    return RedisTarget(((host, port),), False, tuple(kwargs.items()))


def load_store(repo: str | os.PathLike[str] | None = None) -> FeatureStore:
    """Open the Feast ``FeatureStore`` of the repo (Redis resolved as the module doc says)."""
    export_redis_env(repo)
    from feast import FeatureStore

    return FeatureStore(repo_path=str(find_repo(repo)))


def registered_path(repo: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """How a data path is written into a source declaration: relative to the repo when it is
    inside the repo's parent folder (the project), so a copied or moved project reads its own
    copy; absolute otherwise (a shared lake folder, say).

    >>> registered_path("/p/feature_repo", "/p/feature_repo/data/raw/**/*.parquet")
    'data/raw/**/*.parquet'
    >>> registered_path("/p/feature_repo", "/p/data/raw")
    '../data/raw'
    >>> registered_path("/p/feature_repo", "/lake/raw")
    '/lake/raw'
    """
    repo_path, target = Path(repo).resolve(), Path(path)
    if "://" in str(path) or not target.is_absolute():
        return str(path)
    if target.is_relative_to(repo_path.parent):
        return os.path.relpath(target, repo_path)
    return str(target)


def _project_of(repo: Path) -> str | None:
    """The ``project:`` of a repo's ``feature_store.yaml`` (None: no such file)."""
    try:
        text = (repo / "feature_store.yaml").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("project:"):
            return line.partition(":")[2].split("#")[0].strip().strip("'\"")
    return ""


def _foreign_copy(path: Path, repo: Path) -> Path | None:
    """Another checkout of the same project (a feature repo elsewhere with the same
    ``project:``) whose folder holds ``path``, if any: a registry applied there."""
    mine = {repo, repo.parent}
    project = None
    for folder in path.parents:
        if folder in mine:
            return None
        for candidate in (folder, folder / "feature_repo"):
            other = _project_of(candidate) if candidate != repo else None
            if other is not None:
                project = _project_of(repo) if project is None else project
                return candidate if other == project else None
    return None


def resolve_source_path(repo: str | os.PathLike[str] | None, path: str) -> str:
    """The path (or glob) a registered source ``path`` means for the feature repo ``repo``.

    Relative paths are relative to the repo, as Feast resolves them. An absolute path inside
    another checkout of the same project (a feature repo elsewhere with the same ``project:``)
    is what a copied or moved repo with a stale registry holds: reading it would silently use
    the other folder's data, so this stops instead.
    """
    if repo is None or "://" in path:
        return path
    repo_path = Path(repo).resolve()
    target = Path(path)
    if not target.is_absolute():
        return str(repo_path / target)
    head = Path(path.split("*", 1)[0])
    other = _foreign_copy(head, repo_path)
    if other is not None:
        raise InvalidInput(
            f"the registry of {repo_path} points a source at {path}, inside another feature repo "
            f"({other}): it was applied in another folder (a copied or moved repo). Run "
            f"`featurepipe apply --repo {repo_path}` to register this repo's own paths"
        )
    return path


def source_path(store: FeatureStore, source: Any) -> str:
    """The resolved path (or glob) of a registered ``FileSource`` (by name or object)."""
    if isinstance(source, str):
        source = store.get_data_source(source)
    return resolve_source_path(store.repo_path, source.path)
