"""Streaming benchmark: featurepipe's stream job vs Feast's own push path, same events, same Redis.

Sets up a temporary copy of ``feature_repo/`` with generated transactions (the demo's
density: about 33k a day), ``feast apply``, a private ``redis-server`` on a free loopback
port, and the batch backfill (whose row right after each event, its change point x + 1 us,
is what Feast is given to push). Then:

1. **Throughput**: every event is published to a Redis stream up front; the stream job
   (the demo's two views, 16 aggregates over 1h / 24h / 7d windows, request-time: each
   touched key's row in force and its window schedule written online; dead letters, raw
   archive, checkpoints every 5 s, ``--final``) consumes it to the end with 1 worker,
   then with 2 workers (two processes, each owning half of the keys). Sustained events/s =
   events / the time until the slowest worker has the last event online, periodic
   checkpoints (offline log, state) included as they run in a sustained stream; the
   ``--final`` flush of the whole remaining offline log at the end of a finite backlog is
   reported apart (``with_final_flush_per_s``). Process start-up and ``import feast``
   are excluded.
   Feast's side: ``FeatureStore.push(..., to=PushMode.ONLINE)`` of the same events' feature
   rows (precomputed by the batch engine: Feast is not asked to aggregate) in micro-batches
   of ``--micro-batch`` events, one push per view.
2. **Latency at a fixed rate**: a publisher process XADDs ``--rate`` events/s (every 10 ms)
   for ``--seconds``; the job runs meanwhile, and for each event the time from its stream
   entry (the entry ID is the broker's clock in ms) to its features being written online is
   kept. Feast's side: a consumer reading the same stream at the same rate and pushing the
   events' precomputed rows per read batch.

Runs go in rounds (featurepipe, then Feast, per round) and the medians are printed with
their ratio. Each run is its own process (fork); Redis is flushed before it. Each run also
reports the CPU seconds the job used (``job_cpu_s``, its DuckDB threads included) and the
machine's 1-minute load average as it ended (``load``): on a shared machine the wall-clock
figures depend on it.

    .venv/bin/python benchmarks/streaming.py                      # 400k events, 10k/s for 15 s, 3 rounds
    .venv/bin/python benchmarks/streaming.py --events 100000 --rounds 1 --seconds 5   # quick
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CTX = multiprocessing.get_context("fork")


@dataclass
class Setup:
    repo: Path
    data: Path
    url: str
    payloads: list[bytes]
    events: Any  # pa.Table in publish order


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}" if url.count("/") > 2 else f"{url}/{db}"


def setup(base: Path, url: str, n: int, disorder_seconds: float) -> Setup:
    import duckdb
    import numpy as np

    from featurepipe.config import load_store, redis_url_to_feast
    from featurepipe.generate import generate_transactions
    from featurepipe.jobs.backfill import backfill
    from featurepipe.stream.runner import event_payloads

    repo, data = base / "feature_repo", base / "data"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    os.environ.update(REDIS_URL=_db(url, 0), FEATUREPIPE_DATA_DIR=str(data), FEATUREPIPE_REPO=str(repo))
    days = max(1, round(n / 33_333))
    generate_transactions(n, data / "raw" / "transactions", days=days, seed=3)
    done = subprocess.run([str(Path(sys.executable).parent / "feast"), "--chdir", str(repo), "apply"],
                          env={**os.environ, "FEATUREPIPE_REDIS": redis_url_to_feast(_db(url, 0))},
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    backfill(load_store(repo), progress=False, quality=False)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    events = con.sql(
        f"SELECT * EXCLUDE (date) FROM read_parquet('{data}/raw/transactions/**/*.parquet', "
        "hive_partitioning = true) ORDER BY event_timestamp, transaction_id"
    ).to_arrow_table()
    rng = np.random.default_rng(5)
    ts = events.column("event_timestamp").cast("int64").to_numpy()
    order = np.argsort(ts + rng.uniform(0, disorder_seconds * 1e6, len(ts)), kind="stable")
    events = events.take(order)
    payloads = list(event_payloads(events))
    print(f"setup: {n:,} events over {days} days, {len(payloads[0])} bytes a message, "
          f"out of order by up to {disorder_seconds:.0f} s", flush=True)
    return Setup(repo, data, url, payloads, events)


# ---------------------------------------------------------------- featurepipe


def _job(s: Setup, job: str, stream: str, worker: int, workers: int, total: int, sink_db: int,
         queue: Any, final: bool = True, samples: int = 0) -> None:
    import redis

    from featurepipe.config import load_store
    from featurepipe.stream.engine import StreamJob, StreamOptions
    from featurepipe.stream.source import RedisStreamSource

    options = StreamOptions(source="transactions", job=job, worker=worker, workers=workers, max_events=total, final=final,
                            progress=False, latency_samples=samples, poll_timeout=0.005)
    source = RedisStreamSource(redis.Redis.from_url(_db(s.url, 0)), stream, f"featurepipe-{job}-w{worker}")
    j = StreamJob(load_store(s.repo), source, redis.Redis.from_url(_db(s.url, sink_db), socket_timeout=120), options)
    queue.put(("ready", worker))
    cpu = time.process_time()
    result = j.run()
    cpu = time.process_time() - cpu
    j.close()
    queue.put(("done", worker, result.seconds, result.run_messages, result.counters.accepted,
               result.latencies, _peak_rss_mb(), result.loop_seconds, cpu))


def featurepipe_throughput(s: Setup, workers: int, rnd: int) -> dict[str, float]:
    import redis

    redis.Redis.from_url(_db(s.url, 1)).flushdb()
    queue = CTX.Queue()
    job = f"tp{workers}-{rnd}"
    procs = [CTX.Process(target=_job, args=(s, job, "bench", w, workers, len(s.payloads), 1, queue))
             for w in range(workers)]
    for p in procs:
        p.start()
    results = []
    while len(results) < workers:
        msg = queue.get(timeout=900)
        if msg[0] == "done":
            results.append(msg)
    for p in procs:
        p.join()
    loop = max(r[7] for r in results)
    seconds = max(r[2] for r in results)
    return {"events_per_s": len(s.payloads) / loop, "online_s": loop,
            "with_final_flush_per_s": len(s.payloads) / seconds, "total_s": seconds,
            "rss_mb": max(r[6] for r in results), "job_cpu_s": sum(r[8] for r in results),
            "load": os.getloadavg()[0]}


def _publisher(url: str, stream: str, payloads: list[bytes], rate: int, start_at: float) -> None:
    import redis

    from featurepipe.stream.source import EVENT_FIELD

    client = redis.Redis.from_url(_db(url, 0))
    per_tick = max(1, rate // 100)
    while time.time() < start_at:
        time.sleep(0.001)
    for i in range(0, len(payloads), per_tick):
        due = start_at + (i / rate)
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        pipe = client.pipeline(transaction=False)
        for p in payloads[i:i + per_tick]:
            pipe.xadd(stream, {EVENT_FIELD: p})
        pipe.execute()


def featurepipe_latency(s: Setup, rate: int, seconds: float, rnd: int) -> dict[str, float]:
    import numpy as np
    import redis

    client = redis.Redis.from_url(_db(s.url, 0))
    stream, job = f"live-{rnd}", f"live-{rnd}"
    client.delete(stream)
    client.xgroup_create(stream, f"featurepipe-{job}-w0", id="0-0", mkstream=True)
    redis.Redis.from_url(_db(s.url, 1)).flushdb()
    n = int(rate * seconds)
    payloads = s.payloads[:n]
    queue = CTX.Queue()
    proc = CTX.Process(target=_job, args=(s, job, stream, 0, 1, n, 1, queue, False, n))
    proc.start()
    assert queue.get(timeout=120)[0] == "ready"
    pub = CTX.Process(target=_publisher, args=(s.url, stream, payloads, rate, time.time() + 1.0))
    pub.start()
    msg = queue.get(timeout=600)
    pub.join()
    proc.join()
    lat = np.asarray(msg[5]) * 1000
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()), "events": len(lat), "job_cpu_s": msg[8], "load": os.getloadavg()[0]}


# ---------------------------------------------------------------- Feast


def _feast_rows(s: Setup) -> dict[str, tuple[Any, Any]]:
    """Per view: the batch rows and, per event (in publish order), the index of its row."""
    import duckdb
    import numpy as np
    import pyarrow as pa

    out = {}
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    ev = s.events.select(["user_id", "merchant_id", "event_timestamp"]).append_column(
        "__i", pa.array(np.arange(s.events.num_rows)))
    con.register("ev", ev)
    for view, key in (("user_transaction_stats", "user_id"), ("merchant_activity", "merchant_id")):
        rows = con.sql(
            f"SELECT * EXCLUDE (date), row_number() OVER () - 1 AS __r FROM read_parquet("
            f"'{s.data}/offline/{view}/date=*/part-*.parquet', hive_partitioning = true)").to_arrow_table()
        con.register("rows", rows)
        # the row in force right after the event (its change point x + 1 us): what the job writes
        idx = con.sql(f"SELECT r.__r FROM ev e JOIN rows r ON e.{key} = r.{key} AND e.event_timestamp "
                      "+ INTERVAL 1 MICROSECOND = r.event_timestamp ORDER BY e.__i").fetchnumpy()["__r"]
        assert len(idx) == s.events.num_rows, (view, len(idx))
        out[view] = (rows.drop_columns(["__r"]), np.asarray(idx))
    return out


def _feast_push(s: Setup, n: int, batch: int, queue: Any) -> None:
    import redis
    from feast import FeatureStore
    from feast.data_source import PushMode

    from featurepipe.config import redis_url_to_feast

    redis.Redis.from_url(_db(s.url, 2)).flushdb()
    store = FeatureStore(repo_path=str(s.repo))
    store.config.online_store.connection_string = redis_url_to_feast(_db(s.url, 2))
    rows = _feast_rows(s)
    frames = []
    for i in range(0, n, batch):
        frames.append([(f"{view}_push", table.take(idx[i:i + batch]).to_pandas()) for view, (table, idx) in rows.items()])
    t0 = time.perf_counter()
    for pushes in frames:
        for source, df in pushes:
            store.push(source, df, to=PushMode.ONLINE)
    seconds = time.perf_counter() - t0
    queue.put((n / seconds, seconds, _peak_rss_mb()))


def feast_throughput(s: Setup, n: int, batch: int) -> dict[str, float]:
    queue = CTX.Queue()
    proc = CTX.Process(target=_feast_push, args=(s, n, batch, queue))
    proc.start()
    rate, seconds, rss = queue.get(timeout=1800)
    proc.join()
    return {"events_per_s": rate, "seconds": seconds, "rss_mb": rss, "events": n}


def _feast_consumer(s: Setup, stream: str, n: int, queue: Any) -> None:
    import json

    import numpy as np
    import redis
    from feast import FeatureStore
    from feast.data_source import PushMode

    from featurepipe.config import redis_url_to_feast

    store = FeatureStore(repo_path=str(s.repo))
    store.config.online_store.connection_string = redis_url_to_feast(_db(s.url, 2))
    rows = _feast_rows(s)
    position = {int(json.loads(p)["transaction_id"]): i for i, p in enumerate(s.payloads[:n])}
    client = redis.Redis.from_url(_db(s.url, 0))
    queue.put(("ready",))
    last, seen, lat = "0-0", 0, []
    while seen < n:
        reply = client.xread({stream: last}, count=50_000, block=100)
        if not reply:
            continue
        entries = reply[0][1]
        last = entries[-1][0]
        idx = np.array([position[json.loads(f[b"e"])["transaction_id"]] for _, f in entries])
        for view, (table, index) in rows.items():
            store.push(f"{view}_push", table.take(index[idx]).to_pandas(), to=PushMode.ONLINE)
        now = time.time() * 1000
        lat += [now - int(eid.split(b"-")[0]) for eid, _ in entries]
        seen += len(entries)
    queue.put(("done", np.asarray(lat)))


def feast_latency(s: Setup, rate: int, seconds: float, rnd: int) -> dict[str, float]:
    import numpy as np
    import redis

    redis.Redis.from_url(_db(s.url, 2)).flushdb()
    stream = f"feast-live-{rnd}"
    redis.Redis.from_url(_db(s.url, 0)).delete(stream)
    n = int(rate * seconds)
    queue = CTX.Queue()
    proc = CTX.Process(target=_feast_consumer, args=(s, stream, n, queue))
    proc.start()
    assert queue.get(timeout=300)[0] == "ready"
    pub = CTX.Process(target=_publisher, args=(s.url, stream, s.payloads[:n], rate, time.time() + 1.0))
    pub.start()
    msg = queue.get(timeout=1800)
    pub.join()
    proc.join()
    lat = msg[1]
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()), "events": len(lat)}


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=400_000, help="Events for the throughput runs.")
    parser.add_argument("--feast-events", type=int, default=100_000,
                        help="Events Feast pushes in its throughput run (it is slow).")
    parser.add_argument("--micro-batch", type=int, default=5_000, help="Events per Feast push.")
    parser.add_argument("--rate", type=int, default=10_000, help="Events/s in the latency runs.")
    parser.add_argument("--seconds", type=float, default=15.0, help="Length of a latency run.")
    parser.add_argument("--disorder", type=float, default=60.0, help="Events arrive out of order by up to this (s).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["feast", "latency", "workers2"])
    args = parser.parse_args()

    import redis

    from featurepipe.redis_server import RedisServer
    from featurepipe.stream.source import publish_redis

    base = Path(tempfile.mkdtemp(prefix="fp-stream-bench-"))
    try:
        with RedisServer() as server:
            s = setup(base, server.url, args.events, args.disorder)
            client = redis.Redis.from_url(_db(s.url, 0))
            t0 = time.perf_counter()
            publish_redis(client, "bench", s.payloads)
            print(f"published {len(s.payloads):,} events in {time.perf_counter() - t0:.1f} s", flush=True)
            res: dict[str, list[dict[str, float]]] = {}
            for rnd in range(args.rounds):
                runs = [("featurepipe 1 worker", lambda rnd=rnd: featurepipe_throughput(s, 1, rnd))]
                if "workers2" not in args.skip:
                    runs.append(("featurepipe 2 workers", lambda rnd=rnd: featurepipe_throughput(s, 2, rnd)))
                if "feast" not in args.skip:
                    runs.append(("Feast push", lambda: feast_throughput(s, min(args.feast_events, args.events),
                                                                        args.micro_batch)))
                if "latency" not in args.skip:
                    runs.append((f"featurepipe latency @{args.rate}/s",
                                 lambda rnd=rnd: featurepipe_latency(s, args.rate, args.seconds, rnd)))
                    if "feast" not in args.skip:
                        runs.append((f"Feast push latency @{args.rate}/s",
                                     lambda rnd=rnd: feast_latency(s, args.rate, args.seconds, rnd)))
                for name, fn in runs:
                    r = fn()
                    res.setdefault(name, []).append(r)
                    print(f"round {rnd + 1} {name}: " + ", ".join(
                        f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in r.items()), flush=True)
            print("\nmedians over", args.rounds, "round(s)")
            med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in res.items()}
            for name, m in med.items():
                print(f"  {name:32s} " + ", ".join(f"{k} {v:,.1f}" for k, v in m.items()))
            fp = med.get("featurepipe 1 worker", {}).get("events_per_s")
            fe = med.get("Feast push", {}).get("events_per_s")
            if fp and fe:
                print(f"  throughput ratio featurepipe 1 worker / Feast push: {fp / fe:.1f}x")
            two = med.get("featurepipe 2 workers", {}).get("events_per_s")
            if fp and two:
                print(f"  2 workers / 1 worker: {two / fp:.2f}x")
            lf = med.get(f"featurepipe latency @{args.rate}/s")
            lk = med.get(f"Feast push latency @{args.rate}/s")
            if lf and lk:
                print(f"  p99 latency Feast / featurepipe: {lk['p99_ms'] / lf['p99_ms']:.1f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
