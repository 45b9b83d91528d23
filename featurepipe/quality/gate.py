"""Quality gates of a batch run: raw ingest and the feature tables just computed.

``backfill`` opens one :class:`BatchGate` per run. Per view it calls
:meth:`BatchGate.check_input` before computing (the view's raw source, checked once per
run even when several views read it) and :meth:`BatchGate.check_output` on the staged
feature files before they are published. Failing rows are written to
``<data>/quarantine/<stage>/<table>/<run id>.parquet`` with ``quality_check`` and
``quality_reason``; the batch goes on without them (rows in = rows passed on + rows
quarantined), or stops with :class:`~featurepipe.errors.GateBlocked` (an InvalidInput) when a failing check
is ``block``. On exit the gate appends the run record to ``<data>/runs/runs.jsonl``.

What every engine shares (the contracts, the order of the checks, the bookkeeping and the
run record) is :class:`BaseBatchGate`; where the rows are read is a
:class:`~featurepipe.quality.row_engine.RowEngine`: DuckDB's for :class:`BatchGate`, Spark's
for :class:`~featurepipe.quality.spark_gate.SparkBatchGate`. Schemas, file metadata, samples of the quarantine
file and the stored statistics are read with DuckDB on either engine (footers and the
gate's own small files, never the rows).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import duckdb

from featurepipe.config import data_dir, resolve_source_path
from featurepipe.core.db import connect, one_row
from featurepipe.core.parquet_io import has_parquet
from featurepipe.definitions import AggregateView, aggregate_views
from featurepipe.errors import GateBlocked
from featurepipe.quality import anomaly, checks, stats
from featurepipe.quality.contracts import Contracts, TableContract, load_contracts
from featurepipe.quality.gate_base import Gate
from featurepipe.quality.records import CheckResult, RunInput, RunOutput, RunRecord
from featurepipe.quality.row_engine import DuckDBRows, RowEngine
from featurepipe.quality.row_engine import passed_rows as passed_rows  # where 0.1 had it
from featurepipe.quality.runlog import view_definition_hashes

if TYPE_CHECKING:
    from feast import FeatureStore


STAGE_RAW, STAGE_FEATURES = "raw", "features"


class BackfilledView(Protocol):
    """What the gate needs to know of one view's published backfill (the batch stage's
    ``BackfillResult`` is one; the gate does not import the batch stage)."""

    @property
    def view(self) -> str: ...
    @property
    def rows(self) -> int: ...
    @property
    def entities(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def start(self) -> datetime: ...
    @property
    def end(self) -> datetime: ...
    @property
    def published(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class SourceRef:
    """A raw source as the gate sees it: name, Parquet glob, event-time column."""

    name: str
    path: str
    timestamp_field: str


@dataclass(frozen=True)
class GateOutcome:
    """What a gate let through: counts and, when rows were quarantined, where to."""

    stage: str
    table: str
    rows_in: int
    rows_quarantined: int
    quarantine_file: Path | None
    seconds: float
    newest: datetime | None = None
    first_day: date | None = None
    types: dict[str, str] = dataclasses.field(default_factory=dict)
    columns: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def rows_passed(self) -> int:
        return self.rows_in - self.rows_quarantined


def _column_metrics(day_stats: list[stats.DayStats]) -> dict[str, dict[str, float]]:
    """Null count, count and sum per statistics column over all days (for lineage facets)."""
    out: dict[str, dict[str, float]] = {}
    for s in day_stats:
        if s.column == stats.TABLE or s.count is None:
            continue
        m = out.setdefault(s.column, {"nulls": 0, "count": 0, "sum": 0.0})
        m["nulls"] += s.rows - s.count
        m["count"] += s.count
        m["sum"] += (s.mean or 0.0) * s.count
    return out


def published_newest_event(rows: RowEngine, offline: Path, input_newest: datetime | None = None) -> str | None:
    """The newest event time in a published offline table (for freshness metrics): read
    from its newest day partition only; a windowed table's rows after its input's newest
    event (its windows emptying out) count as that event's row, 1 us after it."""
    days = sorted(p for p in offline.glob("date=*") if any(p.glob("*.parquet")))
    if not days:
        return None
    newest = rows.newest(str(days[-1] / "*.parquet"), "event_timestamp")
    if newest is None:
        return None
    newest = newest if newest.tzinfo else newest.replace(tzinfo=timezone.utc)
    if input_newest is not None:
        last = input_newest if input_newest.tzinfo else input_newest.replace(tzinfo=timezone.utc)
        newest = min(newest, last + timedelta(microseconds=1))
    return newest.isoformat()


_Gate = TypeVar("_Gate", bound="BaseBatchGate")


class BaseBatchGate(Gate, ABC):
    """The quality gates and run record of one batch run, whatever engine reads the rows
    (see the module doc); :class:`BatchGate` is DuckDB's, ``SparkBatchGate`` Spark's."""

    log: ClassVar[logging.Logger] = logging.getLogger(__name__)  # failed warnings are said here

    def __init__(
        self,
        contracts: Contracts,
        data: Path,
        sources: list[SourceRef],
        view_hashes: dict[str, str] | None = None,
        kind: str = "backfill",
        now: datetime | None = None,
    ) -> None:
        super().__init__(contracts, data, kind, now)
        self.sources = sources
        self.view_hashes = view_hashes or {}
        self.inputs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self._sources_checked: dict[str, str | None] = {}
        self._input_newest: dict[str, datetime | None] = {}
        self._input_first_day: dict[str, date | None] = {}
        self._staged_newest: dict[str, datetime | None] = {}
        self._view_input_newest: dict[str, datetime | None] = {}  # each view's input's newest event
        self._input_timestamp: dict[str, str] = {}  # the event time column each input was checked by
        self.day_stats: list[stats.DayStats] = []

    # -- raw ingest -------------------------------------------------------------------
    def _source_for(self, view: AggregateView) -> tuple[SourceRef, TableContract] | None:
        for ref in sorted(self.sources, key=lambda r: r.name):
            if ref.path == view.input_path and ref.name in self.contracts.sources:
                return ref, self.contracts.sources[ref.name]
        return None

    def _check_input(self, meta: duckdb.DuckDBPyConnection, rows: RowEngine, view: AggregateView) -> str | None:
        """Check the view's raw source (once per run): ``meta`` reads schemas and metadata,
        ``rows`` the rows. Returns what the batch must read instead of the raw files when
        rows were quarantined, else None. Raises GateBlocked when a blocking check fails."""
        if view.input_path in self._sources_checked:
            return self._sources_checked[view.input_path]
        found = self._source_for(view)
        if found is None:
            self._sources_checked[view.input_path] = None
            return None
        ref, contract = found
        files = sorted(glob.glob(ref.path, recursive=True))
        outcome = self._check(meta, rows, STAGE_RAW, contract, ref.path, ref.timestamp_field)
        self._input_newest[ref.path] = outcome.newest
        self._input_timestamp[ref.path] = ref.timestamp_field
        self._input_first_day[ref.path] = outcome.first_day
        self.inputs[ref.name] = {
            "source": ref.name, "path": ref.path, "files": files, "rows": outcome.rows_in,
            "passed": outcome.rows_passed, "quarantined": outcome.rows_quarantined,
            "quarantine_file": str(outcome.quarantine_file) if outcome.quarantine_file else None,
            "check_seconds": round(outcome.seconds, 4), "views": [],
            "schema": outcome.types, "columns": outcome.columns,
        }
        relation = rows.passed_rows(ref.path, outcome.quarantine_file) if outcome.quarantine_file else None
        self._sources_checked[view.input_path] = relation
        return relation

    # -- after the transformation ---------------------------------------------------------
    def _check_output(self, meta: duckdb.DuckDBPyConnection, rows: RowEngine, view: AggregateView,
                      staging: Path) -> Path:
        """Check the staged feature files of ``view`` before they are published. Returns the
        folder to publish: ``staging`` itself, or a rewrite of it without quarantined rows."""
        for ref in self.sources:
            if ref.path == view.input_path and ref.name in self.inputs:
                self.inputs[ref.name]["views"].append(view.name)
        contract = self.contracts.feature_views.get(view.name)
        record: dict[str, Any] = {"view": view.name, "input_path": view.input_path,
                                  "path": str(view.offline_path), "quarantined": 0,
                                  "quarantine_files": (), "check_seconds": 0.0,
                                  "definition_hash": self.view_hashes.get(view.name)}
        self.outputs[view.name] = record
        if contract is None or not has_parquet(staging):  # (no change point in the range)
            if contract is not None and contract.volume is not None:
                self.keep([CheckResult(STAGE_FEATURES, view.name, "volume", None, contract.volume.severity,
                                       contract.volume.min_rows <= 0, detail="no rows written")])
            return staging
        files = str(staging / "**" / "*.parquet")
        first = self._input_first_day.get(view.input_path)
        warm_until = first + timedelta(days=-(-view.max_window // timedelta(days=1))) if first else None
        input_newest = self._input_newest.get(view.input_path)
        if input_newest is not None and self._input_timestamp.get(view.input_path) != view.timestamp_field:
            # the same files by another event time (the labels' arrival): its own newest
            input_newest = rows.newest(view.input_path, view.timestamp_field)
        outcome = self._check(meta, rows, STAGE_FEATURES, contract, files, "event_timestamp",
                              input_newest=input_newest, warm_until=warm_until)
        self._staged_newest[view.name] = outcome.newest
        self._view_input_newest[view.name] = input_newest
        record.update(quarantined=outcome.rows_quarantined, check_seconds=round(outcome.seconds, 4),
                      quarantine_files=(str(outcome.quarantine_file),) if outcome.quarantine_file else (),
                      schema={k: v for k, v in outcome.types.items() if k != "date"}, columns=outcome.columns)
        if outcome.quarantine_file is None:
            return staging
        cleaned = staging.with_name(staging.name + "-checked")
        rows.rewrite_passed(files, outcome.quarantine_file, cleaned, ["event_timestamp", *view.join_keys])
        shutil.rmtree(staging, ignore_errors=True)
        return cleaned

    def view_done(self, result: BackfilledView) -> None:
        """Record what the backfill of one view published."""
        record = self.outputs.setdefault(result.view, {"view": result.view})
        partitions = list(result.published)
        out = Path(record.get("path", ""))
        newest = self._staged_newest.get(result.view)
        later = [p for p in out.glob("date=*") if p.name >= f"date={result.end:%Y-%m-%d}"]
        if newest is None or later or record.get("quarantined"):  # then the staged newest is not the table's
            newest_event = self._published_newest(out, self._view_input_newest.get(result.view))
        else:
            newest_event = (newest if newest.tzinfo else newest.replace(tzinfo=timezone.utc)).isoformat()
        record.update(rows=result.rows, entities=result.entities, partitions=partitions,
                      seconds=round(result.seconds, 4), start=result.start.isoformat(),
                      end=result.end.isoformat(), newest_event=newest_event)

    @abstractmethod
    def _published_newest(self, offline: Path, input_newest: datetime | None) -> str | None:
        """The newest event of a published table (:func:`published_newest_event`), on the gate's engine."""

    # -- shared ------------------------------------------------------------------------------
    def _check(self, meta: duckdb.DuckDBPyConnection, rows: RowEngine, stage: str, contract: TableContract,
               files: str, timestamp: str, input_newest: datetime | None = None,
               warm_until: date | None = None) -> GateOutcome:
        """Run a table's checks; ``input_newest`` (feature stage): the newest raw event time,
        so a partial backfill of an older range is not called stale; ``warm_until``: days
        before it are not judged for anomalies (the views' windows are still filling).

        The checks use every core: the backfill's own SQL runs on one thread so that a rerun
        writes the same bytes, but counts and statistics do not depend on the order rows
        are read in (float sums only in their last bits, which the detector ignores)."""
        threads = one_row(meta, "SELECT current_setting('threads')")[0]
        meta.execute(f"SET threads = {os.cpu_count() or 1}")
        try:
            return self._check_tables(meta, rows, stage, contract, files, timestamp, input_newest, warm_until)
        finally:
            meta.execute(f"SET threads = {int(threads)}")

    def _check_tables(self, meta: duckdb.DuckDBPyConnection, rows: RowEngine, stage: str,
                      contract: TableContract, files: str, timestamp: str, input_newest: datetime | None,
                      warm_until: date | None) -> GateOutcome:
        t0 = time.perf_counter()
        # the combined schema and each file's own (footers only): the combined one hides a
        # file whose column DuckDB cannot cast, and the scan below would stop on it
        described, results = checks.table_schema_checks(meta, stage, contract, files)
        if described is None or self.any_blocking(results):
            self.keep(results)
            raise self._blocked(stage, contract.name, results)
        types = described or {}
        row_checks = checks.row_checks(contract, types, rows.dialect)
        ts = timestamp if timestamp in types else None
        stat_columns = stats.stats_columns(contract, types, ts) if contract.anomalies and ts else None
        modulus = stats.sample_modulus(meta, files) if stat_columns is not None else 1
        scan = rows.scan(files, row_checks, contract, ts, stage, stat_columns, modulus)
        quarantine = None
        quarantined = 0
        day_stats = scan.stats
        if any(scan.failed.values()):
            quarantine = self.data / "quarantine" / stage / contract.name / f"{self.run_id}.parquet"
            quarantined = rows.write_quarantine(files, row_checks, quarantine)
            if stat_columns is not None and ts:  # statistics of what goes on, not of what was stopped
                day_stats = rows.passed_day_stats(stage, contract.name, files, quarantine, ts, stat_columns, modulus)
        for rc in row_checks:
            n = scan.failed[rc.name]
            results.append(CheckResult(
                stage, contract.name, rc.name, rc.column, rc.severity, n == 0, failed_rows=n, rows=scan.rows,
                detail=f"{n:,} of {scan.rows:,} rows quarantined to {quarantine}" if n else "",
                sample=checks.sample_rows(meta, quarantine, rc.name) if n and quarantine else [],
            ))
        if input_newest is not None and scan.newest is not None and scan.newest > input_newest:
            # a windowed table holds rows after its newest event (its windows emptying out, up
            # to the horizon later): what it is fresh as of is the newest event it accounts
            # for, whose row is 1 us after it (the online store's newest event says the same)
            newest = input_newest if input_newest.tzinfo else input_newest.replace(tzinfo=timezone.utc)
            scan = dataclasses.replace(scan, newest=min(scan.newest, newest + timedelta(microseconds=1)))
        fresh = checks.freshness_check(stage, contract, scan, self.now)
        if fresh is not None and not fresh.passed and scan.newest and input_newest \
                and scan.newest < input_newest - timedelta(days=1):
            fresh = dataclasses.replace(fresh, passed=True, detail="not checked: a backfill of an older range "
                                        f"(newest input event {input_newest:%Y-%m-%d %H:%M} UTC)")
        for extra in (checks.volume_check(stage, contract, scan, self.now), fresh):
            if extra is not None:
                results.append(extra)
        if input_newest is not None:
            # days after the newest input event only hold windows emptying out (request-time
            # windows): no event made them, so they are neither judged nor kept as history
            day_stats = [d for d in day_stats if d.day <= input_newest.date()]
        if contract.anomalies is not None and day_stats:
            history = stats.load_history(self.data, stage, contract.name, meta)
            results += anomaly.judge(stage, contract.name, contract.anomalies, day_stats, history, self.now,
                                     warm_until)
        self.day_stats += day_stats
        self.keep(results)
        if self.any_blocking(results):
            raise self._blocked(stage, contract.name, results, quarantine)
        return GateOutcome(stage, contract.name, scan.rows, quarantined, quarantine, time.perf_counter() - t0,
                           scan.newest, min(scan.rows_per_day, default=None), types, _column_metrics(day_stats))

    def _blocked(self, stage: str, table: str, results: list[CheckResult],
                 quarantine: Path | None = None) -> GateBlocked:
        """The error that stops the batch (failing rows, if any, are in ``quarantine``)."""
        return self.blocked(stage, table, results, stopped="the batch", fix="the data", quarantine=quarantine)

    # -- run record -------------------------------------------------------------------------
    def record(self, error: BaseException | None = None) -> RunRecord:
        """The run record as written to the run log."""
        return RunRecord(
            **self.record_head(error, self.view_hashes),
            inputs=tuple(RunInput.from_dict(i) for i in self.inputs.values()),
            outputs=tuple(RunOutput.from_dict(o) for o in self.outputs.values()),
            checks=tuple(self.results),
        )

    def __enter__(self: _Gate) -> _Gate:
        self.start_lineage()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        record = self.record(exc)
        if record.ok:  # a blocked run's figures are not history: it published nothing
            written = stats.write_stats(self.data, self.run_id, self.day_stats)
            record = dataclasses.replace(record, stats_file=str(written) if written else None)
        self.publish(record)


class BatchGate(BaseBatchGate):
    """The batch gate on DuckDB: the checks run on the backfill's own connection."""

    def check_input(self, con: duckdb.DuckDBPyConnection, view: AggregateView) -> str | None:
        """Check the view's raw source (once per run). Returns the relation the batch must read
        instead of the raw files when rows were quarantined, else None (read the files as
        they are). Raises GateBlocked when a blocking check fails."""
        return self._check_input(con, DuckDBRows(con), view)

    def check_output(self, con: duckdb.DuckDBPyConnection, view: AggregateView, staging: Path) -> Path:
        """Check the staged feature files of ``view`` before they are published. Returns the
        folder to publish: ``staging`` itself, or a rewrite of it without quarantined rows."""
        return self._check_output(con, DuckDBRows(con), view, staging)

    def _published_newest(self, offline: Path, input_newest: datetime | None) -> str | None:
        with connect() as con:
            return published_newest_event(DuckDBRows(con), offline, input_newest)


@dataclass(frozen=True)
class GateSetup:
    """What a batch gate of a repo is made of (see :func:`gate_setup`)."""

    contracts: Contracts
    data: Path
    sources: list[SourceRef]
    view_hashes: dict[str, str]


def gate_setup(store: FeatureStore, views: list[str] | None = None) -> GateSetup:
    """A batch gate's parts on ``store``'s repo: its ``contracts.yaml``, its data folder, its
    FileSources, and the definition hashes of ``views`` (default: every aggregate view)."""
    from feast import FileSource

    repo = Path(store.repo_path)
    sources = [
        SourceRef(s.name, resolve_source_path(repo, s.path), s.timestamp_field)
        for s in store.list_data_sources() if isinstance(s, FileSource)
    ]
    names = views or [v.name for v in aggregate_views(store)]
    return GateSetup(load_contracts(repo), data_dir(repo), sources, view_definition_hashes(store, names))


def open_gate(store: FeatureStore, views: list[str] | None = None, kind: str = "backfill") -> BatchGate:
    """The gate of a run on ``store``'s repo: its ``contracts.yaml``, its data folder, its
    FileSources, and the definition hashes of ``views`` (default: every aggregate view)."""
    setup = gate_setup(store, views)
    return BatchGate(setup.contracts, setup.data, setup.sources, setup.view_hashes, kind)


