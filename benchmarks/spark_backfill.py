"""Backfill benchmark: the same windowed view on DuckDB and on Spark, side by side.

Generates raw transactions (``featurepipe generate``'s generator) into a temporary folder and
backfills one view like the demo's ``user_transaction_stats`` (count, sum, mean, max over 1h,
24h and 7d, and the last event's time; 13 aggregates over 3 windows) with:

* ``duckdb``: :func:`featurepipe.batch.backfill.backfill_view` (one thread: the engine's
  deterministic profile);
* ``spark-local[N]``: :func:`featurepipe.batch.spark.backfill_view` on a ``local[N]`` session
  (N executor cores: ``--cores 1 2`` gives the scaling figure per core).

Each engine runs in its own process, in rounds (one run per engine per round, so load from
elsewhere hits all alike). Printed per engine: the median backfill time, seconds per
million events, the time of Spark's first run in a fresh session apart (JIT warm-up) from
the warm ones, session start-up, and peak RSS (the Python process's ``VmHWM`` plus, for
Spark, its JVM's). After each run the output table is digested (every column's values
sorted by key and time), so the table shows that the engines wrote equal values.

    .venv/bin/python benchmarks/spark_backfill.py                      # 1M events, local[1] and local[2]
    .venv/bin/python benchmarks/spark_backfill.py --rows 200000 --rounds 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, D = timedelta(hours=1), timedelta(days=1)


def view(raw: Path, out: Path):  # noqa: ANN201 (an AggregateView; imported in the child)
    from featurepipe.definitions import AggregateSpec, AggregateView

    aggs = []
    for window, suffix in ((H, "1h"), (D, "24h"), (7 * D, "7d")):
        aggs += [AggregateSpec(f"txn_count_{suffix}", "count", "amount", window),
                 AggregateSpec(f"amount_sum_{suffix}", "sum", "amount", window),
                 AggregateSpec(f"amount_mean_{suffix}", "mean", "amount", window),
                 AggregateSpec(f"amount_max_{suffix}", "max", "amount", window)]
    aggs.append(AggregateSpec("last_txn_epoch", "last", "event_timestamp", None))
    return AggregateView(name="user_transaction_stats", join_keys=("user_id",),
                         input_path=str(raw / "**" / "*.parquet"), timestamp_field="event_timestamp",
                         aggregations=tuple(aggs), offline_path=out, push_source="", ttl=None)


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process (VmHWM), in MB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def java_children() -> list[int]:
    """PIDs of this process's JVM children (Spark's driver JVM in local mode)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].split(")", 1)[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me and name == "java":
            found.append(int(stat.parent.name))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (this one included), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [os.getpid(), *pids]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def digest(path: Path, keys: list[str]) -> str:
    import pyarrow.parquet as pq

    table = pq.read_table(path, partitioning=None)
    table = table.sort_by([(k, "ascending") for k in [*keys, "event_timestamp"]])
    h = hashlib.sha256()
    for name in sorted(table.column_names):
        column = table[name].combine_chunks()
        h.update(name.encode())
        h.update(column.to_numpy(zero_copy_only=False).tobytes() if column.null_count == 0 else
                 json.dumps(column.to_pylist(), default=str).encode())
    return h.hexdigest()[:12]


def child(engine: str, raw: Path, out: Path, repeats: int) -> None:
    """One engine's runs in this process; prints RESULT {json}."""
    t0 = time.perf_counter()
    seconds, cpu, startup = [], [], 0.0
    target = view(raw, out)
    if engine == "duckdb":
        from featurepipe.batch.backfill import backfill_view

        startup = time.perf_counter() - t0
        for _ in range(repeats):
            t, c = time.perf_counter(), cpu_seconds([])
            backfill_view(target)
            seconds.append(time.perf_counter() - t)
            cpu.append(cpu_seconds([]) - c)
        jvm = 0.0
    else:
        from featurepipe.batch.spark import backfill_view as spark_backfill
        from featurepipe.core.spark import spark_session

        cores = engine.split("[")[1].rstrip("]")
        spark = spark_session(master=f"local[{cores}]", overrides={"spark.sql.shuffle.partitions": str(2 * int(cores))})
        startup = time.perf_counter() - t0
        for _ in range(repeats):
            t, c = time.perf_counter(), cpu_seconds(java_children())
            spark_backfill(target, spark=spark)
            seconds.append(time.perf_counter() - t)
            cpu.append(cpu_seconds(java_children()) - c)
        jvm = sum(peak_rss_mb(p) for p in java_children())
    print("RESULT " + json.dumps({"seconds": seconds, "cpu": cpu, "startup": startup, "rss_mb": peak_rss_mb(),
                                  "jvm_rss_mb": jvm, "digest": digest(out, ["user_id"])}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="raw events (default 1M)")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="Spark local[N] sizes (default 1 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of one run per engine (default 2)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="backfills per process: Spark's first one warms its JIT (default 2)")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.repeats)
        return
    from featurepipe.generate import generate_transactions

    engines = ["duckdb", *(f"spark-local[{n}]" for n in args.cores)]
    with tempfile.TemporaryDirectory(prefix="fp-spark-bench-") as tmp:
        raw = Path(tmp) / "raw"
        generate_transactions(args.rows, raw, days=args.days, seed=11)
        print(f"{args.rows:,} events over {args.days} days; engines {engines}; {args.rounds} rounds x "
              f"{args.repeats} backfills per process", flush=True)
        results: dict[str, list[dict]] = {e: [] for e in engines}
        for r in range(args.rounds):
            for engine in engines:
                out = Path(tmp) / "out" / engine.replace("[", "").replace("]", "") / "user_transaction_stats"
                proc = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--child", engine,
                                       str(raw), str(out)], capture_output=True, text=True, cwd=ROOT)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(line[0][7:])
                results[engine].append(result)
                print(f"round {r + 1} {engine:15s} runs {[round(s, 2) for s in result['seconds']]}  start-up "
                      f"{result['startup']:.1f} s  peak RSS {result['rss_mb']:,.0f} MB + JVM "
                      f"{result['jvm_rss_mb']:,.0f} MB  digest {result['digest']}", flush=True)
        print()
        base = statistics.median(s for r in results["duckdb"] for s in r["seconds"])
        print(f"{'engine':15s} {'first run':>10s} {'warm (median)':>14s} {'s / M events':>13s} {'vs duckdb':>10s} "
              f"{'CPU s / M events':>17s} {'peak RSS MB':>12s}  digest")
        for engine in engines:
            runs = results[engine]
            first = statistics.median(r["seconds"][0] for r in runs)
            warm_runs = [s for r in runs for s in (r["seconds"][1:] or r["seconds"])]
            warm = statistics.median(warm_runs)
            cpu = statistics.median([c for r in runs for c in (r["cpu"][1:] or r["cpu"])])
            rss = max(r["rss_mb"] + r["jvm_rss_mb"] for r in runs)
            digests = sorted({r["digest"] for r in runs})
            print(f"{engine:15s} {first:10.2f} {warm:14.2f} {warm / args.rows * 1e6:13.2f} {warm / base:9.1f}x "
                  f"{cpu / args.rows * 1e6:17.1f} {rss:12,.0f}  {','.join(digests)}")
        same = len({r["digest"] for rs in results.values() for r in rs}) == 1
        print(f"\nequal values on every engine: {same}")
        print("CPU s: user + system time of the process (and its JVM) during a warm backfill: the core-seconds a "
              "cluster spends per million events")


if __name__ == "__main__":
    main()
