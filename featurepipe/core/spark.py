"""One Spark session factory with the settings featurepipe's exactness depends on.

Spark is optional (``pip install 'featurepipe[spark]'`` and a Java 17+ runtime); this module
imports ``pyspark`` only when a session is asked for, and says what to install when it or
Java is missing.

Where it runs, in order of precedence (later wins):

1. ``local[*]`` on this machine, driver bound to 127.0.0.1, UI off;
2. the ``spark:`` section of the repo's ``featurepipe.yaml`` (``master`` and ``conf``, any
   Spark setting: ``spark.executor.memory``, ``spark.kubernetes.container.image``...);
3. ``$FEATUREPIPE_SPARK_MASTER`` and ``$FEATUREPIPE_SPARK_CONF``
   (``key=value`` pairs separated by ``;``).

So one command runs on a standalone cluster (``spark://host:7077``), YARN (``yarn``) or
Kubernetes (``k8s://https://...``) by changing the master. The settings in
:data:`PINNED` are always applied last: without them the engines would not agree to the
bit (UTC session time, ANSI arithmetic, exact decimal subtraction, micros timestamps).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from featurepipe.core.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

REPO_SETTINGS = "featurepipe.yaml"
"""The repo's own settings file (beside ``feature_store.yaml``): ``engine`` and ``spark``."""

ENGINES = ("duckdb", "spark")

PINNED: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.ansi.enabled": "true",
    # decimal(38, 9) - decimal(38, 9) keeps scale 9 (the default would drop to 8 digits)
    "spark.sql.decimalOperations.allowPrecisionLoss": "false",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.parquet.compression.codec": "zstd",
    "spark.sql.parquet.mergeSchema": "false",
    "spark.sql.sources.partitionOverwriteMode": "static",
}
"""Session settings the kernel's exactness depends on; no configuration overrides them."""

LOCAL_DEFAULTS: dict[str, str] = {
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.driver.host": "127.0.0.1",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.default.parallelism": "4",
    "spark.sql.adaptive.enabled": "true",
    "spark.driver.memory": "2g",
}
"""Defaults for a session on this machine (``local[...]`` masters)."""

_LOCK = threading.Lock()


def repo_settings(repo: Path | str | None) -> dict[str, Any]:
    """The repo's ``featurepipe.yaml`` as a dict (empty when there is none)."""
    if repo is None:
        return {}
    path = Path(repo) / REPO_SETTINGS
    if not path.is_file():
        return {}
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise InvalidInput(f"{path}: expected a mapping (engine: ..., spark: ...), got {type(loaded).__name__}")
    return loaded


def default_engine(repo: Path | str | None) -> str:
    """The batch engine a repo runs on: ``$FEATUREPIPE_ENGINE``, else ``engine:`` in its
    ``featurepipe.yaml``, else ``duckdb``."""
    engine = os.environ.get("FEATUREPIPE_ENGINE") or repo_settings(repo).get("engine") or "duckdb"
    if engine not in ENGINES:
        raise InvalidInput(f"unknown batch engine {engine!r} (from $FEATUREPIPE_ENGINE or "
                           f"{REPO_SETTINGS}); use one of {', '.join(ENGINES)}")
    return str(engine)


def spark_settings(repo: Path | str | None = None, overrides: Mapping[str, str] | None = None,
                   master: str | None = None) -> tuple[str, dict[str, str]]:
    """The master and Spark settings a session for ``repo`` gets (see the module doc);
    ``master`` and ``overrides``, when given, win over both."""
    section = repo_settings(repo).get("spark") or {}
    if not isinstance(section, dict):
        raise InvalidInput(f"{REPO_SETTINGS}: `spark:` must be a mapping (master: ..., conf: {{...}})")
    master = str(master or os.environ.get("FEATUREPIPE_SPARK_MASTER") or section.get("master") or "local[*]")
    conf: dict[str, str] = {}
    if master.startswith("local"):  # Python workers on this machine: this interpreter, with featurepipe
        conf.update(LOCAL_DEFAULTS, **{"spark.pyspark.python": sys.executable})
    conf.update({str(k): str(v) for k, v in (section.get("conf") or {}).items()})
    for pair in filter(None, (os.environ.get("FEATUREPIPE_SPARK_CONF") or "").split(";")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"$FEATUREPIPE_SPARK_CONF: {pair!r} is not key=value (pairs separated by ';')")
        conf[key.strip()] = value.strip()
    conf.update(overrides or {})
    conf.update(PINNED)
    return master, conf


def require_spark() -> None:
    """Raise InvalidInput saying what to install when pyspark or Java is missing."""
    try:
        import pyspark  # noqa: F401
    except ImportError as exc:
        raise InvalidInput(
            "the Spark engine needs pyspark: pip install 'featurepipe[spark]' "
            "(or run with --engine duckdb)"
        ) from exc
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home) / "bin" / "java" if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise InvalidInput(
            "the Spark engine needs a Java 17+ runtime and none was found (JAVA_HOME unset, no `java` on PATH): "
            "install one, e.g. `apt-get install -y openjdk-17-jre-headless`, or run with --engine duckdb"
        )


def spark_session(repo: Path | str | None = None, overrides: Mapping[str, str] | None = None,
                  master: str | None = None, app_name: str = "featurepipe") -> SparkSession:
    """The process's Spark session, created on first use with :func:`spark_settings`.

    A session that already runs (one per JVM) is reused; the pinned settings are
    (re)applied to it, as they are runtime settings."""
    require_spark()
    from pyspark.sql import SparkSession

    master, conf = spark_settings(repo, overrides, master)
    with _LOCK:
        active = SparkSession.getActiveSession()
        if active is None:
            if master.startswith("local"):  # PySpark starts its Python workers with $PYSPARK_PYTHON
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no lookup of an outside address
            builder = SparkSession.builder.master(master).appName(app_name)
            for key, value in conf.items():
                builder = builder.config(key, value)
            active = builder.getOrCreate()
            active.sparkContext.setLogLevel("ERROR")
        for key, value in PINNED.items():
            active.conf.set(key, value)
    return active


def stop_session() -> None:
    """Stop the process's Spark session, if one runs."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return
    with _LOCK:
        active = SparkSession.getActiveSession()
        if active is not None:
            active.stop()


def input_files(path: str) -> list[str]:
    """The Parquet files of a raw source glob, sorted (NotFound when there are none)."""
    if "://" in path:
        return [path.replace("/**/", "/*/")]  # remote storage: Spark expands the glob itself
    files = sorted(glob.glob(path, recursive=True))
    if not files:
        raise NotFound(f"no Parquet files match {path}; run `featurepipe generate` (or put raw data there) first")
    return files


def base_path(path: str) -> str:
    """The folder a source glob starts in (hive partitions ``k=v`` below it become columns)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return "/".join(parts[:i]) or "/"
    return os.path.dirname(path)


def read_source(spark: SparkSession, path: str) -> DataFrame:
    """The raw Parquet of a source glob, as DuckDB's ``read_parquet(..., hive_partitioning,
    union_by_name)`` reads it: columns merged by name, ``k=v`` folders as columns."""
    return (spark.read.option("basePath", base_path(path)).option("mergeSchema", "true")
            .parquet(*input_files(path)))
