"""The Dagster definitions run in process on a real deployed copy of the demo repo.

A small generated data set, the real ``feast apply``, a redis-server of the module's own:
the definitions are built from that registry and run with ``execute_in_process`` on an
ephemeral Dagster instance. A range of partitions backfills in one run, the daily job
materialises the online store (oracle: one Redis key per user and per merchant), a raw file
with a retyped column stops the run with the gate's message and no retry, a Redis that is
down on the first attempt is retried, and the stream sensor tells a running stream job
from a stopped one.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from featurepipe.redis_server import RedisServer, free_port
from tests.conftest import ROOT, deployed_repo

pytestmark = pytest.mark.integration

try:
    import dagster as dg
except ImportError:  # the extra is not installed
    dg = None

needs_dagster = pytest.mark.skipif(dg is None, reason="dagster is not installed: pip install 'featurepipe[dagster]'")

ROWS, DAYS = 3_000, 5
VIEWS = ("merchant_activity", "merchant_fraud", "user_transaction_stats")
DAILY = "featurepipe_daily"
STALE_AFTER = timedelta(seconds=2)


@dataclass
class Deployed:
    repo: Path
    data: Path
    server: RedisServer
    defs: Any

    @property
    def days(self) -> list[str]:
        return sorted(p.name.removeprefix("date=") for p in (self.data / "raw" / "transactions").glob("date=*"))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """The demo repo deployed with its own data and redis-server, and its Dagster
    definitions (retries 1 s apart, so the retry test does not wait 10 s)."""
    if dg is None:
        pytest.skip("dagster is not installed: pip install 'featurepipe[dagster]'")
    from featurepipe.orchestration.dagster import definitions

    with RedisServer() as server, deployed_repo(tmp_path_factory.mktemp("dagster"), server.url, ROWS, DAYS) \
            as (repo, data):
        retry = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL)
        yield Deployed(repo, data, server, definitions(repo, retry_policy=retry, stream_stale_after=STALE_AFTER))


def _events(result: Any, kind: str) -> list[Any]:
    return [e for e in result.all_events if e.event_type_value == kind]


def _run(deployed: Deployed, partition: str | None = None, tags: dict[str, str] | None = None,
         assets: tuple[str, ...] | None = None, loggers: Any = None) -> Any:
    defs = deployed.defs
    config: dict[str, Any] = {}
    if loggers is not None:
        defs = dg.Definitions.merge(defs, dg.Definitions(loggers=loggers))
        config = {"loggers": {name: {} for name in loggers}}
    job = defs.resolve_job_def(DAILY)
    with dg.DagsterInstance.ephemeral() as instance:
        return job.execute_in_process(
            partition_key=partition, tags=tags, instance=instance, raise_on_error=False, run_config=config,
            asset_selection=[dg.AssetKey(a) for a in assets] if assets else None)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ the definitions

@needs_dagster
def test_the_asset_graph_comes_from_the_registry_and_the_contracts(deployed: Deployed) -> None:
    from featurepipe.orchestration.dagster import asset_graph_text

    graph = deployed.defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {*VIEWS, "online_store", "raw/transactions", "stream"}
    assert {p.path[-1] for p in graph.get(dg.AssetKey("online_store")).parent_keys} == set(VIEWS)
    for view in VIEWS:
        node = graph.get(dg.AssetKey(view))
        assert node.parent_keys == {dg.AssetKey(["raw", "transactions"])}
        # partitions from the first raw day, through yesterday (the generator's last day)
        assert node.partitions_def.get_partition_keys() == deployed.days
        assert node.backfill_policy == dg.BackfillPolicy.single_run()
        assert node.assets_def.op.retry_policy.max_retries == 3
        checks = {k.name: graph.get_check_spec(k) for k in node.check_keys}
        assert set(checks) == {f"{stage}_{kind}" for stage in ("raw", "features")
                               for kind in ("schema", "rows", "volume", "freshness", "anomalies")}
        # contracts.yaml: every raw row rule warns; the views' key columns block
        assert not checks["raw_rows"].blocking and checks["features_rows"].blocking
        assert checks["raw_schema"].blocking and not checks["features_volume"].blocking
        assert "amount.range (warn)" in checks["raw_rows"].description
    sla = {v: graph.get(dg.AssetKey(v)).freshness_policy_or_from_metadata.fail_window.to_timedelta() for v in VIEWS}
    assert sla == {"merchant_activity": timedelta(hours=48), "merchant_fraud": timedelta(hours=72),
                   "user_transaction_stats": timedelta(hours=48)}
    schedule = deployed.defs.resolve_schedule_def(f"{DAILY}_schedule")
    assert schedule.cron_schedule == "0 1 * * *" and schedule.job_name == DAILY
    assert [s.name for s in deployed.defs.sensors or ()] == ["stream_health"]
    text = asset_graph_text(deployed.defs)
    assert "online_store  <- merchant_activity, merchant_fraud, user_transaction_stats" in text
    assert "checks: raw: schema!, rows, volume, freshness, anomalies | features: schema!, rows!," in text
    print(text)


@needs_dagster
def test_the_graph_in_the_docs_is_the_definitions_graph(deployed: Deployed) -> None:
    """docs/orchestration.md shows the demo repo's asset graph as asset_graph_text prints it."""
    from featurepipe.orchestration.dagster import asset_graph_text, definitions

    text = (ROOT / "docs" / "orchestration.md").read_text(encoding="utf-8")
    graph = asset_graph_text(definitions(deployed.repo))  # the default policies
    start = re.sub(r"Daily, starting \S+ UTC", "Daily, starting <first raw day> UTC", graph)
    assert start in text, start


# ------------------------------------------------------------------------------ runs

@needs_dagster
def test_a_range_of_partitions_backfills_in_one_run(deployed: Deployed) -> None:
    first, second = deployed.days[-2:]  # days with labels: merchant_fraud's input is their arrival
    result = _run(deployed, tags={"dagster/asset_partition_range_start": first,
                                  "dagster/asset_partition_range_end": second}, assets=VIEWS)
    assert result.success
    assert [e.step_key for e in _events(result, "STEP_START")] == ["backfill"]  # one step, one backfill
    materialised = {(e.asset_key.path[-1], e.partition) for e in _events(result, "ASSET_MATERIALIZATION")}
    assert materialised == {(v, d) for v in VIEWS for d in (first, second)}
    for view in VIEWS:
        published = sorted(p.name for p in (deployed.data / "offline" / view).glob("date=*"))
        assert published == [f"date={first}", f"date={second}"]  # those days only
    checks = _events(result, "ASSET_CHECK_EVALUATION")
    assert len(checks) == 3 * 10 and all(e.event_specific_data.passed for e in checks)
    from featurepipe.quality.runlog import read_runs

    run = read_runs(deployed.data)[-1]
    assert run.kind == "backfill" and run.ok and {o.view for o in run.outputs} == set(VIEWS)
    meta = next(e for e in checks if e.event_specific_data.check_name == "raw_rows").event_specific_data.metadata
    assert meta["featurepipe_run"].value == run.run_id


@needs_dagster
def test_a_partition_without_change_points_publishes_nothing(deployed: Deployed) -> None:
    """``merchant_fraud`` reads the labels' arrival time: on the first day none has arrived,
    so its backfill of that day has no row to write. The run succeeds, publishes nothing for
    it, and its run record says 0 rows (an empty staging folder is not read as Parquet)."""
    from featurepipe.quality.runlog import read_runs

    before = _tree(deployed.data / "offline" / "merchant_fraud")
    result = _run(deployed, partition=deployed.days[0], assets=("merchant_fraud",))
    assert result.success, [e.message for e in _events(result, "STEP_FAILURE")]
    assert _tree(deployed.data / "offline" / "merchant_fraud") == before
    run = read_runs(deployed.data)[-1]
    assert run.kind == "backfill" and run.ok and [(o.view, o.rows) for o in run.outputs] == [("merchant_fraud", 0)]


@needs_dagster
def test_the_daily_job_materialises_the_online_store(deployed: Deployed) -> None:
    import duckdb
    import redis

    yesterday = deployed.days[-1]
    result = _run(deployed, partition=yesterday)
    assert result.success
    assert [e.step_key for e in _events(result, "STEP_SUCCESS")] == ["backfill", "online_store"]
    online = next(e for e in _events(result, "ASSET_MATERIALIZATION") if e.asset_key.path == ["online_store"])
    per_view = {v["view"]: v for v in online.event_specific_data.materialization.metadata["views"].value}
    assert set(per_view) == set(VIEWS)
    with duckdb.connect() as con:
        users, merchants = con.execute(
            f"SELECT count(DISTINCT user_id), count(DISTINCT merchant_id) "
            f"FROM read_parquet('{deployed.data}/raw/transactions/**/*.parquet')").fetchall()[0]
    assert per_view["user_transaction_stats"]["entities"] == users
    client = redis.Redis.from_url(deployed.server.url)
    try:
        assert client.dbsize() == users + merchants  # one hash per user and per merchant, Feast's layout
    finally:
        client.close()


@needs_dagster
def test_a_blocking_contract_check_stops_the_run_with_the_gates_message(deployed: Deployed) -> None:
    day = deployed.data / "raw" / "transactions" / f"date={deployed.days[-1]}"
    clean = pq.read_table(next(day.glob("*.parquet")))
    bad = clean.slice(0, 50)
    bad = bad.set_column(bad.schema.get_field_index("amount"), "amount", bad.column("amount").cast("string"))
    bad = bad.set_column(bad.schema.get_field_index("transaction_id"), "transaction_id",
                         pc.add(bad.column("transaction_id"), 10_000_000))
    late = day / "late-producer.parquet"
    offline_before = _tree(deployed.data / "offline")
    pq.write_table(bad, late)
    try:
        result = _run(deployed, partition=deployed.days[-1])
    finally:
        late.unlink()
    assert not result.success
    failure = result.get_step_failure_events()
    assert [e.step_key for e in failure] == ["backfill"]
    message = failure[0].event_specific_data.error.message
    assert "quality gate raw/transactions blocked the batch" in message and str(late) in message, message
    assert "amount" in message
    assert not _events(result, "STEP_UP_FOR_RETRY")  # a block is final: no retry
    assert "online_store" not in {e.step_key for e in _events(result, "STEP_START")}
    failed = [e.event_specific_data for e in _events(result, "ASSET_CHECK_EVALUATION")
              if not e.event_specific_data.passed]
    assert {(c.asset_key.path[-1], c.check_name) for c in failed} == {(v, "raw_schema") for v in VIEWS}
    assert all(c.severity == dg.AssetCheckSeverity.ERROR for c in failed)
    assert _tree(deployed.data / "offline") == offline_before  # nothing published


@needs_dagster
def test_a_redis_that_is_down_at_first_is_retried(deployed: Deployed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online store's Redis answers only from the second attempt on: the step fails with
    BackendUnavailable, Dagster retries it after the policy's delay, and it succeeds."""
    port = free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    late = RedisServer(port=port)
    seen: list[str] = []

    class StartRedisOnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            event = getattr(record, "dagster_meta", {}).get("dagster_event")
            if event is not None and event.event_type_value == "STEP_UP_FOR_RETRY":
                seen.append(event.step_key)
                if late.process is None:
                    late.start()  # before the retry's delay is over

    @dg.logger
    def watch(_context: Any) -> logging.Logger:
        logger = logging.Logger("featurepipe-test-watch", level=logging.DEBUG)
        logger.addHandler(StartRedisOnRetry())
        return logger

    try:
        result = _run(deployed, assets=("online_store",), loggers={"watch": watch})
        assert result.success, [e.message for e in result.get_step_failure_events()]
        assert seen == ["online_store"]  # failed once, retried once
        assert len(_events(result, "STEP_RESTARTED")) == 1
        assert late.process is not None
        import redis

        client = redis.Redis(port=port)
        assert client.dbsize() > 0
        client.close()
    finally:
        late.stop()


@needs_dagster
def test_the_stream_sensor_tells_a_running_job_from_a_stopped_one(deployed: Deployed) -> None:
    import redis

    from featurepipe.config import load_store
    from featurepipe.stream.engine import StreamJob, StreamOptions
    from featurepipe.stream.runner import event_payloads, open_source
    from featurepipe.stream.source import publish_redis

    sensor = deployed.defs.resolve_sensor_def("stream_health")
    with dg.DagsterInstance.ephemeral() as instance:
        context = dg.build_sensor_context(instance=instance, definitions=deployed.defs)
        assert isinstance(sensor(context), dg.SkipReason)  # no stream job yet

        events = pq.read_table(deployed.data / "raw" / "transactions").sort_by("event_timestamp").slice(0, 400)
        url = deployed.server.url.rsplit("/", 1)[0]
        client = redis.Redis.from_url(url + "/0")
        publish_redis(client, "events", event_payloads(events.drop_columns(["date"])))
        client.close()
        options = StreamOptions(source="transactions", job="live", views=["user_transaction_stats"],
                                checkpoint_seconds=0.2, progress=False, archive_raw=False)
        job = StreamJob(load_store(deployed.repo), open_source(options, stream="events", stream_url=url + "/0"),
                        redis.Redis.from_url(url + "/2"), options)
        worker = threading.Thread(target=job.run, daemon=True)
        worker.start()
        try:
            deadline = time.monotonic() + 30
            while job.counters.messages < len(events) or job.counters.checkpoints < 2:
                assert time.monotonic() < deadline, "the stream job did not read its events"
                time.sleep(0.05)
            time.sleep(0.5)  # a checkpoint after the last message: lag 0
            running = sensor(context)
        finally:
            job.stop()
            worker.join(30)
            job.close()
        time.sleep(STALE_AFTER.total_seconds() + 0.5)
        stopped = sensor(context)

    for result, healthy in ((running, True), (stopped, False)):
        assert isinstance(result, dg.SensorResult)
        observation, check = result.asset_events
        assert observation.asset_key == check.asset_key == dg.AssetKey("stream")
        assert check.check_name == "healthy" and check.passed is healthy
        (share,) = observation.metadata["shares"].value
        assert (share["job"], share["share"], share["healthy"]) == ("live", "w0", healthy)
        assert share["messages"] == len(events) and share["lag"] == 0
    assert "1 of 1 stream share(s) stopped or stuck" in check.description


# ------------------------------------------------------------------------------ no dagster needed

def test_dagster_is_imported_by_the_orchestration_package_only() -> None:
    """The extra stays an extra: no other module imports dagster (read from the source)."""
    wrong = []
    for package in ("featurepipe", "serving", "training"):
        for path in (ROOT / package).rglob("*.py"):
            if path.parent == ROOT / "featurepipe" / "orchestration":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                if any(n.split(".")[0] == "dagster" for n in names):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert wrong == []


def test_the_airflow_example_calls_functions_that_exist() -> None:
    """The DAG in docs/orchestration.md parses and names only featurepipe functions that
    exist (Airflow itself is not installed here)."""
    text = (ROOT / "docs" / "orchestration.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "airflow" in b]
    assert len(blocks) == 1
    tree = ast.parse(blocks[0])
    imported = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and (n.module or "").startswith("featurepipe") for a in n.names]
    assert {name for _, name in imported} >= {"backfill", "materialize", "load_store"}
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
