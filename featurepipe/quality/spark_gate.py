"""The batch quality gates on Spark: DuckDB's contracts, checks, quarantine and run record.

``featurepipe backfill --engine spark`` opens one :class:`SparkBatchGate` per run
(:func:`open_spark_gate`) and calls it as the DuckDB backfill calls
:class:`~featurepipe.quality.gate.BatchGate` (``check_input``, ``check_output``,
``view_done``), with the Spark session instead of a connection. All but where the rows are
read is :class:`~featurepipe.quality.gate.BaseBatchGate`'s, so both engines give the same
check results, messages and reconciliation (rows in = rows passed on + rows quarantined).

The row checks are the same SQL in Spark's dialect, run as Spark jobs: one grouped scan
(plus a distinct count for a uniqueness check), the failing rows written by Spark into the
one Parquet file ``<data>/quarantine/<stage>/<table>/<run id>.parquet`` with DuckDB's
columns, column order, row order and reasons. Each row keeps DuckDB's storage identity:
``__source_file`` is the path as DuckDB names it (Spark's ``_metadata.file_path`` without
its ``file:`` scheme and URL escapes), ``file_row_number`` is ``_metadata.row_index``; so
whichever engine wrote a quarantine file, either excludes the same rows. Schemas (each
file's footer), file metadata, samples of the quarantine file and the stored statistics
are read on the driver with DuckDB: metadata and the gate's own small files, never the data.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

import duckdb
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from featurepipe.core.db import connect
from featurepipe.core.spark import read_source
from featurepipe.core.sql import SPARK, Dialect
from featurepipe.definitions import AggregateView
from featurepipe.quality import checks
from featurepipe.quality.checks import ROW_ID, RowCheck, Scan, parquet_relation
from featurepipe.quality.contracts import Contracts, TableContract
from featurepipe.quality.gate import BaseBatchGate, SourceRef, gate_setup, published_newest_event
from featurepipe.quality.stats import DayStats

if TYPE_CHECKING:
    from feast import FeatureStore

# DuckDB names a local file by its path; Spark by a URI (file:/a/b%20c.parquet): the scheme
# dropped and the escapes decoded ('+' kept: url_decode would read it as a space)
SOURCE_FILE = "url_decode(replace(regexp_replace(_metadata.file_path, '^file:(//)?', ''), '+', '%2B'))"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class SparkRows:
    """A gate's row work on Spark (see the module doc). ``meta``: the driver's DuckDB
    connection for footers; temporary views made are listed in ``views`` (the gate drops
    them when the run ends)."""

    def __init__(self, spark: SparkSession, meta: duckdb.DuckDBPyConnection, views: list[str]) -> None:
        self.spark = spark
        self.meta = meta
        self.views = views
        self._frames: dict[str, DataFrame] = {}  # a glob read once (merging its schemas is a job)

    @property
    def dialect(self) -> Dialect:
        return SPARK

    def frame(self, files: str) -> DataFrame:
        """The rows of a Parquet glob with their storage identity, read as DuckDB's
        :func:`~featurepipe.quality.checks.parquet_relation` reads them: columns merged by
        name, ``k=v`` folders as columns, in DuckDB's column order."""
        if files in self._frames:
            return self._frames[files]
        read = read_source(self.spark, files).select("*", F.expr(SOURCE_FILE).alias("__source_file"),
                           F.col("_metadata.row_index").alias("file_row_number"))
        order = [r[0] for r in self.meta.execute(f"DESCRIBE SELECT * FROM {parquet_relation(files)}").fetchall()]
        self._frames[files] = read.select(*(F.col(SPARK.quote(c)) for c in order))
        return self._frames[files]

    def view(self, frame: DataFrame) -> str:
        """``frame`` as a temporary view; its name."""
        name = f"__fp_gate_{uuid.uuid4().hex[:12]}"
        frame.createOrReplaceTempView(name)
        self.views.append(name)
        return name

    def scan(self, files: str, row_checks: list[RowCheck], contract: TableContract, timestamp: str | None,
             stage: str, stat_columns: list[str] | None, modulus: int) -> Scan:
        relation = self.view(self.frame(files))
        rows = self.spark.sql(checks.scan_sql(relation, row_checks, timestamp, stat_columns, modulus, SPARK)).collect()
        dups = self._duplicates(relation, contract.unique) if any(c.ranked for c in row_checks) else 0
        return checks.scan_result(rows, row_checks, contract, stage, stat_columns if timestamp else None, dups)

    def _duplicates(self, relation: str, columns: tuple[str, ...]) -> int:
        keys = [SPARK.quote(k) for k in columns]
        not_null = " AND ".join(f"{k} IS NOT NULL" for k in keys)
        row = self.spark.sql(f"SELECT count(*) - count(DISTINCT {', '.join(keys)}) FROM {relation} "
                             f"WHERE {not_null}").first()
        return int(row[0]) if row else 0

    def write_quarantine(self, files: str, row_checks: list[RowCheck], target: Path) -> int:
        relation = self.view(self.frame(files))
        failing = self.spark.sql(checks.failing_rows_sql(relation, row_checks, SPARK))
        if any(c.ranked for c in row_checks):
            failing = failing.drop("__dup_rank")
        write_one_file(failing.repartition(1).sortWithinPartitions(*ROW_ID), target)
        return int(pq.read_metadata(target).num_rows)

    def _passed_with_ids(self, files: str, quarantine: Path) -> DataFrame:
        stopped = self.spark.read.parquet(str(quarantine)).select(*ROW_ID)
        return self.frame(files).join(stopped, list(ROW_ID), "left_anti")

    def passed_day_stats(self, stage: str, table: str, files: str, quarantine: Path, timestamp: str,
                         columns: list[str], modulus: int) -> list[DayStats]:
        relation = self.view(self._passed_with_ids(files, quarantine))
        rows = self.spark.sql(checks.scan_sql(relation, [], timestamp, columns, modulus, SPARK)).collect()
        return checks.scan_result(rows, [], TableContract(table), stage, columns).stats

    def newest(self, files: str, column: str) -> datetime | None:
        row = read_source(self.spark, files).selectExpr(SPARK.epoch_us(f"max({SPARK.quote(column)})")).first()
        return None if row is None or row[0] is None else _EPOCH + timedelta(microseconds=int(row[0]))

    def passed_rows(self, files: str, quarantine: Path) -> str:
        return self.view(self._passed_with_ids(files, quarantine).drop(*ROW_ID))

    def rewrite_passed(self, files: str, quarantine: Path, target: Path, order: list[str]) -> None:
        passed = self._passed_with_ids(files, quarantine).drop(*ROW_ID)
        partitions = int(self.spark.conf.get("spark.sql.shuffle.partitions") or "8")
        (passed.repartition(partitions, "date").sortWithinPartitions("date", *order)
         .write.mode("overwrite").partitionBy("date").parquet(str(target)))
        for marker in [*target.glob("_*"), *target.glob("**/.*.crc")]:
            marker.unlink(missing_ok=True)
        for day in sorted(target.glob("date=*")):  # DuckDB's names: part-<i>.parquet per day
            for i, part in enumerate(sorted(day.glob("part-*.parquet"))):
                part.rename(day / f"part-{i}.parquet")


def write_one_file(frame: DataFrame, target: Path) -> None:
    """Write a one-partition frame as the single Parquet file ``target`` (through a folder
    beside it that Spark writes and that is removed after)."""
    folder = target.with_name(f".{target.stem}-{uuid.uuid4().hex[:8]}")
    frame.write.mode("overwrite").parquet(str(folder))
    try:
        (part,) = sorted(folder.glob("part-*.parquet"))
        target.parent.mkdir(parents=True, exist_ok=True)
        part.replace(target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class SparkBatchGate(BaseBatchGate):
    """The batch gate on Spark: rows read and checked by Spark jobs (see the module doc)."""

    log: ClassVar[logging.Logger] = logging.getLogger(__name__)  # failed warnings are said here

    def __init__(self, contracts: Contracts, data: Path, sources: list[SourceRef],
                 view_hashes: dict[str, str] | None = None, kind: str = "backfill",
                 now: datetime | None = None) -> None:
        super().__init__(contracts, data, sources, view_hashes, kind, now)
        self._views: list[str] = []  # temporary views made by this run's checks
        self._spark: SparkSession | None = None

    def check_input(self, spark: SparkSession, view: AggregateView) -> str | None:
        """Check the view's raw source (once per run). Returns the name of a temporary view
        of the raw rows that passed (the raw files' columns) when rows were quarantined, else
        None (read the files as they are). Raises GateBlocked when a blocking check fails."""
        self._spark = spark
        with connect() as meta:
            return self._check_input(meta, SparkRows(spark, meta, self._views), view)

    def check_output(self, spark: SparkSession, view: AggregateView, staging: Path) -> Path:
        """Check the staged feature files of ``view`` before they are published. Returns the
        folder to publish: ``staging`` itself, or a rewrite of it without quarantined rows."""
        self._spark = spark
        with connect() as meta:
            return self._check_output(meta, SparkRows(spark, meta, self._views), view, staging)

    def _published_newest(self, offline: Path, input_newest: datetime | None) -> str | None:
        spark = self._spark or SparkSession.active()
        with connect() as meta:
            return published_newest_event(SparkRows(spark, meta, self._views), offline, input_newest)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            if self._spark is not None:
                for name in self._views:
                    self._spark.catalog.dropTempView(name)
            self._views.clear()


def open_spark_gate(store: FeatureStore, views: list[str] | None = None, kind: str = "backfill") -> SparkBatchGate:
    """The Spark gate of a run on ``store``'s repo (what :func:`~featurepipe.quality.gate.open_gate`
    is on DuckDB): its ``contracts.yaml``, data folder, FileSources and definition hashes."""
    setup = gate_setup(store, views)
    return SparkBatchGate(setup.contracts, setup.data, setup.sources, setup.view_hashes, kind)
