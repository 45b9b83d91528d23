"""The parts of ``feature_store.yaml`` the server uses, read without the Feast SDK.

The file is read with PyYAML, environment variables expanded as Feast does. The online
store's connection string is resolved the way featurepipe resolves it everywhere
(``$REDIS_URL``, the configured string, the repo's own redis-server): see
:mod:`featurepipe.config`; a Redis Cluster's (``redis_type: redis_cluster``) is the configured
string, as given. Named ``ServingRepoConfig`` so it is never mistaken for Feast's
``RepoConfig``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from featurepipe.config import ONLINE_STORE_TYPE, redis_connection_string
from featurepipe.errors import InvalidInput

REDIS_CLUSTER = "redis_cluster"  # the redis_type of a Redis Cluster, as Feast names it


@dataclass(frozen=True)
class ServingRepoConfig:
    """The parts of ``feature_store.yaml`` the server uses."""

    repo: Path
    project: str
    registry_file: Path | None  # None: not a local file (read through Feast's SDK)
    online_type: str
    redis_type: str
    connection_string: str


def read_repo_config(repo: Path) -> ServingRepoConfig:
    """Parse ``<repo>/feature_store.yaml`` as Feast does (``${VAR}`` expanded)."""
    import yaml

    path = repo / "feature_store.yaml"
    try:
        raw = yaml.safe_load(os.path.expandvars(path.read_text(encoding="utf-8"))) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}; fix feature_store.yaml") from exc
    if not isinstance(raw, dict) or not raw.get("project"):
        raise InvalidInput(f"{path} names no project; add `project: <name>`")
    registry = raw.get("registry", "data/registry.db")
    if isinstance(registry, dict):
        registry_type = str(registry.get("registry_type", "file"))
        location = registry.get("path", "")
    else:
        registry_type, location = "file", registry
    registry_file = None
    if registry_type == "file" and isinstance(location, str):
        if location.startswith("file://"):
            location = location[len("file://") :]
        if "://" not in location:
            registry_file = Path(location) if Path(location).is_absolute() else repo / location
    online = raw.get("online_store", {})
    if isinstance(online, str):
        online = {"type": online}
    online_type = str(online.get("type", "sqlite"))
    redis_type = str(online.get("redis_type", "redis"))
    connection = str(online.get("connection_string", "localhost:6379"))
    if online_type == ONLINE_STORE_TYPE and redis_type == REDIS_CLUSTER:
        # the cluster's nodes as given: $REDIS_URL and the local server are one Redis each
        connection = str(online.get("connection_string") or "")
        if not connection.strip() or "${" in connection:
            raise InvalidInput(
                f"{path}: redis_type: redis_cluster needs connection_string: "
                '"host1:port1,host2:port2" (any nodes of the cluster; $REDIS_URL names one '
                "server and is not used for a cluster)"
            )
    elif online_type == ONLINE_STORE_TYPE:  # $REDIS_URL, the configured string, the local server
        connection = redis_connection_string(repo, str(online.get("connection_string", "")))
    return ServingRepoConfig(
        repo=repo,
        project=str(raw["project"]),
        registry_file=registry_file,
        online_type=online_type,
        redis_type=redis_type,
        connection_string=connection,
    )


def check_servable(config: ServingRepoConfig) -> None:
    """Raise InvalidInput unless the server can read this repo's online store (one Redis or
    a Redis Cluster)."""
    if config.online_type not in ("redis", ONLINE_STORE_TYPE):
        raise InvalidInput(
            f"online_store type {config.online_type!r} in feature_store.yaml is not "
            "supported; featurepipe serve reads the redis online store"
        )
    if config.redis_type not in ("redis", REDIS_CLUSTER):
        raise InvalidInput(
            f"online_store redis_type {config.redis_type!r} is not supported by featurepipe "
            "serve yet; use a single Redis server (redis_type: redis) or a Redis Cluster "
            '(redis_type: redis_cluster, connection_string: "host1:port1,host2:port2")'
        )
