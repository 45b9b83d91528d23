"""Atomic Parquet writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_parquet(table: pa.Table, target: Path, **options: Any) -> Path:
    """Write ``table`` to ``target`` (zstd unless ``compression`` is given) through a
    temporary sibling file renamed into place. Returns ``target``.

    Atomic against a crash of the process (the rename is); not fsynced, so not against a
    power loss of the machine (the stream's checkpoints replay from the source then)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    options.setdefault("compression", "zstd")
    try:
        pq.write_table(table, tmp, **options)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def has_parquet(folder: Path) -> bool:
    """True when ``folder`` holds a Parquet file anywhere below it (DuckDB's partitioned
    ``COPY`` of no rows leaves the folder, empty)."""
    return folder.is_dir() and any(folder.glob("**/*.parquet"))
