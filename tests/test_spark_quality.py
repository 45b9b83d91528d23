"""The batch quality gates on Spark give what they give on DuckDB, row for row and word for word.

The same bad raw data (null keys, out-of-range values, a value outside the allowed ones,
duplicated events, a file whose name a URI must escape) goes through the DuckDB gate
(:class:`~featurepipe.quality.gate.BatchGate`, the oracle: tests/test_quality.py checks it
against hand-counted expectations) and the Spark gate
(:class:`~featurepipe.quality.spark_gate.SparkBatchGate`): the quarantine files hold the
same rows (storage identity, values, check, reason), the check results and the blocked
errors say the same, and rows in = rows passed on + rows quarantined on both. One Spark
session for the module (the ``spark`` fixture), a few thousand rows.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from featurepipe.definitions import AggregateSpec, AggregateView
from featurepipe.errors import GateBlocked
from featurepipe.quality.contracts import load_contracts
from featurepipe.quality.gate import BaseBatchGate, BatchGate, SourceRef
from featurepipe.quality.records import CheckResult
from featurepipe.quality.spark_gate import SparkBatchGate
from tests.conftest import SOURCE_REPO

ROWS, DAYS = 2_000, 4
VIEW = "user_stats"

# null keys (id 201 also out of range: two reasons), values out of range (DuckDB's and Java's
# texts of 2.5e7 and -1.5e-05 differ), a category not allowed, duplicated events
BAD_ROWS = """
SELECT * REPLACE (
  CASE WHEN transaction_id % 200 = 1 THEN NULL ELSE user_id END AS user_id,
  CASE WHEN transaction_id % 300 = 2 THEN -10.0 WHEN transaction_id % 300 = 3 THEN 5e6
       WHEN transaction_id % 300 = 4 THEN 2.5e7 WHEN transaction_id % 300 = 5 THEN -1.5e-5
       WHEN transaction_id = 201 THEN -1.0 ELSE amount END AS amount,
  CASE WHEN transaction_id % 400 = 6 THEN 'weap''ons' ELSE category END AS category)
FROM raw
UNION ALL SELECT * FROM raw WHERE transaction_id % 350 = 7
"""
# a late producer's file whose name Spark's URI escapes: rows of its own, one of them bad
LATE_FILE = "late batch+1 %.parquet"
FEATURES = {  # the view's feature-stage contract, added to the demo repo's
    "unique": ["user_id", "event_timestamp"],
    "columns": {
        "user_id": {"type": "BIGINT", "nullable": False, "severity": "block"},
        "event_timestamp": {"type": "TIMESTAMP WITH TIME ZONE", "nullable": False},
        "txn_count_1h": {"type": "BIGINT", "nullable": False, "min": 0},
        "amount_sum_1h": {"type": "DOUBLE", "min": 0, "max": 500},
    },
}


def query(sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(sql).fetchall()


@dataclass
class Case:
    """Raw files, a view reading them and the contracts, in a folder of their own."""

    root: Path
    now: datetime

    @property
    def raw(self) -> str:
        return str(self.root / "raw" / "**" / "*.parquet")

    def view(self, engine: str) -> AggregateView:
        hour = timedelta(hours=1)
        return AggregateView(
            VIEW, ("user_id",), self.raw, "event_timestamp",
            (AggregateSpec("txn_count_1h", "count", "amount", hour), AggregateSpec("amount_sum_1h", "sum", "amount", hour)),
            self.root / f"offline-{engine}" / VIEW, "", None)

    def gates(self, edit: Callable[[dict], None] | None = None) -> tuple[BatchGate, SparkBatchGate]:
        """A DuckDB gate and a Spark gate with the same contracts, time and sources; each its
        own data folder (run log, quarantine)."""
        spec = yaml.safe_load((SOURCE_REPO / "contracts.yaml").read_text())
        spec["feature_views"][VIEW] = FEATURES
        if edit:
            edit(spec)
        (self.root / "contracts.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        contracts = load_contracts(self.root)
        sources = [SourceRef("transactions", self.raw, "event_timestamp")]
        return (BatchGate(contracts, self.root / "data-duckdb", sources, now=self.now),
                SparkBatchGate(contracts, self.root / "data-spark", sources, now=self.now))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The bad raw data set (read only: a test that changes files copies it first)."""
    from featurepipe.generate import generate_transactions

    root = tmp_path_factory.mktemp("spark-quality")
    summary = generate_transactions(ROWS, root / "generated", days=DAYS)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"CREATE VIEW raw AS SELECT * FROM read_parquet('{root / 'generated'}/**/*.parquet', "
                "hive_partitioning = true)")
    con.execute(f"COPY ({BAD_ROWS}) TO '{root / 'raw'}' (FORMAT parquet, PARTITION_BY (date))")
    last_day = sorted((root / "raw").glob("date=*"))[-1]
    con.execute(f"COPY (SELECT * EXCLUDE (date) REPLACE (transaction_id + 1000000 AS transaction_id, "
                "CASE WHEN transaction_id % 5 = 0 THEN -2.0 ELSE amount END AS amount) FROM raw "
                f"WHERE date = (SELECT max(date) FROM raw) LIMIT 20) TO '{last_day / LATE_FILE}' (FORMAT parquet)")
    con.close()
    return Case(root, summary.end + timedelta(hours=1))


@pytest.fixture
def case(base: Case, tmp_path: Path) -> Iterator[Case]:
    """A copy of the bad data set that a test may change."""
    shutil.copytree(base.root / "raw", tmp_path / "raw")
    yield Case(tmp_path, base.now)


def quarantine_of(gate: BaseBatchGate, stage: str, table: str) -> pa.Table:
    (file,) = (gate.data / "quarantine" / stage / table).glob("*.parquet")
    assert file.name == f"{gate.run_id}.parquet"
    return pq.read_table(file)


def rows_of(table: pa.Table) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(r.values()) for r in table.to_pylist())


def staged_as_published(table: pa.Table) -> pa.Table:
    """Quarantined feature rows with ``__source_file`` from the day folder on: each engine
    stages its rows in a folder of its own."""
    i = table.schema.get_field_index("__source_file")
    return table.set_column(i, "__source_file", pc.replace_substring_regex(
        table.column(i), pattern=r"^.*/(date=[^/]+/[^/]+)$", replacement=r"\1"))


def said(gate: BaseBatchGate, text: str) -> str:
    """A message with what differs between two runs (run id, data folder) named alike."""
    return text.replace(gate.run_id, "<run>").replace(str(gate.data), "<data>")


def results_of(gate: BaseBatchGate) -> list[CheckResult]:
    return [dataclasses.replace(r, detail=said(gate, r.detail)) for r in gate.results]


def assert_same_quarantine(duck: BatchGate, spark: SparkBatchGate, stage: str, table: str) -> pa.Table:
    dq, sq = quarantine_of(duck, stage, table), quarantine_of(spark, stage, table)
    if stage == "features":
        dq, sq = staged_as_published(dq), staged_as_published(sq)
        assert dq.column("__source_file")[0].as_py().startswith("date=")
    assert sq.column_names == dq.column_names
    assert {"__source_file", "file_row_number", "quality_check", "quality_reason"} <= set(sq.column_names)
    assert rows_of(sq) == rows_of(dq)
    assert sq.to_pylist() == dq.to_pylist()  # the same order too: (__source_file, file_row_number)
    return dq


def test_blocking_checks_and_a_retyped_file_stop_both_engines_alike(spark: Any, case: Case) -> None:
    def block_amount(spec: dict) -> None:
        spec["sources"]["transactions"]["columns"]["amount"]["severity"] = "block"

    errors = []
    for gate, call in zip(case.gates(block_amount), (_duckdb_input, _spark_input(spark)), strict=True):
        with pytest.raises(GateBlocked) as err:
            call(gate, case.view("x"))
        errors.append(said(gate, str(err.value)))
        assert err.value.quarantine == gate.data / "quarantine" / "raw" / "transactions" / f"{gate.run_id}.parquet"
    assert errors[1] == errors[0]
    assert "check 'amount.range' on column 'amount' failed: " in errors[0] and "sample: [{" in errors[0]

    # one file whose event time is epoch milliseconds (another producer's): blocked before a row is read
    day = sorted((case.root / "raw").glob("date=*"))[0]
    clean = pq.read_table(next(day.glob("*.parquet")), partitioning=None).slice(0, 10)
    millis = pc.divide(clean.column("event_timestamp").cast(pa.int64()), 1000)
    retyped = day / "late-producer.parquet"
    pq.write_table(clean.set_column(clean.schema.get_field_index("event_timestamp"), "event_timestamp", millis),
                   retyped)
    errors = []
    for gate, call in zip(case.gates(), (_duckdb_input, _spark_input(spark)), strict=True):
        with pytest.raises(GateBlocked) as err:
            call(gate, case.view("x"))
        errors.append(said(gate, str(err.value)))
        assert err.value.quarantine is None and not list(gate.data.glob(f"quarantine/**/{gate.run_id}.parquet"))
    assert errors[1] == errors[0]
    assert (f"the schema of `{retyped}` does not match: column `event_timestamp` is BIGINT, expected "
            "TIMESTAMP WITH TIME ZONE") in errors[0]


def _duckdb_input(gate: BaseBatchGate, view: AggregateView) -> str | None:
    assert isinstance(gate, BatchGate)
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return gate.check_input(con, view)


def _spark_input(spark: Any) -> Callable[[BaseBatchGate, AggregateView], str | None]:
    def call(gate: BaseBatchGate, view: AggregateView) -> str | None:
        assert isinstance(gate, SparkBatchGate)
        return gate.check_input(spark, view)
    return call


def test_staged_feature_rows_are_quarantined_and_rewritten_alike(spark: Any, case: Case) -> None:
    """The feature stage: staged rows out of range or duplicated are quarantined alike and
    the folder published is the same rows in DuckDB's layout."""
    staged = case.root / "staged"
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(
            f"COPY (SELECT user_id, event_timestamp, 1::BIGINT AS txn_count_1h, amount AS amount_sum_1h, "
            f"strftime(event_timestamp, '%Y-%m-%d') AS date FROM read_parquet('{case.raw}') "
            "WHERE user_id IS NOT NULL ORDER BY event_timestamp, user_id) "
            f"TO '{staged}' (FORMAT parquet, PARTITION_BY (date), FILENAME_PATTERN 'part-{{i}}')")
    rows_staged = query(f"SELECT count(*) FROM read_parquet('{staged}/**/*.parquet')")[0][0]
    duck, sgate = case.gates()
    shutil.copytree(staged, case.root / "staged-duckdb")
    shutil.copytree(staged, case.root / "staged-spark")
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        duck_out = duck.check_output(con, case.view("duckdb"), case.root / "staged-duckdb")
    spark_out = sgate.check_output(spark, case.view("spark"), case.root / "staged-spark")
    assert duck_out.name == "staged-duckdb-checked" and spark_out.name == "staged-spark-checked"
    assert not (case.root / "staged-spark").exists()

    q = assert_same_quarantine(duck, sgate, "features", VIEW)
    assert {"amount_sum_1h.range", "unique(user_id, event_timestamp)"} <= set(q.column("quality_check").to_pylist())
    assert results_of(sgate) == results_of(duck)
    layout = sorted(str(p.relative_to(spark_out)) for p in spark_out.rglob("*"))
    assert layout == sorted(str(p.relative_to(duck_out)) for p in duck_out.rglob("*"))  # date=*/part-0.parquet
    published = {}
    for out in (duck_out, spark_out):
        files = sorted(out.glob("date=*/*.parquet"))
        tables = [pq.read_table(f, partitioning=None) for f in files]
        for t in tables:  # each day sorted by (event time, key)
            keys = list(zip(t.column("event_timestamp").to_pylist(), t.column("user_id").to_pylist()))
            assert keys == sorted(keys)
        published[out] = Counter(r for t in tables for r in rows_of(t))
    assert published[spark_out] == published[duck_out]
    assert rows_staged == sum(published[spark_out].values()) + q.num_rows
    assert sgate.outputs[VIEW]["quarantined"] == duck.outputs[VIEW]["quarantined"] == q.num_rows


class PassedRows:
    """A backfill hook around a gate that keeps the raw rows it let through (as Arrow)."""

    def __init__(self, gate: Any, read: Callable[[Any, str], pa.Table]) -> None:
        self.gate, self.read, self.passed = gate, read, None

    def check_input(self, engine: Any, view: AggregateView) -> str | None:
        relation = self.gate.check_input(engine, view)
        assert relation is not None and self.gate.check_input(engine, view) == relation  # once per run
        self.passed = self.read(engine, relation)
        return relation

    def check_output(self, engine: Any, view: AggregateView, staging: Path) -> Path:
        return self.gate.check_output(engine, view, staging)

    def view_done(self, result: Any) -> None:
        self.gate.view_done(result)


def test_bad_raw_data_backfilled_on_spark_is_quarantined_as_on_duckdb(spark: Any, case: Case) -> None:
    """End to end: each engine's backfill behind its gate. The same raw rows are stopped with
    the same reasons, the same rows go on, the same feature rows are published and
    quarantined, and the run records say the same."""
    from featurepipe.batch.backfill import backfill_view as duckdb_backfill
    from featurepipe.batch.spark import backfill_view as spark_backfill
    from featurepipe.quality.runlog import read_runs

    duck, sgate = case.gates()
    duck_hook = PassedRows(duck, lambda con, relation: con.sql(f"SELECT * FROM {relation}").to_arrow_table())
    spark_hook = PassedRows(sgate, lambda session, name: session.table(name).toArrow())
    with duck:
        duck.view_done(duckdb_backfill(case.view("duckdb"), gate=duck_hook))
    views_before = {t.name for t in spark.catalog.listTables()}
    with sgate:
        sgate.view_done(spark_backfill(case.view("spark"), gate=spark_hook, spark=spark))
    assert {t.name for t in spark.catalog.listTables()} <= views_before  # the gate's views dropped

    # raw ingest: the rows, their identity and reasons; rows in = passed on + quarantined
    q = assert_same_quarantine(duck, sgate, "raw", "transactions")
    reasons = dict(zip(q.column("transaction_id").to_pylist(), q.column("quality_reason").to_pylist()))
    assert reasons[201] == "user_id is null; amount = -1.0 outside [0, 1000000]"
    assert reasons[4] == "amount = 25000000.0 outside [0, 1000000]"  # Spark writes 2.5E7
    assert reasons[5] == "amount = -1.5e-05 outside [0, 1000000]"  # Spark writes -1.5E-5
    assert reasons[6] == "category = weap'ons not in the allowed values"
    assert any(f.endswith(LATE_FILE) for f in q.column("__source_file").to_pylist())
    assert all(Path(f).is_file() for f in q.column("__source_file").to_pylist())
    assert set(q.column("quality_check").to_pylist()) == {
        "user_id.not_null", "amount.range", "category.allowed", "unique(transaction_id)"}
    rows_in = query(f"SELECT count(*) FROM read_parquet('{case.raw}')")[0][0]
    assert spark_hook.passed is not None and duck_hook.passed is not None
    assert rows_in == ROWS + len(range(7, ROWS + 1, 350)) + 20 == spark_hook.passed.num_rows + q.num_rows
    assert spark_hook.passed.column_names == duck_hook.passed.column_names
    assert rows_of(spark_hook.passed) == rows_of(duck_hook.passed)

    # the feature stage and what was published
    assert_same_quarantine(duck, sgate, "features", VIEW)
    tables = {}
    for engine in ("duckdb", "spark"):
        files = sorted((case.root / f"offline-{engine}" / VIEW).glob("date=*/*.parquet"))
        assert files
        tables[engine] = Counter(r for f in files for r in rows_of(pq.read_table(f, partitioning=None)))
    assert tables["spark"] == tables["duckdb"]

    # the same checks (messages, samples), statistics and run record
    assert results_of(sgate) == results_of(duck)
    assert any(not r.passed and r.sample for r in sgate.results)
    key = lambda s: (s.stage, s.table, s.column, s.day)  # noqa: E731
    for d, s in zip(sorted(duck.day_stats, key=key), sorted(sgate.day_stats, key=key), strict=True):
        assert key(s) + (s.rows, s.count) == key(d) + (d.rows, d.count)
        for name in ("mean", "std", "p05", "p50", "p95"):
            expected = getattr(d, name)
            assert getattr(s, name) == (expected if expected is None else pytest.approx(expected, rel=1e-12)), (s, d)
    (drun,), (srun,) = read_runs(duck.data), read_runs(sgate.data)
    assert srun.status == drun.status == "ok"
    assert [said(sgate, str(c)) for c in srun.checks] == [said(duck, str(c)) for c in drun.checks]
    (dinput,), (sinput,) = drun.inputs, srun.inputs
    assert (sinput.rows, sinput.passed, sinput.quarantined, sinput.files, sinput.schema, sinput.views) == (
        dinput.rows, dinput.passed, dinput.quarantined, dinput.files, dinput.schema, dinput.views)
    assert sinput.rows == sinput.passed + sinput.quarantined == rows_in
    (dout,), (sout,) = drun.outputs, srun.outputs
    assert (sout.rows, sout.entities, sout.quarantined, sout.partitions, sout.newest_event, sout.schema) == (
        dout.rows, dout.entities, dout.quarantined, dout.partitions, dout.newest_event, dout.schema)
    assert sout.quarantined > 0
