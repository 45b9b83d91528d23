"""Where a batch gate reads rows: the :class:`RowEngine` a gate runs its row work on, and
DuckDB's (:class:`DuckDBRows`, on the backfill's own connection).

:class:`~featurepipe.quality.gate.BaseBatchGate` decides what to check, in which order, and
what to record; a row engine counts, quarantines and rewrites. Spark's is
``featurepipe.quality.spark_gate.SparkRows`` (loaded on the Spark path only).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Protocol

import duckdb

from featurepipe.core.db import one_row
from featurepipe.core.sql import DUCKDB, Dialect, literal, quote
from featurepipe.quality import checks, stats
from featurepipe.quality.checks import RowCheck, Scan, parquet_relation
from featurepipe.quality.contracts import TableContract
from featurepipe.quality.stats import DayStats


def _passed_with_ids(glob_path: str, quarantine_file: Path) -> str:
    """The rows that passed, keeping their storage identity (for statistics on a sample)."""
    return (
        f"(SELECT __passed.* FROM {parquet_relation(glob_path)} AS __passed ANTI JOIN "
        f"read_parquet({literal(str(quarantine_file))}) AS __quarantined USING (__source_file, file_row_number))"
    )


def passed_rows(glob_path: str, quarantine_file: Path) -> str:
    """A DuckDB relation over the Parquet files without the quarantined rows."""
    return (
        f"(SELECT __passed.* EXCLUDE (__source_file, file_row_number) FROM {parquet_relation(glob_path)} "
        f"AS __passed ANTI JOIN read_parquet({literal(str(quarantine_file))}) AS __quarantined "
        "USING (__source_file, file_row_number))"
    )


class RowEngine(Protocol):
    """Where a batch gate reads rows: DuckDB (:class:`DuckDBRows`) or Spark
    (``featurepipe.quality.spark_gate.SparkRows``). ``files`` is a Parquet glob, read as
    DuckDB's :func:`~featurepipe.quality.checks.parquet_relation` reads it; each row is
    identified by where it is stored (``__source_file``, ``file_row_number``)."""

    @property
    def dialect(self) -> Dialect:
        """The SQL dialect the row checks are written in."""

    def scan(self, files: str, row_checks: list[RowCheck], contract: TableContract, timestamp: str | None,
             stage: str, stat_columns: list[str] | None, modulus: int) -> Scan:
        """Counts, failures per check and per-day statistics (:func:`checks.scan`)."""

    def write_quarantine(self, files: str, row_checks: list[RowCheck], target: Path) -> int:
        """Every failing row once into the one Parquet file ``target`` (:func:`checks.write_quarantine`)."""

    def passed_day_stats(self, stage: str, table: str, files: str, quarantine: Path, timestamp: str,
                         columns: list[str], modulus: int) -> list[DayStats]:
        """The per-day statistics of the rows not in ``quarantine``."""

    def newest(self, files: str, column: str) -> datetime | None:
        """The largest value of a timestamp column."""

    def passed_rows(self, files: str, quarantine: Path) -> str:
        """What the batch reads instead of ``files``: their rows not in ``quarantine``,
        without the identity columns (a DuckDB relation, a Spark temporary view)."""

    def rewrite_passed(self, files: str, quarantine: Path, target: Path, order: list[str]) -> None:
        """The staged feature rows not in ``quarantine`` written to ``target`` in the batch's
        layout (``date=YYYY-MM-DD/part-<i>.parquet``, sorted by ``order``)."""


class DuckDBRows:
    """A gate's row work in DuckDB, on the batch's own connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con

    @property
    def dialect(self) -> Dialect:
        return DUCKDB

    def scan(self, files: str, row_checks: list[RowCheck], contract: TableContract, timestamp: str | None,
             stage: str, stat_columns: list[str] | None, modulus: int) -> Scan:
        return checks.scan(self.con, parquet_relation(files), row_checks, contract, timestamp, stage,
                           stat_columns, modulus)

    def write_quarantine(self, files: str, row_checks: list[RowCheck], target: Path) -> int:
        return checks.write_quarantine(self.con, parquet_relation(files), row_checks, target)

    def passed_day_stats(self, stage: str, table: str, files: str, quarantine: Path, timestamp: str,
                         columns: list[str], modulus: int) -> list[DayStats]:
        return stats.day_stats(self.con, stage, table, _passed_with_ids(files, quarantine), timestamp,
                               columns, modulus)

    def newest(self, files: str, column: str) -> datetime | None:
        newest: datetime | None = one_row(self.con, f"SELECT max({quote(column)}) FROM {parquet_relation(files)}")[0]
        return newest

    def passed_rows(self, files: str, quarantine: Path) -> str:
        return passed_rows(files, quarantine)

    def rewrite_passed(self, files: str, quarantine: Path, target: Path, order: list[str]) -> None:
        self.con.execute(
            f"COPY (SELECT * FROM {passed_rows(files, quarantine)} ORDER BY {', '.join(quote(c) for c in order)}) "
            f"TO {literal(str(target))} "
            "(FORMAT parquet, PARTITION_BY (date), FILENAME_PATTERN 'part-{i}', COMPRESSION zstd)"
        )
