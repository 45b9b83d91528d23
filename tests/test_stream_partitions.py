"""Partitioned stream workers on a Kafka consumer group (a real Kafka-protocol broker, Tansu,
and a real Redis), started as a user starts them: ``featurepipe stream run --partitioned``.

The oracle is a single worker of another group on the same keyed topics: the group's
workers, one of them SIGKILLed mid-run (the other takes its partitions over) and a third
joining mid-run (partitions move to it), must leave Redis, the offline log, the dead
letters and the raw archive exactly as the single worker does; and the single worker's
offline rows are the batch backfill's. The route test checks a raw topic's events once and
keys them, then routes them all again (a route that crashed before its checkpoint): the
workers drop the second copies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from featurepipe.stream.keys import keyed_topic
from tests.kafka_broker import kafka_bootstrap  # noqa: F401  (fixture)
from tests.test_stream import (
    LATENESS,
    VIEWS,
    StreamRepo,
    _assert_same_rows,
    _base_url,
    _kernel_rows,
    _redis_dump,
    _rows,
    _shuffled,
    _with_bad_messages,
    stream_repo,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.integration

PARTITIONS = 4
KEYS = (("merchant_id",), ("user_id",))  # the demo's views: merchant_activity, user_transaction_stats


def _publish_keyed(bootstrap: str, base: str, messages: list[bytes]) -> None:
    """Each message to the keyed topic of each key, keyed by the event's key (no key when
    the message has none: the producer places it anywhere)."""
    from featurepipe.stream.kafka_topics import KeyedProducer

    producer = KeyedProducer(bootstrap, [keyed_topic(base, k) for k in KEYS])
    for payload in messages:
        try:
            event = json.loads(payload)
        except ValueError:
            event = {}
        for keys in KEYS:
            value = event.get(keys[0]) if isinstance(event, dict) else None
            producer.produce(keyed_topic(base, keys), payload, None if value is None else str(value).encode())
    producer.flush()


class Worker:
    """``featurepipe stream run --partitioned`` in a process of its own, with its metrics."""

    def __init__(self, sr: StreamRepo, bootstrap: str, base: str, job: str, worker: int, total: int,
                 sink_db: int, log: Path) -> None:
        cmd = [sys.executable, "-m", "featurepipe.cli", "stream", "run", "--repo", str(sr.repo),
               "--kafka", bootstrap, "--topic", base, "--partitioned", "--job", job, "--worker", str(worker),
               "--no-bootstrap", "--lateness", "30m", "--checkpoint-interval", "1500ms", "--max-batch", "300",
               "--max-events", str(total), "--final", "--no-progress", "--metrics-port", "0"]
        env = {**os.environ, "REDIS_URL": _base_url(sr.redis_url) + f"/{sink_db}"}
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("metrics: http://127.0.0.1:"), (line, log.read_text()[-3000:])
        self.url = line.split()[1]

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name:
                    return float(s.value)
        return 0.0

    def finish(self, timeout: float) -> str:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"worker did not finish in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}") from None
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _wait(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)
    return time.monotonic() - started


def _manifests(data: Path, job: str) -> dict[str, dict[str, Any]]:
    out = {}
    for f in (data / "stream" / job).glob("by-*/checkpoint.json"):
        try:
            out[f.parent.name] = json.loads(f.read_text())
        except ValueError:  # being replaced
            continue
    return out


def _dead_letters(data: Path, job: str) -> list[tuple[Any, ...]]:
    return duckdb.sql(
        f"SELECT message_id, partition, payload, quality_check, quality_reason "
        f"FROM read_parquet('{data}/quarantine/stream/{job}/*.parquet') ORDER BY ALL").fetchall()


def _archive(data: Path, job: str) -> list[tuple[Any, ...]]:
    return duckdb.sql(f"SELECT * FROM read_parquet('{data}/raw/transactions/date=*/stream-{job}-*.parquet') "
                      "ORDER BY ALL").fetchall()


def test_group_with_a_killed_and_a_joining_worker_equals_one_worker(
        stream_repo: StreamRepo, kafka_bootstrap: str, tmp_path: Path) -> None:  # noqa: F811
    from featurepipe.stream.kafka_topics import create_topic

    sr = stream_repo
    base = f"tx-{uuid.uuid4().hex[:8]}"
    for keys in KEYS:
        create_topic(kafka_bootstrap, keyed_topic(base, keys), partitions=PARTITIONS)
    messages, _ = _with_bad_messages(_shuffled(sr.events, seed=31), sr.events, seed=32)
    total = len(KEYS) * len(messages)  # every message is in each keyed topic once
    for db in (11, 12):
        redis.Redis.from_url(_base_url(sr.redis_url) + f"/{db}").flushdb()
    cut = [0, len(messages) * 35 // 100, len(messages) * 50 // 100, len(messages) * 70 // 100, len(messages)]
    _publish_keyed(kafka_bootstrap, base, messages[cut[0]:cut[1]])
    started = time.monotonic()

    def worker(job: str, w: int, db: int) -> Worker:
        return Worker(sr, kafka_bootstrap, base, job, w, total, db, tmp_path / f"{job}-w{w}.log")

    oracle = worker("oracle", 0, 12)
    a, b = worker("group", 0, 11), worker("group", 1, 11)
    workers = [oracle, a, b]
    try:
        _wait("worker 0 holds partitions and checkpointed",
              lambda: a.metric("featurepipe_stream_partitions") > 0 and a.metric("featurepipe_stream_checkpoints") > 0
              and a.metric("featurepipe_stream_messages_total") > 0)
        read = a.metric("featurepipe_stream_messages_total")
        _publish_keyed(kafka_bootstrap, base, messages[cut[1]:cut[2]])
        _wait("worker 0 reads on", lambda: a.metric("featurepipe_stream_messages_total") > read, timeout=30)
        read = a.metric("featurepipe_stream_messages_total")
        a.kill()  # mid-run: most likely between two checkpoints
        killed_at = time.monotonic()
        by_a = {name: m for name, m in _manifests(sr.data, "group").items() if m["worker"] == 0}
        held_by_a = set(by_a)
        assert held_by_a, "worker 0 checkpointed no partition"
        unsaved = read - sum(m["counters"]["messages"] for m in by_a.values())
        _publish_keyed(kafka_bootstrap, base, messages[cut[2]:cut[3]])
        _wait("worker 1 takes over every partition", lambda: b.metric("featurepipe_stream_partitions") == 2 * PARTITIONS)
        takeover = time.monotonic() - killed_at
        c = worker("group", 2, 11)
        workers.append(c)
        joined = _wait("worker 2 gets partitions",
                       lambda: c.metric("featurepipe_stream_partitions") > 0
                       and b.metric("featurepipe_stream_partitions") + c.metric("featurepipe_stream_partitions")
                       == 2 * PARTITIONS)
        _publish_keyed(kafka_bootstrap, base, messages[cut[3]:])
        out_b, out_c = b.finish(120), c.finish(120)
        oracle.finish(120)
    finally:
        for w in workers:
            w.kill()
    seconds = time.monotonic() - started
    print(f"group run {seconds:.1f} s; worker 0 killed with at least {unsaved:.0f} messages read since its last "
          f"checkpoints; takeover {takeover:.1f} s after the kill; third worker in {joined:.1f} s")
    # worker 2 did part of the work; worker 1 wrote the partitions worker 0 held
    assert int(out_c.split(" messages this run")[0].rsplit(" ", 1)[1].replace(",", "")) > 0, out_c
    assert "messages this run" in out_b
    after = _manifests(sr.data, "group")
    assert {after[name]["worker"] for name in held_by_a} <= {1, 2} and len(after) == 2 * PARTITIONS
    # both jobs did every message once, with the same outcome
    group_totals = {k: sum(m["counters"][k] for m in after.values()) for k in after[next(iter(after))]["counters"]}
    oracle_m = _manifests(sr.data, "oracle")
    oracle_totals = {k: sum(m["counters"][k] for m in oracle_m.values()) for k in group_totals}
    assert group_totals["messages"] == total
    for name in ("messages", "accepted", "dead", "late", "duplicate", "offline_rows"):
        assert group_totals[name] == oracle_totals[name], (name, group_totals, oracle_totals)
    assert group_totals["accepted"] == len(KEYS) * sr.events.num_rows
    # online: every key's hash equal; offline: the same rows, and the batch backfill's
    assert _redis_dump(sr.redis_url, 11) == _redis_dump(sr.redis_url, 12)
    for view in VIEWS:
        group_rows = _rows(sr.data / "offline" / view, "stream-group-*")
        _assert_same_rows(group_rows, _rows(sr.data / "offline" / view, "stream-oracle-*"), view)
        _assert_same_rows(group_rows, sr.batch[view], view)
    dead = _dead_letters(sr.data, "group")
    assert dead == _dead_letters(sr.data, "oracle")
    checks = {d[3] for d in dead}
    assert {"decode", "late", "duplicate"} <= checks and "partition" not in checks, checks
    archived = _archive(sr.data, "group")
    assert archived == _archive(sr.data, "oracle") and len(archived) == sr.events.num_rows
    for f in (sr.data / "raw" / "transactions").glob("date=*/stream-*.parquet"):
        f.unlink()  # the archived copies would double the history later tests read


def test_route_checks_once_and_workers_drop_what_it_routes_again(
        stream_repo: StreamRepo, kafka_bootstrap: str) -> None:  # noqa: F811
    """A raw topic not keyed by entity: the route dead-letters bad messages once and keys the
    rest into both keyed topics; routed a second time from the start (a route that crashed
    before its checkpoint), the workers drop every second copy; lateness is judged per raw
    partition (the route merges them in any order), and the rows are the kernel's."""
    from featurepipe.stream.engine import StreamJob, StreamOptions
    from featurepipe.stream.kafka_topics import create_topic, publish_kafka
    from featurepipe.stream.keys import partition_of
    from featurepipe.stream.runner import open_source, run_route

    sr = stream_repo
    events = sr.events.slice(0, 1500)
    raw = f"raw-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, raw, partitions=2)
    messages, expected_dead = _with_bad_messages(_shuffled(events, seed=41), events, seed=42)
    # the older half in one raw partition, the newer in the other: however the route
    # interleaves them, each keyed partition is late by nothing the raw partitions are not
    home = partition_of(pa.array([f"k{i}".encode() for i in range(20)], pa.binary()), 2).tolist()
    older, newer = f"k{home.index(0)}", f"k{home.index(1)}"
    sent = iter(range(len(messages)))
    publish_kafka(kafka_bootstrap, raw, messages, key_of=lambda _: older if next(sent) < len(messages) // 2 else newer)
    route_options = StreamOptions(job="routed", source="transactions", max_events=len(messages),
                                  checkpoint_seconds=0.3, max_batch=200, progress=False)
    first = run_route(sr.repo, route_options, bootstrap=kafka_bootstrap, topic=raw, partitions=PARTITIONS,
                      handle_signals=False)
    dead_once = expected_dead - 5 - 1  # the route does not judge duplicates and lateness
    assert first.counters.dead == dead_once and first.counters.accepted == len(messages) - dead_once
    (sr.data / "stream" / "routed" / "route" / "checkpoint.json").unlink()  # as if it crashed before any
    again = run_route(sr.repo, route_options, bootstrap=kafka_bootstrap, topic=raw, partitions=PARTITIONS,
                      handle_signals=False)
    assert again.run_messages == len(messages)
    route_dead = duckdb.sql(f"SELECT count(*) FROM read_parquet('{sr.data}/quarantine/stream/routed/*.parquet')"
                            ).fetchall()[0][0]
    assert route_dead == dead_once  # the replay's dead letters replaced the first's

    routed = 2 * first.counters.accepted  # each routed twice ...
    options = StreamOptions(job="routed", source="transactions", partitioned=True, max_events=len(KEYS) * routed,
                            final=True, allowed_lateness=LATENESS,
                            progress=False, archive_raw=False, checkpoint_seconds=0.5)
    source = open_source(options, bootstrap=kafka_bootstrap, topic=raw, store=sr.store)
    job = StreamJob(sr.store, source, redis.Redis.from_url(_base_url(sr.redis_url) + "/13"), options)
    try:
        result = job.run()
    finally:
        job.close()
    c = result.counters
    assert c.messages == len(KEYS) * routed and c.redelivered == len(KEYS) * first.counters.accepted
    assert c.accepted == len(KEYS) * events.num_rows and c.duplicate == len(KEYS) * 5 and c.late == len(KEYS)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("events", events)
    for view in VIEWS:
        _assert_same_rows(_rows(sr.data / "offline" / view, "stream-routed-*"),
                          _kernel_rows(con, sr.store, view, "events"), view)


def test_partitions_bootstrap_their_own_keys_of_the_history(stream_repo: StreamRepo) -> None:  # noqa: F811
    """A new partitioned job starts from the Parquet history as one worker does: the
    partitions' states together are the worker's, each key in the partition murmur2 gives it."""
    import numpy as np

    from featurepipe.stream.engine import StreamJob, StreamOptions
    from featurepipe.stream.keys import entity_keys, partition_of

    sr = stream_repo
    topics = {keyed_topic("tx", k): k for k in KEYS}

    class KeyedTopics:  # what a job asks of a keyed source before it reads
        name = "kafka:tx"
        key_sets = topics

        def listen(self, listener: Any) -> None: ...
        def partitions(self, topic: str) -> int: return PARTITIONS
        def assigned(self) -> None: return None
        def close(self) -> None: ...

    client = redis.Redis.from_url(sr.redis_url)
    whole = StreamJob(sr.store, KeyedTopics(), client,  # type: ignore[arg-type]
                      StreamOptions(job="boot-one", source="transactions", bootstrap=True, progress=False))
    group = StreamJob(sr.store, KeyedTopics(), client,  # type: ignore[arg-type]
                      StreamOptions(job="boot-group", source="transactions", bootstrap=True, partitioned=True,
                                    progress=False))
    try:
        one = whole.shares[None]
        whole.maker.bootstrap(one)
        group.assigned([f"{t}:{p}" for t in topics for p in range(PARTITIONS)])
        assert len(group.shares) == len(KEYS) * PARTITIONS
        for i, view in enumerate(one.views):
            expected = whole.con.sql(f"SELECT * FROM {one.state.tables[i]} ORDER BY ALL").fetchall()
            assert expected
            got = []
            for share in group.shares.values():
                if i not in share.view_ids:
                    continue
                assert share.finalised_to == one.finalised_to
                table = group.con.sql(f"SELECT * FROM {share.state.tables[share.view_ids.index(i)]}").to_arrow_table()
                assert share.placement is not None
                home = partition_of(entity_keys(table, share.placement.keys), PARTITIONS)
                assert np.all(home == share.placement.partition)
                got += table.to_pylist()
            keys = list(view.needed)
            assert sorted(tuple(r[k] for k in keys) for r in got) == expected, view.spec.name
    finally:
        whole.close()
        group.close()
