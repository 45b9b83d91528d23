"""Point-in-time join benchmark: featurepipe's offline store vs Feast's ``duckdb`` and ``file`` stores.

Same data, same request, side by side in one run; entity frames of 10k, 100k and 1M rows
at random instants. Each retrieval runs in its own process so peak RSS is that retrieval's
alone (it includes ``import feast``: see the ``baseline`` line). Feast's ``file`` store is
skipped above ``--file-max`` entity rows.

``--views windowed`` (the default): three windowed-aggregate views (featurepipe's
``WindowedFeatures``) over 1M raw card events (30 days, skewed users and merchants): user
(8 features: counts and sums over 1h / 24h / 7d, the 7d mean, the 24h max), merchant (4),
user x merchant (4, compound key), backfilled by featurepipe into their change-point tables
(about 10M rows; the backfill is timed on its own). featurepipe returns the request-time
values at each entity row's instant; Feast's ``duckdb`` store runs its as-of join over the
very same tables (the views have no TTL, so both give the same values: the checksums must
agree). ``--views plain``: plain feature views over ~10M synthetic feature rows (user: 5M
rows x 8 features; merchant: 3M x 4; user x merchant: 2M x 4), TTL 7 days.

    .venv/bin/python benchmarks/pit_join.py                      # 10k, 100k, 1M
    .venv/bin/python benchmarks/pit_join.py --sizes 1000000 --repeat 3 --stores featurepipe,duckdb
    .venv/bin/python benchmarks/pit_join.py --views plain
    .venv/bin/python benchmarks/pit_join.py --out-of-core 20000000  # featurepipe only, result streamed to Parquet

Prints wall seconds (median of ``--repeat``), peak RSS, rows returned, a checksum of the
feature values (stores must agree) and the ratio to featurepipe. featurepipe's first
retrieval after the files change builds its sorted index of each view: that run is timed
on its own first (``index build``); ``featurepipe-scan`` is featurepipe with the index
switched off (an ASOF join over the files on every retrieval).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

START = np.datetime64("2026-01-01T00:00:00", "us")
SPAN_US = 30 * 86_400 * 1_000_000
USERS, MERCHANTS = 200_000, 20_000
VIEWS = {  # name: (keys, rows, features)
    "user_view": (["user_id"], 5_000_000, 8),
    "merchant_view": (["merchant_id"], 3_000_000, 4),
    "pair_view": (["user_id", "merchant_id"], 2_000_000, 4),
}

# windowed views: name -> (keys, [(function, window in hours, feature name)])
EVENTS = 1_000_000
WINDOWED = {
    "user_view": (["user_id"], [
        ("count", 1, "u_count_1h"), ("sum", 1, "u_sum_1h"), ("count", 24, "u_count_24h"), ("sum", 24, "u_sum_24h"),
        ("count", 168, "u_count_7d"), ("sum", 168, "u_sum_7d"), ("mean", 168, "u_mean_7d"), ("max", 24, "u_max_24h"),
    ]),
    "merchant_view": (["merchant_id"], [
        ("count", 24, "m_count_24h"), ("count", 168, "m_count_7d"), ("mean", 168, "m_mean_7d"), ("max", 168, "m_max_7d"),
    ]),
    "pair_view": (["user_id", "merchant_id"], [
        ("count", 24, "p_count_24h"), ("sum", 24, "p_sum_24h"), ("count", 168, "p_count_7d"), ("sum", 168, "p_sum_7d"),
    ]),
}

WINDOWED_DEFINITIONS = '''
from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.aggregation import Aggregation
from feast.types import Float64, Int64
from featurepipe.definitions import WindowedFeatures

DATA = "{data}"
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.INT64)
events = FileSource(name="events", path=f"{{DATA}}/events/**/*.parquet", timestamp_field="event_timestamp")


def windowed(name, keys, aggs):
    spec = WindowedFeatures(
        name=name, entity=user if keys[0] == "user_id" else merchant, source=events, ttl=timedelta(0),
        offline_root=f"{{DATA}}/tables",
        aggregations=[Aggregation(column="amount", function=f, time_window=timedelta(hours=h), name=n) for f, h, n in aggs],
    )
    if len(keys) == 1:
        return spec.feature_view()
    # a compound key: WindowedFeatures declares one entity, so the view is assembled from its parts
    return FeatureView(name=name, entities=[user, merchant], ttl=timedelta(0), online=True,
                       tags=spec.feature_view().tags, source=spec.push_source(),
                       schema=[Field(name=k, dtype=Int64) for k in keys]
                              + [Field(name=n, dtype=Int64 if f == "count" else Float64) for f, _, n in aggs])


for name, (keys, aggs) in {views}.items():
    globals()[name] = windowed(name, keys, aggs)
'''

DEFINITIONS = '''
from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64

DATA = "{data}"
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.INT64)

for name, ents, keys, n, ttl in {specs}:
    schema = [Field(name=k, dtype=Int64) for k in keys] + [Field(name=f"{{name}}_f{{i}}", dtype=Float64) for i in range(n)]
    globals()[name] = (FeatureView(name=name, entities=[user if e == "user" else merchant for e in ents], ttl=ttl, schema=schema,
                             source=FileSource(name=name + "_src", path=f"{{DATA}}/{{name}}.parquet", timestamp_field="event_timestamp")))
'''


def _keys(rng: np.random.Generator, n: int, cardinality: int) -> np.ndarray:
    """Skewed ids: a few very active, a long tail (lognormal weights)."""
    weights = rng.lognormal(0.0, 1.2, cardinality)
    return rng.choice(cardinality, size=n, p=weights / weights.sum()).astype(np.int64) + 1


def generate(data: Path) -> None:
    rng = np.random.default_rng(7)
    data.mkdir(parents=True, exist_ok=True)
    for name, (keys, rows, features) in VIEWS.items():
        columns: dict[str, pa.Array] = {}
        for key in keys:
            columns[key] = pa.array(_keys(rng, rows, USERS if key == "user_id" else MERCHANTS))
        stamps = START + rng.integers(0, SPAN_US, rows).astype("timedelta64[us]")
        columns["event_timestamp"] = pa.array(stamps, pa.timestamp("us", tz="UTC"))
        for i in range(features):
            columns[f"{name}_f{i}"] = pa.array(rng.normal(size=rows).round(6))
        pq.write_table(pa.table(columns), data / f"{name}.parquet", row_group_size=1_000_000)


def generate_events(data: Path) -> None:
    """Raw card events, one Parquet file per day: skewed users and merchants, 30 days."""
    rng = np.random.default_rng(7)
    stamps = np.sort(START + rng.integers(0, SPAN_US, EVENTS).astype("timedelta64[us]"))
    table = pa.table({
        "user_id": pa.array(_keys(rng, EVENTS, USERS)),
        "merchant_id": pa.array(_keys(rng, EVENTS, MERCHANTS)),
        "event_timestamp": pa.array(stamps, pa.timestamp("us", tz="UTC")),
        "amount": pa.array(np.round(rng.lognormal(3.0, 1.0, EVENTS), 2)),
    })
    days = stamps.astype("datetime64[D]")
    for day in np.unique(days):
        folder = data / "events" / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(pa.array(days == day)), folder / "part-0.parquet")


def entity_frame(n: int):  # noqa: ANN201 - pandas is imported lazily
    import pandas as pd

    rng = np.random.default_rng(n)
    return pd.DataFrame({
        "user_id": _keys(rng, n, USERS),
        "merchant_id": _keys(rng, n, MERCHANTS),
        "event_timestamp": pd.to_datetime(START + rng.integers(0, SPAN_US, n).astype("timedelta64[us]"), utc=True),
    })


def make_repo(root: Path, data: Path, windowed: bool) -> Path:
    repo = root / ("repo-windowed" if windowed else "repo")
    repo.mkdir(parents=True, exist_ok=True)
    if windowed:
        (repo / "features.py").write_text(WINDOWED_DEFINITIONS.format(data=data, views=repr(WINDOWED)))
    else:
        specs = [(name, ["user" if k == "user_id" else "merchant" for k in keys], keys, n, "timedelta(days=7)")
                 for name, (keys, _, n) in VIEWS.items()]
        specs_src = "[" + ", ".join(f"({n!r}, {e!r}, {k!r}, {f}, {t})" for n, e, k, f, t in specs) + "]"
        (repo / "features.py").write_text(DEFINITIONS.format(data=data, specs=specs_src))
    (repo / "feature_store.yaml").write_text(
        "project: bench\nprovider: local\nregistry: registry.db\n"
        "online_store:\n  type: sqlite\n  path: online.db\n"
        "offline_store:\n  type: featurepipe.offline.store.FeaturepipeOfflineStore\n"
        "entity_key_serialization_version: 3\n"
    )
    feast = str(Path(sys.executable).parent / "feast")
    subprocess.run([feast, "--chdir", str(repo), "apply"], check=True, capture_output=True)
    return repo


def backfill_windowed(repo: Path) -> None:
    """featurepipe's backfill of the windowed views (their change-point tables), timed; run
    in a child process (``--backfill``), so this one stays small: a child forked from it
    would count its memory in the child's peak RSS."""
    from feast import FeatureStore

    from featurepipe.batch.backfill import backfill

    t0 = time.perf_counter()
    results = backfill(FeatureStore(repo_path=str(repo)), progress=False)
    rows = ", ".join(f"{r.view} {r.rows:,} rows" for r in results)
    print(f"backfill of the windowed views: {time.perf_counter() - t0:.1f} s ({rows})")


def feature_refs(windowed: bool) -> list[str]:
    if windowed:
        return [f"{name}:{n}" for name, (_, aggs) in WINDOWED.items() for _, _, n in aggs]
    return [f"{name}:{name}_f{i}" for name, (_, _, n) in VIEWS.items() for i in range(n)]


def worker(args: argparse.Namespace) -> None:
    """One retrieval in this process; prints a JSON line."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    offline: dict[str, object] = {
        "featurepipe": {"type": "featurepipe.offline.store.FeaturepipeOfflineStore"},
        "featurepipe-scan": {"type": "featurepipe.offline.store.FeaturepipeOfflineStore", "index": False},
        "duckdb": {"type": "duckdb"},
        "file": {"type": "file"},
    }[args.store]
    if args.store.startswith("featurepipe") and args.memory_limit:
        offline = {**offline, "memory_limit": args.memory_limit}
    repo = Path(args.repo)
    config = RepoConfig(project="bench", provider="local", registry=str(repo / "registry.db"),
                        online_store={"type": "sqlite", "path": str(repo / "online.db")},
                        offline_store=offline, entity_key_serialization_version=3, repo_path=repo)
    store = FeatureStore(config=config)
    refs = feature_refs(repo.name == "repo-windowed")
    if args.entities == 0:
        print(json.dumps({"seconds": 0.0, "rows": 0, "checksum": None}))
        return
    entity_df = entity_frame(args.entities)
    t0 = time.perf_counter()
    job = store.get_historical_features(entity_df=entity_df, features=refs)
    if args.to_parquet:
        rows = job.to_parquet(Path(args.repo).parent / "result.parquet")
        seconds = time.perf_counter() - t0
        checksum = None
    else:
        result = job.to_df()
        seconds = time.perf_counter() - t0  # the checksum below is not the store's work
        rows = len(result)
        feature_cols = [r.split(":")[1] for r in refs]
        checksum = [round(float(np.nansum(result[feature_cols].to_numpy(dtype="float64"))), 3),
                    int(result[feature_cols].isna().to_numpy().sum())]
    print(json.dumps({"seconds": seconds, "rows": rows, "checksum": checksum}))


def run_one(store: str, entities: int, repo: Path, timeout: float, extra: list[str]) -> dict[str, object]:
    """Run one retrieval in a child process; its peak RSS comes from ``wait4``."""
    cmd = [sys.executable, __file__, "--worker", "--store", store, "--entities", str(entities), "--repo", str(repo), *extra]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        errors = err.read().strip().splitlines()
    rss_mb = usage.ru_maxrss / 1024
    if not lines:
        reason = "killed (timeout)" if proc.returncode < 0 else (errors or ["no output"])[-1][:160]
        return {"error": reason, "rss_mb": rss_mb}
    return {**json.loads(lines[-1]), "rss_mb": rss_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="entity frame sizes, comma separated")
    parser.add_argument("--stores", default="featurepipe,featurepipe-scan,duckdb,file",
                        help="stores to compare (featurepipe-scan: featurepipe with its index switched off)")
    parser.add_argument("--file-max", type=int, default=100_000, help="largest entity frame for Feast's file store")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the median is printed")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    parser.add_argument("--out-of-core", type=int, default=0, metavar="N",
                        help="instead: featurepipe only, N entity rows, result streamed to Parquet")
    parser.add_argument("--memory-limit", default="", help="DuckDB memory_limit for featurepipe (e.g. 2GB)")
    parser.add_argument("--views", choices=["windowed", "plain"], default="windowed",
                        help="windowed-aggregate views backfilled by featurepipe, or plain views")
    parser.add_argument("--data", default="", help="reuse generated data (and tables) in this folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--entities", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repo", help=argparse.SUPPRESS)
    parser.add_argument("--to-parquet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backfill", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.backfill:
        backfill_windowed(Path(args.repo))
        return

    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="fp-pit-"))
    data = root / "data"
    windowed = args.views == "windowed"
    if windowed and not (data / "events").exists():
        t0 = time.perf_counter()
        generate_events(data)
        print(f"generated {EVENTS:,} raw events in {time.perf_counter() - t0:.1f} s ({root})")
    elif not windowed and not (data / "pair_view.parquet").exists():
        t0 = time.perf_counter()
        generate(data)
        print(f"generated {sum(v[1] for v in VIEWS.values()):,} feature rows in {time.perf_counter() - t0:.1f} s ({root})")
    repo = make_repo(root, data, windowed)
    if windowed and not (data / "tables").exists():
        subprocess.run([sys.executable, __file__, "--backfill", "--repo", str(repo)], check=True)
    extra = ["--memory-limit", args.memory_limit] if args.memory_limit else []
    base = run_one("featurepipe", 0, repo, 120, [])
    print(f"baseline (import feast, no retrieval): peak RSS {base['rss_mb']:.0f} MB")
    stores = args.stores.split(",")
    if "featurepipe" in stores and not args.out_of_core:
        # the first retrieval after the files change builds the sorted index of every view;
        # measured on its own, then every run below finds it built
        shutil.rmtree(repo / ".featurepipe", ignore_errors=True)
        cold = run_one("featurepipe", 10_000, repo, args.timeout, extra)
        print(f"featurepipe index build (first retrieval of 10,000 entity rows after the files change): "
              f"{cold.get('seconds', float('nan')):.2f} s, peak RSS {cold['rss_mb']:.0f} MB {cold.get('error', '')}")

    if args.out_of_core:
        r = run_one("featurepipe", args.out_of_core, repo, args.timeout, [*extra, "--to-parquet"])
        print(f"out of core: {args.out_of_core:,} entity rows -> Parquet: {r.get('seconds', float('nan')):.1f} s, "
              f"peak RSS {r['rss_mb']:.0f} MB, rows {r.get('rows')} {r.get('error', '')}")
        return

    header = f"{'entities':>10}  {'store':<16} {'seconds':>8} {'peak RSS MB':>12} {'rows':>10}  {'vs featurepipe':>14}  checksum"
    print(header)
    print("-" * len(header))
    for size in (int(s) for s in args.sizes.split(",")):
        results: dict[str, dict[str, object]] = {}
        for store in stores:
            if store == "file" and size > args.file_max:
                print(f"{size:>10,}  {store:<16} {'skipped (--file-max)':>20}")
                continue
            runs = [run_one(store, size, repo, args.timeout, extra if store.startswith("featurepipe") else [])
                    for _ in range(args.repeat)]
            ok = [r for r in runs if "error" not in r]
            if not ok:
                print(f"{size:>10,}  {store:<16} failed: {runs[-1]['error']}")
                continue
            secs = statistics.median(float(r["seconds"]) for r in ok)
            rss = statistics.median(float(r["rss_mb"]) for r in ok)
            results[store] = {"seconds": secs, "rss": rss, "rows": ok[-1]["rows"], "checksum": ok[-1]["checksum"]}
            ratio = secs / results["featurepipe"]["seconds"] if "featurepipe" in results else float("nan")
            print(f"{size:>10,}  {store:<16} {secs:>8.2f} {rss:>12.0f} {ok[-1]['rows']:>10,}  {ratio:>13.1f}x  {ok[-1]['checksum']}")
        sums = {s: r["checksum"] for s, r in results.items() if r["checksum"] is not None}
        if len(set(map(str, sums.values()))) > 1:
            print(f"{'':>10}  !! stores disagree on the feature values: {sums}")


if __name__ == "__main__":
    main()
