"""Contract checks as DuckDB SQL: one grouped scan for the counts, one more only on failure.

A relation here is a DuckDB ``FROM`` item whose rows carry ``__source_file`` and
``file_row_number`` (``read_parquet(..., filename='__source_file', file_row_number=true)``),
so a failing row is identified by where it is stored and can be excluded downstream.

The row checks (:func:`row_checks`) are SQL in either dialect (DuckDB's or Spark's, see
:class:`~featurepipe.core.sql.Dialect`); the Spark gate (:mod:`featurepipe.quality.spark_gate`)
runs them in its own scan and reads schemas and metadata with the functions here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb

from featurepipe.core.db import one_row
from featurepipe.core.sql import DUCKDB, Dialect, literal, quote
from featurepipe.quality import stats
from featurepipe.quality.contracts import TableContract
from featurepipe.quality.records import CheckResult
from featurepipe.quality.stats import DayStats

ROW_ID = ("__source_file", "file_row_number")
DAY_US = 86_400_000_000
_EPOCH = date(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NUMERIC = ("INT", "DOUBLE", "FLOAT", "DECIMAL", "REAL", "NUMERIC")


@dataclass(frozen=True)
class RowCheck:
    """A row-level check: SQL that is true for a failing row, and SQL giving the reason."""

    name: str
    column: str | None
    severity: str
    fails: str
    reason: str

    @property
    def ranked(self) -> bool:
        """Whether the check compares a row with others (a uniqueness check: ``__dup_rank``)."""
        return "__dup_rank" in self.fails


def parquet_relation(glob: str) -> str:
    """A DuckDB relation over Parquet files with the row identity columns."""
    return (
        f"read_parquet({literal(glob)}, hive_partitioning = true, union_by_name = true, "
        "filename = '__source_file', file_row_number = true)"
    )


def describe(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    """Column names and DuckDB types of a relation, without the row identity columns."""
    rows = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
    return {r[0]: str(r[1]).upper() for r in rows if r[0] not in ROW_ID}


def schema_checks(stage: str, contract: TableContract, types: dict[str, str]) -> list[CheckResult]:
    """Declared columns exist with their declared types (a rename shows as missing + new)."""
    results = []
    declared = {c.name for c in contract.columns}
    extra = sorted(set(types) - declared - {"date"})
    for col in contract.columns:
        if col.name not in types:
            hint = f"; new column(s) {extra}: renamed?" if extra else ""
            results.append(CheckResult(
                stage, contract.name, "schema.missing", col.name, contract.schema_severity, False,
                detail=f"column {col.name!r} is missing (columns: {sorted(types)}){hint}",
            ))
        elif col.type and types[col.name] != col.type:
            results.append(CheckResult(
                stage, contract.name, "schema.type", col.name, contract.schema_severity, False,
                detail=f"column {col.name!r} is {types[col.name]}, the contract says {col.type}",
            ))
    if not results:
        results.append(CheckResult(stage, contract.name, "schema", None, contract.schema_severity, True))
    return results


_NAMED_FILES = 3  # files a per-file schema message names before "and N more"


def file_schemas(con: duckdb.DuckDBPyConnection, glob: str) -> dict[str, dict[str, str]]:
    """Each Parquet file's own top-level columns and DuckDB types, from the footers only
    (one ``parquet_schema`` query over the glob, no data read). No file matching: ``{}``."""
    try:
        rows = con.execute(
            f"SELECT file_name, name, num_children, duckdb_type FROM parquet_schema({literal(glob)})"
        ).fetchall()
    except duckdb.IOException:  # nothing matches the glob: the caller's scan says so
        return {}
    except duckdb.BinderException:  # DuckDB before 1.4: no duckdb_type column, ask per file
        files = con.execute(f"SELECT DISTINCT file_name FROM parquet_schema({literal(glob)})").fetchall()
        return {f: describe(con, f"read_parquet({literal(f)}, hive_partitioning = false)") for (f,) in sorted(files)}
    per_file: dict[str, list[tuple[str, int, str | None]]] = {}
    for file, name, children, duckdb_type in rows:  # each file's schema tree, in order
        per_file.setdefault(file, []).append((name, int(children or 0), duckdb_type))
    return {file: _top_level(nodes) for file, nodes in sorted(per_file.items())}


def _top_level(nodes: list[tuple[str, int, str | None]]) -> dict[str, str]:
    """The root's direct children of a flattened Parquet schema tree (a struct's fields
    follow their struct and are skipped, however deep)."""
    out: dict[str, str] = {}
    i = 1
    for _ in range(nodes[0][1]):
        name, _children, duckdb_type = nodes[i]
        out[name] = str(duckdb_type).upper()
        pending = nodes[i][1]
        i += 1
        while pending:
            pending += nodes[i][1] - 1
            i += 1
    return out


def _hive_keys(file: str) -> set[str]:
    """Columns a file's folder names give it (``date=2024-01-01/``), absent from the file."""
    return {part.split("=", 1)[0] for part in Path(file).parent.parts if "=" in part}


@dataclass(frozen=True)
class _FileDrift:
    """One way some files differ from the contract: a check, a column, the type found
    (``""``: missing) and the files."""

    check: str
    column: str | None
    found: str
    files: list[str]
    hint: str = ""


def _file_drifts(contract: TableContract, schemas: dict[str, dict[str, str]]) -> list[_FileDrift]:
    declared = {c.name for c in contract.columns}
    by_schema: dict[tuple[tuple[tuple[str, str], ...], frozenset[str]], list[str]] = {}
    for file, types in schemas.items():  # one comparison per distinct schema, not per file
        by_schema.setdefault((tuple(types.items()), frozenset(_hive_keys(file))), []).append(file)
    drifts: dict[tuple[str, str | None, str], _FileDrift] = {}
    for (items, hive), files in by_schema.items():
        types = dict(items)
        for r in schema_checks("", contract, types):  # the contract's comparison, per file
            if r.passed or (r.column in hive and r.column not in types):
                continue  # a hive partition column: the combined schema's to check
            found = types.get(r.column or "", "")
            extra = sorted(set(types) - declared - {"date"})
            hint = f" (the file has new column(s) {extra}: renamed?)" if r.check == "schema.missing" and extra else ""
            drift = drifts.setdefault((r.check, r.column, found), _FileDrift(r.check, r.column, found, [], hint))
            drift.files.extend(files)
    return [_FileDrift(d.check, d.column, d.found, sorted(d.files), d.hint)
            for _, d in sorted(drifts.items(), key=lambda kv: (kv[0][1] or "", kv[0][0], kv[0][2]))]


def _drift_result(stage: str, contract: TableContract, d: _FileDrift) -> CheckResult:
    spec = contract.column(d.column or "")
    what = (f"is {d.found}, expected {spec.type}" if d.check == "schema.type" and spec is not None
            else f"is missing{d.hint}")
    return CheckResult(stage, contract.name, d.check, d.column, contract.schema_severity, False,
                       detail=f"the schema of {_which(d.files)} does not match: column `{d.column}` {what}")


def _which(files: list[str]) -> str:
    """The files as a message names them: one in backticks, or how many and the first few."""
    if len(files) == 1:
        return f"`{files[0]}`"
    more = f" and {len(files) - _NAMED_FILES} more" if len(files) > _NAMED_FILES else ""
    return f"{len(files)} files ({', '.join(f'`{f}`' for f in files[:_NAMED_FILES])}{more})"


def _unreadable(stage: str, contract: TableContract, glob: str, exc: duckdb.Error) -> CheckResult:
    """A file that is not Parquet blocks whatever the contract's schema severity: nothing
    can read past it."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return CheckResult(stage, contract.name, "schema.file", None, "block", False,
                       detail=f"a file of {glob} cannot be read as Parquet: {first}")


def file_schema_checks(con: duckdb.DuckDBPyConnection, stage: str, contract: TableContract,
                       glob: str) -> list[CheckResult]:
    """The contract's schema checks on EACH file's own schema, read from the Parquet footers
    in one query (DuckDB's combined schema over the glob hides a retyped column in one file:
    an INT64 ``event_timestamp`` among TIMESTAMPTZ files still reads as TIMESTAMPTZ, and a
    scan then fails). Only failures, one per check, column and type found, each naming its
    files; ``[]`` when every file matches (or none exists). A file DuckDB cannot read as
    Parquet fails ``schema.file``."""
    try:
        schemas = file_schemas(con, glob)
    except duckdb.Error as exc:  # not Parquet, truncated: DuckDB's message names the file
        return [_unreadable(stage, contract, glob, exc)]
    return [_drift_result(stage, contract, d) for d in _file_drifts(contract, schemas)]


def majority_types(schemas: dict[str, dict[str, str]]) -> dict[str, str]:
    """Each column's type in most of the files that have it (a tie: the type of the first
    such file, in name order)."""
    counts: dict[str, dict[str, int]] = {}
    for types in schemas.values():
        for column, type_ in types.items():
            by_type = counts.setdefault(column, {})
            by_type[type_] = by_type.get(type_, 0) + 1
    return {column: max(by_type, key=by_type.__getitem__) for column, by_type in counts.items()}


def _implicit_casts(con: duckdb.DuckDBPyConnection, pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (from, to) type pairs DuckDB casts implicitly, so that a file of the one type reads
    among files of the other (a FLOAT column among DOUBLE ones), in one query on no data.
    None on a DuckDB that cannot say (every difference then counts)."""
    ordered = sorted(pairs)
    if not ordered:
        return set()
    try:
        row = con.execute("SELECT " + ", ".join(
            f"can_cast_implicitly(NULL::{a}, NULL::{b})" for a, b in ordered)).fetchone()
    except duckdb.Error:
        return set()
    return {pair for pair, ok in zip(ordered, row or ()) if ok}


def history_schema_checks(con: duckdb.DuckDBPyConnection, stage: str, name: str,
                          contract: TableContract | None, glob: str) -> list[CheckResult]:
    """Each file's own schema (footers only, one query) before a reader takes the files of
    ``glob`` together: the columns the contract types against the contract (as
    :func:`file_schema_checks`, with its schema severity), every other column (all of them
    without a contract) against the type most files give it. A file whose type differs
    from that majority fails (blocking) unless DuckDB casts it there implicitly; a column a
    file lacks is no failure (it reads as NULL). Only failures; ``[]`` when no file
    matches. A file DuckDB cannot read as Parquet fails ``schema.file``."""
    table = contract or TableContract(name)
    try:
        schemas = file_schemas(con, glob)
    except duckdb.Error as exc:
        return [_unreadable(stage, table, glob, exc)]
    results = [_drift_result(stage, contract, d) for d in _file_drifts(contract, schemas)] if contract else []
    typed = {c.name for c in contract.columns if c.type} if contract else set()
    majority = majority_types(schemas)
    differ = {(t, majority[c]) for types in schemas.values() for c, t in types.items()
              if c not in typed and t != majority[c]}
    implicit = _implicit_casts(con, differ)
    drifts: dict[tuple[str, str], list[str]] = {}
    for file, types in schemas.items():
        for column, type_ in types.items():
            if (type_, majority[column]) in differ - implicit and column not in typed:
                drifts.setdefault((column, type_), []).append(file)
    for (column, type_), files in sorted(drifts.items()):
        having = [types[column] for types in schemas.values() if column in types]
        results.append(CheckResult(
            stage, name, "schema.type", column, "block", False,
            detail=f"the schema of {_which(sorted(files))} does not match: column `{column}` is {type_}, expected "
                   f"{majority[column]} (the type of {having.count(majority[column])} of the {len(having)} files "
                   "with that column)",
        ))
    return results


def table_schema_checks(con: duckdb.DuckDBPyConnection, stage: str, contract: TableContract,
                        glob: str) -> tuple[dict[str, str] | None, list[CheckResult]]:
    """The combined schema of the files of ``glob`` (for the row checks) and the schema
    results of the table: the contract's checks on the combined schema and on each file's
    own (see :func:`file_schema_checks`), in one pass over the footers.

    A drift of every file is said once, as before, of the table; a drift of some files only
    replaces the combined result of that column (which would describe DuckDB's widened
    type, not the data) with one naming the files. The combined schema is None when DuckDB
    cannot combine the files and a file check says why."""
    try:
        schemas = file_schemas(con, glob)
    except duckdb.Error as exc:
        return None, [_unreadable(stage, contract, glob, exc)]
    drifts = _file_drifts(contract, schemas)
    try:
        types = describe(con, parquet_relation(glob))
    except duckdb.Error:  # the files do not combine at all: blocking, whatever the severity
        if not drifts:
            raise
        return None, [CheckResult(r.stage, r.table, r.check, r.column, "block", False, detail=r.detail)
                      for r in (_drift_result(stage, contract, d) for d in drifts)]
    combined = schema_checks(stage, contract, types)
    failed = {(r.check, r.column) for r in combined if not r.passed}
    whole = {(d.check, d.column) for d in drifts if len(d.files) == len(schemas) and (d.check, d.column) in failed}
    partial = [d for d in drifts if (d.check, d.column) not in whole]
    replaced = {(d.check, d.column) for d in partial}
    results = [r for r in combined if (r.check, r.column) not in replaced and not (r.passed and partial)]
    return types, results + [_drift_result(stage, contract, d) for d in partial]


def _value(v: Any, dialect: Dialect) -> str:
    return dialect.literal(v) if isinstance(v, str) else repr(v)


def as_text(expr: str, duckdb_type: str, dialect: Dialect = DUCKDB) -> str:
    """SQL giving the text DuckDB's ``CAST(expr AS VARCHAR)`` gives (a quarantine reason
    quotes the failing value), in ``dialect``. Spark writes DOUBLE as Java does (``1.0E7``,
    ``Infinity``): rewritten to DuckDB's shortest round-trip text (``10000000.0``, ``inf``),
    which is Python's ``repr`` (equal on 200k values below 1e16; on Java before 19 some
    values from 1e16 up and subnormals keep a digit more). TIMESTAMP WITH TIME ZONE gains
    DuckDB's ``+00`` (Spark's session is UTC)."""
    if dialect.name == "duckdb":
        return f"CAST({expr} AS VARCHAR)"
    s = f"CAST({expr} AS STRING)"
    if duckdb_type == "TIMESTAMP WITH TIME ZONE":
        return f"concat({s}, '+00')"
    if duckdb_type not in ("DOUBLE", "FLOAT", "REAL"):
        return s
    sign = f"CASE WHEN startswith({s}, '-') THEN '-' ELSE '' END"
    lead = f"regexp_extract({s}, '^-?([0-9])', 1)"
    fraction = f"regexp_replace(regexp_extract({s}, '^-?[0-9]*\\\\.([0-9]*)', 1), '0+$', '')"
    exp = f"try_cast(regexp_extract({s}, 'E(-?[0-9]+)$', 1) AS INT)"
    digits = f"concat({lead}, {fraction})"
    scientific = (f"concat({sign}, {lead}, CASE WHEN {fraction} = '' THEN '' ELSE concat('.', {fraction}) END, "
                  f"'e', CASE WHEN {exp} < 0 THEN '-' ELSE '+' END, CASE WHEN abs({exp}) < 10 THEN '0' ELSE '' END, "
                  f"abs({exp}))")
    large = (f"CASE WHEN length({digits}) <= {exp} + 1 "
             f"THEN concat({sign}, {digits}, repeat('0', {exp} + 1 - length({digits})), '.0') "
             f"ELSE concat({sign}, substr({digits}, 1, {exp} + 1), '.', substr({digits}, {exp} + 2)) END")
    small = f"concat({sign}, '0.', repeat('0', -{exp} - 1), {digits})"
    return (f"(CASE WHEN {s} = 'NaN' THEN 'nan' WHEN {s} = 'Infinity' THEN 'inf' "
            f"WHEN {s} = '-Infinity' THEN '-inf' WHEN NOT contains({s}, 'E') THEN {s} "
            f"WHEN {exp} >= 16 OR {exp} < -4 THEN {scientific} WHEN {exp} >= 0 THEN {large} ELSE {small} END)")


def row_checks(contract: TableContract, types: dict[str, str], dialect: Dialect = DUCKDB) -> list[RowCheck]:
    """The row-level checks of a contract that apply to the columns present, as SQL of
    ``dialect`` (``types``: DuckDB's type names, which the contract speaks)."""
    quote, literal = dialect.quote, dialect.literal
    checks = []
    for col in contract.columns:
        if col.name not in types:
            continue
        q = quote(col.name)
        text = as_text(q, types[col.name], dialect)
        if not col.nullable:
            checks.append(RowCheck(f"{col.name}.not_null", col.name, col.severity,
                                   f"{q} IS NULL", literal(f"{col.name} is null")))
        numeric = any(t in types[col.name] for t in _NUMERIC)
        if numeric and (col.min is not None or col.max is not None):
            conds = []
            if col.min is not None:
                conds.append(f"{q} < {col.min!r}")
            if col.max is not None:
                conds.append(f"{q} > {col.max!r}")
            if "DOUBLE" in types[col.name] or "FLOAT" in types[col.name]:
                conds.append(f"isnan({q})")
            bounds = f"[{'-inf' if col.min is None else col.min}, {'inf' if col.max is None else col.max}]"
            checks.append(RowCheck(f"{col.name}.range", col.name, col.severity, f"({' OR '.join(conds)})",
                                   f"{literal(col.name + ' = ')} || {text} || {literal(' outside ' + bounds)}"))
        if col.allowed is not None:
            values = ", ".join(_value(v, dialect) for v in col.allowed)
            checks.append(RowCheck(f"{col.name}.allowed", col.name, col.severity,
                                   f"{q} NOT IN ({values})",
                                   f"{literal(col.name + ' = ')} || {text} || ' not in the allowed values'"))
    if contract.unique and all(k in types for k in contract.unique):
        not_null = " AND ".join(f"{quote(k)} IS NOT NULL" for k in contract.unique)
        checks.append(RowCheck(
            f"unique({', '.join(contract.unique)})", None, contract.unique_severity,
            f"(__dup_rank > 1 AND {not_null})",
            f"'duplicate of an earlier row with the same ({', '.join(contract.unique)})'",
        ))
    return checks


@dataclass(frozen=True)
class Scan:
    """Counts from one grouped scan of a relation."""

    rows: int
    failed: dict[str, int]
    rows_per_day: dict[date, int]
    newest: datetime | None
    stats: list[DayStats] = field(default_factory=list)


def scan(con: duckdb.DuckDBPyConnection, relation: str, checks: list[RowCheck],
         contract: TableContract, timestamp: str | None, stage: str = "",
         stat_columns: list[str] | None = None, modulus: int = 1) -> Scan:
    """Row count, failures per check, rows per day, newest event time and the per-day
    statistics of ``stat_columns``, in one scan (plus one distinct count for a uniqueness
    check)."""
    rows = con.execute(scan_sql(relation, checks, timestamp, stat_columns, modulus)).fetchall()
    dups = duplicates(con, relation, contract.unique) if any(c.ranked for c in checks) else 0
    return scan_result(rows, checks, contract, stage, stat_columns if timestamp else None, dups)


def scan_sql(relation: str, checks: list[RowCheck], timestamp: str | None, stat_columns: list[str] | None,
             modulus: int, dialect: Dialect = DUCKDB) -> str:
    """The grouped query of a scan in ``dialect``: per day of the event time (days since
    1970-01-01), rows, the newest event time (microseconds since the epoch), the failures
    of each check but a uniqueness one, and the statistics of ``stat_columns``
    (:func:`stats_sql`). :func:`scan_result` reads its rows."""
    # sum(CAST(cond AS INTEGER)) and an integer day: several times cheaper in DuckDB than
    # count(*) FILTER (WHERE cond) and date_trunc on a TIMESTAMPTZ
    counts = [f"coalesce(sum(CAST({c.fails} AS INTEGER)), 0)" for c in checks if not c.ranked]
    if stat_columns is not None and timestamp is not None:
        counts += stats_sql(stat_columns, modulus, dialect)
    day = newest = "CAST(NULL AS BIGINT)"
    if timestamp:
        ts = dialect.quote(timestamp)
        day = f"{dialect.epoch_us(ts)} {'//' if dialect.name == 'duckdb' else 'div'} {DAY_US}"
        newest = dialect.epoch_us(f"max({ts})")
    return f"SELECT {day}, count(*), {newest}{''.join(', ' + c for c in counts)} FROM {relation} GROUP BY 1"


def stats_sql(columns: list[str], modulus: int, dialect: Dialect = DUCKDB) -> list[str]:
    """:func:`featurepipe.quality.stats.select_sql` in ``dialect`` (Spark's exact
    ``percentile`` interpolates as DuckDB's ``quantile_cont`` does)."""
    if dialect.name == "duckdb":
        return stats.select_sql(columns, modulus)
    sample = "" if modulus <= 1 else f" FILTER (WHERE file_row_number % {modulus} = 0)"
    quantiles = ", ".join(str(q) for q in stats.QUANTILES)
    out = []
    for name in columns:
        x = f"CAST({dialect.quote(name)} AS DOUBLE)"
        out += [f"count({dialect.quote(name)})", f"sum({x})", f"sum({x} * {x})",
                f"percentile({x}, array({quantiles})){sample}"]
    return out


def scan_result(rows: Sequence[Sequence[Any]], checks: list[RowCheck], contract: TableContract, stage: str,
                stat_columns: list[str] | None, duplicate_rows: int = 0) -> Scan:
    """The :class:`Scan` of the rows of :func:`scan_sql` (``stat_columns``: None when it kept
    no statistics), with ``duplicate_rows`` the failures of a uniqueness check."""
    plain = [c for c in checks if not c.ranked]
    columns = stat_columns or []
    failed = {c.name: sum(int(r[3 + i]) for r in rows) for i, c in enumerate(plain)}
    failed.update({c.name: duplicate_rows for c in checks if c.ranked})
    day_stats = [s for r in rows for s in stats.parse(stage, contract.name, columns, r[0], r[1],
                                                       tuple(r[3 + len(plain):]))] if stat_columns is not None else []
    newest_us = max((int(r[2]) for r in rows if r[2] is not None), default=None)
    return Scan(
        rows=sum(int(r[1]) for r in rows),
        failed=failed,
        rows_per_day={_EPOCH + timedelta(days=int(r[0])): int(r[1]) for r in rows if r[0] is not None},
        newest=None if newest_us is None else _EPOCH_UTC + timedelta(microseconds=newest_us),
        stats=sorted(day_stats, key=lambda s: (s.column, s.day)),
    )


def duplicates(con: duckdb.DuckDBPyConnection, relation: str, columns: tuple[str, ...]) -> int:
    """Rows that repeat an earlier row's ``columns`` (rows with a null among them excluded).

    Counts distinct 64-bit hashes first (about half the cost of distinct tuples): equal
    tuples always hash equal, so zero there is exact; only a non-zero count (a duplicate,
    or a hash collision) is recounted exactly on the tuples.
    """
    keys = [quote(k) for k in columns]
    not_null = " AND ".join(f"{k} IS NOT NULL" for k in keys)
    fast = one_row(
        con, f"SELECT count(*) - count(DISTINCT hash({', '.join(keys)})) FROM {relation} WHERE {not_null}"
    )[0]
    if not fast:
        return 0
    distinct = keys[0] if len(keys) == 1 else f"({', '.join(keys)})"
    return int(one_row(
        con, f"SELECT count(*) - count(DISTINCT {distinct}) FROM {relation} WHERE {not_null}"
    )[0])


def failing_rows_sql(relation: str, checks: list[RowCheck], dialect: Dialect = DUCKDB) -> str:
    """A SELECT (in ``dialect``) of every failing row of ``relation`` once, with its first
    failing check (``quality_check``) and all its reasons (``quality_reason``); with a
    uniqueness check, also its ``__dup_rank`` (to leave out: earlier rows with the same key
    come first in storage order)."""
    first = "CASE " + " ".join(f"WHEN {c.fails} THEN {dialect.literal(c.name)}" for c in checks) + " END"
    reasons = "concat_ws('; ', " + ", ".join(f"CASE WHEN {c.fails} THEN {c.reason} END" for c in checks) + ")"
    dup = next((c for c in checks if c.ranked), None)
    ranked = relation
    if dup is not None:
        keys = ", ".join(dialect.quote(k) for k in dup.name[len("unique("):-1].split(", "))
        ranked = (f"(SELECT *, row_number() OVER (PARTITION BY {keys} ORDER BY __source_file, "
                  f"file_row_number) AS __dup_rank FROM {relation})")
    return (f"SELECT * FROM (SELECT *, {first} AS quality_check, {reasons} AS quality_reason "
            f"FROM {ranked}) AS __checked WHERE quality_check IS NOT NULL")


def write_quarantine(con: duckdb.DuckDBPyConnection, relation: str, checks: list[RowCheck],
                     target: Path) -> int:
    """Write every failing row once, with its first failing check (``quality_check``) and all
    its reasons (``quality_reason``), and return how many rows were written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    exclude = "EXCLUDE (__dup_rank)" if any(c.ranked for c in checks) else ""
    con.execute(
        f"COPY (SELECT * {exclude} FROM ({failing_rows_sql(relation, checks)}) "
        f"ORDER BY __source_file, file_row_number) TO {literal(str(target))} (FORMAT parquet, COMPRESSION zstd)"
    )
    return int(one_row(con, f"SELECT count(*) FROM read_parquet({literal(str(target))})")[0])


def sample_rows(con: duckdb.DuckDBPyConnection, quarantine: Path, check: str, limit: int = 3) -> list[dict[str, Any]]:
    """A few quarantined rows of one check, JSON-friendly."""
    cur = con.execute(
        f"SELECT * EXCLUDE (__source_file, file_row_number) FROM read_parquet({literal(str(quarantine))}) "
        f"WHERE quality_check = {literal(check)} LIMIT {limit}"
    )
    names = [d[0] for d in cur.description]
    return [{n: _jsonable(v) for n, v in zip(names, row)} for row in cur.fetchall()]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, int | float | str | bool):
        return value
    return str(value)


def volume_check(stage: str, contract: TableContract, s: Scan, now: datetime) -> CheckResult | None:
    """Too few rows overall, or a complete day (before ``now``'s day) far below the median
    day (a collapse)."""
    vol = contract.volume
    if vol is None:
        return None
    if s.rows < vol.min_rows:
        return CheckResult(stage, contract.name, "volume", None, vol.severity, False, rows=s.rows,
                           detail=f"{s.rows:,} rows, the contract expects at least {vol.min_rows:,}")
    if vol.min_day_ratio is not None and len(s.rows_per_day) >= 3:  # a median needs a few days
        complete = {d: n for d, n in s.rows_per_day.items() if d < now.date()}
        counts = sorted(complete.values()) or [0]
        median = counts[len(counts) // 2]
        low = sorted((d, n) for d, n in complete.items() if n < vol.min_day_ratio * median)
        if low:
            days = ", ".join(f"{d:%Y-%m-%d}: {n:,}" for d, n in low[:5])
            return CheckResult(
                stage, contract.name, "volume", None, vol.severity, False, failed_rows=0, rows=s.rows,
                detail=f"{len(low)} day(s) below {vol.min_day_ratio:.0%} of the median day ({median:,} rows): {days}",
            )
    return CheckResult(stage, contract.name, "volume", None, vol.severity, True, rows=s.rows)


def freshness_check(stage: str, contract: TableContract, s: Scan, now: datetime) -> CheckResult | None:
    """The newest event time is within the contract's ``max_age`` of ``now``."""
    fresh = contract.freshness
    if fresh is None:
        return None
    if s.newest is None:
        return CheckResult(stage, contract.name, "freshness", None, fresh.severity, False,
                           detail="no rows with an event time")
    age = now - s.newest
    ok = age <= fresh.max_age
    return CheckResult(stage, contract.name, "freshness", None, fresh.severity, ok, rows=s.rows,
                       detail=f"newest event {s.newest:%Y-%m-%d %H:%M:%S} UTC, {_age(age)} old "
                              f"(SLA {_age(fresh.max_age)})")


def _age(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f}d"
    if seconds >= 3_600:
        return f"{seconds / 3_600:.1f}h"
    return f"{seconds / 60:.0f}m"
