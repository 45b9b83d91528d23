"""Point-in-time join benchmark: featurepipe's DuckDB offline store vs its Spark offline store.

The same generated data, the same request, side by side: plain feature views over Parquet
(user: 2M rows x 8 features, TTL 7 days; merchant: 500k x 4; user x merchant: 500k x 4,
compound key; times spread over 30 days, skewed keys) and an entity frame of ``--entities``
rows at random instants, through ``FeatureStore.get_historical_features(...).to_arrow()``.
``--scale`` multiplies the feature rows.

Stores: ``duckdb`` (featurepipe's store as configured by default: its sorted index is built
by the first retrieval after the files change), ``duckdb-scan`` (index off: an ASOF join over
the files every time) and ``spark`` (:mod:`featurepipe.offline.spark_store` on ``local[2]``).
Each store runs in its own process, twice: the first retrieval (index build; for Spark, a
cold JVM and the session start apart), then the second (warm). Peak RSS: the worker's own
(``ru_maxrss``, it includes ``import feast``) and, for Spark, the JVM's (``VmHWM`` of the
driver JVM, read before the session stops); the JVM runs the executors too in local mode.
Every result is written to Parquet and compared with the DuckDB store's, Arrow table to
Arrow table (values and types).

    .venv/bin/python benchmarks/spark_pit.py                        # 100k entity rows
    .venv/bin/python benchmarks/spark_pit.py --entities 1000000 --scale 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

START = np.datetime64("2026-01-01T00:00:00", "us")
SPAN_US = 30 * 86_400 * 1_000_000
USERS, MERCHANTS = 200_000, 20_000
VIEWS = {  # name: (keys, rows at scale 1, features, TTL days or 0)
    "user_view": (["user_id"], 2_000_000, 8, 7),
    "merchant_view": (["merchant_id"], 500_000, 4, 0),
    "pair_view": (["user_id", "merchant_id"], 500_000, 4, 0),
}

DEFINITIONS = '''
from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float64, Int64

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.INT64)
for name, (keys, _, n, ttl) in {views}.items():
    schema = [Field(name=k, dtype=Int64) for k in keys] + [Field(name=f"{{name}}_f{{i}}", dtype=Float64) for i in range(n)]
    globals()[name] = FeatureView(
        name=name, entities=[user if k == "user_id" else merchant for k in keys], ttl=timedelta(days=ttl),
        schema=schema, source=FileSource(name=name + "_src", path="{data}/" + name + "/*.parquet",
                                         timestamp_field="event_timestamp", created_timestamp_column="created"))
'''

OFFLINE = {
    "duckdb": {"type": "featurepipe.offline.store.FeaturepipeOfflineStore"},
    "duckdb-scan": {"type": "featurepipe.offline.store.FeaturepipeOfflineStore", "index": False},
    "spark": {"type": "featurepipe.offline.spark_store.SparkOfflineStore", "master": "local[2]"},
}


def _keys(rng: np.random.Generator, n: int, cardinality: int) -> np.ndarray:
    """Skewed ids: a few very active, a long tail (lognormal weights)."""
    weights = rng.lognormal(0.0, 1.2, cardinality)
    return rng.choice(cardinality, size=n, p=weights / weights.sum()).astype(np.int64) + 1


def generate(data: Path, scale: float) -> int:
    """Each view's rows in 4 files; whole seconds, so ties on event time are common
    (the created time, 0-3 s later, breaks them)."""
    rng = np.random.default_rng(7)
    total = 0
    for name, (keys, rows, features, _) in VIEWS.items():
        rows = int(rows * scale)
        total += rows
        columns: dict[str, pa.Array] = {k: pa.array(_keys(rng, rows, USERS if k == "user_id" else MERCHANTS))
                                        for k in keys}
        seconds = rng.integers(0, SPAN_US // 1_000_000, rows)
        stamps = START + (seconds * 1_000_000).astype("timedelta64[us]")
        columns["event_timestamp"] = pa.array(stamps, pa.timestamp("us", tz="UTC"))
        columns["created"] = pa.array(stamps + (rng.integers(0, 4, rows) * 1_000_000).astype("timedelta64[us]"),
                                      pa.timestamp("us", tz="UTC"))
        for i in range(features):
            columns[f"{name}_f{i}"] = pa.array(rng.normal(size=rows).round(6))
        table = pa.table(columns)
        (data / name).mkdir(parents=True, exist_ok=True)
        for part in range(4):
            lo, hi = part * rows // 4, (part + 1) * rows // 4
            pq.write_table(table.slice(lo, hi - lo), data / name / f"part-{part}.parquet")
    return total


def entity_table(n: int) -> pa.Table:
    rng = np.random.default_rng(n)
    return pa.table({
        "user_id": pa.array(_keys(rng, n, USERS)),
        "merchant_id": pa.array(_keys(rng, n, MERCHANTS)),
        "event_timestamp": pa.array(START + rng.integers(0, SPAN_US, n).astype("timedelta64[us]"),
                                    pa.timestamp("us", tz="UTC")),
    })


def make_repo(root: Path, data: Path) -> Path:
    repo = root / "repo"
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "features.py").write_text(DEFINITIONS.format(data=data, views=repr(VIEWS)))
    (repo / "feature_store.yaml").write_text(
        "project: bench\nprovider: local\nregistry: registry.db\n"
        "online_store:\n  type: sqlite\n  path: online.db\n"
        "offline_store:\n  type: featurepipe.offline.store.FeaturepipeOfflineStore\n"
        "entity_key_serialization_version: 3\n"
    )
    feast = str(Path(sys.executable).parent / "feast")
    subprocess.run([feast, "--chdir", str(repo), "apply"], check=True, capture_output=True)
    return repo


def feature_refs() -> list[str]:
    return [f"{name}:{name}_f{i}" for name, (_, _, n, _) in VIEWS.items() for i in range(n)]


def _jvm_peak_mb() -> float:
    """Peak RSS of the driver JVM (``VmHWM``), or NaN when no session runs."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    proc = getattr(gateway, "proc", None)
    if proc is None:
        return float("nan")
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    """Two retrievals in this process; prints a JSON line and writes the result to Parquet."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    repo = Path(args.repo)
    config = RepoConfig(project="bench", provider="local", registry=str(repo / "registry.db"),
                        online_store={"type": "sqlite", "path": str(repo / "online.db")},
                        offline_store=OFFLINE[args.store], entity_key_serialization_version=3, repo_path=repo)
    store = FeatureStore(config=config)
    entity_df = entity_table(args.entities).to_pandas()
    report: dict[str, object] = {}
    if args.store == "spark":
        from featurepipe.core.spark import spark_session

        t0 = time.perf_counter()
        spark_session(repo, master="local[2]")
        report["session_s"] = time.perf_counter() - t0
    times = []
    result = None
    for _ in range(2):
        t0 = time.perf_counter()
        result = store.get_historical_features(entity_df=entity_df, features=feature_refs()).to_arrow()
        times.append(time.perf_counter() - t0)
    assert result is not None
    pq.write_table(result, args.out)
    report.update(first_s=times[0], warm_s=times[1], rows=result.num_rows,
                  worker_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.store == "spark":
        report["jvm_mb"] = _jvm_peak_mb()
    print(json.dumps(report))


def run(store: str, repo: Path, entities: int, out: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", "--store", store, "--repo", str(repo),
           "--entities", str(entities), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{store} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))


def _ratio(seconds: float, base: float) -> str:
    return "-" if base != base else f"{seconds / base:.1f}x"  # base != base: NaN, not run yet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=100_000, help="entity rows")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the feature rows (3M at 1)")
    parser.add_argument("--stores", default="duckdb,duckdb-scan,spark")
    parser.add_argument("--data", default="", help="reuse generated data in this folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--repo", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="fp-spark-pit-"))
    data = root / "data"
    if not data.exists():
        t0 = time.perf_counter()
        rows = generate(data, args.scale)
        print(f"generated {rows:,} feature rows in {time.perf_counter() - t0:.1f} s ({root})")
    repo = make_repo(root, data)
    print(f"{args.entities:,} entity rows, {len(feature_refs())} features from {len(VIEWS)} views; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    header = (f"{'store':<12} {'first s':>8} {'warm s':>8} {'vs duckdb':>10} {'vs scan':>8} {'session s':>10} "
              f"{'worker MB':>10} {'JVM MB':>8}  same result as {args.stores.split(',')[0]}")
    print(header)
    print("-" * len(header))
    results: dict[str, dict[str, float]] = {}
    reference: pa.Table | None = None
    for store in args.stores.split(","):
        out = root / f"result-{store}.parquet"
        r = results[store] = run(store, repo, args.entities, out)
        table = pq.read_table(out)
        if reference is None:
            reference = table
        same = "yes" if table.equals(reference) else "NO"  # values and types
        base = results.get("duckdb", {}).get("warm_s", float("nan"))
        scan = results.get("duckdb-scan", {}).get("warm_s", float("nan"))
        print(f"{store:<12} {r['first_s']:>8.2f} {r['warm_s']:>8.2f} {_ratio(r['warm_s'], base):>10} "
              f"{_ratio(r['warm_s'], scan):>8} "
              f"{r.get('session_s', float('nan')):>10.1f} {r['worker_mb']:>10.0f} "
              f"{r.get('jvm_mb', float('nan')):>8.0f}  {same} ({r['rows']:,} rows)")


if __name__ == "__main__":
    main()
