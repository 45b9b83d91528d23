"""Materialisation benchmark: Feast's own engine (defaults, best settings) vs featurepipe's.

Generates a synthetic offline feature table (Parquet, partitioned by day) with DuckDB in a
temporary folder, registers one feature view over it in a temporary Feast repo, starts a
private ``redis-server`` on a free loopback port, and materialises the same window with:

* ``feast-default``: Feast's ``local`` engine as shipped (pulls every row of the window,
  de-duplicates in pandas, one online write batch);
* ``feast-best``: ``materialization_config: {pull_latest_features: true,
  online_write_batch_size: 10000}`` and ``online_store.skip_dedup: true``;
* ``featurepipe``: ``batch_engine: featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine``.

Both Feast configurations read through Feast's ``duckdb`` offline store. Runs go in
rounds (one per engine per round, so load from elsewhere hits all alike); each is a
separate process (peak RSS is its own ``VmHWM``; the data is generated in another one),
Redis is flushed before it,
and the timed part is the ``FeatureStore.materialize`` call (process start-up and
``import feast``, ≈ 5-15 s, are reported apart). featurepipe's run is repeated on a table
twice as long (same entities) to show that its memory does not grow with the table.
After each run the Redis content is digested (every key's ``DUMP``), so the table shows
whether the engines wrote identical bytes. ``redis-benchmark -t hset -P 64`` gives the
server's pipelined single-field HSET rate as a ceiling, and replaying featurepipe's result
as ready-made ``RESTORE`` commands (every key ``DUMP``-ed, flushed, restored on one
pipelined connection) gives Redis's own time for this content: the floor for any client.

``--demo-repo PATH`` runs the same comparison on a real repo instead: every online view of a
feature repo after ``make demo`` (its offline tables, registry and contracts as they are),
``FeatureStore.materialize`` over all views, featurepipe's engine (quality gate, run log,
metrics and lineage on, as configured in the repo) against Feast's ``local`` engine with the
best settings above, each run from the same copy of the repo's registry and run log.

    .venv/bin/python benchmarks/materialize.py                  # 100k entities x 20 features, 3M rows
    .venv/bin/python benchmarks/materialize.py --entities 20000 --skip feast-default   # quick
    .venv/bin/python benchmarks/materialize.py --demo-repo feature_repo --skip feast-default --runs 5

``--windowed`` runs the request-time windows case instead: raw events (``--rows-per-entity``
per entity over 30 days) and one windowed-aggregate view like the demo's user statistics
(count, sum, mean, max over 1h / 24h / 7d, and the last event's time), each checkout's
backfill run first (not timed), then ``FeatureStore.materialize`` with featurepipe's engine of
this checkout (each entity's window schedule, as its backfill prepared them from the raw
events; ``--compute`` removes them, so the materialisation computes them from the raw events),
of ``--old-checkout`` (default ``../main``: the latest row of its offline table, as before
request-time windows), and Feast's ``local`` engine with the best settings over this
checkout's offline table.

    .venv/bin/python benchmarks/materialize.py --windowed --runs 3 --old-checkout /work/main
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a worker of the --windowed case may run another checkout's featurepipe (the old engine)
sys.path.insert(0, os.environ.get("FEATUREPIPE_CHECKOUT") or str(ROOT))

ENGINES = ("feast-default", "feast-best", "featurepipe")
PROJECT = "bench"
VIEW = "entity_stats"
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
DAYS = 30


# ---------------------------------------------------------------- data and repo


def generate(folder: Path, entities: int, rows_per_entity: int, features: int) -> int:
    """Write the offline table: rows_per_entity rows per entity spread over DAYS days."""
    import duckdb

    cols = ",\n".join(
        f"(hash(e * {i + 7} + r) % 1000)::BIGINT AS f{i}" if i % 2 == 0
        else f"round((hash(e * {i + 3} + r) % 100000) / 100.0, 2)::DOUBLE AS f{i}"
        for i in range(features)
    )
    step_us = DAYS * 86_400 * 1_000_000 // rows_per_entity
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"""
        COPY (
          SELECT e AS entity_id,
                 TIMESTAMPTZ '{START.isoformat()}' + to_microseconds(r * {step_us} + (hash(e, r) % {step_us})::BIGINT)
                   AS event_timestamp,
                 {cols},
                 strftime(TIMESTAMPTZ '{START.isoformat()}' + to_microseconds(r * {step_us}), '%Y-%m-%d') AS date
          FROM range({entities}) t(e), range({rows_per_entity}) s(r)
        ) TO '{folder}' (FORMAT parquet, PARTITION_BY (date), COMPRESSION zstd)
    """)
    con.close()
    return entities * rows_per_entity


def generate_events(folder: Path, entities: int, events_per_entity: int) -> int:
    """Raw events for the --windowed case: events_per_entity per entity over DAYS days, in
    bursts (a third of them within minutes of the one before), an amount each."""
    import duckdb

    step_us = DAYS * 86_400 * 1_000_000 // events_per_entity
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"""
        COPY (
          SELECT e AS entity_id,
                 TIMESTAMPTZ '{START.isoformat()}' + to_microseconds(
                   CASE WHEN hash(e, r, 1) % 3 = 0 AND r > 0
                        THEN (r - 1) * {step_us} + (hash(e, r - 1) % {step_us})::BIGINT + (hash(e, r) % 600000000)::BIGINT
                        ELSE r * {step_us} + (hash(e, r) % {step_us})::BIGINT END) AS event_timestamp,
                 round((hash(e * 7 + r) % 100000) / 100.0, 2)::DOUBLE AS amount,
                 strftime(TIMESTAMPTZ '{START.isoformat()}' + to_microseconds(r * {step_us}), '%Y-%m-%d') AS date
          FROM range({entities}) t(e), range({events_per_entity}) s(r)
        ) TO '{folder}' (FORMAT parquet, PARTITION_BY (date), COMPRESSION zstd)
    """)
    con.close()
    return entities * events_per_entity


def windowed_definitions(raw: str, offline_root: str) -> list[object]:
    """The --windowed case's view: the demo's user statistics over the benchmark's events."""
    from feast import Entity, FileSource, ValueType
    from feast.aggregation import Aggregation

    from featurepipe.definitions import WindowedFeatures

    entity = Entity(name="entity", join_keys=["entity_id"], value_type=ValueType.INT64)
    source = FileSource(name="entity_events", path=f"{raw}/**/*.parquet", timestamp_field="event_timestamp")
    aggregations = [
        Aggregation(column="amount", function=function, time_window=window, name=f"{name}_{suffix}")
        for window, suffix in ((timedelta(hours=1), "1h"), (timedelta(days=1), "24h"), (timedelta(days=7), "7d"))
        for function, name in (("count", "txn_count"), ("sum", "amount_sum"), ("mean", "amount_mean"),
                               ("max", "amount_max"))
    ] + [Aggregation(column="event_timestamp", function="last", name="last_txn_epoch")]
    view = WindowedFeatures(name=VIEW, entity=entity, source=source, aggregations=aggregations,
                            ttl=timedelta(days=7), offline_root=Path(offline_root))
    return [entity, source, view.feature_view()]


def write_repo(repo: Path, data: Path, redis_port: int, engine: str, features: int) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    yaml = [
        f"project: {PROJECT}", "provider: local", "registry: registry.db",
        "online_store:", "  type: redis", f'  connection_string: "127.0.0.1:{redis_port},db=0"',
    ]
    if engine == "feast-best":
        yaml.append("  skip_dedup: true")
    yaml += ["offline_store:", "  type: duckdb", "entity_key_serialization_version: 3"]
    if engine == "feast-best":
        yaml += ["materialization_config:", "  pull_latest_features: true", "  online_write_batch_size: 10000"]
    if engine == "featurepipe":
        yaml += ["batch_engine:", "  type: featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine",
                 "  progress: false", f"  quarantine_dir: {repo / 'quarantine'}"]
    (repo / "feature_store.yaml").write_text("\n".join(yaml) + "\n")
    (repo / "bench.json").write_text(json.dumps({"data": str(data), "features": features}))


def definitions(data: str, features: int) -> list[object]:
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64

    entity = Entity(name="entity", join_keys=["entity_id"], value_type=ValueType.INT64)
    source = FileSource(name="entity_stats_source", path=f"{data}/**/*.parquet",
                        timestamp_field="event_timestamp")
    schema = [Field(name="entity_id", dtype=Int64)] + [
        Field(name=f"f{i}", dtype=Int64 if i % 2 == 0 else Float64) for i in range(features)
    ]
    view = FeatureView(name=VIEW, entities=[entity], ttl=timedelta(days=DAYS + 1), schema=schema,
                       source=source, online=True)
    return [entity, source, view]


# ---------------------------------------------------------------- one run per process


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a
    large parent at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(repo: Path, action: str) -> None:
    """Runs in a child process: ``generate`` the table, ``apply`` the definitions, or
    ``materialize`` and report."""
    if action == "generate":
        spec = json.loads((repo / "bench.json").read_text())
        if spec.get("windowed"):
            rows = generate_events(Path(spec["data"]), spec["entities"], spec["rows_per_entity"])
        else:
            rows = generate(Path(spec["data"]), spec["entities"], spec["rows_per_entity"], spec["features"])
        print("RESULT " + json.dumps({"rows": rows}))
        return
    t_import = time.perf_counter()
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(repo))
    if action == "materialize-demo":
        demo_worker(store, t_import)
        return
    spec = json.loads((repo / "bench.json").read_text())
    if action == "apply":
        if spec.get("windowed"):
            store.apply(windowed_definitions(spec["data"], spec["offline_root"]))
        else:
            store.apply(definitions(spec["data"], spec["features"]))
        return
    if action == "backfill":
        from featurepipe.jobs.backfill import backfill

        t0 = time.perf_counter()
        backfill(store, progress=False, quality=False)
        print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0}))
        return
    # Build the engine (Feast's or featurepipe's; Feast builds it lazily on the first
    # materialize) before the clock starts: imports are start-up, like ``import feast``.
    _ = store._get_provider().batch_engine
    ready = time.perf_counter() - t_import
    t0 = time.perf_counter()
    store.materialize(START - timedelta(days=1), START + timedelta(days=DAYS + 1), [VIEW])
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": seconds, "startup": ready, "rss_mb": peak_rss_mb()}))


def demo_worker(store: object, t_import: float) -> None:
    """Materialise every online view of a demo repo copy (see :func:`demo_case`)."""
    from feast import FeatureStore

    assert isinstance(store, FeatureStore)
    spec = json.loads((Path(store.repo_path) / DEMO_SPEC).read_text())
    views = sorted(fv.name for fv in store.list_feature_views() if fv.online)
    _ = store._get_provider().batch_engine
    ready = time.perf_counter() - t_import
    t0 = time.perf_counter()
    store.materialize(datetime.fromisoformat(spec["start"]), datetime.fromisoformat(spec["end"]), views)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": seconds, "startup": ready, "rss_mb": peak_rss_mb(), "views": views}))


def run_worker(repo: Path, action: str, env: dict[str, str] | None = None) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--worker", action, "--repo", str(repo)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{action} in {repo} failed:\n{proc.stderr[-4000:]}")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {}


def digest(port: int) -> tuple[int, str]:
    """Number of keys and a digest of every key with its DUMP (fields, order, encoding)."""
    import redis

    client = redis.Redis(port=port)
    keys = sorted(client.scan_iter(count=5000))
    h = hashlib.sha256()
    for i in range(0, len(keys), 5000):
        pipe = client.pipeline(transaction=False)
        chunk = keys[i:i + 5000]
        for k in chunk:
            pipe.dump(k)
        for k, d in zip(chunk, pipe.execute()):
            h.update(k)
            h.update(d)
    return len(keys), h.hexdigest()[:16]


def restore_floor(port: int, repeats: int = 3) -> dict[str, float]:
    """Redis alone: the keys in Redis now, ``DUMP``-ed, flushed, and restored again from
    ready-made ``RESTORE`` commands sent on one pipelined connection (batches of 5,000 as
    featurepipe sends them). Median wall time and redis-server CPU (``INFO cpu``): what no
    client can beat for this content on this server."""
    import socket

    import redis

    client = redis.Redis(port=port)
    keys = list(client.scan_iter(count=5000))
    dumps = []
    for i in range(0, len(keys), 5000):
        pipe = client.pipeline(transaction=False)
        for k in keys[i:i + 5000]:
            pipe.dump(k)
        dumps.extend(pipe.execute())
    batches = []
    for i in range(0, len(keys), 5000):
        parts = [b"*4\r\n$7\r\nRESTORE\r\n$%d\r\n%s\r\n$1\r\n0\r\n$%d\r\n%s\r\n" % (len(k), k, len(d), d)
                 for k, d in zip(keys[i:i + 5000], dumps[i:i + 5000])]
        batches.append((len(parts), b"".join(parts)))

    def cpu() -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    walls, cpus = [], []
    for _ in range(repeats):
        client.flushall()
        sock = socket.create_connection(("127.0.0.1", port))
        reader = sock.makefile("rb")
        c0, t0 = cpu(), time.perf_counter()
        pending = 0
        for count, payload in batches:
            sock.sendall(payload)
            for _ in range(pending):
                if not reader.readline().startswith(b"+OK"):
                    raise SystemExit("RESTORE replay failed")
            pending = count
        for _ in range(pending):
            reader.readline()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu() - c0)
        sock.close()
    return {"rows": len(keys), "seconds": statistics.median(walls), "server_cpu": statistics.median(cpus)}


def redis_benchmark(port: int) -> float | None:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    out = subprocess.run([exe, "-p", str(port), "-t", "hset", "-P", "64", "-n", "200000", "-q"],
                         capture_output=True, text=True).stdout
    found = re.findall(r"HSET: ([\d.]+) requests per second", out)
    return float(found[-1]) if found else None


# ---------------------------------------------------------------- the demo repo case

DEMO_SPEC = "bench-demo.json"
# what a materialisation writes under the data folder: restored from the demo repo (or
# removed) before every run, so each starts from the same state; the rest is linked
DEMO_WRITTEN = ("runs", "metrics", "lineage", "quarantine")


def demo_config(source: Path, engine: str, port: int) -> dict[str, object]:
    """The demo repo's ``feature_store.yaml`` for one engine, on the private Redis."""
    import yaml

    config = yaml.safe_load((source / "feature_store.yaml").read_text())
    online = dict(config.get("online_store") or {})
    online["connection_string"] = f"127.0.0.1:{port},db=0"
    online.pop("skip_dedup", None)
    engine_config = dict(config.pop("batch_engine", None) or {})
    if engine != "featurepipe":  # featurepipe's engine ignores it; the demo's is Feast's best
        config.pop("materialization_config", None)
    if engine == "feast-best":
        online["skip_dedup"] = True
        config["materialization_config"] = {"pull_latest_features": True, "online_write_batch_size": 10000}
    if engine == "featurepipe":
        # the repo's own engine options, under either path of the engine (repos applied before
        # 0.2 name featurepipe.online.engine); any other engine: featurepipe's with defaults
        if not str(engine_config.get("type", "")).startswith(("featurepipe.feast.materialization_engine.",
                                                                 "featurepipe.online.engine.")):
            engine_config = {"type": "featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine"}
        config["batch_engine"] = {**engine_config, "progress": False}
    config["online_store"] = online
    return config


def demo_registry(source: Path) -> Path:
    """The demo repo's registry file, relative to the repo."""
    import yaml

    registry = yaml.safe_load((source / "feature_store.yaml").read_text()).get("registry")
    path = registry.get("path") if isinstance(registry, dict) else registry
    if not path or "://" in str(path) or Path(path).is_absolute() or not (source / path).is_file():
        raise SystemExit(f"{source}: needs a local registry file relative to the repo (got {path!r}); "
                         "run `make demo` (or `featurepipe demo --repo PATH`) first")
    return Path(path)


def demo_repo_copy(source: Path, target: Path, engine: str, port: int, window: tuple[str, str]) -> None:
    """A copy of a demo feature repo for one engine: its own ``feature_store.yaml``, registry
    and run log; the offline tables (everything else under ``data/``) linked, not copied."""
    import yaml

    data = source / "data"
    if not (data / "offline").is_dir():
        raise SystemExit(f"{source}: no data/offline folder; run `make demo` first")
    target.mkdir(parents=True)
    (target / "feature_store.yaml").write_text(yaml.safe_dump(demo_config(source, engine, port), sort_keys=False))
    for name in ("contracts.yaml", "features.py", ".feastignore"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    (target / "data").mkdir()
    registry = demo_registry(source)
    for entry in data.iterdir():
        if entry.name not in DEMO_WRITTEN and entry.resolve() != (source / registry).resolve():
            (target / "data" / entry.name).symlink_to(entry.resolve())
    (target / DEMO_SPEC).write_text(json.dumps({"source": str(source), "registry": str(registry),
                                                "start": window[0], "end": window[1]}))


def demo_reset(target: Path) -> None:
    """Put back the demo repo's registry and run log (a run appends to both) and remove the
    metrics, lineage and quarantine files the last run wrote."""
    spec = json.loads((target / DEMO_SPEC).read_text())
    source = Path(spec["source"])
    shutil.copy2(source / spec["registry"], target / spec["registry"])
    for name in DEMO_WRITTEN:
        shutil.rmtree(target / "data" / name, ignore_errors=True)
        if (source / "data" / name).is_dir() and name == "runs":
            shutil.copytree(source / "data" / name, target / "data" / name)


def demo_case(args: argparse.Namespace) -> None:
    """featurepipe vs Feast's engine on every view of a repo after ``make demo``."""
    from featurepipe.redis_server import RedisServer

    source = args.demo_repo.resolve()
    if not (source / "feature_store.yaml").is_file():
        raise SystemExit(f"{source}: no feature_store.yaml")
    demo_registry(source)
    engines = [e for e in ENGINES if e not in args.skip]
    window = ("1970-01-02T00:00:00+00:00", datetime.now(timezone.utc).isoformat())
    tmp = Path(tempfile.mkdtemp(prefix="bench-materialize-demo-"))
    runs: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
    digests: dict[str, set[tuple[int, str]]] = {e: set() for e in engines}
    try:
        with RedisServer(workdir=tmp / "redis") as server:
            import redis

            client = redis.Redis(port=server.port)
            env = {"REDIS_URL": f"redis://127.0.0.1:{server.port}/0", "FEATUREPIPE_DATA_DIR": "",
                   "FEATUREPIPE_REPO": ""}
            repos = {}
            for engine in engines:
                repos[engine] = tmp / engine / source.name
                demo_repo_copy(source, repos[engine], engine, server.port, window)
            print(f"demo repo {source}: window {window[0]} .. {window[1]}; engines {', '.join(engines)}; "
                  f"{args.runs} round(s)", flush=True)
            for round_ in range(args.runs):  # rounds: a burst of load elsewhere hits every engine
                for engine in engines:
                    demo_reset(repos[engine])
                    client.flushall()
                    result = run_worker(repos[engine], "materialize-demo", env)
                    runs[engine].append(result)
                    digests[engine].add(digest(server.port))
                    keys, dig = sorted(digests[engine])[-1]
                    print(f"  round {round_ + 1} {engine:14s} {result['seconds']:7.3f}s  keys {keys:,}  "
                          f"digest {dig}  peak RSS {result['rss_mb']:,.0f} MB", flush=True)
            ceiling = redis_benchmark(server.port)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    views = next(iter(runs.values()))[0].get("views", [])
    print()
    print(f"demo repo {source}, {len(views)} views ({', '.join(views)}), {args.runs} run(s) each, medians:")
    medians = {e: statistics.median(r["seconds"] for r in runs[e]) for e in engines}
    ref = digests.get("feast-best") or digests.get("feast-default")
    for engine in engines:
        same = "" if ref is None or len(digests[engine]) != 1 else (
            "identical" if digests[engine] == ref else "DIFFERENT")
        keys = sorted(digests[engine])[-1][0]
        print(f"  {engine:14s} {medians[engine]:7.3f}s  runs {[round(r['seconds'], 3) for r in runs[engine]]}  "
              f"peak RSS {max(r['rss_mb'] for r in runs[engine]):,.0f} MB  keys {keys:,}  "
              f"Redis content vs Feast: {same or 'n/a'}"
              + ("" if len(digests[engine]) == 1 else "  (runs differ!)"))
    if "featurepipe" in medians:
        for name in ("feast-default", "feast-best"):
            if name in medians:
                print(f"featurepipe vs {name}: {medians[name] / medians['featurepipe']:.1f}x faster")
    if ceiling:
        print(f"redis-benchmark -t hset -P 64 -n 200000: {ceiling:,.0f} single-field HSETs/s")
    print(f"process start-up (import feast, open the store, build the engine) is not timed: "
          f"{statistics.median(float(r['startup']) for rs in runs.values() for r in rs):.1f}s median")


# ---------------------------------------------------------------- request-time windows


def windowed_repo(repo: Path, data: Path, offline_root: Path, port: int, engine: str, entities: int,
                  events: int) -> None:
    """A repo for the --windowed case: one engine's feature_store.yaml and the view's spec."""
    yaml = [f"project: {PROJECT}", "provider: local", "registry: registry.db", "online_store:", "  type: redis",
            f'  connection_string: "127.0.0.1:{port},db=0"']
    if engine == "feast-best":
        yaml += ["  skip_dedup: true", "offline_store:", "  type: duckdb", "materialization_config:",
                 "  pull_latest_features: true", "  online_write_batch_size: 10000"]
    else:
        yaml += ["offline_store:", "  type: duckdb", "batch_engine:",
                 "  type: featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine",
                 "  progress: false", f"  quarantine_dir: {repo / 'quarantine'}"]
    yaml.append("entity_key_serialization_version: 3")
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text("\n".join(yaml) + "\n")
    (repo / "bench.json").write_text(json.dumps({
        "data": str(data), "offline_root": str(offline_root), "entities": entities, "rows_per_entity": events,
        "windowed": True, "features": 13}))


def windowed_case(args: argparse.Namespace) -> None:
    """This checkout's engine (schedules from raw events) against the old checkout's (latest
    offline row) and Feast's best, on one windowed view over generated events."""
    from featurepipe.redis_server import RedisServer

    old = args.old_checkout.resolve()
    if not (old / "featurepipe" / "feast" / "materialization_engine.py").is_file():
        raise SystemExit(f"{old}: not a featurepipe checkout (--old-checkout)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-materialize-windowed-"))
    # featurepipe-computed: this checkout's engine with the backfill's prepared schedules put
    # aside for its runs, so it computes them from the raw events
    checkouts = {"featurepipe": ROOT, "featurepipe-computed": ROOT, "featurepipe-old": old, "feast-best": ROOT}
    engines = [e for e in checkouts if e not in args.skip]
    results: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
    keys: dict[str, tuple[int, str]] = {}
    memory: dict[str, float] = {}
    try:
        with RedisServer(workdir=tmp / "redis") as server:
            import redis

            client = redis.Redis(port=server.port)
            raw = tmp / "raw"
            spec_dir = tmp / "spec"
            windowed_repo(spec_dir, raw, tmp / "unused", server.port, "featurepipe", args.entities, args.rows_per_entity)
            t = time.perf_counter()
            rows = int(run_worker(spec_dir, "generate")["rows"])
            print(f"generated {rows:,} raw events ({args.entities:,} entities) in {time.perf_counter() - t:.1f}s",
                  flush=True)
            repos = {}
            for engine in engines:
                offline = tmp / ("offline-old" if engine == "featurepipe-old" else "offline-new")
                repos[engine] = tmp / f"repo-{engine}"
                windowed_repo(repos[engine], raw, offline, server.port, engine, args.entities, args.rows_per_entity)
                env = {"FEATUREPIPE_CHECKOUT": str(checkouts[engine])}
                run_worker(repos[engine], "apply", env)
            backfilled: set[Path] = set()
            for engine in engines:
                # featurepipe's backfill also prepares the schedules its materialisation reads
                offline = tmp / ("offline-old" if engine == "featurepipe-old" else "offline-new")
                if offline not in backfilled:
                    env = {"FEATUREPIPE_CHECKOUT": str(checkouts[engine]), "FEATUREPIPE_DATA_DIR": str(tmp / "d")}
                    took = run_worker(repos[engine], "backfill", env)["seconds"]
                    print(f"  backfill for {engine} ({checkouts[engine]}): {took:.1f}s (not timed)", flush=True)
                    backfilled.add(offline)
            for _ in range(args.runs):
                for engine in engines:
                    client.flushall()
                    env = {"FEATUREPIPE_CHECKOUT": str(checkouts[engine]), "FEATUREPIPE_DATA_DIR": str(tmp / "d")}
                    prepared = tmp / "offline-new" / ".schedules" / f"{VIEW}.parquet"
                    aside = prepared.with_name(prepared.name + ".aside")
                    if engine == "featurepipe-computed" and prepared.exists():
                        prepared.rename(aside)
                    try:
                        result = run_worker(repos[engine], "materialize", env)
                    finally:
                        if aside.exists():
                            aside.rename(prepared)
                    results[engine].append(result)
                    keys[engine] = digest(server.port)
                    sample = list(client.scan_iter(count=1000))[:2000]
                    memory[engine] = statistics.median(int(client.memory_usage(k, samples=0)) for k in sample)
                    print(f"  {engine:16s} {result['seconds']:7.2f}s  {args.entities / result['seconds']:>10,.0f} "
                          f"entity rows/s  peak RSS {result['rss_mb']:,.0f} MB  keys {keys[engine][0]:,}  "
                          f"MEMORY USAGE p50 {memory[engine]:,.0f} B", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"windowed view (13 features: 1h / 24h / 7d count, sum, mean, max; last), {args.entities:,} entities, "
          f"{rows:,} raw events, medians of {args.runs} run(s):")
    medians = {e: statistics.median(r["seconds"] for r in results[e]) for e in engines}
    for engine in engines:
        print(f"  {engine:16s} {medians[engine]:7.2f}s  {args.entities / medians[engine]:>10,.0f} entity rows/s  "
              f"runs {[round(r['seconds'], 2) for r in results[engine]]}  peak RSS "
              f"{max(r['rss_mb'] for r in results[engine]):,.0f} MB  key p50 {memory[engine]:,.0f} B")
    if "featurepipe" in medians:
        for other in ("featurepipe-computed", "featurepipe-old", "feast-best"):
            if other in medians:
                print(f"featurepipe (schedules) vs {other}: {medians[other] / medians['featurepipe']:.2f}x the speed")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=100_000, help="distinct entities (default 100,000)")
    parser.add_argument("--rows-per-entity", type=int, default=30,
                        help="offline rows per entity in the window (default 30: 3M rows)")
    parser.add_argument("--features", type=int, default=20, help="features in the view, half Int64, half Float64")
    parser.add_argument("--runs", type=int, default=1, help="runs per engine; the median is shown (default 1)")
    parser.add_argument("--skip", action="append", default=[], choices=[*ENGINES, "featurepipe-old", "featurepipe-computed"],
                        help="leave an engine out")
    parser.add_argument("--no-double", action="store_true",
                        help="skip featurepipe's second run on a table twice as long")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--demo-repo", type=Path, metavar="PATH",
                        help="instead of generated data: every view of this feature repo after `make demo`")
    parser.add_argument("--windowed", action="store_true",
                        help="the request-time windows case: raw events, one windowed view (see above)")
    parser.add_argument("--old-checkout", type=Path, default=ROOT.parent / "main",
                        help="--windowed: the checkout whose engine is 'today's' (default ../main)")
    parser.add_argument("--worker", choices=["generate", "apply", "backfill", "materialize", "materialize-demo"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.repo, args.worker)
        return
    if args.demo_repo:
        demo_case(args)
        return
    if args.windowed:
        windowed_case(args)
        return

    from featurepipe.redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="bench-materialize-"))
    results: list[dict[str, object]] = []
    floor: dict[str, float] | None = None
    try:
        with RedisServer(workdir=tmp / "redis") as server:
            import redis

            client = redis.Redis(port=server.port)
            sizes = [args.rows_per_entity] + ([] if args.no_double else [2 * args.rows_per_entity])
            ceiling = redis_benchmark(server.port)
            client.flushall()
            for size in sizes:
                data = tmp / f"offline-{size}"
                t = time.perf_counter()
                spec_dir = tmp / f"spec-{size}"
                spec_dir.mkdir()
                (spec_dir / "bench.json").write_text(json.dumps({
                    "data": str(data), "entities": args.entities, "rows_per_entity": size,
                    "features": args.features,
                }))
                rows = int(run_worker(spec_dir, "generate")["rows"])
                print(f"generated {rows:,} offline rows ({args.entities:,} entities x {args.features} "
                      f"features) in {time.perf_counter() - t:.1f}s", flush=True)
                engines = [e for e in ENGINES if e not in args.skip]
                if size != sizes[0]:
                    engines = [e for e in engines if e == "featurepipe"]
                repos = {}
                for engine in engines:
                    repos[engine] = tmp / f"repo-{engine}-{size}"
                    write_repo(repos[engine], data, server.port, engine, args.features)
                    run_worker(repos[engine], "apply")
                # rounds of one run per engine: a burst of load elsewhere hits every engine
                runs: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
                digests: dict[str, tuple[int, str]] = {}
                for _ in range(args.runs):
                    for engine in engines:
                        client.flushall()
                        runs[engine].append(run_worker(repos[engine], "materialize"))
                        digests[engine] = digest(server.port)
                if size == sizes[0] and "featurepipe" in engines:  # its content is still in Redis
                    floor = restore_floor(server.port)
                    print(f"  Redis alone, RESTORE of the same {floor['rows']:,} hashes, ready-made: "
                          f"{floor['seconds']:.2f}s ({floor['rows'] / floor['seconds']:,.0f} rows/s), "
                          f"redis-server CPU {floor['server_cpu']:.2f}s", flush=True)
                for engine in engines:
                    keys, dig = digests[engine]
                    seconds = statistics.median(r["seconds"] for r in runs[engine])
                    results.append({
                        "engine": engine, "offline_rows": rows, "entities": args.entities, "keys": keys,
                        "seconds": seconds, "all_seconds": [round(r["seconds"], 2) for r in runs[engine]],
                        "rss_mb": max(r["rss_mb"] for r in runs[engine]), "startup": runs[engine][0]["startup"],
                        "digest": dig,
                    })
                    print(f"  {engine:14s} {seconds:7.2f}s  {args.entities / seconds:>10,.0f} entity rows/s  "
                          f"{rows / seconds:>12,.0f} offline rows/s  peak RSS {results[-1]['rss_mb']:,.0f} MB  "
                          f"keys {keys:,}  digest {dig}  runs {results[-1]['all_seconds']}", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results, ceiling, args, floor)


def report(results: list[dict[str, object]], ceiling: float | None, args: argparse.Namespace,
           floor: dict[str, float] | None = None) -> None:
    by = {(r["engine"], r["offline_rows"]): r for r in results}
    base_rows = args.entities * args.rows_per_entity
    ours = by.get(("featurepipe", base_rows))
    print()
    print(f"{'engine':14s} {'offline rows':>13s} {'seconds':>8s} {'entity rows/s':>14s} {'peak RSS MB':>12s} "
          f"{'vs this':>8s}  same bytes as feast-best")
    ref = by.get(("feast-best", base_rows))
    for r in results:
        ratio = f"{r['seconds'] / ours['seconds']:.1f}x" if ours and r["offline_rows"] == base_rows else ""
        same = ("" if ref is None or r["offline_rows"] != base_rows
                else "yes" if r["digest"] == ref["digest"] else "NO")
        print(f"{r['engine']:14s} {r['offline_rows']:>13,} {r['seconds']:>8.2f} "
              f"{r['entities'] / r['seconds']:>14,.0f} {r['rss_mb']:>12,.0f} {ratio:>8s}  {same}")
    if ours:
        for name in ("feast-default", "feast-best"):
            other = by.get((name, base_rows))
            if other:
                print(f"featurepipe vs {name}: {other['seconds'] / ours['seconds']:.1f}x faster, "
                      f"{other['rss_mb'] / ours['rss_mb']:.1f}x less peak memory")
    if ceiling:
        print(f"redis-benchmark -t hset -P 64 -n 200000: {ceiling:,.0f} single-field HSETs/s "
              f"(a row here is one hash of {args.features + 1} fields)")
    if floor:
        print(f"Redis alone restoring the same {floor['rows']:,} hashes from ready-made RESTORE commands: "
              f"{floor['seconds']:.2f}s = {floor['rows'] / floor['seconds']:,.0f} rows/s "
              f"(redis-server CPU {floor['server_cpu']:.2f}s)"
              + (f"; featurepipe reaches {floor['seconds'] / ours['seconds']:.0%} of it" if ours else ""))
    print(f"process start-up (import feast, open the store) is not timed: "
          f"{statistics.median(float(r['startup']) for r in results):.1f}s median")


if __name__ == "__main__":
    main()
