"""The streaming engine against a real Redis and a real Feast repo.

Oracles: the batch backfill's rows (the kernel's change-point rows,
:func:`featurepipe.core.windows.change_point_sql`) over the same events, and a brute-force
reference (each window's events filtered at each instant, ``tests/window_oracle.py``). The stream gets the
events shuffled (out of order within the allowed lateness), mixed with bad messages, late
events and resent duplicates, and must end with the kernel's rows, value for value, in its
offline log; online, each key's row in force at its newest event + 1 us in Feast's fields
(read back through Feast) and the kernel's rows from there on in its schedule field.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
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
import pytest
import redis
import redis.crc

from featurepipe.core.windows import KERNEL_VERSION
from tests.conftest import deployed_repo, redis_url_feast
from tests.kafka_broker import kafka_bootstrap  # noqa: F401  (fixture)

ROWS, DAYS = 6_000, 3
LATENESS = timedelta(minutes=30)


@dataclass
class StreamRepo:
    repo: Path
    data: Path
    store: Any
    events: pa.Table  # the generated transactions, in event-time order
    batch: dict[str, pa.Table]  # the backfill's rows per view (the kernel's over all the events)
    redis_url: str


VIEWS = ("user_transaction_stats", "merchant_activity")


def _kernel_rows(con: duckdb.DuckDBPyConnection, store: Any, view_name: str, events: str,
                 start_us: int | None = None) -> pa.Table:
    """The kernel's change-point rows of a view over the relation ``events`` (with ``v >=
    start_us``), ordered as :func:`_rows` orders the stream's offline files."""
    from featurepipe.core.windows import ViewShape, change_point_sql
    from featurepipe.definitions import aggregate_views

    (view,) = aggregate_views(store, [view_name])
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {events}").fetchall()}
    shape = ViewShape(view.join_keys, view.timestamp_field, view.aggregations, types)
    where = f"WHERE epoch_us(event_timestamp) >= {start_us}" if start_us is not None else ""
    return con.sql(f"SELECT * FROM ({change_point_sql(shape, events)}) {where} "
                   f"ORDER BY {', '.join(view.join_keys)}, event_timestamp").to_arrow_table()


def _base_url(url: str) -> str:
    return url.rsplit("/", 1)[0] if url.count("/") > 2 else url


@pytest.fixture(scope="module")
def stream_repo(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[StreamRepo]:
    """A copy of feature_repo with its own data: generated events, feast apply, the batch
    backfill (its default range: every change point, down to every window empty), which
    is the kernel's rows over all the events."""
    from featurepipe.config import load_store
    from featurepipe.jobs.backfill import backfill

    url = _base_url(redis_url) + "/3"
    with deployed_repo(tmp_path_factory.mktemp("stream"), url, ROWS, DAYS, seed=11) as (repo, data):
        store = load_store(repo)
        backfill(store, progress=False, quality=False)
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        raw = f"read_parquet('{data}/raw/transactions/**/*.parquet', hive_partitioning = true)"
        events = con.sql(
            f"SELECT * EXCLUDE (date) FROM {raw} ORDER BY event_timestamp, transaction_id"
        ).to_arrow_table()
        batch = {view: _rows(data / "offline" / view, "part-*") for view in VIEWS}
        for view in VIEWS:
            _assert_same_rows(batch[view], _kernel_rows(con, store, view, raw), view)
        yield StreamRepo(repo, data, store, events, batch, url)


def _rows(folder: Path, pattern: str) -> pa.Table:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    key = "user_id" if "user" in folder.name else "merchant_id"
    return con.sql(
        f"SELECT * EXCLUDE (date) FROM read_parquet('{folder}/date=*/{pattern}.parquet', hive_partitioning = true) "
        f"ORDER BY {key}, event_timestamp"
    ).to_arrow_table()


def _payloads(events: pa.Table) -> list[bytes]:
    from featurepipe.stream.runner import event_payloads

    return list(event_payloads(events))


def _shuffled(events: pa.Table, seed: int) -> list[bytes]:
    """Messages in an order where each event may arrive after events up to 0.9 x lateness newer."""
    rng = np.random.default_rng(seed)
    ts = events.column("event_timestamp").cast(pa.int64()).to_numpy()
    jitter = rng.uniform(0, 0.9 * LATENESS.total_seconds() * 1e6, len(ts))
    order = np.argsort(ts + jitter, kind="stable")
    payloads = _payloads(events)
    return [payloads[i] for i in order]


def _with_bad_messages(messages: list[bytes], events: pa.Table, seed: int) -> tuple[list[bytes], int]:
    """Insert malformed messages, rule breakers, late events and resent duplicates; return
    the messages and how many of them must end in the dead letters."""
    rng = random.Random(seed)
    first = events.slice(0, 1).to_pylist()[0]
    bad: list[bytes] = [
        b"{not json", b"", b"[1, 2, 3]", b'{"transaction_id": "abc", "user_id": 1}',
        json.dumps({**_jsonable(first), "transaction_id": 10**9 + 1, "amount": -5.0}).encode(),  # out of range
        json.dumps({**_jsonable(first), "transaction_id": 10**9 + 2, "user_id": None}).encode(),  # null key
        json.dumps({**_jsonable(first), "transaction_id": 10**9 + 3, "category": "weapons"}).encode(),
    ]
    out = list(messages)
    for b in bad:
        out.insert(rng.randrange(len(out) // 10, len(out)), b)
    # resent duplicates: a copy of a message shortly after the original
    for _ in range(5):
        i = rng.randrange(len(out) // 2)
        if out[i].startswith(b'{"transaction_id"') and b"abc" not in out[i]:
            out.insert(i + rng.randrange(1, 5), out[i])
            bad.append(out[i])
    # late: an event a day older than the stream has reached, near the end
    late = json.dumps({**_jsonable(first), "transaction_id": 10**9 + 4}).encode()
    out.insert(len(out) - 10, late)
    bad.append(late)
    return out, len(bad)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items() if v is not None}


def _publish(url: str, stream: str, messages: list[bytes]) -> None:
    from featurepipe.stream.source import publish_redis

    client = redis.Redis.from_url(_base_url(url) + "/0")
    client.delete(stream)
    publish_redis(client, stream, messages)
    client.close()


def _options(job: str, **kw: Any) -> Any:
    from featurepipe.stream.engine import StreamOptions

    kw.setdefault("archive_raw", False)
    kw.setdefault("source", "transactions")
    return StreamOptions(job=job, allowed_lateness=LATENESS, progress=False, **kw)


def _run(sr: StreamRepo, stream: str, options: Any, sink_db: int = 3) -> Any:
    from featurepipe.stream.engine import StreamJob
    from featurepipe.stream.runner import open_source

    source = open_source(options, stream=stream, stream_url=_base_url(sr.redis_url) + "/0")
    job = StreamJob(sr.store, source, redis.Redis.from_url(_base_url(sr.redis_url) + f"/{sink_db}"), options)
    try:
        return job.run()
    finally:
        job.close()


def _assert_same_rows(stream_rows: pa.Table, batch_rows: pa.Table, view: str) -> None:
    assert stream_rows.num_rows == batch_rows.num_rows, (view, stream_rows.num_rows, batch_rows.num_rows)
    assert stream_rows.schema.names == batch_rows.schema.names
    for name in batch_rows.schema.names:
        a, b = stream_rows.column(name), batch_rows.column(name)
        if not a.equals(b):
            diff = [i for i, (x, y) in enumerate(zip(a.to_pylist(), b.to_pylist())) if x != y]
            raise AssertionError(f"{view}.{name}: {len(diff)} values differ, first at row {diff[0]}: "
                                 f"stream {a[diff[0]]} vs batch {b[diff[0]]}")


def test_stream_equals_batch_out_of_order_with_bad_messages(stream_repo: StreamRepo) -> None:
    sr = stream_repo
    messages, expected_dead = _with_bad_messages(_shuffled(sr.events, seed=1), sr.events, seed=2)
    _publish(sr.redis_url, "parity", messages)
    result = _run(sr, "parity", _options("parity", max_events=len(messages), final=True, max_batch=700,
                                          checkpoint_seconds=0.2))
    c = result.counters
    assert c.messages == len(messages)
    assert c.accepted == sr.events.num_rows
    assert c.dead == expected_dead, (c.dead, expected_dead)
    assert c.late == 1 and c.duplicate == 5
    assert c.accepted + c.dead == c.messages  # reconciliation: nothing lost
    for view, batch_rows in sr.batch.items():
        _assert_same_rows(_rows(sr.data / "offline" / view, "stream-parity-w0-*"), batch_rows, view)
    # every dead letter is kept, with its reason
    dead = duckdb.sql(
        f"SELECT quality_check, quality_reason, payload FROM read_parquet('{sr.data}/quarantine/stream/parity/*.parquet')"
    ).fetchall()
    assert len(dead) == expected_dead
    checks = {d[0] for d in dead}
    assert {"decode", "late", "duplicate", "amount.range", "user_id.not_null", "category.allowed"} <= checks, checks
    assert any("not JSON" in d[1] for d in dead) and any("empty message" in d[1] for d in dead)
    # the offline files say which kernel wrote them
    import pyarrow.parquet as pq

    for view in VIEWS:
        files = list((sr.data / "offline" / view).glob("date=*/stream-parity-w0-*.parquet"))
        assert files and all(pq.read_schema(f).metadata[b"featurepipe.kernel"] == str(KERNEL_VERSION).encode() for f in files)
    # online: each key's row in force and its schedule
    _assert_online_in_force(sr, sink_db=3)


def _assert_online_in_force(sr: StreamRepo, sink_db: int, expected: dict[str, pa.Table] | None = None,
                            events: pa.Table | None = None) -> None:
    """Online, each key of ``events`` (default: all) holds its row in force at its newest
    event + 1 us among ``expected``'s rows (default: the kernel's over all events): read
    back through Feast, and in its schedule field, with every later row.

    Feast reads the job's sink database ``sink_db``: featurepipe's online store takes
    ``$REDIS_URL`` before ``connection_string`` (as documented), and ``deployed_repo`` set
    ``REDIS_URL`` to the fixture's database, so the sink is chosen through ``REDIS_URL``
    (setting ``connection_string`` alone would silently read the fixture's database).
    """
    from feast import FeatureStore

    from featurepipe.config import online_connection_string

    events = sr.events if events is None else events
    with pytest.MonkeyPatch.context() as mp:
        sink = _base_url(sr.redis_url) + f"/{sink_db}"
        mp.setenv("REDIS_URL", sink)
        store = FeatureStore(repo_path=str(sr.repo))
        assert online_connection_string(store.config) == redis_url_feast(sink)  # the sink, not the fixture's db
        client = redis.Redis.from_url(sink)
        for view, rows in (expected or sr.batch).items():
            key = rows.schema.names[0]
            features = rows.schema.names[2:]
            schedules = _expected_schedules(rows, events, key)
            in_force = {k: {f: r[f][0] for f in features} for k, r in schedules.items()}
            got = store.get_online_features(
                features=[f"{view}:{f}" for f in features],
                entity_rows=[{key: int(k)} for k in sorted(in_force)],
            ).to_dict()
            for f in features:
                want = [in_force[k][f] for k in sorted(in_force)]
                assert _same(got[f], want), (view, f)
            stored = _stored_schedules(client, store, view, sorted(schedules))
            for k, want_rows in schedules.items():
                sched = stored[k]
                assert sched.v.tolist() == want_rows["__v"], (view, k)
                for f, column in zip(features, sched.columns):
                    assert _same(column.tolist(), want_rows[f]), (view, k, f)
        client.close()


def _same(got: list[Any], want: list[Any]) -> bool:
    """Equal value for value, a null equal to a null or NaN."""
    def norm(x: Any) -> Any:
        return None if x is None or (isinstance(x, float) and x != x) else x
    return [norm(x) for x in got] == [norm(x) for x in want]


def _expected_schedules(rows: pa.Table, events: pa.Table, key: str) -> dict[int, dict[str, list[Any]]]:
    """Per key of ``events``: the kernel rows from its newest event + 1 us on (``__v``
    and one list per feature)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("rows_", rows)
    con.register("events_", events.select([key, "event_timestamp"]))
    table = con.sql(
        f"SELECT r.*, epoch_us(r.event_timestamp) AS __v FROM rows_ r JOIN "
        f"(SELECT {key}, epoch_us(max(event_timestamp)) + 1 AS __in FROM events_ GROUP BY {key}) h "
        f"USING ({key}) WHERE epoch_us(r.event_timestamp) >= h.__in ORDER BY {key}, r.event_timestamp"
    ).to_arrow_table()
    out: dict[int, dict[str, list[Any]]] = {}
    for part in table.to_pylist():
        entry = out.setdefault(part[key], {})
        for name, value in part.items():
            entry.setdefault(name, []).append(value)
    return out


def _stored_schedules(client: redis.Redis, store: Any, view: str, keys: list[int]) -> dict[int, Any]:
    """The decoded ``_fp_sched:<view>`` field of each key, from Redis."""
    from featurepipe.online import codec
    from featurepipe.online.plan import view_plan
    from featurepipe.online.schedule import decode, schedule_field

    plan = view_plan(store.get_feature_view(view), store.config, store.project)
    (join,) = plan.query.join_keys
    piece = codec.encode_entity_keys({join.name: pa.array(keys, pa.int64())}, plan.join_keys, plan.project)
    redis_keys = [bytes(piece.data[i, :piece.row_lengths()[i]]) for i in range(len(keys))]
    pipe = client.pipeline(transaction=False)
    for rk in redis_keys:
        pipe.hget(rk, schedule_field(plan.view))
    names = [f.name for f in plan.features]
    return {k: decode(raw, names) for k, raw in zip(keys, pipe.execute(), strict=True)}


def test_two_workers_split_the_keys(stream_repo: StreamRepo) -> None:
    import threading

    sr = stream_repo
    messages = _shuffled(sr.events, seed=3)
    _publish(sr.redis_url, "split", messages)
    results: dict[int, Any] = {}

    def work(w: int) -> None:
        results[w] = _run(sr, "split", _options("split", worker=w, workers=2, max_events=len(messages), final=True,
                                                  max_batch=2000), sink_db=4)

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert set(results) == {0, 1}
    for view, batch_rows in sr.batch.items():
        parts = [_rows(sr.data / "offline" / view, f"stream-split-w{w}-*") for w in (0, 1)]
        assert parts[0].num_rows and parts[1].num_rows  # both workers own keys
        key = batch_rows.schema.names[0]
        assert not set(parts[0].column(key).to_pylist()) & set(parts[1].column(key).to_pylist())
        union = pa.concat_tables(parts).sort_by([(key, "ascending"), ("event_timestamp", "ascending")])
        _assert_same_rows(union, batch_rows, view)
    _assert_online_in_force(sr, sink_db=4)


def _job_process(repo: str, data: str, url: str, stream: str, job: str, total: int, sink_db: int) -> None:
    os.environ.update(FEATUREPIPE_DATA_DIR=data, FEATUREPIPE_REPO=repo, REDIS_URL=url)
    from featurepipe.config import load_store
    from featurepipe.stream.engine import StreamJob
    from featurepipe.stream.runner import open_source

    # small batches and frequent checkpoints: many kill points (mid-batch, mid-checkpoint)
    options = _options(job, max_events=total, final=True, max_batch=40, checkpoint_seconds=0.1,
                       archive_raw=True)
    source = open_source(options, stream=stream, stream_url=_base_url(url) + "/0")
    job_ = StreamJob(load_store(repo), source, redis.Redis.from_url(_base_url(url) + f"/{sink_db}"), options)
    job_.run()
    job_.close()


def _redis_dump(url: str, db: int) -> dict[bytes, dict[bytes, bytes]]:
    """Every hash of database ``db`` but the online writer's RESTORE self-test keys
    (``featurepipe:probe:*``, made and deleted as a run starts: a run killed meanwhile leaves
    them behind, for 60 s or, killed between HSET and PEXPIRE, for good)."""
    client = redis.Redis.from_url(_base_url(url) + f"/{db}")
    out = {k: client.hgetall(k) for k in client.scan_iter(count=1000) if not k.startswith(b"featurepipe:probe:")}
    client.close()
    return out


def test_sigkill_at_random_points_neither_loses_nor_double_counts(stream_repo: StreamRepo) -> None:
    """Killed with SIGKILL again and again, restarted each time: the end state equals an
    uninterrupted run's (Redis hashes, offline log rows, dead letters, raw archive)."""
    sr = stream_repo
    messages, _ = _with_bad_messages(_shuffled(sr.events, seed=5), sr.events, seed=6)
    _publish(sr.redis_url, "crash", messages)
    ctx = multiprocessing.get_context("fork")
    args = (str(sr.repo), str(sr.data), sr.redis_url, "crash")
    for db in (5, 6):
        redis.Redis.from_url(_base_url(sr.redis_url) + f"/{db}").flushdb()
    reference = ctx.Process(target=_job_process, args=(*args, "calm", len(messages), 5))
    started = time.monotonic()
    reference.start()
    reference.join(240)
    assert reference.exitcode == 0
    calm_seconds = time.monotonic() - started
    rng = random.Random(7)
    kills = 0
    for _attempt in range(60):
        proc = ctx.Process(target=_job_process, args=(*args, "killed", len(messages), 6))
        proc.start()
        if kills < 12:
            # each of the first 12 runs lives at most calm/15: together they cannot finish the
            # job, and some die before their first checkpoint, some mid-checkpoint
            proc.join(rng.uniform(0.2, max(0.3, calm_seconds / 15)))
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                kills += 1
                continue
        else:
            proc.join(max(60.0, 4 * calm_seconds))
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                pytest.fail(f"the restarted job did not finish in {max(60.0, 4 * calm_seconds):.0f} s "
                            f"(calm run {calm_seconds:.1f} s): messages were lost across a restart?")
        assert proc.exitcode == 0
        break
    assert kills >= 10, f"only {kills} kills before the job finished (calm run {calm_seconds:.1f} s)"
    manifest = json.loads((sr.data / "stream" / "killed" / "w0" / "checkpoint.json").read_text())
    assert manifest["counters"]["messages"] == len(messages)
    assert _redis_dump(sr.redis_url, 6) == _redis_dump(sr.redis_url, 5)
    for view in sr.batch:
        calm = _rows(sr.data / "offline" / view, "stream-calm-w0-*")
        killed = _rows(sr.data / "offline" / view, "stream-killed-w0-*")
        _assert_same_rows(killed, calm, view)
        _assert_same_rows(killed, sr.batch[view], view)
    for pattern in ("quarantine/stream/{job}/*.parquet", "raw/transactions/date=*/stream-{job}-w0-*.parquet"):
        q = ("SELECT * EXCLUDE (received_at) FROM read_parquet('{}') ORDER BY ALL" if "quarantine" in pattern
             else "SELECT * FROM read_parquet('{}') ORDER BY ALL")
        calm = duckdb.sql(q.format(sr.data / pattern.format(job="calm"))).fetchall()
        killed = duckdb.sql(q.format(sr.data / pattern.format(job="killed"))).fetchall()
        assert calm == killed, pattern
        assert len(calm) > 0
    for f in (sr.data / "raw" / "transactions").glob("date=*/stream-*.parquet"):
        f.unlink()  # the archived copies would double the history later tests read


def test_stream_errors_are_clear(stream_repo: StreamRepo) -> None:
    from featurepipe.errors import InvalidInput
    from featurepipe.stream.engine import StreamJob, StreamOptions

    sr = stream_repo
    with pytest.raises(InvalidInput, match="does not exist"):
        _run(sr, "no-such-stream", _options("missing", max_events=1))
    with pytest.raises(InvalidInput, match="worker must be in"):
        StreamOptions(source="transactions", worker=2, workers=2)
    from featurepipe.stream.runner import open_source

    with pytest.raises(InvalidInput, match="no data source 'nope'"):
        StreamJob(sr.store, open_source(_options("x")), redis.Redis.from_url(sr.redis_url),
                  _options("x", source="nope"))


def test_kafka_path_equals_batch(stream_repo: StreamRepo, kafka_bootstrap: str) -> None:  # noqa: F811
    """The same job reading a 2-partition Kafka topic (a real Kafka-protocol broker, Tansu)."""
    from featurepipe.stream.engine import StreamJob
    from featurepipe.stream.kafka import KafkaSource, create_topic, publish_kafka

    sr = stream_repo
    messages, expected_dead = _with_bad_messages(_shuffled(sr.events, seed=8), sr.events, seed=9)
    create_topic(kafka_bootstrap, "parity", partitions=2)
    # messages of one transaction id share a partition, so a resent duplicate follows its original
    publish_kafka(kafka_bootstrap, "parity", messages, key_of=lambda p: p[:40])
    options = _options("kafka", max_events=len(messages), final=True, max_batch=1000, checkpoint_seconds=0.5)
    source = KafkaSource(kafka_bootstrap, "parity", "featurepipe-kafka-w0", session_timeout_ms=6000)
    job = StreamJob(sr.store, source, redis.Redis.from_url(_base_url(sr.redis_url) + "/7"), options)
    try:
        result = job.run()
    finally:
        job.close()
    c = result.counters
    assert c.messages == len(messages) and c.accepted == sr.events.num_rows and c.dead == expected_dead
    for view, batch_rows in sr.batch.items():
        _assert_same_rows(_rows(sr.data / "offline" / view, "stream-kafka-w0-*"), batch_rows, view)
    _assert_online_in_force(sr, sink_db=7)


def test_cli_sigterm_checkpoints_and_exposes_metrics(stream_repo: StreamRepo) -> None:
    """`featurepipe stream run` as a user starts it: Prometheus metrics on 127.0.0.1, a
    progress line, SIGTERM finishes cleanly with a checkpoint, a restart resumes after it."""
    from prometheus_client.parser import text_string_to_metric_families

    sr = stream_repo
    n = 2_000
    _publish(sr.redis_url, "cli", _payloads(sr.events.slice(0, n)))
    env = {**os.environ, "REDIS_URL": _base_url(sr.redis_url) + "/8"}
    base = [sys.executable, "-m", "featurepipe.cli", "stream", "run", "--repo", str(sr.repo), "--stream", "cli",
            "--stream-url", _base_url(sr.redis_url) + "/0", "--job", "cli", "--no-archive-raw", "--no-bootstrap", "--lateness", "30m"]
    cmd = [*base, "--metrics-port", "0", "--checkpoint-interval", "500ms"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("metrics: http://127.0.0.1:"), line
        url = line.split()[1]
        import urllib.request

        deadline = time.monotonic() + 120
        values: dict[str, float] = {}
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                      if not s.labels.get("le")}
            if values.get("featurepipe_stream_messages_total") == n and "featurepipe_stream_consumer_lag" in values:
                break
            time.sleep(0.3)
        assert values.get("featurepipe_stream_messages_total") == n, values
        assert values.get("featurepipe_stream_events_accepted_total") == n
        assert values["featurepipe_stream_consumer_lag"] == 0
        assert values["featurepipe_stream_event_to_online_seconds_count"] > 0
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert f"{n:,} messages this run" in out
    assert "events" in err and "watermark" in err  # the progress line
    manifest = json.loads((sr.data / "stream" / "cli" / "w0" / "checkpoint.json").read_text())
    assert manifest["counters"]["messages"] == n
    # more events; the restarted job reads only those
    _append = _payloads(sr.events.slice(n, 500))
    from featurepipe.stream.source import publish_redis

    publish_redis(redis.Redis.from_url(_base_url(sr.redis_url) + "/0"), "cli", _append)
    again = subprocess.run([*base, "--idle-timeout", "2s", "--no-progress"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "500 messages this run" in again.stdout, again.stdout
    manifest = json.loads((sr.data / "stream" / "cli" / "w0" / "checkpoint.json").read_text())
    assert manifest["counters"]["messages"] == n + 500


def test_new_job_bootstraps_from_history(stream_repo: StreamRepo) -> None:
    """A job without a checkpoint starts from the Parquet history: the rows after the
    history's newest event (``v > newest``) are the kernel's over history + live events,
    and online the live keys hold their rows from their newest event on; an event older
    than the history's newest is late (its rows are final already)."""
    sr = stream_repo
    raw = sr.data / "raw" / "transactions"
    newest = sr.events.column("event_timestamp").cast(pa.int64()).to_numpy().max()
    tail = sr.events.slice(sr.events.num_rows - 300).to_pandas()
    shift = tail["event_timestamp"].max() - tail["event_timestamp"].min() + timedelta(hours=1)
    tail["event_timestamp"] = tail["event_timestamp"] + shift  # all after the history's newest
    tail["transaction_id"] = tail["transaction_id"] + 10**8
    old = tail.iloc[:1].copy()
    old["event_timestamp"] = old["event_timestamp"] - shift - timedelta(hours=1)
    old["transaction_id"] = old["transaction_id"] + 10**7
    live = pa.Table.from_pandas(tail, preserve_index=False)
    messages = _payloads(live)
    messages.insert(150, _payloads(pa.Table.from_pandas(old, preserve_index=False))[0])
    _publish(sr.redis_url, "boot", messages)
    result = _run(sr, "boot", _options("boot", max_events=len(messages), final=True, bootstrap=True,
                                        archive_raw=True), sink_db=9)
    try:
        c = result.counters
        assert c.accepted == 300 and c.late == 1, c
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        everything = f"read_parquet('{raw}/**/*.parquet', hive_partitioning = true)"  # history + archived live events
        expected = {}
        for view in VIEWS:
            oracle = _kernel_rows(con, sr.store, view, everything, start_us=int(newest) + 1)
            assert oracle.num_rows > 0
            _assert_same_rows(_rows(sr.data / "offline" / view, "stream-boot-w0-*"), oracle, view)
            expected[view] = oracle
        _assert_online_in_force(sr, sink_db=9, expected=expected, events=live)
    finally:
        for f in raw.glob("date=*/stream-boot-*.parquet"):
            f.unlink()


def _random_events(sr: StreamRepo, n: int, seed: int) -> pa.Table:
    """``n`` events of the fixture's schema over 10 days for 25 users and 6 merchants,
    with times on the 5-minute grid (hop boundaries; ties within a key), the minute grid,
    1 us before a grid point, and anywhere."""
    rng = np.random.default_rng(seed)
    base = sr.events.slice(0, n)
    day = 86_400 * 10**6
    t0 = (int(sr.events.column("event_timestamp").cast(pa.int64()).to_numpy().min()) // day) * day
    kind = rng.integers(0, 4, n)
    five, minute = 300 * 10**6, 60 * 10**6
    t = np.where(kind == 0, rng.integers(0, 10 * day // five, n) * five,
                 np.where(kind == 1, rng.integers(0, 10 * day // minute, n) * minute,
                          np.where(kind == 2, rng.integers(1, 10 * day // five, n) * five - 1,
                                   rng.integers(0, 10 * day, n)))) + t0
    users = rng.choice(np.unique(base.column("user_id").to_numpy())[:25], n)
    merchants = rng.choice(np.unique(base.column("merchant_id").to_numpy())[:6], n)

    def replace(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
        return table.set_column(table.schema.get_field_index(name), name, values)

    out = replace(base, "event_timestamp", pa.array(t, pa.int64()).cast(base.schema.field("event_timestamp").type))
    out = replace(out, "user_id", pa.array(users, pa.int64()))
    out = replace(out, "merchant_id", pa.array(merchants, pa.int64()))
    return replace(out, "transaction_id", pa.array(np.arange(n) + 5 * 10**8, pa.int64()))


def test_stream_windows_equal_kernel_and_brute_force_at_many_instants(stream_repo: StreamRepo) -> None:
    """Random events (ties, hop boundaries, out of order within the lateness, a few beyond
    it) through small micro-batches and frequent checkpoints: (a) the offline rows the job
    finalised are the kernel's rows over the admitted events, bit for bit, and a sample of
    them the brute-force reference's values at their change point; (b) each key's schedule
    written online, decoded and asked at many instants (every change point, 1 us before
    it, random instants up to a day after the last), gives the brute-force reference's
    values there; its first row is in force at the key's newest event + 1 us, also in
    Feast's fields."""
    from featurepipe.definitions import aggregate_views
    from tests.window_oracle import Event, differences, values_at

    sr = stream_repo
    events = _random_events(sr, 2_000, seed=21)
    ts = events.column("event_timestamp").cast(pa.int64()).to_numpy()
    rng = np.random.default_rng(22)
    arrival = np.argsort(ts + rng.uniform(0, 0.9 * LATENESS.total_seconds() * 1e6, len(ts)), kind="stable")
    too_late = [int(i) for i in rng.choice(np.flatnonzero(ts < ts.max() - 2 * 86_400 * 10**6), 4, replace=False)]
    order = [int(i) for i in arrival if int(i) not in too_late] + too_late  # sent last: beyond the lateness
    payloads = _payloads(events)
    _publish(sr.redis_url, "windows", [payloads[i] for i in order])
    redis.Redis.from_url(_base_url(sr.redis_url) + "/10").flushdb()
    result = _run(sr, "windows", _options("windows", max_events=len(order), final=True, max_batch=50,
                                           checkpoint_seconds=0.05), sink_db=10)
    assert result.counters.late == len(too_late) and result.counters.accepted == len(order) - len(too_late)
    admitted = events.filter(pa.array(~np.isin(np.arange(len(ts)), too_late)))
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("admitted", admitted)
    expected = {view: _kernel_rows(con, sr.store, view, "admitted") for view in VIEWS}
    # (a) offline: the kernel's rows, bit for bit
    for view in VIEWS:
        _assert_same_rows(_rows(sr.data / "offline" / view, "stream-windows-w0-*"), expected[view], view)
    # online: Feast's fields and the schedules (rows from each key's newest event + 1 us)
    _assert_online_in_force(sr, sink_db=10, expected=expected, events=admitted)
    # (a) and (b) against the brute-force reference
    client = redis.Redis.from_url(_base_url(sr.redis_url) + "/10")
    types = {r[0]: r[1] for r in con.execute("DESCRIBE SELECT * FROM admitted").fetchall()}
    asked = 0
    for view in aggregate_views(sr.store, list(VIEWS)):
        (key,) = view.join_keys
        by_key: dict[int, list[Event]] = {}
        for row in admitted.select([key, "event_timestamp", "amount"]).to_pylist():
            t_us = int((row["event_timestamp"] - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1))
            by_key.setdefault(row[key], []).append(Event((row[key],), t_us, {"amount": row["amount"]}))

        def reference(k: int, t_us: int, by_key: dict[int, list[Event]] = by_key,
                      aggs: Any = view.aggregations) -> dict[str, Any]:
            return values_at(by_key[k], aggs, types, (k,), t_us, timestamp_field="event_timestamp")

        offline = expected[view.name].to_pylist()
        for row in [offline[i] for i in rng.choice(len(offline), 300, replace=False)]:
            v_us = int((row["event_timestamp"] - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1))
            got = {a.name: row[a.name] for a in view.aggregations}
            assert not differences(got, reference(row[key], v_us)), (view.name, row)
        schedules = _stored_schedules(client, sr.store, view.name, sorted(by_key))
        for k, sched in schedules.items():
            assert int(sched.v[0]) == max(e.t_us for e in by_key[k]) + 1
            v = sched.v.astype(np.int64)
            instants = np.unique(np.concatenate([v, v[1:] - 1, rng.integers(v[0], v[-1] + 86_400 * 10**6, 20)]))
            for t_us in instants.tolist():
                i = sched.row_at(t_us)
                assert i >= 0
                got = {a.name: _stored_value(sched.columns[j][i]) for j, a in enumerate(view.aggregations)}
                diff = differences(got, reference(k, t_us))
                assert not diff, (view.name, k, t_us, diff)
                asked += 1
    client.close()
    assert asked > 2_000


def _stored_value(x: Any) -> Any:
    """A schedule cell as the reference gives it: an int, a float, None for NaN."""
    if isinstance(x, np.integer):
        return int(x)
    x = float(x)
    return None if x != x else x


def test_the_stream_job_writes_into_a_redis_cluster(stream_repo: StreamRepo) -> None:
    """The same events through the stream job with the online store on a 3-node Redis
    Cluster: each key (on the primary owning its slot) holds exactly what the job writes
    into one server."""
    from redis.cluster import ClusterNode, RedisCluster

    from featurepipe.redis_server import RedisClusterServers
    from featurepipe.stream.engine import StreamJob
    from featurepipe.stream.runner import open_source

    sr = stream_repo
    messages = _payloads(sr.events)
    _publish(sr.redis_url, "to-cluster", messages)
    single = redis.Redis.from_url(_base_url(sr.redis_url) + "/9")
    single.flushdb()
    options = {"max_events": len(messages), "max_batch": 900, "checkpoint_seconds": 0.5}
    _run(sr, "to-cluster", _options("to-single", **options), sink_db=9)
    expected = _redis_dump(sr.redis_url, 9)
    assert expected
    with RedisClusterServers() as cluster:
        client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster.ports])
        source = open_source(_options("to-cluster"), stream="to-cluster", stream_url=_base_url(sr.redis_url) + "/0")
        job = StreamJob(sr.store, source, client, _options("to-cluster", **options))
        try:
            result = job.run()
        finally:
            job.close()
        assert result.counters.accepted == sr.events.num_rows
        got: dict[bytes, dict[bytes, bytes]] = {}
        for i, port in enumerate(cluster.ports):
            first, last = cluster.slot_ranges(i)
            node = redis.Redis(port=port)
            keys = [k for k in node.scan_iter(count=1000) if not k.startswith(b"featurepipe:probe:")]
            assert keys and all(first <= redis.crc.key_slot(k) <= last for k in keys)
            got.update({k: node.hgetall(k) for k in keys})
    assert got == expected
