"""Per-day statistics of a table, computed in the gate's own DuckDB scan, and their store.

For each day (of the event time) and each statistics column: rows, non-null count, mean,
standard deviation and the 5th / 50th / 95th percentiles. Mean and standard deviation come
from ``count``, ``sum`` and ``sum of squares`` (several times cheaper in DuckDB than
``avg`` and ``stddev``); percentiles from a deterministic 1-in-``m`` sample of the rows
(``file_row_number % m``, about :data:`SAMPLE_PER_FILE` values per file), so their cost
stays small on large tables and a rerun gives the same figures.

Every successful run writes its statistics to ``<data>/runs/stats/<run id>.parquet``;
:func:`load_history` reads back the latest figures per (column, day) for the anomaly
detector and the HTML report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb

from featurepipe.core.db import connect, one_row
from featurepipe.core.sql import literal, quote
from featurepipe.errors import InvalidInput
from featurepipe.quality.contracts import TableContract

TABLE = "*"  # the column name of a table's own (rows per day) statistics
SAMPLE_PER_FILE = 512
QUANTILES = (0.05, 0.5, 0.95)
_EPOCH = date(1970, 1, 1)
_NUMERIC = ("INT", "DOUBLE", "FLOAT", "DECIMAL", "REAL", "NUMERIC")


@dataclass(frozen=True)
class DayStats:
    """The statistics of one column (or :data:`TABLE`) on one day."""

    stage: str
    table: str
    column: str
    day: date
    rows: int
    count: int | None = None
    mean: float | None = None
    std: float | None = None
    p05: float | None = None
    p50: float | None = None
    p95: float | None = None

    @property
    def null_rate(self) -> float | None:
        return None if self.count is None or not self.rows else 1.0 - self.count / self.rows

    def value(self, statistic: str) -> float | None:
        """``rows``, ``null_rate``, ``mean``, ``std``, ``p05``, ``p50`` or ``p95`` (None: n/a)."""
        value = float(self.rows) if statistic == "rows" else getattr(self, statistic)
        return None if value is None or not math.isfinite(value) else float(value)

    def same_data(self, other: DayStats) -> bool:
        """Whether two figures describe the same rows (a rerun over unchanged data)."""
        return self.rows == other.rows and self.count == other.count and (
            self.mean == other.mean or (self.mean is not None and other.mean is not None
                                        and math.isclose(self.mean, other.mean, rel_tol=1e-9)))


def is_numeric(duckdb_type: str) -> bool:
    return any(t in duckdb_type for t in _NUMERIC) and not duckdb_type.endswith("[]")


def stats_columns(contract: TableContract, types: dict[str, str], timestamp: str | None) -> list[str]:
    """The columns whose statistics are kept: the contract's ``anomalies.columns``, or every
    numeric column but the unique key columns and the event time."""
    anomalies = contract.anomalies
    if anomalies is None:
        return []
    if anomalies.columns is not None:
        wrong = [c for c in anomalies.columns if c in types and not is_numeric(types[c])]
        if wrong:
            raise InvalidInput(
                f"contracts.yaml: {contract.name}.anomalies.columns: {wrong} are not numeric "
                f"({', '.join(types[c] for c in wrong)}); list numeric columns only"
            )
        return [c for c in anomalies.columns if c in types]  # a missing one: the schema check says so
    skip = {*contract.unique, timestamp, "date"}
    return [c for c, t in types.items() if c not in skip and is_numeric(t)]


def sample_modulus(con: duckdb.DuckDBPyConnection, files: str) -> int:
    """1-in-m for the percentile sample: about :data:`SAMPLE_PER_FILE` rows per file."""
    found = one_row(
        con, f"SELECT count(*), coalesce(sum(num_rows), 0) FROM parquet_file_metadata({literal(files)})"
    )
    n_files, n_rows = int(found[0]), int(found[1])
    return max(1, n_rows // max(1, n_files) // SAMPLE_PER_FILE)


def select_sql(columns: list[str], modulus: int) -> list[str]:
    """Aggregate expressions for :func:`parse`, four per column, for a ``GROUP BY day`` scan
    of a relation carrying ``file_row_number``."""
    out = []
    sample = "" if modulus <= 1 else f" FILTER (WHERE file_row_number % {modulus} = 0)"
    for name in columns:
        x = f"CAST({quote(name)} AS DOUBLE)"
        out += [f"count({quote(name)})", f"sum({x})", f"sum({x} * {x})",
                f"quantile_cont({x}, {list(QUANTILES)}){sample}"]
    return out


def parse(stage: str, table: str, columns: list[str], day: int | None, rows: int,
          values: tuple[Any, ...]) -> list[DayStats]:
    """The figures of one result row of a scan using :func:`select_sql` (``values``: its
    aggregates, in order). ``day``: days since 1970-01-01."""
    if day is None:
        return []
    d = _EPOCH + timedelta(days=int(day))
    out = [DayStats(stage, table, TABLE, d, int(rows))]
    for i, name in enumerate(columns):
        count, total, squares, quantiles = values[4 * i: 4 * i + 4]
        count = int(count or 0)
        mean = std = None
        if count:
            mean = float(total) / count
            if count > 1:
                std = math.sqrt(max(0.0, (float(squares) - count * mean * mean) / (count - 1))) \
                    if math.isfinite(mean) else float("nan")
        q = list(quantiles) if quantiles else [None, None, None]
        out.append(DayStats(stage, table, name, d, int(rows), count, mean, std, *q))
    return out


def day_stats(con: duckdb.DuckDBPyConnection, stage: str, table: str, relation: str,
              timestamp: str, columns: list[str], modulus: int) -> list[DayStats]:
    """The figures of ``relation`` (a relation with ``file_row_number``) in a scan of their own
    (the gate's slow path: statistics of the rows that passed, after a quarantine)."""
    day = f"epoch_us({quote(timestamp)}) // {86_400_000_000}"
    rows = con.execute(
        f"SELECT {day}, count(*){''.join(', ' + s for s in select_sql(columns, modulus))} "
        f"FROM {relation} GROUP BY 1"
    ).fetchall()
    return [s for r in rows for s in parse(stage, table, columns, r[0], r[1], r[2:])]


# -- the store -------------------------------------------------------------------------------

def stats_dir(data: Path) -> Path:
    return Path(data) / "runs" / "stats"


def write_stats(data: Path, run_id: str, stats: list[DayStats]) -> Path | None:
    """Write one run's figures to ``<data>/runs/stats/<run id>.parquet`` (atomically)."""
    if not stats:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {f.name: [getattr(s, f.name) for s in stats] for f in fields(DayStats)}
    table = pa.table({"run_id": [run_id] * len(stats), **columns})
    folder = stats_dir(data)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{run_id}.parquet"
    partial = target.with_suffix(".parquet.partial")
    pq.write_table(table, partial)
    partial.replace(target)
    return target


def load_history(data: Path, stage: str | None = None, table: str | None = None,
                 con: duckdb.DuckDBPyConnection | None = None) -> list[DayStats]:
    """The latest stored figures per (stage, table, column, day), oldest day first."""
    if not any(stats_dir(data).glob("*.parquet")):
        return []
    own = con is None
    con = con or connect()
    where = []
    if stage is not None:
        where.append(f"stage = {literal(stage)}")
    if table is not None:
        where.append(f'"table" = {literal(table)}')
    names = [f.name for f in fields(DayStats)]
    try:
        rows = con.execute(
            f"SELECT {', '.join(quote(n) for n in names)} FROM read_parquet("
            f"{literal(str(stats_dir(data) / '*.parquet'))}, union_by_name = true) "
            f"{'WHERE ' + ' AND '.join(where) if where else ''} "
            'QUALIFY row_number() OVER (PARTITION BY stage, "table", "column", day ORDER BY run_id DESC) = 1 '
            'ORDER BY stage, "table", "column", day'
        ).fetchall()
    finally:
        if own:
            con.close()
    return [DayStats(**dict(zip(names, r))) for r in rows]


def as_dict(s: DayStats) -> dict[str, Any]:
    out = asdict(s)
    out["day"] = s.day.isoformat()
    return out
