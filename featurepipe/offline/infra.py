"""What the offline store's options set up: the DuckDB database, source paths, the index folder.

Everything in :mod:`featurepipe.offline` that needs a DuckDB connection, the path of a
view's Parquet files or the offline index's folder gets it here, so the Feast plug-in
(:mod:`featurepipe.offline.store`), the retrieval job and ``featurepipe index`` agree on
them. The options (:class:`featurepipe.offline.store.FeaturepipeOfflineStoreConfig`) are
read with ``getattr``, so any ``RepoConfig`` (or ``None``: the defaults) works, whatever its
offline store.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
from feast.infra.offline_stores.file_source import FileSource

from featurepipe.config import resolve_source_path
from featurepipe.core import db
from featurepipe.errors import InvalidInput

if TYPE_CHECKING:
    from feast.data_source import DataSource
    from feast.repo_config import RepoConfig


def index_directory(config: RepoConfig | None) -> Path | None:
    """Where the offline index lives, or None when it is switched off."""
    options = getattr(config, "offline_store", None)
    if not getattr(options, "index", True):
        return None
    directory = getattr(options, "index_directory", None)
    if directory:
        return Path(directory)
    repo = getattr(config, "repo_path", None)
    base = Path(repo) if repo else Path(tempfile.gettempdir())
    return base / ".featurepipe" / "offline-index"


_SPILL_CLEANUP: set[str] = set()


def connect(config: RepoConfig | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection in UTC, with the store's memory and spill settings.

    Opening a DuckDB database costs about 30 ms here, more than a whole small retrieval, so
    each process keeps one in-memory database per setting and hands out cursors: each cursor
    is its own session (its temp tables and registered Arrow tables are its own). Close it
    when done.
    """
    options = getattr(config, "offline_store", None)
    spill = getattr(options, "temp_directory", None) or os.path.join(
        tempfile.gettempdir(), f"featurepipe-duckdb-{os.getpid()}"
    )
    settings: dict[str, str | int] = {"temp_directory": spill}
    memory = getattr(options, "memory_limit", None)
    if memory:
        settings["memory_limit"] = str(memory)
    if not getattr(options, "temp_directory", None) and spill not in _SPILL_CLEANUP:
        _SPILL_CLEANUP.add(spill)
        atexit.register(shutil.rmtree, spill, True)
    threads = getattr(options, "threads", None)
    return db.shared_cursor("scan", int(threads) if threads else None, settings)


def source_path(config: RepoConfig, source: DataSource | None, view: str = "") -> str:
    """The absolute path (or glob) of a Parquet ``FileSource`` (a view's ``batch_source``,
    which Feast leaves None for a view declared without a source)."""
    if not isinstance(source, FileSource):
        got = "no batch source" if source is None else f"{type(source).__name__} {source.name!r}"
        raise InvalidInput(
            f"{'feature view ' + repr(view) + ': ' if view else ''}the featurepipe offline store reads "
            f"Parquet FileSource sources, got {got}"
        )
    return resolve_source_path(config.repo_path, source.path)
