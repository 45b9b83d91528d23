"""The kernel version of a windowed-aggregate view's offline table, read from its files.

``featurepipe backfill`` writes the version of the aggregation kernel
(:data:`featurepipe.core.windows.KERNEL_VERSION`) into the key-value metadata of every
Parquet file of a windowed view's table. A table whose rows mean something else (version
1: windows as of each event, no metadata at all) must not be joined as if it held
request-time values, nor mixed with newer files: :func:`require_current_kernel` refuses it
with the command that rebuilds it.

The footers are read once per version of the files (path, size, modification time, inode),
so a warm retrieval pays a ``stat`` per file; remote files (``s3://``...) are read through
DuckDB's ``parquet_kv_metadata`` in one query.
"""

from __future__ import annotations

import os
import threading

import duckdb
import pyarrow.parquet as pq

from featurepipe.core.sql import literal
from featurepipe.core.windows import KERNEL_METADATA_KEY, KERNEL_VERSION
from featurepipe.errors import InvalidInput
from featurepipe.offline.view import ViewRequest

MEANING = {1: "windows as of each event", 2: "min and max could keep -0.0 apart from 0.0"}

_CACHE: dict[tuple[object, ...], int] = {}
_LOCK = threading.Lock()


def file_kernel_versions(view: ViewRequest, con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Kernel version of each of the view's pinned files (1 where a file has none)."""
    if any("://" in f for f in view.files):
        rows = con.execute(
            f"SELECT file_name, decode(value) FROM parquet_kv_metadata([{', '.join(literal(f) for f in view.files)}]) "
            f"WHERE decode(key) = {literal(KERNEL_METADATA_KEY)}"
        ).fetchall()
        found = {name: _version(value) for name, value in rows}
        return {f: found.get(f, 1) for f in view.files}
    versions = {}
    for f in view.files:
        st = os.stat(f)
        key = (f, st.st_size, st.st_mtime_ns, st.st_ino)
        with _LOCK:
            version = _CACHE.get(key)
        if version is None:
            metadata = pq.read_metadata(f).metadata or {}
            version = _version(metadata.get(KERNEL_METADATA_KEY.encode(), b"1").decode())
            with _LOCK:
                _CACHE[key] = version
        versions[f] = version
    return versions


def _version(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


def require_current_kernel(view: ViewRequest, con: duckdb.DuckDBPyConnection) -> None:
    """Raise InvalidInput when a file of ``view``'s table (pinned) was computed by another
    kernel version than this featurepipe's; nothing for a view that is not windowed."""
    if not view.windowed:
        return
    versions = file_kernel_versions(view, con)
    other = sorted({v for v in versions.values() if v != KERNEL_VERSION})
    if not other:
        return
    version, name = other[0], view.windowed_view
    files = sorted(f for f, v in versions.items() if v == version)
    meaning = f" ({MEANING[version]})" if version in MEANING else ""
    newer = f", newer than this featurepipe's ({KERNEL_VERSION}): upgrade featurepipe or" if version > KERNEL_VERSION \
        else ";"
    raise InvalidInput(
        f"feature table {name} was computed with kernel version {version}{meaning}{newer} rebuild it: "
        f"featurepipe backfill --view {name} ({len(files)} of its {len(versions)} files, e.g. {files[0]})"
    )
