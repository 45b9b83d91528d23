"""Materialisation into Redis: featurepipe's engine against Feast's own, byte for byte.

Plain views (every Feast type, compound keys, created-timestamp ties, bad rows): oracle is
Feast's ``local`` engine (its best settings: ``pull_latest_features``, batches of 10,000)
over Feast's own ``duckdb`` offline store, writing into another Redis database of the same
server. Both contents are compared key by key: same keys, same ``HGETALL``, same ``DUMP``
(same fields in the same order and encoding), same TTLs.

The demo's windowed-aggregate views are materialised from their raw events (each entity's
window schedule, from the row right after its newest event): their Feast fields are
compared with what Feast's own writer (``write_to_online_store``) stores for the offline
table's row at that change point (the backfill's, so online = offline too), field by field
and TTL by TTL; the schedules themselves are checked against the raw events in
``tests/test_request_time_online.py``. Each store has its own copy of the registry, so the
shared ``pipeline`` state is left alone.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from featurepipe.config import redis_connection_kwargs
from featurepipe.online import codec, dump, rows
from tests.conftest import Pipeline

ENGINE = "featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine"
EPOCH = datetime(1970, 1, 2, tzinfo=timezone.utc)
KEY_TTL = 86_400
# Redis databases of the test server used here (the pipeline uses its URL's own, 0)
DB_FEAST, DB_OURS, DB_PUSHED, DB_INCREMENTAL, DB_KILLED = 8, 9, 10, 11, 12
DB_TYPES_FEAST, DB_TYPES_OURS, DB_TYPES_SCRIPT = 13, 14, 15


@pytest.fixture(scope="module", autouse=True)
def own_data_folders() -> Iterator[None]:
    """The repo copies here keep their run logs and metrics in their own data folders, not
    in the shared pipeline's (``$FEATUREPIPE_DATA_DIR``, which the session's pipeline fixture
    sets and other modules read). Session fixtures are set up before this one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FEATUREPIPE_DATA_DIR", raising=False)
        yield


# ---------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Server:
    host: str
    port: int

    def client(self, db: int, flush: bool = False) -> redis.Redis:
        c = redis.Redis(host=self.host, port=self.port, db=db)
        if flush:
            c.flushdb()
        return c

    def feast_form(self, db: int) -> str:
        return f"{self.host}:{self.port},db={db}"


@pytest.fixture(scope="module")
def server(redis_url: str) -> Server:
    kw = redis_connection_kwargs(redis_url)
    return Server(str(kw["host"]), int(kw["port"]))  # type: ignore[arg-type]


def content(client: redis.Redis) -> dict[bytes, tuple[dict[bytes, bytes], bytes]]:
    """Every key's fields and its DUMP (which also fixes field order and encoding)."""
    return {k: (client.hgetall(k), client.dump(k)) for k in client.scan_iter(count=1000)}


def fields(client: redis.Redis, schedules: bool = True) -> dict[bytes, dict[bytes, bytes]]:
    """Every key's fields (the encoding aside: a hash restored whole with a schedule is a
    listpack, one a script rewrote a hashtable), with or without the schedules."""
    return {k: {f: v for f, v in client.hgetall(k).items() if schedules or not f.startswith(b"_fp_sched:")}
            for k in client.scan_iter(count=1000)}


def ttls(client: redis.Redis) -> dict[bytes, int]:
    return {k: client.ttl(k) for k in client.scan_iter(count=1000)}


def repo_copy(base: Path, name: str, registry: Path, server: Server, db: int, *, engine: str,
              extra_engine: str = "") -> Path:
    """A repo folder with its own registry copy and a feature_store.yaml for one engine."""
    folder = base / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    shared = base / "data"  # the registry's sources are relative to its repo (../data/...)
    if not shared.exists():
        shared.symlink_to(registry.parent.parent.parent / "data", target_is_directory=True)
    shutil.copy(registry, folder / "data" / "registry.db")
    engine_yaml = (
        f"batch_engine:\n  type: {ENGINE}\n  progress: false\n  quarantine_dir: {folder / 'quarantine'}\n"
        + extra_engine if engine == "featurepipe" else "batch_engine: local\n"
    )
    (folder / "feature_store.yaml").write_text(
        "project: featurepipe_demo\nprovider: local\nregistry: data/registry.db\n"
        f"online_store:\n  type: redis\n  connection_string: \"{server.feast_form(db)}\"\n"
        f"  key_ttl_seconds: {KEY_TTL}\n"
        "offline_store:\n  type: duckdb\nentity_key_serialization_version: 3\n"
        "materialization_config:\n  pull_latest_features: true\n  online_write_batch_size: 10000\n"
        + engine_yaml
    )
    return folder


def forget_materializations(registry: Path) -> None:
    """Drop the materialised intervals a registry copy inherited from the pipeline."""
    from feast.protos.feast.core.Registry_pb2 import Registry

    proto = Registry()
    proto.ParseFromString(registry.read_bytes())
    for view in proto.feature_views:
        del view.meta.materialization_intervals[:]
    registry.write_bytes(proto.SerializeToString())


def store_at(folder: Path) -> Any:
    from feast import FeatureStore

    return FeatureStore(repo_path=str(folder))


@dataclass
class Demo:
    """The demo repo materialised by featurepipe's engine, and the offline rows its Feast
    fields must hold written by Feast's own writer, in two databases."""

    pipeline: Pipeline
    base: Path
    registry: Path
    end: datetime
    feast: dict[bytes, dict[bytes, bytes]]  # Feast's writer: every key's fields
    feast_ttls: dict[bytes, int]
    ours: dict[bytes, dict[bytes, bytes]]  # featurepipe's engine: every key's fields, schedules too
    ours_store: Any
    ours_result: Any


VIEWS = ("merchant_activity", "merchant_fraud", "user_transaction_stats")


def first_rows(p: Pipeline, view: str, end: datetime) -> Any:
    """The offline table's row right after each entity's newest raw event (``v = x + 1 us``)
    up to ``end``: what the engine puts in Feast's fields. A pandas DataFrame."""
    from featurepipe.definitions import aggregate_views

    (spec,) = aggregate_views(p.store, [view])
    key, ts = spec.join_keys[0], spec.timestamp_field
    return duckdb.sql(
        f"WITH newest AS (SELECT {key}, max({ts}) AS x FROM read_parquet('{spec.input_path}', hive_partitioning = "
        f"true) WHERE {ts} <= TIMESTAMPTZ '{end.isoformat()}' AND {key} IS NOT NULL GROUP BY ALL) "
        f"SELECT o.* EXCLUDE (date) FROM read_parquet('{spec.offline_path}/**/*.parquet', hive_partitioning = true) o "
        f"JOIN newest n USING ({key}) WHERE o.event_timestamp = n.x + INTERVAL 1 MICROSECOND ORDER BY {key}"
    ).df()


@pytest.fixture(scope="module")
def demo(pipeline: Pipeline, server: Server, tmp_path_factory: pytest.TempPathFactory) -> Demo:
    from featurepipe.jobs.materialize import materialize

    base = tmp_path_factory.mktemp("materialize")
    registry = pipeline.repo / "data" / "registry.db"
    end = datetime.now(timezone.utc)
    feast_store = store_at(repo_copy(base, "feast", registry, server, DB_FEAST, engine="local"))
    server.client(DB_FEAST, flush=True)
    for view in VIEWS:
        feast_store.write_to_online_store(view, first_rows(pipeline, view, end))
    ours_store = store_at(repo_copy(base, "ours", registry, server, DB_OURS, engine="featurepipe"))
    server.client(DB_OURS, flush=True)
    result = materialize(ours_store, EPOCH, end)
    feast_client = server.client(DB_FEAST)
    return Demo(pipeline, base, registry, end, fields(feast_client), ttls(feast_client),
                fields(server.client(DB_OURS)), ours_store, result)


def newest_event(p: Pipeline, view: str, end: datetime) -> dict[int, datetime]:
    """Each entity's first change point after its newest event (what Feast's timestamp holds)."""
    frame = first_rows(p, view, end)
    key = frame.columns[0] if frame.columns[0] != "event_timestamp" else frame.columns[1]
    return dict(zip(frame[key].tolist(), frame["event_timestamp"].tolist(), strict=True))


# ---------------------------------------------------------------- the demo repo


def test_feast_fields_equal_feasts_writer_on_the_offline_rows(demo: Demo, server: Server) -> None:
    """Feast's own fields of every key are the bytes Feast's writer stores for the offline
    table's row right after the entity's newest event; every windowed view's hash also holds
    its schedule; the same TTLs."""
    assert demo.feast, "Feast's writer wrote nothing: the comparison would be empty"
    without = {k: {f: v for f, v in fs.items() if not f.startswith(b"_fp_sched:")} for k, fs in demo.ours.items()}
    assert without == demo.feast
    for fs in demo.ours.values():
        views = {f[len(b"_ts:"):] for f in fs if f.startswith(b"_ts:")}
        assert {f[len(b"_fp_sched:"):] for f in fs if f.startswith(b"_fp_sched:")} == views
    ours_ttls = ttls(server.client(DB_OURS))
    assert ours_ttls.keys() == demo.feast_ttls.keys()
    assert all(KEY_TTL - 120 < t <= KEY_TTL for t in ours_ttls.values())
    assert all(abs(ours_ttls[k] - demo.feast_ttls[k]) <= 60 for k in ours_ttls)


def test_engine_reports_what_it_did(demo: Demo) -> None:
    by_view = {r.view: r for r in demo.ours_result.per_view}
    assert set(by_view) == set(VIEWS)
    users = by_view["user_transaction_stats"]
    latest = newest_event(demo.pipeline, "user_transaction_stats", demo.end)
    assert users.entities == users.written == len(latest)
    assert users.window_rows >= users.entities and users.quarantined == 0
    assert users.schedule_rows >= users.entities
    # an empty Redis: every key created whole by RESTORE (then merged by the script for
    # the merchant views, which share their hashes)
    assert users.restored == users.written
    merchants = [by_view["merchant_activity"], by_view["merchant_fraud"]]
    assert merchants[0].restored == merchants[0].written and merchants[1].restored == 0


def test_feast_reads_identical_values_and_timestamps(demo: Demo, server: Server) -> None:
    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    feast_store = store_at(demo.base / "feast")
    view = demo.ours_store.get_feature_view("user_transaction_stats")
    latest = newest_event(demo.pipeline, "user_transaction_stats", demo.end)
    keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=int(u))]) for u in sorted(latest)]
    ours = RedisOnlineStore().online_read(demo.ours_store.config, view, keys)
    theirs = RedisOnlineStore().online_read(feast_store.config, view, keys)
    assert ours == theirs
    assert [abs((ts - latest[u]).total_seconds()) < 2e-6 for (ts, _), u in zip(ours, sorted(latest))] \
        == [True] * len(latest)
    refs = [f"user_transaction_stats:{f.name}" for f in view.features]
    rows_ = [{"user_id": int(u)} for u in sorted(latest)[:50]]
    assert (demo.ours_store.get_online_features(refs, rows_).to_dict()
            == feast_store.get_online_features(refs, rows_).to_dict())


def test_second_run_changes_nothing(demo: Demo, server: Server) -> None:
    from featurepipe.jobs.materialize import materialize

    client = server.client(DB_OURS)
    before = fields(client)  # (not DUMP: a hashtable's lookups may move its rehashing on)
    again = materialize(demo.ours_store, EPOCH, demo.end)
    assert sum(r.written for r in again.per_view) == sum(r.restored for r in again.per_view) == 0
    assert sum(r.skipped for r in again.per_view) == sum(r.entities for r in again.per_view) > 0
    assert fields(client) == before == demo.ours


def test_newer_streamed_value_is_not_overwritten(demo: Demo, server: Server) -> None:
    """A newer row written with its schedule (as the stream job writes it) survives a
    materialisation; a newer row written by Feast's SDK without one (which no reader can use:
    the view's windows would never slide) is rewritten from the raw events."""
    import pandas as pd

    from featurepipe.jobs.materialize import materialize
    from featurepipe.online.layout import entity_key_prefix
    from featurepipe.online.schedule import schedule_field

    store = store_at(repo_copy(demo.base, "pushed", demo.registry, server, DB_PUSHED, engine="featurepipe"))
    client = server.client(DB_PUSHED, flush=True)
    view = store.get_feature_view("user_transaction_stats")
    first, second = sorted(newest_event(demo.pipeline, "user_transaction_stats", demo.end))[:2]
    newer = {f.name: [7] * 2 if f.name.startswith("txn_count") else [7.5] * 2 for f in view.features}
    store.write_to_online_store("user_transaction_stats", pd.DataFrame(
        {"user_id": [first, second], **newer, "event_timestamp": [pd.Timestamp(demo.end + timedelta(days=1))] * 2}
    ))
    with_schedule = entity_key_prefix(["user_id"]) + struct.pack("<IIq", 4, 8, first) + store.project.encode()
    schedule = next(v for k, v in demo.ours.items() if k == with_schedule)[schedule_field(view.name)]
    client.hset(with_schedule, schedule_field(view.name), schedule)
    pushed = content(client)
    result = materialize(store, EPOCH, demo.end, ["user_transaction_stats"])
    assert result.per_view[0].skipped == 1
    after = fields(client)
    assert after[with_schedule] == pushed[with_schedule][0]
    # every other hash is what the engine writes for that view
    others = {k: v for k, v in after.items() if k != with_schedule}
    assert others == {k: v for k, v in demo.ours.items() if k in others}
    users = {k for k, fs in demo.ours.items() if b"_ts:user_transaction_stats" in fs}
    assert set(others) == users - {with_schedule}


def test_incremental_moves_only_new_rows(demo: Demo, server: Server) -> None:
    from featurepipe.jobs.materialize import materialize

    folder = repo_copy(demo.base, "incremental", demo.registry, server, DB_INCREMENTAL, engine="featurepipe")
    forget_materializations(folder / "data" / "registry.db")
    store = store_at(folder)
    client = server.client(DB_INCREMENTAL, flush=True)
    raw = demo.pipeline.data / "raw" / "transactions" / "**" / "*.parquet"
    lo, hi = duckdb.sql(f"SELECT min(event_timestamp), max(event_timestamp) FROM read_parquet('{raw}')").fetchall()[0]
    middle = lo + (hi - lo) / 2
    first = materialize(store, EPOCH, middle)
    assert sum(r.written for r in first.per_view) > 0
    second = materialize(store, end=demo.end, incremental=True)
    users = next(r for r in second.per_view if r.view == "user_transaction_stats")
    assert users.start == middle  # from where the registry says the last run ended
    new_rows, new_users = duckdb.sql(
        f"SELECT count(*), count(DISTINCT user_id) FROM read_parquet('{raw}') WHERE event_timestamp >= "
        f"TIMESTAMPTZ '{middle.isoformat()}' AND event_timestamp <= TIMESTAMPTZ '{demo.end.isoformat()}'"
    ).fetchall()[0]
    assert users.window_rows == new_rows and users.entities == new_users
    assert fields(client) == demo.ours  # the same schedules as one run over the whole range


def test_killed_run_resumes_to_the_same_content(demo: Demo, server: Server) -> None:
    """SIGKILL Feast's own `feast materialize` (our engine, throttled in feature_store.yaml)
    mid-way; `featurepipe materialize` over the same window then gives exactly the content
    of an uninterrupted run."""
    from click.testing import CliRunner

    from featurepipe.cli import main

    folder = repo_copy(demo.base, "killed", demo.registry, server, DB_KILLED, engine="featurepipe",
                       extra_engine="  batch_rows: 20\n  max_rows_per_second: 300\n")
    client = server.client(DB_KILLED, flush=True)
    total = len(demo.ours)
    start, end = EPOCH.replace(tzinfo=None).isoformat(), demo.end.replace(tzinfo=None).isoformat()
    slow = subprocess.Popen(
        [str(Path(sys.executable).parent / "feast"), "--chdir", str(folder), "materialize", start, end],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while client.dbsize() < total // 3 and time.monotonic() < deadline and slow.poll() is None:
            time.sleep(0.02)
        slow.send_signal(signal.SIGKILL)
        slow.wait(10)
        written_when_killed = client.dbsize()
    finally:
        if slow.poll() is None:
            slow.kill()
    assert slow.returncode == -signal.SIGKILL
    assert 0 < written_when_killed < total, slow.stderr.read()[-2000:] if slow.stderr else ""
    assert fields(client) != demo.ours
    rerun = CliRunner().invoke(main, ["materialize", "--repo", str(folder), "--no-progress",
                                      "--max-rows-per-second", "0", "--start", start, "--end", end])
    assert rerun.exit_code == 0, rerun.output[-3000:]
    assert "user_transaction_stats" in rerun.output and "entities" in rerun.output
    assert fields(client) == demo.ours


def test_one_call_publishes_once_and_stops_at_the_first_failed_view(
        demo: Demo, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feast hands the engine every view of a call at once: each view still gets its run
    record and lineage events, but the metrics file is rebuilt once per call, not per view.
    A view that fails stops the views after it, as Feast's view-by-view path did."""
    from featurepipe.errors import InvalidInput
    from featurepipe.quality import metrics
    from featurepipe.quality.runlog import read_runs

    views = ["merchant_activity", "merchant_fraud", "user_transaction_stats"]
    folder = repo_copy(demo.base, "one_call", demo.registry, server, DB_PUSHED, engine="featurepipe")
    forget_materializations(folder / "data" / "registry.db")
    data = tmp_path / "data"
    monkeypatch.setenv("FEATUREPIPE_DATA_DIR", str(data))
    published: list[Path] = []
    rebuild = metrics.publish
    monkeypatch.setattr(metrics, "publish", lambda d, sla=None: published.append(d) or rebuild(d, sla))
    store = store_at(folder)
    client = server.client(DB_PUSHED, flush=True)
    store.materialize(EPOCH, demo.end, views)
    assert fields(client) == demo.ours
    runs = read_runs(data)
    assert [(r.kind, r.status, r.outputs[0].view) for r in runs] == [("materialize", "ok", v) for v in views]
    assert published == [data] and (data / "metrics" / "featurepipe.prom").is_file()
    events = [json.loads(line) for line in (data / "lineage" / "openlineage.jsonl").read_text().splitlines()]
    assert sorted((e["job"]["name"], e["eventType"]) for e in events) == sorted(
        (f"featurepipe.materialize.{v}", state) for v in views for state in ("START", "COMPLETE"))

    (folder / "contracts.yaml").write_text(  # merchant_fraud's table no longer matches its contract
        "feature_views:\n  merchant_fraud:\n    columns:\n      merchant_fraud_rate_30d: {type: VARCHAR}\n")
    client.flushdb()
    with pytest.raises(InvalidInput, match="quality gate materialize/merchant_fraud blocked the view"):
        store.materialize(EPOCH, demo.end, views)
    runs = read_runs(data)[len(views):]
    assert [(r.status, r.outputs[0].view) for r in runs] == [("ok", "merchant_activity"), ("blocked", "merchant_fraud")]
    assert published == [data, data]
    written = {f for fs in fields(client).values() for f in fs if f.startswith(b"_ts:")}
    assert written == {b"_ts:merchant_activity"}  # nothing of the view after the blocked one
    intervals = {v: len(store.registry.get_feature_view(v, store.project).materialization_intervals)
                 for v in views}
    assert intervals == {"merchant_activity": 2, "merchant_fraud": 1, "user_transaction_stats": 1}


# ---------------------------------------------------------------- every type, ties, bad data


def _types_table(rng: np.random.Generator, entities: int) -> pa.Table:
    """Three rows per entity (compound key), one pair tied on event time (created breaks it)."""
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    n = entities * 3
    ids = np.repeat(np.arange(entities, dtype=np.int64), 3)
    offsets = np.tile([0, 3600, 3600], entities) + np.repeat(rng.integers(0, 86_400, entities), 3)
    event = [base + timedelta(seconds=int(s), microseconds=int(rng.integers(0, 10**6)) * (i % 7 != 0))
             for i, s in enumerate(offsets)]
    for i in range(0, n, 3):  # rows i+1 and i+2 tie on event time
        event[i + 2] = event[i + 1]
    created = [e + timedelta(seconds=int(k % 3)) for k, e in enumerate(event)]
    doubles = rng.normal(0, 1e3, n)
    doubles[::11] = np.nan
    text = [None if i % 13 == 0 else ("é" * (i % 70)) + str(i) for i in range(n)]
    return pa.table({
        "customer_id": pa.array(ids),
        "region": pa.array([["eu", "us", ""][i % 3] for i in ids]),
        "event_timestamp": pa.array(event, pa.timestamp("us", tz="UTC")),
        "created": pa.array(created, pa.timestamp("us", tz="UTC")),
        "f_double": pa.array(doubles, mask=np.arange(n) % 17 == 0),
        "f_float": pa.array(rng.normal(0, 10, n).astype(np.float32)),
        "f_int64": pa.array(rng.integers(-(2**40), 2**40, n), mask=np.arange(n) % 5 == 0),
        "f_int32": pa.array(rng.integers(-(2**31), 2**31 - 1, n, dtype=np.int64).astype(np.int32)),
        "f_bool": pa.array(rng.random(n) < 0.5, mask=np.arange(n) % 7 == 0),
        "f_string": pa.array(text),
        "f_bytes": pa.array([bytes(rng.integers(0, 256, i % 9, dtype=np.uint8)) for i in range(n)]),
        "f_ts": pa.array(event, pa.timestamp("us", tz="UTC"), mask=np.arange(n) % 4 == 0),
        "f_list": pa.array([list(range(i % 4)) for i in range(n)], pa.list_(pa.int64())),
    })


def _types_objects(path: Path, schema_overrides: dict[str, Any] | None = None) -> list[Any]:
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import (
        Array,
        Bool,
        Bytes,
        Float32,
        Float64,
        Int32,
        Int64,
        String,
        UnixTimestamp,
    )

    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    region = Entity(name="region", join_keys=["region"], value_type=ValueType.STRING)
    source = FileSource(name="typed", path=str(path), timestamp_field="event_timestamp",
                        created_timestamp_column="created")
    schema = {"f_double": Float64, "f_float": Float32, "f_int64": Int64, "f_int32": Int32, "f_bool": Bool,
              "f_string": String, "f_bytes": Bytes, "f_ts": UnixTimestamp, "f_list": Array(Int64),
              **(schema_overrides or {})}
    view = FeatureView(name="typed_view", entities=[customer, region], ttl=timedelta(days=30),
                       schema=[Field(name="customer_id", dtype=Int64), Field(name="region", dtype=String),
                               *(Field(name=k, dtype=v) for k, v in schema.items())],
                       source=source, online=True)
    return [customer, region, source, view]


def _typed_store(folder: Path, server: Server, db: int, engine: str, registry: Path,
                 restore: bool = True) -> Any:
    from feast import FeatureStore, RepoConfig

    folder.mkdir(parents=True, exist_ok=True)
    batch: Any = ({"type": ENGINE, "progress": False, "quarantine_dir": str(folder / "quarantine"),
                   "restore": restore} if engine == "featurepipe" else "local")
    config = RepoConfig(
        project="typed", provider="local", registry=str(registry), repo_path=str(folder),
        online_store={"type": "redis", "connection_string": server.feast_form(db)},
        offline_store={"type": "duckdb"}, batch_engine=batch, entity_key_serialization_version=3,
        materialization={"pull_latest_features": True, "online_write_batch_size": 10_000},
    )
    return FeatureStore(config=config)


@pytest.fixture(scope="module")
def typed_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("typed")
    yield base


def test_every_type_and_created_ties_match_feast(typed_env: Path, server: Server,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    table = _types_table(np.random.default_rng(5), 150)
    pq.write_table(table, typed_env / "typed.parquet")
    registry = typed_env / "registry.db"
    feast_store = _typed_store(typed_env / "feast", server, DB_TYPES_FEAST, "local", registry)
    feast_store.apply(_types_objects(typed_env / "typed.parquet"))
    ours_store = _typed_store(typed_env / "ours", server, DB_TYPES_OURS, "featurepipe", registry)
    end = datetime(2027, 1, 1, tzinfo=timezone.utc)
    server.client(DB_TYPES_FEAST, flush=True)
    server.client(DB_TYPES_OURS, flush=True)
    feast_store.materialize(EPOCH, end)
    from featurepipe.jobs.materialize import materialize

    result = materialize(ours_store, EPOCH, end)
    theirs = content(server.client(DB_TYPES_FEAST))
    assert len(theirs) == 150
    assert content(server.client(DB_TYPES_OURS)) == theirs
    # the same through the compare-and-set script alone (no RESTORE of new keys)
    script_store = _typed_store(typed_env / "script", server, DB_TYPES_SCRIPT, "featurepipe", registry,
                                restore=False)
    server.client(DB_TYPES_SCRIPT, flush=True)
    materialize(script_store, EPOCH, end)
    assert content(server.client(DB_TYPES_SCRIPT)) == theirs
    # and with the NumPy fallback the install uses when the C part cannot be compiled
    monkeypatch.setattr(codec, "compiled", None)
    monkeypatch.setattr(dump, "compiled", None)
    server.client(DB_TYPES_OURS, flush=True)
    materialize(ours_store, EPOCH, end)
    assert content(server.client(DB_TYPES_OURS)) == theirs
    # (each entity's two latest rows tie on event time: equal bytes mean the created
    # timestamp broke the tie as in Feast)
    assert result.per_view[0].entities == result.per_view[0].written == 150


def test_bad_rows_are_quarantined_never_written(typed_env: Path, server: Server) -> None:
    """Null join keys and values that do not fit their type: counted, quarantined, not written."""
    from feast.types import Int32, Int64

    from featurepipe.jobs.materialize import materialize

    folder = typed_env / "bad"
    folder.mkdir()
    table = _types_table(np.random.default_rng(6), 60)
    n = table.num_rows
    ids = table.column("customer_id").to_numpy()
    big = table.column("f_int32").to_numpy().astype(np.int64)
    big[ids == 3] = 2**40  # entity 3: its latest row's Int32 value does not fit
    fraction = np.where(ids == 5, 1.5, np.round(np.arange(n) / 7.0))  # entity 5: not an integer
    keys = pa.array(ids, mask=(np.arange(n) % 29 == 1))  # some rows without a join key
    table = (table.set_column(0, "customer_id", keys)
                  .set_column(table.schema.get_field_index("f_int32"), "f_int32", pa.array(big))
                  .set_column(table.schema.get_field_index("f_int64"), "f_int64", pa.array(fraction)))
    pq.write_table(table, folder / "bad.parquet")
    registry = folder / "registry.db"
    ours = _typed_store(folder / "ours", server, DB_TYPES_OURS, "featurepipe", registry)
    ours.apply(_types_objects(folder / "bad.parquet", {"f_int32": Int32, "f_int64": Int64}))
    client = server.client(DB_TYPES_OURS, flush=True)
    result = materialize(ours, EPOCH, datetime(2027, 1, 1, tzinfo=timezone.utc)).per_view[0]
    null_keys = int((np.arange(n) % 29 == 1).sum())
    assert result.quarantined == null_keys + 2
    assert sorted(Path(f).name.split("-", 2)[2] for f in result.quarantine_files) == [
        "bad-values.parquet", "null-keys.parquet"]
    quarantined = [reason for f in result.quarantine_files
                   for reason in pq.read_table(f).column("quarantine_reason").to_pylist()]
    assert len(quarantined) == result.quarantined
    assert sum("f_int32: value does not fit INT32" in r for r in quarantined) == 1
    assert sum("f_int64: value does not fit INT64" in r for r in quarantined) == 1
    assert sum("join key" in r for r in quarantined) == null_keys
    # oracle: Feast's engine on the same data less the bad entities and key-less rows
    clean = table.filter(pa.compute.and_(pa.compute.is_valid(table.column("customer_id")),
                                         pa.compute.invert(pa.compute.is_in(table.column("customer_id"),
                                                                            pa.array([3, 5])))))
    pq.write_table(clean, folder / "clean.parquet")
    feast = _typed_store(folder / "feast", server, DB_TYPES_FEAST, "local", folder / "registry-clean.db")
    feast.apply(_types_objects(folder / "clean.parquet", {"f_int32": Int32, "f_int64": Int64}))
    server.client(DB_TYPES_FEAST, flush=True)
    feast.materialize(EPOCH, datetime(2027, 1, 1, tzinfo=timezone.utc))
    assert content(client) == content(server.client(DB_TYPES_FEAST))
    assert result.written == len(content(client)) == 58


# ---------------------------------------------------------------- encoders (no services)


def _split(piece: rows.Piece) -> list[bytes]:
    flat, offsets = rows.join([piece])
    return [bytes(flat[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]


@pytest.mark.parametrize("value_type, array", [
    ("DOUBLE", pa.array([0.0, -1.5, float("nan"), None, 1e300, float("inf")])),
    ("FLOAT", pa.array([0.0, -1.5, None, 3.25, 1e30], pa.float32())),
    ("INT64", pa.array([0, 1, -1, 127, 128, 2**62, -(2**63), None, 300])),
    ("INT32", pa.array([0, 1, -1, 2**31 - 1, -(2**31), None], pa.int32())),
    ("BOOL", pa.array([True, False, None])),
    ("STRING", pa.array(["", "a", None, "héllo" * 30])),
    ("BYTES", pa.array([b"", b"\x00\x01", None, b"z" * 130])),
    ("UNIX_TIMESTAMP", pa.array([datetime(2020, 1, 1, tzinfo=timezone.utc), None,
                                 datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=timezone.utc)],
                                pa.timestamp("us", tz="UTC"))),
])
@pytest.mark.parametrize("use_compiled", [True, False], ids=["C", "numpy"])
def test_value_bytes_equal_feasts(value_type: str, array: pa.Array, use_compiled: bool) -> None:
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    expected = [v.SerializeToString() for v in python_values_to_proto_values(
        array.to_numpy(zero_copy_only=False), ValueType[value_type])]
    assert _split(codec.encode_values(array, value_type, use_compiled=use_compiled)) == expected
    sliced = array.slice(1)  # an Arrow array with an offset
    assert _split(codec.encode_values(sliced, value_type, use_compiled=use_compiled)) == expected[1:]


@pytest.mark.parametrize("value_type", ["DOUBLE", "FLOAT", "INT64", "INT32"])
def test_random_numbers_encode_as_feast_does(value_type: str) -> None:
    """Random values of every magnitude (each varint length, NaN, nulls): C, NumPy and Feast agree."""
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    rng = np.random.default_rng(7)
    n = 2000
    if value_type in ("INT64", "INT32"):
        bits = 63 if value_type == "INT64" else 31
        raw = rng.integers(-(2**bits), 2**bits - 1, n, dtype=np.int64) >> rng.integers(0, bits, n)
        array = pa.array(raw, pa.int64() if value_type == "INT64" else pa.int32(), mask=rng.random(n) < 0.1)
    else:
        raw = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)
        raw[rng.random(n) < 0.05] = np.nan
        array = pa.array(raw, pa.float64() if value_type == "DOUBLE" else pa.float32(), mask=rng.random(n) < 0.1)
    # Python values, not to_numpy(): an integer column with nulls becomes float64 there, and
    # integers above 2**53 lose their last bits (Feast's own engine does that; featurepipe does not)
    expected = [v.SerializeToString() for v in python_values_to_proto_values(
        array.to_pylist(), ValueType[value_type])]
    assert _split(codec.encode_values(array, value_type, use_compiled=True)) == expected
    assert _split(codec.encode_values(array, value_type, use_compiled=False)) == expected


@pytest.mark.parametrize("use_compiled", [True, False], ids=["C", "numpy"])
def test_timestamp_and_key_bytes_equal_feasts(use_compiled: bool) -> None:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from google.protobuf.timestamp_pb2 import Timestamp

    micros = np.array([0, 1, 999_999, 1_000_000, -1, -1_500_000, 1_767_225_600_123_456])
    expected = []
    for m in micros:
        t = Timestamp()
        t.FromDatetime(datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=int(m)))
        expected.append(t.SerializeToString())
    assert _split(codec.encode_timestamps(micros, use_compiled=use_compiled)) == expected
    users, names = [1, -5, 2**40], ["x", "", "ééé"]
    keys = [codec.JoinKeySpec("user_id", "INT64"), codec.JoinKeySpec("a_name", "STRING")]
    got = _split(codec.encode_entity_keys({"user_id": pa.array(users), "a_name": pa.array(names)}, keys, "p"))
    assert got == [serialize_entity_key(EntityKey(join_keys=["user_id", "a_name"], entity_values=[
        Value(int64_val=u), Value(string_val=s)]), 3) + b"p" for u, s in zip(users, names)]


def test_compiled_restore_writer_is_built() -> None:
    """``make install`` compiles the C writer (the NumPy one is only a fallback)."""
    assert dump.compiled is not None, "featurepipe/core/_native.c was not compiled: reinstall with a C compiler"


def test_crc64_is_redis_checksum() -> None:
    flat = np.frombuffer(b"123456789" + b"x" * 100, dtype=np.uint8)
    crc = dump.crc64(flat, np.array([0, 9, 109]))
    assert int(crc[0]) == 0xE9C6D914C4B8D9CA  # CRC-64/Redis check value
    assert dump.compiled.crc64(b"123456789") == 0xE9C6D914C4B8D9CA
    ref = 0
    table = [0] * 256
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x95AC9329AC4BC9B5 if c & 1 else 0)
        table[i] = c
    for b in b"x" * 100:
        ref = table[(ref ^ b) & 0xFF] ^ (ref >> 8)
    assert int(crc[1]) == ref


def test_decimal_and_varint_pieces() -> None:
    values = np.array([0, 9, 10, 99, 100, 12345678901234567890], dtype=np.uint64)
    assert _split(rows.decimal(values, b"$", b"\r\n")) == [b"$%d\r\n" % int(v) for v in values]
    from google.protobuf.internal.encoder import _VarintBytes

    ints = np.array([0, 1, 127, 128, 300, 2**63 - 1], dtype=np.uint64)
    assert _split(rows.varint(ints)) == [_VarintBytes(int(v)) for v in ints]


def _reference_restore(key: bytes, items: list[bytes], ttl_ms: int) -> bytes:
    """RESTORE of a hash in plain Python, from the listpack and RDB specs (no NumPy)."""
    def backlen(n: int) -> bytes:
        size = 1 if n <= 127 else 2 if n < 16383 else 3 if n < 2097151 else 4 if n < 268435455 else 5
        return bytes(((n >> (7 * (size - 1 - j))) & 0x7F) | (0x80 if j else 0) for j in range(size))

    def entry(b: bytes) -> bytes:
        n = len(b)
        head = bytes([0x80 | n]) if n < 64 else bytes([0xE0 | n >> 8, n & 0xFF]) if n < 4096 else (
            b"\xf0" + n.to_bytes(4, "little"))
        return head + b + backlen(len(head) + n)

    body = b"".join(entry(x) for x in items)
    lp = (len(body) + 7).to_bytes(4, "little") + len(items).to_bytes(2, "little") + body + b"\xff"
    n = len(lp)
    rdb_len = bytes([n]) if n < 64 else bytes([0x40 | n >> 8, n & 0xFF]) if n < 16384 else (
        b"\x80" + n.to_bytes(4, "big"))
    payload = b"\x10" + rdb_len + lp + (10).to_bytes(2, "little")
    crc = 0
    for byte in payload:
        c = (crc ^ byte) & 0xFF
        for _ in range(8):
            c = (c >> 1) ^ (0x95AC9329AC4BC9B5 if c & 1 else 0)
        crc = c ^ (crc >> 8)
    payload += crc.to_bytes(8, "little")
    ttl = str(ttl_ms).encode()
    return b"*4\r\n$7\r\nRESTORE\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(key), key, len(ttl), ttl, len(payload), payload)


@pytest.mark.parametrize("use_compiled", [True, False], ids=["C", "numpy"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_restore_commands_equal_a_plain_python_reference(use_compiled: bool, seed: int) -> None:
    """Both RESTORE writers, C and NumPy (every listpack header and backlen size, empty
    values, the CRC), against a plain-Python construction from the specs; Redis itself
    checks the same bytes in the content tests above (DUMP equality with Feast's HSETs)."""
    rng = np.random.default_rng(seed)
    n = 12
    values = [rows.Piece(rng.integers(0, 256, (n, w), dtype=np.uint8), rng.integers(0, w + 1, n))
              for w in (0, 1, 63, 64, 200, 5000)]
    keys = rows.Piece(rng.integers(0, 256, (n, 30), dtype=np.uint8), rng.integers(1, 31, n))
    ts = rows.Piece(rng.integers(0, 256, (n, 11), dtype=np.uint8), rng.integers(0, 12, n))
    fields = [bytes([65 + j]) * (3 + 20 * j) for j in range(len(values))]
    got = dump.restore_commands(keys, [b"_ts:x", *fields], [ts, *values], 3_600_000, use_compiled=use_compiled)
    key_rows, ts_rows, value_rows = _split(keys), _split(ts), [_split(v) for v in values]
    expected = b"".join(
        _reference_restore(key_rows[i], [b"_ts:x", ts_rows[i], *(x for f, v in zip(fields, value_rows)
                                                                  for x in (f, v[i]))], 3_600_000)
        for i in range(n)
    )
    assert got == expected


def test_compiled_writer_refuses_inconsistent_input() -> None:
    """The C writer checks its arrays instead of reading past them."""
    keys = rows.Piece(np.zeros((2, 4), np.uint8), np.array([4, 4]))
    good = rows.Piece(np.zeros((2, 3), np.uint8), np.array([3, 1]))
    assert dump.restore_commands(keys, [b"a"], [good], 0).startswith(b"*4\r\n$7\r\nRESTORE\r\n")
    for bad, message in [
        (rows.Piece(np.zeros((2, 3), np.uint8), np.array([4, 1])), "value length out of range"),
        (rows.Piece(np.zeros((3, 3), np.uint8), np.array([1, 1, 1])), "one row per key"),
    ]:
        with pytest.raises(ValueError, match=message):
            dump.restore_commands(keys, [b"a"], [bad], 0)
    with pytest.raises(ValueError, match="key length out of range"):
        dump.restore_commands(rows.Piece(np.zeros((2, 4), np.uint8), np.array([5, 4])), [b"a"], [good], 0)
    with pytest.raises(ValueError, match="as many fields as values"):
        dump.restore_commands(keys, [b"a", b"b"], [good], 0)


def test_redis_connection_forms() -> None:
    assert redis_connection_kwargs("10.0.0.5:6380,db=2,password=s3cret,ssl=true") == {
        "host": "10.0.0.5", "port": 6380, "db": 2, "password": "s3cret", "ssl": True}
    assert redis_connection_kwargs("redis://:pw@h:1/3") == {"host": "h", "port": 1, "db": 3, "password": "pw"}
    assert redis_connection_kwargs("rediss://u:pw@h:7/0")["ssl"] is True
    from featurepipe.errors import InvalidInput

    with pytest.raises(InvalidInput, match="exactly one host"):
        redis_connection_kwargs("a:1,b:2")


def test_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    from featurepipe.errors import BackendUnavailable
    from featurepipe.online.latest import Column, LatestQuery
    from featurepipe.online.window import ViewPlan, WindowOptions, materialize_window
    from featurepipe.redis_server import free_port

    pq.write_table(pa.table({"k": [1, 2], "v": [1.0, 2.0], "event_timestamp": pa.array(
        [datetime(2026, 1, 1, tzinfo=timezone.utc)] * 2, pa.timestamp("us", tz="UTC"))}), tmp_path / "t.parquet")
    plan = ViewPlan(view="v", project="p", query=LatestQuery(
        path=str(tmp_path / "*.parquet"), timestamp="event_timestamp",
        join_keys=[Column("k", "k", "INT64")], features=[Column("v", "v", "DOUBLE")]))
    client = redis.Redis(port=free_port(), socket_connect_timeout=1)
    with pytest.raises(BackendUnavailable, match="cannot reach Redis"):
        materialize_window(plan, EPOCH, datetime(2027, 1, 1, tzinfo=timezone.utc), client,
                           WindowOptions(progress=False, quarantine_dir=tmp_path / "q"))
