"""Partitioned stream workers: messages read and CPU seconds per worker with 1, 2 and 4 workers.

Sets up a temporary copy of ``feature_repo/`` with generated transactions (``feast apply``),
a private ``redis-server`` and a private Kafka-protocol broker (Tansu, as the tests use) on
free loopback ports. For each worker count n, the demo's views (``user_transaction_stats``
keyed by user, ``merchant_activity`` by merchant) read the keyed topics
``<topic>.by-user_id`` and ``<topic>.by-merchant_id`` (``--partitions`` each) in one
consumer group of n workers (``featurepipe stream run --partitioned``, each its own
process). The workers start first; once the group has settled (every partition held),
every event is published to both keyed topics, and the workers run until the group has
done all of them (``--final``: the offline log flushed at the end).

Printed per worker: the messages it read, the CPU seconds its process used from the
publish to its end (its DuckDB and checkpoint threads included; start-up, ``import feast``
and the group join excluded) and its wall seconds; per n, the largest share of messages a
worker read and the CPU per message. Each worker must read only its share: messages per
worker fall as 1/n (the Redis Streams ``--workers`` hash split, by design, has each of its
n workers read every message). On a 2-core machine the wall time stops falling at 2
workers; CPU per worker still falls.

    .venv/bin/python benchmarks/stream_partitions.py                       # 100k events
    .venv/bin/python benchmarks/stream_partitions.py --events 20000        # quick
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CTX = multiprocessing.get_context("fork")
KEYS = (("merchant_id",), ("user_id",))


def setup(base: Path, redis_url: str, n: int) -> tuple[Path, list[bytes], Any]:
    """A feature repo copy with ``n`` generated events applied; the events as messages, in
    event-time order, and as a table."""
    import duckdb

    from featurepipe.config import redis_url_to_feast
    from featurepipe.generate import generate_transactions
    from featurepipe.stream.runner import event_payloads

    repo, data = base / "feature_repo", base / "data"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    os.environ.update(REDIS_URL=redis_url, FEATUREPIPE_DATA_DIR=str(data), FEATUREPIPE_REPO=str(repo))
    days = max(1, round(n / 33_333))
    generate_transactions(n, data / "raw" / "transactions", days=days, seed=3)
    done = subprocess.run([str(Path(sys.executable).parent / "feast"), "--chdir", str(repo), "apply"],
                          env={**os.environ, "FEATUREPIPE_REDIS": redis_url_to_feast(redis_url)},
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    events = con.sql(
        f"SELECT * EXCLUDE (date) FROM read_parquet('{data}/raw/transactions/**/*.parquet', "
        "hive_partitioning = true) ORDER BY event_timestamp, transaction_id"
    ).to_arrow_table()
    print(f"setup: {n:,} events over {days} days", flush=True)
    return repo, list(event_payloads(events)), events


def _worker(repo: Path, redis_url: str, bootstrap: str, base: str, job: str, worker: int, total: int,
            held: Any, go: Any, queue: Any) -> None:
    """One worker of the group: reports the partitions it holds (``held[worker]``) while it
    runs, and its messages and CPU seconds from the publish (``go``) to its end."""
    import redis

    from featurepipe.config import load_store
    from featurepipe.stream.engine import StreamJob, StreamOptions
    from featurepipe.stream.runner import open_source

    store = load_store(repo)
    options = StreamOptions(source="transactions", job=job, worker=worker, partitioned=True, max_events=total,
                            final=True, progress=False, archive_raw=False)
    source = open_source(options, bootstrap=bootstrap, topic=base, store=store)
    job_ = StreamJob(store, source, redis.Redis.from_url(redis_url, socket_timeout=120), options)
    cpu_at_go: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            held[worker] = len(job_.shares)
            if go.value and not cpu_at_go:
                cpu_at_go.append(time.process_time())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = job_.run()
    end_cpu, end_wall = time.process_time(), time.time()
    done.set()
    watcher.join()
    job_.close()
    queue.put((worker, result.run_messages, end_cpu - (cpu_at_go[0] if cpu_at_go else 0.0), end_wall))


def run_group(repo: Path, redis_url: str, bootstrap: str, payloads: list[bytes], events: Any, n: int,
              partitions: int) -> list[tuple[int, int, float, float]]:
    """n workers in one group over freshly published keyed topics; (worker, messages, CPU s,
    wall s from the publish) per worker."""
    from featurepipe.stream.kafka_topics import KeyedProducer, create_topic
    from featurepipe.stream.keys import entity_keys, keyed_topic

    base, job = f"bench{n}", f"bench{n}"
    topics = {keyed_topic(base, k): k for k in KEYS}
    for topic in topics:
        create_topic(bootstrap, topic, partitions=partitions)
    held = CTX.Array("i", n)
    go = CTX.Value("i", 0)
    queue = CTX.Queue()
    total = len(topics) * len(payloads)
    procs = [CTX.Process(target=_worker, args=(repo, redis_url, bootstrap, base, job, w, total, held, go, queue))
             for w in range(n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    while not (sum(held[:]) == len(topics) * partitions and min(held[:]) > 0):
        if time.monotonic() > deadline:
            raise SystemExit(f"the group of {n} did not settle: partitions held {held[:]}")
        time.sleep(0.2)
    go.value = 1
    time.sleep(0.1)  # every worker noted its CPU at the go
    started = time.time()
    producer = KeyedProducer(bootstrap, topics)
    for topic, keys in topics.items():
        for payload, key in zip(payloads, entity_keys(events, keys).to_pylist()):
            producer.produce(topic, payload, key)
    producer.flush()
    published = time.time() - started
    out = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    print(f"  {n} worker(s): published {total:,} messages in {published:.1f} s", flush=True)
    return sorted((w, m, cpu, end - started) for w, m, cpu, end in out)


def partition_sizes(events: Any, keys: tuple[str, ...], partitions: int) -> list[int]:
    """How many events each partition of the topic keyed by ``keys`` holds."""
    import numpy as np

    from featurepipe.stream.keys import entity_keys, partition_of

    return np.bincount(partition_of(entity_keys(events, keys), partitions), minlength=partitions).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4, help="partitions of each keyed topic")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    from featurepipe.redis_server import RedisServer
    from tests.kafka_broker import TansuBroker

    with tempfile.TemporaryDirectory(prefix="bench-partitions-") as tmp, \
            RedisServer(workdir=Path(tmp) / "redis") as server, TansuBroker() as broker:
        repo, payloads, events = setup(Path(tmp), server.url, args.events)
        results = {}
        for n in args.workers:
            results[n] = run_group(repo, server.url, broker.bootstrap, payloads, events, n, args.partitions)
        total = len(KEYS) * len(payloads)
        print(f"\n{args.events:,} events = {total:,} messages ({len(KEYS)} keyed topics x {args.partitions} "
              f"partitions); load {os.getloadavg()[0]:.1f}")
        print("messages per partition (murmur2 of the key): " + "; ".join(
            f"{'.'.join(k)} {partition_sizes(events, k, args.partitions)}" for k in KEYS))
        print(f"{'workers':>7} {'worker':>6} {'messages':>10} {'share':>6} {'CPU s':>7} {'wall s':>7} {'CPU us/msg':>10}")
        base_cpu = None
        for n, rows in results.items():
            for w, messages, cpu, wall in rows:
                print(f"{n:>7} {w:>6} {messages:>10,} {messages / total:>6.2f} {cpu:>7.2f} {wall:>7.1f} "
                      f"{1e6 * cpu / max(messages, 1):>10.1f}")
            most = max(m for _, m, _, _ in rows)
            cpu_max = max(c for _, _, c, _ in rows)
            base_cpu = base_cpu or cpu_max
            print(f"{n:>7} {'max':>6} {most:>10,} {most / total:>6.2f} {cpu_max:>7.2f} "
                  f"{max(x for *_, x in rows):>7.1f}   (1/n = {1 / n:.2f}; CPU vs 1 worker {cpu_max / base_cpu:.2f})")


if __name__ == "__main__":
    main()
