"""Data quality gates on real Parquet, real DuckDB and the registry of a real ``feast apply``.

Each kind of bad data is fed to a backfill of the demo repo's views (read back from the
``pipeline`` fixture's registry, pointed at small data in a temporary folder): schema
drift, null join keys, out-of-range values, bad categories, duplicated events, a volume
collapse, a stale source. Oracles: the quarantine files reconcile exactly with the input
(rows in = rows passed + rows quarantined), and the features computed behind the gate
equal an ungated backfill over the clean rows only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from featurepipe.batch.backfill import backfill_view
from featurepipe.definitions import AggregateView, aggregate_views
from featurepipe.errors import GateBlocked, InvalidInput, NotFound
from featurepipe.quality.contracts import Contracts, load_contracts
from featurepipe.quality.gate import BatchGate, SourceRef, passed_rows
from featurepipe.quality.gate_base import Gate
from featurepipe.quality.online_gate import MaterializeGate
from featurepipe.quality.records import CheckResult, RunRecord
from featurepipe.quality.runlog import read_runs
from featurepipe.quality.status import resolve
from tests.conftest import SOURCE_REPO, Pipeline

BASE_ROWS, BASE_DAYS = 4_000, 8
VIEWS = ("merchant_activity", "merchant_fraud", "user_transaction_stats")


@dataclasses.dataclass
class Case:
    """A small data set of its own: raw files, data folder, views and contracts pointing at it."""

    root: Path
    views: dict[str, AggregateView]

    @property
    def raw(self) -> str:
        return str(self.root / "raw" / "**" / "*.parquet")

    @property
    def data(self) -> Path:
        return self.root / "data"

    def gate(self, edit: Callable[[dict], None] | None = None) -> BatchGate:
        spec = yaml.safe_load((SOURCE_REPO / "contracts.yaml").read_text())
        if edit:
            edit(spec)
        (self.root / "contracts.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return BatchGate(load_contracts(self.root), self.data,
                         [SourceRef("transactions", self.raw, "event_timestamp")])

    def backfill(self, gate: BatchGate | None, views: tuple[str, ...] = VIEWS,
                 start: date | None = None, end: date | None = None) -> None:
        if gate is None:
            for name in views:
                backfill_view(self.views[name], start, end)
            return
        with gate:
            for name in views:
                gate.view_done(backfill_view(self.views[name], start, end, gate=gate))

    def count(self, relation: str) -> int:
        return query(f"SELECT count(*) FROM {relation}")[0][0]


def query(sql: str) -> list[tuple]:
    """Rows of a query, on a connection of its own."""
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def base_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from featurepipe.generate import generate_transactions

    out = tmp_path_factory.mktemp("quality-base") / "raw"
    generate_transactions(BASE_ROWS, out, days=BASE_DAYS)
    return out


@pytest.fixture
def make_case(pipeline: Pipeline, base_raw: Path, tmp_path: Path) -> Callable[..., Case]:
    """Copy the base data through a DuckDB SELECT (the mutation) into a case folder."""
    registered = {v.name: v for v in aggregate_views(pipeline.store)}

    def make(select: str = "SELECT * FROM raw", source: Path | None = None) -> Case:
        root = tmp_path / "case"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE VIEW raw AS SELECT * FROM read_parquet('{source or base_raw}/**/*.parquet', "
                    "hive_partitioning = true)")
        con.execute(f"COPY ({select}) TO '{root / 'raw'}' (FORMAT parquet, PARTITION_BY (date))")
        glob = str(root / "raw" / "**" / "*.parquet")
        views = {n: dataclasses.replace(v, input_path=glob, offline_path=root / "offline" / n)
                 for n, v in registered.items()}
        return Case(root, views)

    return make


def offline(case: Case, view: str) -> str:
    return f"read_parquet('{case.views[view].offline_path}/**/*.parquet')"


def quarantine(case: Case, stage: str, table: str) -> str:
    files = list((case.data / "quarantine" / stage / table).glob("*.parquet"))
    assert len(files) == 1, files
    return f"read_parquet('{files[0]}')"


def test_clean_data_passes_and_gives_the_same_files(make_case: Callable[..., Case]) -> None:
    case = make_case()
    case.backfill(case.gate())
    gated = {p.relative_to(case.root): p.read_bytes() for p in (case.root / "offline").rglob("*.parquet")}
    shutil.rmtree(case.root / "offline")
    case.backfill(None)
    ungated = {p.relative_to(case.root): p.read_bytes() for p in (case.root / "offline").rglob("*.parquet")}
    assert gated == ungated and len(gated) >= 2 * BASE_DAYS
    (run,) = read_runs(case.data)
    assert run.status == "ok" and not (case.data / "quarantine").exists()
    others = [c for c in run.checks if not c.check.startswith("anomaly")]
    assert all(c.passed for c in others), [c for c in others if not c.passed]
    assert flagged_days(anomaly_checks(run)) <= pileup_days(case.raw)  # (the generator's bursts: see below)
    assert {c.stage for c in run.checks} == {"raw", "features"}
    (inp,) = run.inputs
    assert inp.rows == inp.passed == BASE_ROWS and len(inp.files) == BASE_DAYS
    assert sorted(inp.views) == list(VIEWS)
    assert {o.view for o in run.outputs} == set(VIEWS)
    for out in run.outputs:
        days = sorted(p.name for p in Path(out.path).glob("date=*"))
        assert list(out.partitions) == days and len(days) >= BASE_DAYS - 3 and out.rows > 0, out
    assert run.code_version["featurepipe"] and len(run.definitions_hash) == 64


BAD_ROWS = """
SELECT * REPLACE (
  CASE WHEN transaction_id % 500 = 1 THEN NULL ELSE user_id END AS user_id,
  CASE WHEN transaction_id % 700 = 2 THEN -10.0 WHEN transaction_id % 700 = 3 THEN 5e6
       WHEN transaction_id = 501 THEN -1.0 ELSE amount END AS amount,
  CASE WHEN transaction_id % 900 = 4 THEN 'weapons' ELSE category END AS category)
FROM raw
UNION ALL SELECT * FROM raw WHERE transaction_id % 800 = 5
"""


def test_bad_rows_are_quarantined_with_reasons_and_reconcile(make_case: Callable[..., Case],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    case = make_case(BAD_ROWS)
    with caplog.at_level("WARNING", logger="featurepipe.quality.gate"):
        case.backfill(case.gate())
    assert "quality gate raw/transactions (warn): check 'user_id.not_null' on column 'user_id' failed" in caplog.text
    q = quarantine(case, "raw", "transactions")
    by_check = dict(query(f"SELECT quality_check, count(*) FROM {q} GROUP BY 1"))
    ids = lambda cond: {r[0] for r in query(f"SELECT transaction_id FROM read_parquet('{case.raw}') WHERE {cond}")}  # noqa: E731
    null_users, bad_amount = ids("user_id IS NULL"), ids("amount < 0 OR amount > 1e6")
    bad_category, dups = ids("category = 'weapons'"), ids("transaction_id % 800 = 5")
    assert null_users and bad_amount and bad_category and len(dups) == 5
    assert 501 in null_users & bad_amount  # fails two checks: quarantined once, under the first
    assert by_check == {  # each row once, under its first failing check (contract order)
        "user_id.not_null": len(null_users),
        "amount.range": len(bad_amount - null_users),
        "category.allowed": len(bad_category - null_users - bad_amount),
        "unique(transaction_id)": 5,
    }
    reasons = dict(query(f"SELECT transaction_id, quality_reason FROM {q} WHERE transaction_id = 501"))
    assert reasons[501] == "user_id is null; amount = -1.0 outside [0, 1000000]"
    # reconciliation: rows in = rows passed on + rows quarantined, exactly
    rows_in = case.count(f"read_parquet('{case.raw}')")
    passed = case.count(passed_rows(case.raw, Path(q.split("'")[1])))
    assert rows_in == BASE_ROWS + 5 == passed + case.count(q)
    (run,) = read_runs(case.data)
    assert run.inputs[0].rows == rows_in and run.inputs[0].passed == passed
    failed = {c.check: c for c in run.checks if not c.passed}
    assert failed["user_id.not_null"].failed_rows == len(null_users) and failed["user_id.not_null"].sample
    assert failed["amount.range"].failed_rows == len(bad_amount)  # counted per check
    # the features saw the passed rows only: equal to an ungated backfill over the clean rows
    clean = make_case_clean(case, q)
    for view in VIEWS:
        diff = case.count(f"(SELECT * FROM {offline(case, view)} EXCEPT ALL SELECT * FROM {offline(clean, view)})")
        assert diff == 0 and case.count(offline(case, view)) == clean.count(offline(clean, view)), view
    assert query(f"SELECT max(amount_max_7d) FROM {offline(case, 'user_transaction_stats')}")[0][0] < 1e6


def make_case_clean(case: Case, q: str) -> Case:
    """The passed rows written as a data set of their own, backfilled without gates."""
    root = case.root.parent / "clean"
    root.mkdir()
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"COPY (SELECT * FROM {passed_rows(case.raw, Path(q.split(chr(39))[1]))}) "
                f"TO '{root / 'raw'}' (FORMAT parquet, PARTITION_BY (date))")
    glob = str(root / "raw" / "**" / "*.parquet")
    clean = Case(root, {n: dataclasses.replace(v, input_path=glob, offline_path=root / "offline" / n)
                        for n, v in case.views.items()})
    clean.backfill(None)
    return clean


def test_blocking_check_stops_the_batch_with_a_precise_message(make_case: Callable[..., Case]) -> None:
    case = make_case("SELECT * REPLACE (CASE WHEN transaction_id % 1000 = 7 THEN -3.5 ELSE amount END AS amount) FROM raw")

    def block_amount(spec: dict) -> None:
        spec["sources"]["transactions"]["columns"]["amount"]["severity"] = "block"

    with pytest.raises(InvalidInput) as err:
        case.backfill(case.gate(block_amount))
    msg = str(err.value)
    assert "quality gate raw/transactions blocked" in msg and "'amount.range'" in msg
    assert "column 'amount'" in msg and f"4 of {BASE_ROWS:,} rows" in msg and "sample: [{" in msg
    assert "-3.5 outside [0, 1000000]" in msg and "contracts.yaml" in msg
    assert not (case.root / "offline").exists() or not any((case.root / "offline").rglob("*.parquet"))
    assert case.count(quarantine(case, "raw", "transactions")) == 4  # kept for inspection
    (run,) = read_runs(case.data)
    assert run.status == "blocked" and "amount.range" in run.error


@pytest.mark.parametrize("select, check, words", [
    ("SELECT * RENAME (amount AS amt) FROM raw", "schema.missing", ["column 'amount' is missing", "['amt']: renamed?"]),
    ("SELECT * REPLACE (CAST(user_id AS VARCHAR) AS user_id) FROM raw", "schema.type",
     ["column 'user_id' is VARCHAR, the contract says BIGINT"]),
])
def test_schema_drift_blocks_at_raw_ingest(make_case: Callable[..., Case], select: str, check: str,
                                           words: list[str]) -> None:
    case = make_case(select)
    with pytest.raises(InvalidInput) as err:
        case.backfill(case.gate())
    msg = str(err.value)
    assert "quality gate raw/transactions" in msg and f"'{check}'" in msg
    for w in words:
        assert w in msg, msg
    assert not (case.root / "offline").exists()


def test_volume_collapse(make_case: Callable[..., Case]) -> None:
    case = make_case("SELECT * FROM raw WHERE NOT (date = (SELECT min(date) + INTERVAL 3 DAY FROM raw) "
                     "AND transaction_id % 20 <> 0)")
    case.backfill(case.gate(), views=("merchant_activity",))  # warn: recorded, the batch goes on
    (run,) = read_runs(case.data)
    vol = next(c for c in run.checks if c.check == "volume" and c.stage == "raw")
    assert not vol.passed and "1 day(s) below 20% of the median day" in vol.detail
    assert run.status == "ok"

    def block(spec: dict) -> None:
        spec["sources"]["transactions"]["volume"]["severity"] = "block"

    with pytest.raises(InvalidInput, match=r"check 'volume' failed \(1 day\(s\) below 20%"):
        case.backfill(case.gate(block), views=("merchant_activity",))


def test_stale_source_blocks(make_case: Callable[..., Case], tmp_path: Path) -> None:
    from featurepipe.generate import generate_transactions

    old = tmp_path / "old"
    generate_transactions(1_000, old, days=3, end=date.today() - timedelta(days=10))
    case = make_case(source=old)

    def block(spec: dict) -> None:
        spec["sources"]["transactions"]["freshness"] = {"max_age": "2d", "severity": "block"}

    with pytest.raises(InvalidInput, match=r"check 'freshness' failed \(newest event .* old \(SLA 2\.0d\)"):
        case.backfill(case.gate(block), views=("user_transaction_stats",))


def test_stale_features_block_but_an_older_range_is_not_stale(make_case: Callable[..., Case]) -> None:
    case = make_case()

    def strict(spec: dict) -> None:
        spec["feature_views"]["user_transaction_stats"]["freshness"] = {"max_age": "2d", "severity": "block"}

    first = date.today() - timedelta(days=BASE_DAYS)
    case.backfill(case.gate(strict), ("user_transaction_stats",), first, first + timedelta(days=1))
    case.backfill(case.gate(strict), ("user_transaction_stats",))  # the whole range: fresh
    runs = read_runs(case.data)
    fresh = [c for r in runs for c in r.checks if c.check == "freshness" and c.stage == "features"]
    assert [c.passed for c in fresh] == [True, True] and "not checked" in fresh[0].detail

    def stricter(spec: dict) -> None:
        spec["feature_views"]["user_transaction_stats"]["freshness"] = {"max_age": "1m", "severity": "block"}

    with pytest.raises(InvalidInput, match=r"quality gate features/user_transaction_stats blocked .* 'freshness'"):
        case.backfill(case.gate(stricter), ("user_transaction_stats",))


def test_feature_stage_quarantines_and_blocks_before_publishing(make_case: Callable[..., Case]) -> None:
    case = make_case()
    case.backfill(None, views=("user_transaction_stats",))
    ungated = case.count(offline(case, "user_transaction_stats"))
    shutil.rmtree(case.root / "offline")

    def cap(severity: str) -> Callable[[dict], None]:
        def edit(spec: dict) -> None:
            spec["feature_views"]["user_transaction_stats"]["columns"]["amount_max_24h"] = {
                "type": "DOUBLE", "max": 500, "severity": severity}
        return edit

    case.backfill(case.gate(cap("warn")), views=("user_transaction_stats",))
    q = quarantine(case, "features", "user_transaction_stats")
    quarantined = case.count(q)
    published = case.count(offline(case, "user_transaction_stats"))
    assert quarantined > 0 and published + quarantined == ungated
    assert query(f"SELECT max(amount_max_24h) FROM {offline(case, 'user_transaction_stats')}")[0][0] <= 500
    assert query(f"SELECT DISTINCT quality_check FROM {q}") == [("amount_max_24h.range",)]
    (run,) = read_runs(case.data)
    assert run.outputs[0].quarantined == quarantined
    before = sorted(p.read_bytes() for p in (case.root / "offline").rglob("*.parquet"))
    with pytest.raises(InvalidInput, match="quality gate features/user_transaction_stats blocked"):
        case.backfill(case.gate(cap("block")), views=("user_transaction_stats",))
    assert sorted(p.read_bytes() for p in (case.root / "offline").rglob("*.parquet")) == before
    assert not list((case.root / "offline").glob(".staging*"))


def test_contract_errors_say_what_to_fix(tmp_path: Path) -> None:
    (tmp_path / "contracts.yaml").write_text("sources:\n  t:\n    volume: {severity: loud}\n")
    with pytest.raises(InvalidInput, match=r"sources.t.volume: severity 'loud' must be one of warn, block"):
        load_contracts(tmp_path)
    (tmp_path / "contracts.yaml").write_text("sources:\n  t:\n    freshness: {max_age: soon}\n")
    with pytest.raises(InvalidInput, match=r"'soon' is not a duration"):
        load_contracts(tmp_path)


@dataclasses.dataclass
class PipelineCommands:
    """The read-only commands' results on the shared pipeline, with the run log and the
    metrics file they read."""

    status: subprocess.CompletedProcess[str]
    lineage_json: subprocess.CompletedProcess[str]
    lineage_text: subprocess.CompletedProcess[str]
    prometheus: subprocess.CompletedProcess[str]
    report: subprocess.CompletedProcess[str]
    report_page: Path
    runs: list[RunRecord]
    metrics_file: str


@pytest.fixture(scope="module")
def pipeline_commands(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> PipelineCommands:
    """`status`, `lineage` (of a feature as JSON, of a view), `status --prometheus` and
    `report` on the shared pipeline, one after another in one process (each featurepipe
    process pays Feast's import). They only read: the run log is the same after them."""
    page = tmp_path_factory.mktemp("quality-report") / "quality.html"
    runs = read_runs(pipeline.data)
    metrics_file = (pipeline.data / "metrics" / "featurepipe.prom").read_text()
    status, lineage_json, lineage_text, prometheus, report = pipeline.run_many(
        ("status",), ("lineage", "amount_sum_1h", "--json"), ("lineage", "user_transaction_stats"),
        ("status", "--prometheus"), ("report", "--out", str(page)))
    assert [r.to_json() for r in read_runs(pipeline.data)] == [r.to_json() for r in runs]
    return PipelineCommands(status, lineage_json, lineage_text, prometheus, report, page, runs, metrics_file)


def test_status_and_lineage_on_a_real_run(pipeline: Pipeline, pipeline_commands: PipelineCommands) -> None:
    """On the shared pipeline: whatever backfills other tests ran, every recorded run is ok,
    its checks pass (a partial backfill of an older range is not called stale), and the
    lineage maps every published partition of the view to the run that last wrote it, and
    names the materialisation that put it online."""
    runs = [r for r in pipeline_commands.runs  # (other modules materialise repo copies of their own here too)
            if r.kind == "backfill" or r.outputs[0].view in VIEWS]
    assert runs and all(r.status == "ok" for r in runs)
    assert all(c.passed for r in runs for c in r.checks), [
        c for r in runs for c in r.checks if not c.passed]
    backfills = [r for r in runs if r.kind == "backfill"]
    materialised = [r for r in runs if r.kind == "materialize"]
    assert backfills and {r.outputs[0].view for r in materialised} == set(VIEWS)
    status, shown, text = pipeline_commands.status, pipeline_commands.lineage_json, pipeline_commands.lineage_text
    assert status.returncode == 0, status.stderr[-2000:]
    for word in ("freshness", "user_transaction_stats", "merchant_fraud", "OK", "online newest",
                 f"checks of run {backfills[-1].run_id} (backfill, ok): ", "materialize user_transaction_stats, ok",
                 " 0 failed"):
        assert word in status.stdout, status.stdout
    assert shown.returncode == 0, shown.stderr[-2000:]
    info = json.loads(shown.stdout)
    assert info["view"] == "user_transaction_stats" and info["feature"] == "amount_sum_1h"
    assert info["declaration"] == {"function": "sum", "column": "amount", "window_seconds": 3600.0}
    assert not info["partitions_without_run"] and info["published_partitions"] > 0
    assert sum(len(r["partitions"]) for r in info["runs"]) == info["published_partitions"]
    writers = [r for r in backfills if any(o.view == "user_transaction_stats" for o in r.outputs)]
    assert info["runs"][-1]["run_id"] in {r.run_id for r in writers}
    for run in info["runs"]:
        assert run["definition_hash"] == info["current_definition_hash"] and not run["definitions_changed_since"]
        files = run["inputs"][0]["files"]
        assert files and all(Path(f).is_file() and "raw/transactions/date=" in f for f in files)
        assert run["code_version"]["featurepipe"]
    online = info["online"]
    assert online["written"] + online["not_newer"] > 0 and online["online_store"].startswith("redis://")
    assert online["definition_hash"] == info["current_definition_hash"] and not online["definitions_changed_since"]
    # the newest event's row (1 us after it; the schedule's later rows are its windows
    # emptying out), among the raw files that materialisation read (pushes add others later)
    last = [r for r in materialised if r.outputs[0].view == "user_transaction_stats"][-1]
    assert online["newest_event"] == newest_event_row(last.inputs[0].files, "event_timestamp").isoformat()
    assert text.returncode == 0, text.stderr[-2000:]
    assert "online: materialised by run " in text.stdout and "computed as" not in text.stdout, text.stdout
    with pytest.raises(NotFound, match="no feature view or feature named 'nope'"):
        resolve(aggregate_views(pipeline.store), "nope")


def test_status_prometheus_and_the_metrics_file(pipeline: Pipeline, pipeline_commands: PipelineCommands) -> None:
    """The metrics printed and the textfile-collector file parse, and say what the run log says."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples(text: str) -> dict[tuple[str, tuple], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    shown = pipeline_commands.prometheus
    assert shown.returncode == 0, shown.stderr[-2000:]
    printed = samples(shown.stdout)
    in_file = samples(pipeline_commands.metrics_file)
    runs = pipeline_commands.runs
    ok_backfills = [r for r in runs if r.kind == "backfill" and r.status == "ok"]
    assert printed[("featurepipe_runs_total", (("job", "backfill"), ("status", "ok")))] == len(ok_backfills)
    raw = (("job", "backfill"), ("stage", "raw"), ("table", "transactions"))
    assert printed[("featurepipe_rows_processed_total", raw)] == sum(r.inputs[0].rows for r in ok_backfills)
    assert printed[("featurepipe_rows_quarantined_total", raw)] == 0
    users = (("job", "backfill"), ("stage", "features"), ("table", "user_transaction_stats"))
    assert printed[("featurepipe_rows_published_total", users)] == sum(
        o.rows for r in ok_backfills for o in r.outputs if o.view == "user_transaction_stats")
    # fresh as of the newest event it accounts for (its row 1 us after it), not its windows'
    # later drops: of the events the last backfill read
    last = [r for r in ok_backfills if any(o.view == "user_transaction_stats" for o in r.outputs)][-1]
    table = query(f"SELECT max(event_timestamp) FROM read_parquet('{pipeline.data}/offline/user_transaction_stats/*/*.parquet')")
    newest = min(table[0][0], newest_event_row(last.inputs[0].files, "event_timestamp")).timestamp()
    offline = (("feature_view", "user_transaction_stats"), ("store", "offline"))
    assert printed[("featurepipe_feature_view_newest_event_timestamp_seconds", offline)] == newest
    assert printed[("featurepipe_feature_view_freshness_sla_seconds", (("feature_view", "merchant_fraud"),))] == 72 * 3600
    assert printed[("featurepipe_last_run_duration_seconds", (("job", "backfill"),))] == [
        r for r in runs if r.kind == "backfill"][-1].seconds
    age = ("featurepipe_feature_view_freshness_seconds", offline)
    assert 0 < in_file[age] <= printed[age]  # (the file was written when the last run ended)
    assert {k: v for k, v in in_file.items() if k[0] != age[0]} == {k: v for k, v in printed.items() if k[0] != age[0]}


# ---------------------------------------------------------------- anomaly detection

LONG_ROWS, LONG_DAYS = 30_000, 20


@pytest.fixture(scope="module")
def long_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twenty days of generated transactions: the days before each day are its history."""
    from featurepipe.generate import generate_transactions

    out = tmp_path_factory.mktemp("quality-long") / "raw"
    generate_transactions(LONG_ROWS, out, days=LONG_DAYS)
    return out


def anomaly_checks(run: RunRecord, stage: str | None = None) -> list[CheckResult]:
    return [c for c in run.checks if c.check.startswith("anomaly") and (stage is None or c.stage == stage)]


def judged(check: CheckResult) -> int:
    """How many days a check judged (``N day(s) judged`` or ``k of N day(s) deviate``)."""
    if not check.passed:
        return int(check.detail.split(" day(s) deviate")[0].split(" of ")[-1])
    return int(check.detail.split(" day(s) judged")[0].rsplit(" ", 1)[-1])


def flagged_days(checks: list[CheckResult]) -> set[str]:
    """The days (ISO) that failed anomaly checks name."""
    return {s["day"] for c in checks if not c.passed for s in c.sample}


def pileup_days(raw_glob: str, share: float = 0.1) -> set[str]:
    """Days on which one merchant takes at least ``share`` of the day's purchases in a single
    second: the generator moves every purchase drawn before a merchant opens to its opening
    instant. Not day-to-day noise: a real burst, that the detector is right to flag."""
    rows = query(
        "SELECT date FROM (SELECT date, count(*) OVER (PARTITION BY date) AS day_rows, count(*) OVER "
        "(PARTITION BY merchant_id, epoch_us(event_timestamp) // 1000000) AS burst "
        f"FROM read_parquet('{raw_glob}', hive_partitioning = true)) GROUP BY 1 HAVING max(burst) >= {share} * max(day_rows)")
    return {str(r[0]) for r in rows}


def after_a_pileup(days: set[str], pileups: set[str], window_days: int = 7) -> bool:
    """Every day lies within ``window_days`` after a pile-up (a window feature carries it)."""
    starts = [date.fromisoformat(p) for p in pileups]
    return all(any(p <= date.fromisoformat(d) < p + timedelta(days=window_days) for p in starts) for d in days)


@pytest.mark.parametrize("seed", [7, 3])
def test_anomalies_ordinary_noise_is_not_flagged(make_case: Callable[..., Case], tmp_path: Path, seed: int) -> None:
    """Every day of generated data judged against the days before it: no ordinary day is
    flagged, only the generator's bursts (a merchant opening with all its earlier purchases
    in one second), at raw ingest on their day, in the features within a window after."""
    from featurepipe.generate import generate_transactions

    source = tmp_path / f"seed{seed}"
    generate_transactions(LONG_ROWS, source, days=LONG_DAYS, seed=seed)
    case = make_case(source=source)
    case.backfill(case.gate())
    (run,) = read_runs(case.data)
    pileups = pileup_days(case.raw)
    raw_flagged, features_flagged = flagged_days(anomaly_checks(run, "raw")), flagged_days(anomaly_checks(run, "features"))
    assert raw_flagged <= pileups, [c.detail for c in anomaly_checks(run, "raw") if not c.passed]
    assert after_a_pileup(features_flagged, pileups), [
        c.detail for c in anomaly_checks(run, "features") if not c.passed]
    raw = {c.column: c for c in anomaly_checks(run, "raw")}
    assert set(raw) == {None, "amount"}  # the contract's columns (ids and late labels left out)
    assert judged(raw["amount"]) == LONG_DAYS - 7 and judged(raw[None]) == LONG_DAYS - 7
    users = {c.column: c for c in anomaly_checks(run, "features") if c.table == "user_transaction_stats"}
    assert len(users) == 1 + 13 and judged(users["amount_sum_7d"]) >= LONG_DAYS - 7 - 7 - 1  # after warm-up
    fraud = [c for c in anomaly_checks(run, "features") if c.table == "merchant_fraud"]
    assert fraud and all(judged(c) == 0 for c in fraud)  # 30-day windows never full in 20 days
    stored = pq_rows(run.stats_file)
    assert {r["stage"] for r in stored} == {"raw", "features"} and len({r["day"] for r in stored}) == LONG_DAYS


def pq_rows(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


SHIFT_LAST_DAY = "SELECT * REPLACE (CASE WHEN date = (SELECT max(date) FROM raw) THEN amount * 3 ELSE amount END AS amount) FROM raw"


def test_anomalies_flag_a_shifted_distribution(make_case: Callable[..., Case], long_raw: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    case = make_case(SHIFT_LAST_DAY, source=long_raw)
    last = query(f"SELECT max(date) FROM read_parquet('{case.raw}', hive_partitioning = true)")[0][0]
    median_mean = query(
        f"SELECT median(m) FROM (SELECT date, avg(amount) AS m FROM read_parquet('{case.raw}', hive_partitioning = true) "
        f"WHERE date >= DATE '{last}' - 14 AND date < DATE '{last}' GROUP BY 1)")[0][0]
    with caplog.at_level("WARNING", logger="featurepipe.quality.gate"):
        case.backfill(case.gate())  # warn: recorded and logged, the batch goes on
    (run,) = read_runs(case.data)
    assert run.status == "ok"
    failed = {(c.stage, c.table, c.column): c for c in anomaly_checks(run)
              if not c.passed and f"{last}" in flagged_days([c])}  # (the last day's, not a burst's)
    assert flagged_days(anomaly_checks(run)) <= {f"{last}"} | {d for d in flagged_days(anomaly_checks(run))
                                                             if after_a_pileup({d}, pileup_days(case.raw))}
    raw = failed[("raw", "transactions", "amount")]
    assert f"1 of {LONG_DAYS - 7} day(s) deviate" in raw.detail
    assert "mean = " in raw.detail and f"on {last:%Y-%m-%d}, expected " in raw.detail
    assert "p50 = " in raw.detail and "of the 14 days before; robust z" in raw.detail
    mean = next(s for s in raw.sample if s["statistic"] == "mean")
    assert mean["median"] == pytest.approx(median_mean) and mean["value"] > mean["high"] > mean["median"]
    assert mean["value"] == pytest.approx(3 * query(
        f"SELECT avg(amount) / 3 FROM read_parquet('{case.raw}', hive_partitioning = true) WHERE date = DATE '{last}'")[0][0])
    assert "quality gate raw/transactions (warn): check 'anomaly' on column 'amount' failed" in caplog.text
    # the shift reaches the features computed from the amounts, and only those
    flagged = {col for (stage, table, col) in failed if stage == "features"}
    assert {"amount_sum_1h", "amount_mean_24h", "amount_max_7d"} <= flagged
    assert not flagged & {"txn_count_1h", "txn_count_24h", "merchant_txn_count_24h", "last_txn_epoch"}
    assert ("raw", "transactions", None) not in failed  # the volume did not change

    def block(spec: dict) -> None:
        spec["sources"]["transactions"]["anomalies"]["severity"] = "block"

    shutil.rmtree(case.root / "offline")
    shutil.rmtree(case.data)  # (else the stored figures say the day was judged already)
    with pytest.raises(InvalidInput) as err:
        case.backfill(case.gate(block))
    assert "quality gate raw/transactions blocked" in str(err.value)
    assert f"check 'anomaly' on column 'amount' failed (1 of {LONG_DAYS - 7} day(s) deviate" in str(err.value)
    assert not (case.root / "offline").exists()


def test_anomalies_use_earlier_runs_as_history(make_case: Callable[..., Case], long_raw: Path) -> None:
    """A daily run: the new day's features are judged against figures stored by earlier runs."""
    case = make_case(SHIFT_LAST_DAY, source=long_raw)
    last = query(f"SELECT max(date) FROM read_parquet('{case.raw}', hive_partitioning = true)")[0][0]
    views = ("user_transaction_stats",)
    case.backfill(case.gate(), views, end=last)  # every day but the last
    first, = read_runs(case.data)
    assert after_a_pileup(flagged_days(anomaly_checks(first, "features")), pileup_days(case.raw))
    assert Path(first.stats_file).is_file()
    case.backfill(case.gate(), views, start=last, end=last + timedelta(days=1))
    second = read_runs(case.data)[-1]
    features = {c.column: c for c in anomaly_checks(second, "features")}
    assert not features["amount_sum_24h"].passed and "1 of 1 day(s) deviate" in features["amount_sum_24h"].detail
    assert features["txn_count_24h"].passed and features["txn_count_24h"].detail == "1 day(s) judged"
    # a rerun over unchanged figures judges nothing again (the warning was given once)
    case.backfill(case.gate(), views, start=last, end=last + timedelta(days=1))
    third = read_runs(case.data)[-1]
    assert all(c.passed and c.detail == "0 day(s) judged" for c in anomaly_checks(third, "features"))


def test_anomalies_need_history_and_catch_a_volume_collapse(make_case: Callable[..., Case], long_raw: Path) -> None:
    case = make_case("SELECT * FROM raw WHERE date >= (SELECT max(date) - 4 FROM raw)", source=long_raw)
    case.backfill(case.gate(), views=("merchant_activity",))
    (run,) = read_runs(case.data)
    raw = {c.column: c for c in anomaly_checks(run, "raw")}
    assert raw["amount"].passed and raw["amount"].detail == (
        "0 day(s) judged; 5 day(s) not judged (fewer than 7 days of history)")
    collapsed = make_case("SELECT * FROM raw WHERE date <> (SELECT max(date) - 2 FROM raw) OR transaction_id % 20 = 0",
                          source=long_raw)
    collapsed.backfill(collapsed.gate(), views=("merchant_activity",))
    (run,) = read_runs(collapsed.data)
    rows = next(c for c in anomaly_checks(run, "raw") if c.check == "anomaly.rows")
    day = query(f"SELECT max(date) - 2 FROM read_parquet('{collapsed.raw}', hive_partitioning = true)")[0][0]
    assert not rows.passed and f"rows = {collapsed.count(f'''read_parquet('{collapsed.raw}', hive_partitioning = true) WHERE date = DATE '{day}' ''')}" in rows.detail
    assert f"{day}" in flagged_days([rows]) and flagged_days([rows]) <= {f"{day}"} | pileup_days(collapsed.raw)


# ---------------------------------------------------------------- before materialisation

MAT_VIEW = "user_transaction_stats"


@dataclasses.dataclass
class Online:
    """One view of the demo repo registered in a registry of its own, reading a (mutated)
    copy of the pipeline's offline table, materialised into a private Redis."""

    store: Any
    data: Path
    offline: Path
    client: Any

    def materialize(self) -> Any:
        from featurepipe.jobs.materialize import materialize

        return materialize(self.store, views=[MAT_VIEW], progress=False).per_view[0]

    def latest(self, where: str = "true") -> int:
        return query(f"SELECT count(DISTINCT user_id) FROM read_parquet('{self.offline}/**/*.parquet') "
                     f"WHERE user_id IS NOT NULL AND ({where})")[0][0]


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """A redis-server of this module's own (the shared one's databases belong to other tests)."""
    from featurepipe.redis_server import RedisServer

    with RedisServer() as server:
        yield server.url


@pytest.fixture
def online_case(pipeline: Pipeline, private_redis: str, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Callable[..., Online]:
    from feast import FeatureStore, FeatureView, FileSource, PushSource, RepoConfig

    from featurepipe.config import redis_connection_kwargs, redis_url_to_feast

    def make(select: str = "SELECT * FROM features", edit: Callable[[dict], None] | None = None) -> Online:
        folder = tmp_path / "online"
        repo, data, offline_copy = folder / "repo", folder / "data", folder / "offline" / MAT_VIEW
        repo.mkdir(parents=True)
        offline_copy.parent.mkdir(parents=True)
        monkeypatch.setenv("FEATUREPIPE_DATA_DIR", str(data))  # this run's log, not the pipeline's
        with duckdb.connect() as con:
            con.execute("SET TimeZone = 'UTC'")
            con.execute(f"CREATE VIEW features AS SELECT * FROM read_parquet("
                        f"'{pipeline.data / 'offline' / MAT_VIEW}/**/*.parquet', hive_partitioning = true)")
            con.execute(f"COPY ({select}) TO '{offline_copy}' (FORMAT parquet, PARTITION_BY (date))")
        spec = yaml.safe_load((SOURCE_REPO / "contracts.yaml").read_text())
        if edit:
            edit(spec)
        (repo / "contracts.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        registered = pipeline.store.get_feature_view(MAT_VIEW)
        table = FileSource(name=f"{MAT_VIEW}_table", path=str(offline_copy / "**" / "*.parquet"),
                           timestamp_field="event_timestamp")
        push = PushSource(name=f"{MAT_VIEW}_push", batch_source=table)
        # a plain view over the edited copy (without featurepipe's windowed-aggregate tags, which
        # would materialise it from raw events: the gate on schedules is tested in
        # test_request_time_online)
        view = FeatureView(name=MAT_VIEW, entities=[pipeline.store.get_entity("user")], ttl=registered.ttl,
                           schema=[*registered.entity_columns, *registered.features], source=push, online=True,
                           tags={k: v for k, v in registered.tags.items() if not k.startswith("featurepipe.")})
        store = FeatureStore(config=RepoConfig(
            project="quality_online", provider="local", registry=str(folder / "registry.db"),
            repo_path=str(repo), entity_key_serialization_version=3,
            online_store={"type": "redis", "connection_string": redis_url_to_feast(private_redis)},
            offline_store={"type": "duckdb"},
            batch_engine={"type": "featurepipe.online.engine.FeaturepipeMaterializationEngine", "progress": False},
        ))
        store.apply([pipeline.store.get_entity("user"), table, push, view])
        import redis

        client = redis.Redis(**redis_connection_kwargs(private_redis))  # type: ignore[arg-type]
        client.flushdb()
        return Online(store, data, offline_copy, client)

    return make


NEGATIVE_SUMS = ("SELECT * REPLACE (CASE WHEN user_id % 25 = 0 THEN -5.0 ELSE amount_sum_1h END AS amount_sum_1h) "
                 "FROM features")


def user_key_nulls(select: str) -> str:
    return f"SELECT * REPLACE (CASE WHEN txn_count_1h = 3 THEN NULL ELSE user_id END AS user_id) FROM ({select})"


def test_materialisation_quarantines_failing_rows_and_writes_the_rest(online_case: Callable[..., Online],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    def warn_keys(spec: dict) -> None:
        spec["feature_views"][MAT_VIEW]["columns"]["user_id"]["severity"] = "warn"

    case = online_case(user_key_nulls(NEGATIVE_SUMS), warn_keys)
    null_rows = query(
        f"SELECT count(*) FROM read_parquet('{case.offline}/**/*.parquet') WHERE user_id IS NULL")[0][0]
    bad_users = case.latest("user_id % 25 = 0")
    users = case.latest()
    assert null_rows and bad_users
    with caplog.at_level("WARNING", logger="featurepipe.quality.online_gate"):
        result = case.materialize()
    assert "quality gate materialize/user_transaction_stats (warn): check 'amount_sum_1h.range'" in caplog.text
    # nothing lost: latest rows + key-less rows = written or already newer + quarantined
    assert result.entities == users and result.null_key_rows == null_rows
    assert result.entities + result.null_key_rows == result.written + result.skipped + result.quarantined
    assert result.quarantined == null_rows + bad_users and result.check_failures == {"amount_sum_1h.range": bad_users}
    assert case.client.dbsize() == result.written == users - bad_users
    import pyarrow.parquet as pq

    bad_values = pq.read_table([f for f in result.quarantine_files if f.endswith("bad-values.parquet")][0])
    assert bad_values.num_rows == bad_users and set(bad_values.column("quality_check").to_pylist()) == {
        "amount_sum_1h.range"}
    assert set(bad_values.column("quarantine_reason").to_pylist()) == {"amount_sum_1h = -5.0 outside [0, inf]"}
    assert all(u % 25 == 0 for u in bad_values.column("user_id").to_pylist())
    online = case.store.get_online_features(features=[f"{MAT_VIEW}:amount_sum_1h"],
                                            entity_rows=[{"user_id": u} for u in (25, 50, 26)]).to_dict()
    assert online["amount_sum_1h"][:2] == [None, None] and online["amount_sum_1h"][2] is not None
    (run,) = read_runs(case.data)
    assert run.kind == "materialize" and run.status == "ok" and len(run.definitions_hash) == 64
    (inp,), (out,) = run.inputs, run.outputs
    assert inp.rows == inp.passed + inp.quarantined == users + null_rows
    assert out.rows == result.written + result.skipped and inp.files and inp.path.startswith(str(case.offline))
    checks = {c.check: c for c in run.checks}
    assert checks["amount_sum_1h.range"].failed_rows == bad_users and not checks["amount_sum_1h.range"].passed
    assert checks["user_id.not_null"].failed_rows == null_rows
    assert checks["txn_count_1h.range"].passed and checks["amount_max_7d.range"].passed
    start, done = lineage_events(case.data / "lineage" / "openlineage.jsonl")
    assert (start["eventType"], done["eventType"]) == ("START", "COMPLETE")
    assert done["job"]["name"] == "featurepipe.materialize.user_transaction_stats"
    assert [i["name"] for i in done["inputs"]] == [str(case.offline)]
    (output,) = done["outputs"]
    assert output["namespace"].startswith("redis://127.0.0.1:") and output["name"] == MAT_VIEW
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == out.rows
    assertions = {a["assertion"]: a["success"] for a in done["inputs"][0]["inputFacets"]["dataQualityAssertions"]["assertions"]}
    assert assertions["amount_sum_1h.range"] is False and assertions["txn_count_1h.range"] is True


@pytest.mark.parametrize("select, edit, words", [
    (NEGATIVE_SUMS, "block", ["check 'amount_sum_1h.range' failed: ", " latest rows; sample: [{",
                              "'amount_sum_1h': -5.0"]),
    (user_key_nulls("SELECT * FROM features"), None,
     ["check 'user_id.not_null' failed: ", "rows of the window have a null join key (user_id), kept in "]),
    ("SELECT * REPLACE (CAST(txn_count_1h AS VARCHAR) AS txn_count_1h) FROM features", None,
     ["check 'schema.type' on column 'txn_count_1h' failed (column 'txn_count_1h' is VARCHAR, the contract says BIGINT)"]),
    ("SELECT * RENAME (amount_sum_1h AS amt_sum_1h) FROM features", None,
     ["check 'schema.missing' on column 'amount_sum_1h' failed (column 'amount_sum_1h' is missing",
      "new column(s) ['amt_sum_1h']: renamed?"]),
], ids=["out-of-range-block", "null-join-key", "retyped-column", "renamed-column"])
def test_materialisation_blocks_and_writes_nothing(online_case: Callable[..., Online], select: str,
                                                   edit: str | None, words: list[str]) -> None:
    def block_sums(spec: dict) -> None:
        spec["feature_views"][MAT_VIEW]["columns"]["amount_sum_1h"]["severity"] = "block"

    case = online_case(select, block_sums if edit == "block" else None)
    with pytest.raises(InvalidInput) as err:
        case.materialize()
    msg = str(err.value)
    assert msg.startswith("quality gate materialize/user_transaction_stats blocked the view"), msg
    for w in words:
        assert w in msg, msg
    assert "Nothing of this view was written to Redis" in msg and case.client.dbsize() == 0
    (run,) = read_runs(case.data)
    assert run.status == "blocked" and run.error == msg
    assert [c for c in run.checks if not c.passed and c.severity == "block"]


# ---------------------------------------------------------------- lineage events, metrics, report

VIEW_TIMESTAMPS = {"user_transaction_stats": "event_timestamp", "merchant_activity": "event_timestamp",
                   "merchant_fraud": "label_timestamp"}


def newest_event_row(files: Sequence[str], timestamp: str) -> datetime:
    """The change point of the newest event among ``files``: 1 us after it."""
    listed = ", ".join(f"'{f}'" for f in files)
    return query(f"SELECT max({timestamp}) + INTERVAL 1 MICROSECOND FROM "
                 f"read_parquet([{listed}], union_by_name = true)")[0][0]


def lineage_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_backfill_emits_openlineage_events(make_case: Callable[..., Case]) -> None:
    from featurepipe.quality.openlineage import run_uuid

    case = make_case(BAD_ROWS)
    case.backfill(case.gate())
    (run,) = read_runs(case.data)
    events = lineage_events(case.data / "lineage" / "openlineage.jsonl")
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert {e["run"]["runId"] for e in events} == {run_uuid(run.run_id)}
    assert {e["job"]["name"] for e in events} == {"featurepipe.backfill"}
    done = events[1]
    tags = {t["key"]: t["value"] for t in done["run"]["facets"]["tags"]["tags"]}
    assert tags["featurepipe.run_id"] == run.run_id and tags["featurepipe.definitions_hash"] == run.definitions_hash
    (inp,) = done["inputs"]
    assert (inp["namespace"], inp["name"]) == ("file", str(case.root / "raw"))
    fields = {f["name"]: f["type"] for f in inp["facets"]["schema"]["fields"]}
    assert fields["amount"] == "DOUBLE" and fields["user_id"] == "BIGINT"
    metrics = inp["inputFacets"]["dataQualityMetrics"]
    assert metrics["rowCount"] == run.inputs[0].rows == BASE_ROWS + 5 and metrics["fileCount"] == BASE_DAYS
    assert metrics["columnMetrics"]["amount"]["count"] == run.inputs[0].passed
    assertions = {a["assertion"]: a for a in inp["inputFacets"]["dataQualityAssertions"]["assertions"]}
    assert assertions["user_id.not_null"]["success"] is False and assertions["user_id.not_null"]["column"] == "user_id"
    assert assertions["schema"]["success"] is True and assertions["anomaly"]["column"] == "amount"
    outputs = {o["name"]: o for o in done["outputs"]}
    assert set(outputs) == {str(case.views[v].offline_path) for v in VIEWS}
    for out in run.outputs:
        stats = outputs[out.path]["outputFacets"]["outputStatistics"]
        assert stats["rowCount"] == out.rows and stats["fileCount"] == len(out.partitions)
        assert {f["name"] for f in outputs[out.path]["facets"]["schema"]["fields"]} >= {"event_timestamp"}

    def block_amount(spec: dict) -> None:
        spec["sources"]["transactions"]["columns"]["amount"]["severity"] = "block"

    with pytest.raises(InvalidInput):
        case.backfill(case.gate(block_amount))
    blocked = lineage_events(case.data / "lineage" / "openlineage.jsonl")[2:]
    assert [e["eventType"] for e in blocked] == ["START", "FAIL"]
    assert "quality gate raw/transactions blocked" in blocked[1]["run"]["facets"]["errorMessage"]["message"]
    assert blocked[1]["outputs"] == []


class Recorder:
    """A loopback HTTP server that records what is sent to it (an OpenLineage endpoint, a Pushgateway)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[tuple[str, str, bytes]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.requests.append((self.command, self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _record  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


def test_lineage_and_metrics_go_to_endpoints_and_files_as_configured(
        make_case: Callable[..., Case], recorder: Recorder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    case = make_case()
    monkeypatch.setenv("OPENLINEAGE_URL", recorder.url)  # the client's own configuration: HTTP
    monkeypatch.setenv("PROMETHEUS_PUSHGATEWAY", recorder.url)
    case.backfill(case.gate(), views=("merchant_activity",))
    lineage = [json.loads(body) for method, path, body in recorder.requests if path == "/api/v1/lineage"]
    assert [e["eventType"] for e in lineage] == ["START", "COMPLETE"] and not (case.data / "lineage").exists()
    assert lineage[1]["outputs"][0]["name"] == str(case.views["merchant_activity"].offline_path)
    (pushed,) = [body.decode() for method, path, body in recorder.requests if path.startswith("/metrics/job/")]
    assert [p for m, p, _ in recorder.requests if p.startswith("/metrics")] == ["/metrics/job/featurepipe"]
    assert 'featurepipe_runs_total{job="backfill",status="ok"} 1.0' in pushed
    monkeypatch.delenv("OPENLINEAGE_URL")
    monkeypatch.delenv("PROMETHEUS_PUSHGATEWAY")
    monkeypatch.setenv("FEATUREPIPE_OPENLINEAGE_FILE", str(tmp_path / "elsewhere.jsonl"))
    monkeypatch.setenv("FEATUREPIPE_METRICS_FILE", str(tmp_path / "textfile" / "fp.prom"))
    case.backfill(case.gate(), views=("merchant_activity",))
    assert len(lineage_events(tmp_path / "elsewhere.jsonl")) == 2
    assert 'featurepipe_runs_total{job="backfill",status="ok"} 2.0' in (tmp_path / "textfile" / "fp.prom").read_text()
    monkeypatch.setenv("FEATUREPIPE_OPENLINEAGE", "off")
    case.backfill(case.gate(), views=("merchant_activity",))
    assert len(lineage_events(tmp_path / "elsewhere.jsonl")) == 2


def test_metrics_file_counts_what_a_run_quarantined(make_case: Callable[..., Case]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    case = make_case(BAD_ROWS)
    case.backfill(case.gate())
    (run,) = read_runs(case.data)
    text = (case.data / "metrics" / "featurepipe.prom").read_text()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(text) for s in family.samples}
    raw = (("job", "backfill"), ("stage", "raw"), ("table", "transactions"))
    inp = run.inputs[0]
    assert got[("featurepipe_rows_processed_total", raw)] == inp.rows == BASE_ROWS + 5
    assert got[("featurepipe_rows_quarantined_total", raw)] == inp.quarantined > 0
    assert got[("featurepipe_rows_published_total", raw)] == inp.passed == inp.rows - inp.quarantined
    failed = {c.check for c in run.checks if not c.passed}
    for check in failed:
        labels = (("check", check), ("job", "backfill"), ("severity", "warn"), ("stage", "raw"), ("table", "transactions"))
        assert got[("featurepipe_check_failures_total", labels)] == 1
    assert not any(k[0] == "featurepipe_check_failures_total" and ("stage", "features") in k[1] for k in got)
    assert got[("featurepipe_last_run_duration_seconds", (("job", "backfill"),))] == run.seconds
    for view in VIEWS:
        # a windowed table's rows after its input's newest event count as that event's row
        table = query(f"SELECT max(event_timestamp) FROM {offline(case, view)}")[0][0]
        # (the labels view reads the same files, by their label time)
        newest = min(table, newest_event_row(inp.files, VIEW_TIMESTAMPS[view])).timestamp()
        assert got[("featurepipe_feature_view_newest_event_timestamp_seconds",
                    (("feature_view", view), ("store", "offline")))] == newest


def test_html_report_renders_with_the_run_log_numbers(make_case: Callable[..., Case], tmp_path: Path) -> None:
    import base64
    from html.parser import HTMLParser

    import matplotlib.image

    from featurepipe.quality.html_report import write_report

    case = make_case(BAD_ROWS)
    case.backfill(case.gate())
    case.backfill(case.gate(), views=("user_transaction_stats",))  # a second run: drift over runs
    runs = read_runs(case.data)
    info = write_report(case.data, tmp_path / "report.html", list(case.views.values()), load_contracts(case.root))

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.ids: list[str] = []
            self.images: list[str] = []
            self.cells: list[str] = []
            self._cell = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if a.get("id"):
                self.ids.append(str(a["id"]))
            if tag == "img":
                self.images.append(str(a["src"]))
            self._cell = tag == "td"

        def handle_data(self, data: str) -> None:
            if self._cell:
                self.cells.append(data)
                self._cell = False

    page = Page()
    page.feed(info.path.read_text())
    assert {"summary", "freshness", "runs", "checks", "quarantine", "distributions"} <= set(page.ids)
    assert "raw-transactions-amount" in page.ids and "features-user_transaction_stats-amount_sum_7d" in page.ids
    assert len(page.images) == info.figures >= 1 + 1 + 3 * (1 + 1)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        image = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 500
    for run in runs:  # every run listed, with its rows and quarantined rows as the run log has them
        assert run.run_id in page.cells
    first = runs[0]
    quarantined = first.inputs[0].quarantined
    assert f"{first.inputs[0].rows:,}" in page.cells and f"{quarantined:,}" in page.cells
    assert str(first.inputs[0].quarantine_file) in page.cells
    failed = [c for c in runs[-1].checks if not c.passed]
    assert page.cells.count("FAILED") == len(failed) + sum(
        not c.passed for r in latest_of(runs) if r is not runs[-1] for c in r.checks)


def latest_of(runs: list[RunRecord]) -> list[RunRecord]:
    from featurepipe.quality.status import latest_runs

    return latest_runs(runs)


def test_report_command_on_the_pipeline(pipeline_commands: PipelineCommands) -> None:
    shown = pipeline_commands.report
    assert shown.returncode == 0, shown.stderr[-2000:]
    runs = pipeline_commands.runs
    assert shown.stdout.startswith(f"wrote {pipeline_commands.report_page} ({len(runs)} runs, ")
    page = pipeline_commands.report_page.read_text()
    last_backfill = [r for r in runs if r.kind == "backfill"][-1]
    assert 'id="distributions"' in page and last_backfill.run_id in page
    assert page.count("data:image/png;base64,") == int(shown.stdout.split(", ")[1].split()[0]) >= 4 + 13


def test_both_gates_block_and_warn_through_one_base(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The shared base (featurepipe.quality.gate_base) words each gate's GateBlocked as the gate
    did before it existed, carries stage, table, failures and quarantine, and says each failed
    warning through the gate's own logger."""
    contracts = Contracts(path=tmp_path / "contracts.yaml")
    results = [
        CheckResult("raw", "transactions", "amount.range", "amount", "block", False, failed_rows=3, rows=40,
                    sample=[{"amount": -1.0}]),
        CheckResult("raw", "transactions", "schema.file", None, "block", False, detail="cannot read a.parquet"),
        CheckResult("raw", "transactions", "category.allowed", "category", "warn", False, failed_rows=2, rows=40,
                    detail="2 of 40 rows quarantined"),
        CheckResult("raw", "transactions", "user_id.not_null", "user_id", "block", True, rows=40),
    ]
    batch = BatchGate(contracts, tmp_path / "data", [], now=datetime(2024, 5, 1, 12, tzinfo=timezone.utc))
    assert isinstance(batch, Gate) and batch.run_id.startswith("20240501T120000-")
    assert batch.any_blocking(results) and not batch.any_blocking(results[2:])
    quarantine = tmp_path / "q.parquet"
    error = batch._blocked("raw", "transactions", results, quarantine)
    assert isinstance(error, GateBlocked)
    assert str(error) == (
        f"quality gate raw/transactions blocked the batch (run {batch.run_id}): check 'amount.range' on column "
        "'amount' failed: 3 of 40 rows; sample: [{'amount': -1.0}]; check 'schema.file' failed (cannot read "
        f"a.parquet); failing rows kept in {quarantine}. Fix the data, or the contract in "
        f"{tmp_path / 'contracts.yaml'}, and rerun")
    assert (error.stage, error.table, error.failures, error.quarantine) == (
        "raw", "transactions", {"amount.range": 3, "schema.file": 0}, quarantine)

    start = datetime(2024, 5, 1, tzinfo=timezone.utc)
    online = MaterializeGate(Contracts(), tmp_path / "data", "user_transaction_stats", None, "redis://x", start, start)
    schema = CheckResult("materialize", "user_transaction_stats", "schema.type", "amount_sum_1h", "block", False,
                         detail="column 'amount_sum_1h' is VARCHAR, the contract says DOUBLE")
    error = online.blocked("materialize", "user_transaction_stats", [schema], stopped="the view",
                           fix="the offline table", consequence="Nothing of this view was written to Redis")
    assert str(error) == (
        f"quality gate materialize/user_transaction_stats blocked the view (run {online.run_id}): check "
        "'schema.type' on column 'amount_sum_1h' failed (column 'amount_sum_1h' is VARCHAR, the contract says "
        "DOUBLE). Nothing of this view was written to Redis. Fix the offline table, or the contract in "
        "contracts.yaml, and rerun")
    assert error.failures == {"schema.type": 0} and error.quarantine is None

    with caplog.at_level("WARNING"):
        batch.keep(results)
        online.keep([dataclasses.replace(results[2], stage="materialize", table="user_transaction_stats")])
    assert batch.results == results and len(online.results) == 1
    said = [(r.name, r.getMessage()) for r in caplog.records]
    assert said == [
        ("featurepipe.quality.gate",
         "quality gate raw/transactions (warn): check 'category.allowed' on column 'category' failed: "
         "2 of 40 rows quarantined"),
        ("featurepipe.quality.online_gate",
         "quality gate materialize/user_transaction_stats (warn): check 'category.allowed' on column "
         "'category' failed: 2 of 40 rows quarantined"),
    ]
