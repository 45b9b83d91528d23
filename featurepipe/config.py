"""Where things live: the feature repo, its data folder, and the Redis connection.

Every command resolves these the same way:

* feature repo: ``--repo`` option, else ``$FEATUREPIPE_REPO``, else ``./feature_repo``
  (or the current folder if it holds a ``feature_store.yaml``);
* data folder: ``$FEATUREPIPE_DATA_DIR``, else ``<repo>/data``;
* Redis: ``$REDIS_URL`` (``redis://[:password@]host:port[/db]``, ``rediss://`` for TLS),
  else ``$FEATUREPIPE_REDIS`` (Feast's ``host:port,db=0,...`` form), else ``127.0.0.1:6379``.

``feature_store.yaml`` reads the Redis connection from ``${FEATUREPIPE_REDIS}``; call
:func:`export_redis_env` (every featurepipe command does) before Feast loads the repo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from featurepipe.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from feast import FeatureStore

DEFAULT_REDIS = "127.0.0.1:6379"


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


def redis_connection_string() -> str:
    """The Redis connection in Feast's form, from the environment (see module doc)."""
    if os.environ.get("REDIS_URL"):
        return redis_url_to_feast(os.environ["REDIS_URL"])
    return os.environ.get("FEATUREPIPE_REDIS") or DEFAULT_REDIS


def export_redis_env() -> str:
    """Set ``$FEATUREPIPE_REDIS`` (read by feature_store.yaml) and return it."""
    conn = redis_connection_string()
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


def redis_connection_kwargs(connection_string: str) -> dict[str, object]:
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
            "(Redis Cluster and Sentinel are not supported here); "
            "set REDIS_URL=redis://host:port/db"
        )
    host, _, port = nodes[0].rpartition(":")
    kwargs: dict[str, object] = {"host": host, "port": int(port)}
    for part in connection_string.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            continue
        kind = _REDIS_OPTIONS.get(name.strip())
        if kind is None:
            continue  # Feast-only options (e.g. skip_full_coverage_check) do not apply
        kwargs[name.strip()] = _parse_bool(value) if kind is bool else kind(value)
    return kwargs


def load_store(repo: str | os.PathLike[str] | None = None) -> FeatureStore:
    """Open the Feast ``FeatureStore`` of the repo, with Redis taken from the environment."""
    export_redis_env()
    from feast import FeatureStore

    return FeatureStore(repo_path=str(find_repo(repo)))
