"""Redis Cluster benchmark: materialisation and serving on a 3-node cluster vs one server.

Same data, same definitions, side by side in one run, on this machine:

* ``single``   one ``redis-server`` (featurepipe's engine: RESTORE for new keys, one EVAL per
               batch for existing ones);
* ``cluster``  three primaries of one Redis Cluster on the same machine (each batch split by
               slot owner, RESTORE or one EVALSHA per key, every node written before any
               reply is read).

Materialisation: the plain feature view of ``benchmarks/materialize.py`` (``--entities`` x
``--features``), ``FeatureStore.materialize`` in a child process per run, Redis flushed
before each ``fresh`` run (new keys: RESTORE) and not before the ``rerun`` (every key
exists: the compare-and-set script, nothing newer); rounds alternate the targets, medians
printed with rows/s and the ratio. The content of both is digested (every key's fields) to
show they are the same.

Serving: ``python -m serving`` on each (one process), then ``--requests`` GetOnlineFeatures
calls of ``--batch`` random entities each (all features of the view), one at a time from
the Python client, the targets interleaved; p50 / p99 / mean latency.

    .venv/bin/python benchmarks/redis_cluster.py                      # 100k entities, about 2 minutes
    .venv/bin/python benchmarks/redis_cluster.py --entities 20000 --runs 3 --requests 1000

Three nodes on one 2-core machine share the cores with the client: the cluster's figures
here are what the protocol costs (more round trips, per-key scripts), not what three hosts
would give.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import materialize as bm  # noqa: E402  (benchmarks/materialize.py: data, repo and worker)

TARGETS = ("single", "cluster")


def cluster_repo(repo: Path, data: Path, connection: str, features: int) -> None:
    """benchmarks/materialize.py's featurepipe repo, its online store a Redis Cluster."""
    bm.write_repo(repo, data, 0, "featurepipe", features)
    text = (repo / "feature_store.yaml").read_text()
    text = text.replace('  connection_string: "127.0.0.1:0,db=0"',
                        f'  redis_type: redis_cluster\n  connection_string: "{connection}"')
    (repo / "feature_store.yaml").write_text(text)


def content_digest(ports: list[int]) -> tuple[int, str]:
    """Keys and a digest of every key's fields, over the given primaries."""
    import redis

    items = []
    for port in ports:
        client = redis.Redis(port=port)
        items += [(k, sorted(client.hgetall(k).items())) for k in client.scan_iter(count=2000)]
    items.sort()
    return len(items), hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def flush(ports: list[int]) -> None:
    import redis

    for port in ports:
        redis.Redis(port=port).flushall()


def serve(repo: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--repo", str(repo), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    from serving import FeatureClient

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on {repo} exited: {proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")
        try:
            with FeatureClient(f"127.0.0.1:{port}", retries=0) as client:
                client.get_features({"entity_id": [0]}, features=[f"{bm.VIEW}:f0"])
            return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--rows-per-entity", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="materialisation rounds (each: fresh, then rerun)")
    parser.add_argument("--requests", type=int, default=2000, help="serving calls per target")
    parser.add_argument("--batch", type=int, default=100, help="entities per serving call")
    args = parser.parse_args(argv)

    from featurepipe.redis_server import RedisClusterServers, RedisServer, free_port
    from serving import FeatureClient

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, RedisServer() as single, \
            RedisClusterServers() as cluster:
        base = Path(tmp)
        data = base / "data"
        bm.generate(data, args.entities, args.rows_per_entity, args.features)
        repos = {"single": base / "single", "cluster": base / "cluster"}
        bm.write_repo(repos["single"], data, single.port, "featurepipe", args.features)
        cluster_repo(repos["cluster"], data, cluster.connection_string, args.features)
        ports = {"single": [single.port], "cluster": cluster.ports}
        for repo in repos.values():
            bm.run_worker(repo, "apply")
        print(f"{args.entities:,} entities x {args.features} features; cluster nodes {cluster.ports}", flush=True)

        seconds: dict[tuple[str, str], list[float]] = {(t, k): [] for t in TARGETS for k in ("fresh", "rerun")}
        for run in range(args.runs):
            for target in TARGETS:
                flush(ports[target])
                fresh = bm.run_worker(repos[target], "materialize")["seconds"]
                rerun = bm.run_worker(repos[target], "materialize")["seconds"]
                seconds[(target, "fresh")].append(fresh)
                seconds[(target, "rerun")].append(rerun)
                print(f"  run {run + 1} {target:8s} fresh {fresh:6.2f} s  rerun {rerun:6.2f} s", flush=True)
        digests = {t: content_digest(ports[t]) for t in TARGETS}
        print("\nmaterialisation (median of runs, rows/s = entities / seconds)")
        print(f"  {'case':8s} {'single':>18s} {'cluster':>18s} {'cluster/single':>15s}")
        for kind in ("fresh", "rerun"):
            s = statistics.median(seconds[("single", kind)])
            c = statistics.median(seconds[("cluster", kind)])
            print(f"  {kind:8s} {s:6.2f} s {args.entities / s:9,.0f}/s {c:6.2f} s {args.entities / c:9,.0f}/s "
                  f"{(args.entities / c) / (args.entities / s):14.2f}x")
        same = digests["single"] == digests["cluster"]
        print(f"  content: {digests['single'][0]:,} keys on one server, {digests['cluster'][0]:,} on the cluster; "
              f"identical fields: {'yes' if same else 'NO'}")

        servers, addresses = [], {}
        try:
            for target in TARGETS:
                port = free_port()
                servers.append(serve(repos[target], port))
                addresses[target] = f"127.0.0.1:{port}"
            features = [f"{bm.VIEW}:f{i}" for i in range(args.features)]
            rng = random.Random(7)
            latencies: dict[str, list[float]] = {t: [] for t in TARGETS}
            clients = {t: FeatureClient(addresses[t], timeout=5.0) for t in TARGETS}
            for _ in range(args.requests):
                entities = {"entity_id": rng.sample(range(args.entities), args.batch)}
                for target in TARGETS:
                    t0 = time.perf_counter()
                    clients[target].get_features(entities, features=features)
                    latencies[target].append((time.perf_counter() - t0) * 1000)
            check = {"entity_id": list(range(0, args.entities, max(1, args.entities // args.batch)))[:args.batch]}
            answers = {t: clients[t].get_features(check, features=features).to_dict() for t in TARGETS}
            for c in clients.values():
                c.close()
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait(30)
        print(f"\nserving: {args.requests:,} calls x {args.batch} entities x {args.features} features, one at a time")
        print(f"  {'target':8s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}")
        for target in TARGETS:
            lat = latencies[target]
            print(f"  {target:8s} {percentile(lat, 0.5):8.2f} {percentile(lat, 0.99):8.2f} {statistics.fmean(lat):8.2f}")
        p50 = percentile(latencies["cluster"], 0.5) / percentile(latencies["single"], 0.5)
        p99 = percentile(latencies["cluster"], 0.99) / percentile(latencies["single"], 0.99)
        print(f"  cluster/single: p50 {p50:.2f}x, p99 {p99:.2f}x; same answers: "
              f"{'yes' if answers['single'] == answers['cluster'] else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
