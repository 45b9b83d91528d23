"""``featurepipe backfill --plan``: what a backfill would read and write, from metadata alone.

Per windowed-aggregate view: the raw files it would read (count, bytes, rows: Parquet
footers, no scan), the day partitions it would replace, how many feature rows it would
write and how long it would take. Nothing is written and no data page is read.

* **Range.** The backfill's own (:func:`featurepipe.batch.backfill.backfill_range`): by
  default from the day of the first event to the day after the last change point, with
  the first and last event time taken from the footers' statistics of the view's event
  time column. The events read are those of ``[start - horizon, end)``
  (:func:`featurepipe.batch.sql.input_start`); a row group's rows are apportioned evenly
  over its time span to estimate them.
* **Output rows.** A day inside the span of the offline table (its first to its last day
  partition: what the last backfill covered) counts the rows it holds now (footers; a day
  without a partition had none); a new day is estimated from its events times the table's
  rows per event (with no table yet: 1 + the number of windows, an upper bound: one row
  after each event and one where each window drops it).
* **Time.** DuckDB: the events per second of this view's last successful backfills in the
  run log (``<data>/runs/runs.jsonl``), else :data:`DUCKDB_CPU_SECONDS_PER_M` (the backfill
  SQL runs on one thread). Spark: :data:`SPARK_CPU_SECONDS_PER_M` divided by the master's
  cores, plus the session's start-up. The run log does not say which engine a run used,
  so measured rates are used for DuckDB only.
"""

from __future__ import annotations

import glob
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from featurepipe.batch.backfill import backfill_range
from featurepipe.batch.sql import input_start
from featurepipe.config import data_dir
from featurepipe.core.spark import default_engine, spark_settings
from featurepipe.definitions import AggregateView, aggregate_views
from featurepipe.errors import InvalidInput, NotFound
from featurepipe.quality.records import KIND_BACKFILL, RunRecord
from featurepipe.quality.runlog import read_runs

if TYPE_CHECKING:
    from feast import FeatureStore

DUCKDB_CPU_SECONDS_PER_M = 15.0
"""CPU-seconds per million input events of a DuckDB backfill on one thread (docs/benchmarks.md,
"Spark engine": 14.4 for the demo's 13-aggregate view, with the quality gates)."""
SPARK_CPU_SECONDS_PER_M = 150.0
"""CPU-seconds per million input events per Spark executor core (docs/benchmarks.md: 139-146)."""
SPARK_STARTUP_SECONDS = 10.0
"""A local Spark session's start-up (docs/spark.md: about 10 s locally, more on a cluster)."""
MEASURED_RUNS = 5  # the last successful backfills of a view that give its rate
_DAY = timedelta(days=1)


@dataclass(frozen=True)
class RowGroup:
    """One row group of an input file: its rows and the span of its event times (None: no statistics)."""

    rows: int
    first: datetime | None
    last: datetime | None

    def rows_in(self, lo: datetime | None, hi: datetime) -> float:
        """Its rows in ``[lo, hi)`` (``lo`` None: from the beginning), apportioned evenly over its span."""
        if self.first is None or self.last is None:
            return float(self.rows)
        lo = lo or self.first
        if self.last < lo or self.first >= hi:
            return 0.0
        span = (self.last - self.first).total_seconds()
        if span <= 0:
            return float(self.rows)
        inside = (min(self.last, hi) - max(self.first, lo)).total_seconds()
        return self.rows * max(0.0, min(1.0, inside / span))


@dataclass(frozen=True)
class InputFile:
    """A raw Parquet file as its footer describes it."""

    path: str
    size: int
    groups: tuple[RowGroup, ...]

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)

    def touches(self, lo: datetime | None, hi: datetime) -> bool:
        """Whether a backfill reading ``[lo, hi)`` reads this file (a row group without statistics: yes)."""
        return any(g.rows_in(lo, hi) > 0 for g in self.groups)


@dataclass(frozen=True)
class ViewPlan:
    """What a backfill of one view would read and write, and its estimated time."""

    view: str
    input_path: str
    start: datetime
    end: datetime
    read_from: datetime | None  # the first event time read (None: every event)
    files: int
    bytes: int
    rows: int  # rows of the files read, from their footers
    events: int  # estimated events in [read_from, end)
    days: int
    days_new: int  # days outside what the offline table covers now
    output_rows: int
    output_basis: str
    seconds: float
    seconds_basis: str


@dataclass(frozen=True)
class BackfillPlan:
    """A backfill's plan: one :class:`ViewPlan` per view, on ``engine``."""

    engine: str
    views: tuple[ViewPlan, ...]
    startup_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.startup_seconds + sum(v.seconds for v in self.views)


def plan_backfill(store: FeatureStore, views: Sequence[str] | None = None, start: datetime | date | None = None,
                  end: datetime | date | None = None, engine: str | None = None) -> BackfillPlan:
    """The plan of ``featurepipe backfill`` with the same arguments (see the module doc)."""
    engine = engine or default_engine(store.repo_path)
    runs = read_runs(data_dir(Path(store.repo_path)))
    cores = spark_cores(store.repo_path) if engine == "spark" else 1
    plans = tuple(_plan_view(view, start, end, engine, cores, runs) for view in aggregate_views(store, views))
    return BackfillPlan(engine, plans, SPARK_STARTUP_SECONDS if engine == "spark" else 0.0)


def _plan_view(view: AggregateView, start: datetime | date | None, end: datetime | date | None, engine: str,
               cores: int, runs: list[RunRecord]) -> ViewPlan:
    inputs = [read_footer(path, view.timestamp_field) for path in sorted(glob.glob(view.input_path, recursive=True))]
    if not inputs:
        raise NotFound(f"no Parquet files match {view.input_path} (input of {view.name!r}); run `featurepipe "
                       "generate` (or put raw data there) first")
    groups = [g for f in inputs for g in f.groups]
    firsts, lasts = [g.first for g in groups if g.first], [g.last for g in groups if g.last]
    if not firsts or not lasts:
        if start is None or end is None:
            raise InvalidInput(f"the Parquet footers of {view.input_path} hold no statistics of "
                               f"{view.timestamp_field!r}; pass --start and --end to plan a backfill of {view.name!r}")
        firsts = lasts = [datetime(2000, 1, 1, tzinfo=timezone.utc)]  # unused: the range is given
    start_dt, end_dt = backfill_range(view, min(firsts), max(lasts), start, end)
    read_from = input_start(view, start_dt)
    read = [f for f in inputs if f.touches(read_from, end_dt)]
    events = sum(g.rows_in(read_from, end_dt) for g in groups)
    days = [start_dt + i * _DAY for i in range((end_dt - start_dt) // _DAY)]
    output, basis, new = _output_rows(view, days, groups)
    seconds, how = _seconds(view.name, events, engine, cores, runs)
    return ViewPlan(view.name, os.path.normpath(view.input_path), start_dt, end_dt, read_from, len(read),
                    sum(f.size for f in read), sum(f.rows for f in read), round(events), len(days), new, output,
                    basis, seconds, how)


def read_footer(path: str, column: str) -> InputFile:
    """A Parquet file's size and, per row group, its rows and the min / max of ``column``."""
    meta = pq.read_metadata(path)
    index = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == column), None)
    groups = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        first = last = None
        stats = group.column(index).statistics if index is not None else None
        if stats is not None and stats.has_min_max and isinstance(stats.min, datetime):
            first, last = _utc(stats.min), _utc(stats.max)
        groups.append(RowGroup(group.num_rows, first, last))
    return InputFile(path, os.path.getsize(path), tuple(groups))


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


_PARTITION = re.compile(r"date=(\d{4}-\d{2}-\d{2})")


def offline_rows_by_day(offline: Path) -> dict[date, int]:
    """Rows per day partition of an offline table (footers)."""
    out: dict[date, int] = defaultdict(int)
    for path in offline.glob("date=*/*.parquet"):
        match = _PARTITION.fullmatch(path.parent.name)
        if match:
            out[date.fromisoformat(match.group(1))] += pq.read_metadata(path).num_rows
    return dict(out)


def _output_rows(view: AggregateView, days: list[datetime], groups: Iterable[RowGroup]) -> tuple[int, str, int]:
    """Estimated feature rows over ``days``, how it was estimated, and how many of the days are
    new (outside the offline table's span)."""
    table = offline_rows_by_day(view.offline_path)
    groups = list(groups)
    new = [d for d in days if not table or not min(table) <= d.date() <= max(table)]
    held = sum(table.get(d.date(), 0) for d in days)
    if not new:
        return held, "the offline table's rows on these days", 0
    per_event, source = _rows_per_event(view, table, groups)
    estimate = held + sum(per_event * sum(g.rows_in(d, d + _DAY) for g in groups) for d in new)
    basis = f"input events x {per_event:.2f} ({source})"
    if len(new) < len(days):
        basis = f"the offline table's rows, and for the {len(new)} new days {basis}"
    return round(estimate), basis, len(new)


def _rows_per_event(view: AggregateView, table: dict[date, int], groups: list[RowGroup]) -> tuple[float, str]:
    """The offline table's feature rows per input event, or (no table) 1 + the number of windows."""
    if table:
        events = sum(g.rows_in(_day(d), _day(d) + _DAY) for d in table for g in groups)
        if events > 0:
            return sum(table.values()) / events, "the offline table's rows per event"
    windows = {a.window for a in view.aggregations if a.window is not None}
    return 1.0 + len(windows), "no offline table: 1 + windows, an upper bound"


def _day(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)


def measured_rate(view: str, runs: list[RunRecord]) -> tuple[float, int] | None:
    """Input events per second of ``view``'s last successful backfills (up to
    :data:`MEASURED_RUNS`), and how many runs that is; None when the run log has none."""
    events = seconds = 0.0
    used = 0
    for run in reversed(runs):
        output = run.output(view) if run.kind == KIND_BACKFILL and run.ok else None
        if output is None or not output.seconds:
            continue
        source = next((i for i in run.inputs if view in i.views or (i.path and i.path == output.input_path)), None)
        if source is None or not source.rows:
            continue
        events += source.rows
        seconds += output.seconds
        used += 1
        if used == MEASURED_RUNS:
            break
    return (events / seconds, used) if used and seconds > 0 else None


def _seconds(view: str, events: float, engine: str, cores: int, runs: list[RunRecord]) -> tuple[float, str]:
    millions = events / 1e6
    if engine == "spark":
        return (millions * SPARK_CPU_SECONDS_PER_M / cores,
                f"{SPARK_CPU_SECONDS_PER_M:.0f} CPU-s per M events / {cores} cores (docs/benchmarks.md)")
    rate = measured_rate(view, runs)
    if rate is not None:
        per_second, used = rate
        return events / per_second, f"{per_second:,.0f} events/s measured over {used} earlier backfill(s)"
    return (millions * DUCKDB_CPU_SECONDS_PER_M,
            f"{DUCKDB_CPU_SECONDS_PER_M:.0f} CPU-s per M events, one thread (docs/benchmarks.md; no run measured yet)")


def spark_cores(repo: Path | str | None) -> int:
    """The cores a Spark backfill of ``repo`` runs on: ``local[N]``'s N, ``local[*]``'s this
    machine's, else ``spark.cores.max`` or executors x cores from the settings (else this
    machine's, a guess)."""
    master, conf = spark_settings(repo)
    machine = os.cpu_count() or 1
    local = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master)
    if local:
        n = local.group(1)
        return machine if n == "*" else int(n or 1)
    if conf.get("spark.cores.max"):
        return int(conf["spark.cores.max"])
    if conf.get("spark.executor.instances") and conf.get("spark.executor.cores"):
        return int(conf["spark.executor.instances"]) * int(conf["spark.executor.cores"])
    return machine
