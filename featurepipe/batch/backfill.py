"""``featurepipe backfill``: compute the offline feature tables with DuckDB.

For every windowed-aggregate view in the registry, run the kernel's SQL
(:func:`featurepipe.batch.sql.aggregate_sql`) over the raw Parquet and write the view's
change-point rows (``event_timestamp`` = the instant from which the row's values hold) as
Parquet partitioned by ``date=YYYY-MM-DD``. Only the day partitions inside ``[start, end)``
are replaced (each atomically, by rename), so a rerun over the same range gives the same
files, and a partial rerun gives the rows of the full one in its range.

Every file carries the kernel version in its key-value metadata (``featurepipe.kernel``);
the offline store refuses a table written under another version rather than mix meanings.
By default a backfill covers every change point of its input: from the day of the first
event to the day after the last event's last drop (the last event plus the kernel's
horizon), so the table answers at any instant, also after the input ends (an entity's last
row says every window is empty: counts 0, not missing). An explicit ``[start, end)``
writes that range only; rows of later change points are the next range's.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import duckdb
import pyarrow.parquet as pq

from featurepipe.batch.sql import SourceColumns, aggregate_sql
from featurepipe.core.db import connect, one_row
from featurepipe.core.parquet_io import atomic_parquet, has_parquet
from featurepipe.core.sql import literal, quote
from featurepipe.core.windows import KERNEL_METADATA_KEY, KERNEL_VERSION, horizon
from featurepipe.definitions import AggregateView, aggregate_views
from featurepipe.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from feast import FeatureStore



@dataclass(frozen=True)
class BackfillResult:
    """What one view's backfill wrote: ``published`` names the day partitions it replaced
    with new files (``date=YYYY-MM-DD``), ``partitions`` counts them."""

    view: str
    rows: int
    entities: int
    partitions: int
    seconds: float
    start: datetime
    end: datetime
    published: tuple[str, ...] = ()


class BackfillHook(Protocol):
    """What a backfill calls around each view, when given one (a quality gate: see
    ``featurepipe.quality.gate.BatchGate``; the job layer wires it in, the batch stage
    does not import it)."""

    def check_input(self, con: duckdb.DuckDBPyConnection, view: AggregateView) -> str | None:
        """Before computing: a relation to read instead of the raw files (rows that
        passed), or None to read them as they are. Raises to stop the view."""

    def check_output(self, con: duckdb.DuckDBPyConnection, view: AggregateView, staging: Path) -> Path:
        """Before publishing: the staged folder to publish (``staging`` or a rewrite of it)."""

    def view_done(self, result: BackfillResult) -> None:
        """After publishing one view."""


def source_columns(con: duckdb.DuckDBPyConnection, path: str) -> SourceColumns:
    """Column names and types of a Parquet input (raises NotFound when there are no files)."""
    try:
        rows = con.execute(
            f"DESCRIBE SELECT * FROM read_parquet({literal(path)}, hive_partitioning = true, "
            "union_by_name = true)"
        ).fetchall()
    except duckdb.IOException as exc:
        raise NotFound(
            f"no Parquet files match {path}; run `featurepipe generate` (or put raw data there) first"
        ) from exc
    return SourceColumns({r[0]: r[1] for r in rows})


def input_time_range(con: duckdb.DuckDBPyConnection, view: AggregateView) -> tuple[datetime, datetime]:
    """The first and last event time of a view's input."""
    ts = quote(view.timestamp_field)
    lo, hi = one_row(
        con, f"SELECT min({ts}), max({ts}) FROM read_parquet({literal(view.input_path)}, "
        "hive_partitioning = true, union_by_name = true)"
    )
    if lo is None:
        raise NotFound(f"input of {view.name!r} ({view.input_path}) has no rows with {ts} set")
    return lo.astimezone(timezone.utc), hi.astimezone(timezone.utc)


def _day(value: datetime) -> datetime:
    return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)


def _as_utc(value: datetime | date) -> datetime:
    if not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def backfill_view(
    view: AggregateView,
    start: datetime | date | None = None,
    end: datetime | date | None = None,
    gate: BackfillHook | None = None,
) -> BackfillResult:
    """Recompute the day partitions of ``view`` in ``[start, end)`` (default: from the day of
    the first input event to the day after its last change point, the last event plus the
    kernel's horizon): the rows of the change points in that range, from the input events of
    ``[start - horizon, end)``.

    With a ``gate`` (a :class:`BackfillHook`, e.g. a quality gate), only raw rows that pass
    it are read, and the staged feature rows are checked before they are published.
    """
    t0 = time.perf_counter()
    con = connect("deterministic")
    checked_input = gate.check_input(con, view) if gate is not None else None
    columns = source_columns(con, view.input_path)
    columns.require(view)
    lo, hi = input_time_range(con, view)
    start_dt, end_dt = backfill_range(view, lo, hi, start, end)
    sql = aggregate_sql(view, columns, start_dt, end_dt, source=checked_input)
    out = view.offline_path
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".staging-{view.name}-{uuid.uuid4().hex[:8]}"
    try:
        con.execute(
            f"COPY (SELECT *, strftime(event_timestamp, '%Y-%m-%d') AS date FROM ({sql})) "
            f"TO {literal(str(staging))} (FORMAT parquet, PARTITION_BY (date), "
            f"FILENAME_PATTERN 'part-{{i}}', COMPRESSION zstd, "
            f"KV_METADATA {{{literal(KERNEL_METADATA_KEY)}: {literal(str(KERNEL_VERSION))}}})"
        )
        if gate is not None:
            staging = gate.check_output(con, view, staging)
            stamp_kernel_version(staging)  # a gate's rewrite (quarantined rows taken out) has lost it
        rows, entities = one_row(
            con, f"SELECT count(*), count(DISTINCT ({', '.join(quote(k) for k in view.join_keys)})) "
            f"FROM read_parquet({literal(str(staging / '**' / '*.parquet'))})"
        ) if has_parquet(staging) else (0, 0)  # (no change point in the range: an empty folder)
        published = publish_days(staging, out, start_dt, end_dt)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        con.close()
    return BackfillResult(
        view=view.name,
        rows=int(rows),
        entities=int(entities),
        partitions=len(published),
        seconds=time.perf_counter() - t0,
        start=start_dt,
        end=end_dt,
        published=tuple(published),
    )


def backfill_range(view: AggregateView, lo: datetime, hi: datetime, start: datetime | date | None,
                   end: datetime | date | None) -> tuple[datetime, datetime]:
    """The days ``[start, end)`` a backfill of ``view`` covers, given its input's first and last
    event time ``lo`` and ``hi`` (default: from ``lo``'s day to the day after ``hi`` plus the
    kernel's horizon, the last change point)."""
    start_dt = _day(_as_utc(start)) if start is not None else _day(lo)
    end_dt = _day(_as_utc(end)) if end is not None else _day(hi + horizon(view.aggregations)) + timedelta(days=1)
    if end_dt <= start_dt:
        raise InvalidInput(f"backfill range is empty: start {start_dt:%Y-%m-%d} >= end {end_dt:%Y-%m-%d}")
    return start_dt, end_dt


def publish_days(staging: Path, out: Path, start: datetime, end: datetime) -> list[str]:
    """Replace each day partition of ``out`` in ``[start, end)`` by the staged one (each
    atomically, by rename; a day with no staged rows is removed). Returns the partitions
    published (``date=YYYY-MM-DD``)."""
    out.mkdir(parents=True, exist_ok=True)
    published = []
    day = start
    while day < end:
        name = f"date={day:%Y-%m-%d}"
        shutil.rmtree(out / name, ignore_errors=True)
        if (staging / name).exists():
            (staging / name).rename(out / name)
            published.append(name)
        day += timedelta(days=1)
    return published


def backfill(
    store: FeatureStore,
    views: Sequence[str] | None = None,
    start: datetime | date | None = None,
    end: datetime | date | None = None,
    progress: bool = True,
    gate: BackfillHook | None = None,
) -> list[BackfillResult]:
    """Backfill every windowed-aggregate view of the registry (or the named ones), each
    through ``gate`` when given. The whole run with the repo's quality gates and run record
    is :func:`featurepipe.jobs.backfill.backfill`."""
    from tqdm import tqdm

    results = []
    with tqdm(aggregate_views(store, views), desc="backfill", unit="view", disable=not progress) as bar:
        for view in bar:
            bar.set_postfix_str(view.name)
            results.append(backfill_view(view, start, end, gate))
            if gate is not None:
                gate.view_done(results[-1])
    return results


def stamp_kernel_version(folder: Path) -> None:
    """Write the kernel version into every Parquet file under ``folder`` that lacks it
    (each file rewritten atomically, its rows and schema unchanged)."""
    for path in sorted(folder.glob("**/*.parquet")):
        stamp_file(str(path))


def stamp_file(path: str) -> bool:
    """Write the kernel version into one Parquet file when it lacks it (rewritten
    atomically, rows and schema unchanged); True when it was rewritten."""
    expected = str(KERNEL_VERSION).encode()
    metadata = pq.read_metadata(path).metadata or {}
    if metadata.get(KERNEL_METADATA_KEY.encode()) == expected:
        return False
    table = pq.read_table(path, partitioning=None)
    schema_metadata = {**(table.schema.metadata or {}), KERNEL_METADATA_KEY.encode(): expected}
    atomic_parquet(table.replace_schema_metadata(schema_metadata), Path(path))
    return True


def offline_files(path: Path) -> list[Path]:
    """The Parquet files of an offline table, in a stable order."""
    return sorted(path.glob("date=*/*.parquet"))
