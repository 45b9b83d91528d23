"""Online serving benchmark: featurepipe's gRPC server against Feast's own servers and two floors.

Same Redis, same data, same requests, side by side in one run:

* ``featurepipe``      ``python -m serving`` (gRPC ServingService), 1 and 2 worker processes
* ``feast serve``      Feast's Python feature server (HTTP/JSON), ``--max-requests 0``, 1 and 2 workers
* ``feast listen``     Feast's Python gRPC server (``/GrpcFeatureServer/GetOnlineFeatures``)
* ``echo floor``       a trivial Python gRPC server (thread pool, as featurepipe) that returns the request
* ``redis floor``      the same pipelined HMGETs as one request, in a Python loop (redis-py + hiredis)
                       closed loop, and paced at each open-loop rate (one call every 1/rate s:
                       on an idle machine each call also pays for waking redis-server, as a server's does)

Cases: 1 entity and 100 entities x feature service ``fraud_detection_v1`` (16 stored
features from 3 views + 2 on-demand ones). The load generator is ``h2load`` (nghttp2-client,
C, one thread; gRPC with a prebuilt body, HTTP/1.1 for ``feast serve``): open loop at fixed
request rates (gRPC: one connection with up to 100 calls in flight; HTTP/1.1: 4 connections)
for p50 / p99 / p99.9 from its per-request log, and closed loop (64 calls in flight) for saturation
throughput. h2load counts HTTP statuses, not ``grpc-status``: each server answers a real
request before its run, and the response bytes per request are printed as a check.
Start-up: process start to first served request (a poll every 10 ms).

    .venv/bin/python benchmarks/serving.py                    # about 5 minutes
    .venv/bin/python benchmarks/serving.py --seconds 3 --skip feast-serve-2
    .venv/bin/python benchmarks/serving.py --json results.json
    .venv/bin/python benchmarks/serving.py --only echo-floor,featurepipe-1,featurepipe-old-1 --old-checkout ../main

It builds its own small repo (generate, ``feast apply``, backfill, materialize) into a private
redis-server, unless ``--repo`` names a repo already materialised into ``$REDIS_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SERVICE = "fraud_detection_v1"
GRPC_HEADERS = ["content-type: application/grpc", "te: trailers"]
BIN = Path(sys.executable).parent


# --- the echo floor server (run as a child: benchmarks/serving.py --echo-server PORT) ---------

def echo_server(port: int) -> None:
    from concurrent import futures

    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "feast.serving.ServingService", {"GetOnlineFeatures": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


# --- setup --------------------------------------------------------------------------------------

def build_repo(base: Path, rows: int, redis_url: str) -> Path:
    """generate -> feast apply -> backfill -> materialize, as tests/conftest.py does."""
    from featurepipe.config import load_store, redis_url_to_feast
    from featurepipe.generate import generate_transactions

    repo, data = base / "feature_repo", base / "data"
    repo.mkdir(parents=True)
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(ROOT / "feature_repo" / name, repo / name)
    os.environ.update(REDIS_URL=redis_url, FEATUREPIPE_DATA_DIR=str(data),
                      FEATUREPIPE_REPO=str(repo), FEATUREPIPE_REDIS=redis_url_to_feast(redis_url))
    generate_transactions(rows, data / "raw" / "transactions", days=10)
    subprocess.run([str(BIN / "feast"), "--chdir", str(repo), "apply"], check=True,
                   capture_output=True, timeout=600)
    from featurepipe.jobs.backfill import backfill
    from featurepipe.jobs.materialize import materialize

    store = load_store(repo)
    backfill(store, progress=False)
    materialize(store)
    return repo


def sample_entities(repo: Path, count: int) -> dict[str, list[int]]:
    import pyarrow.dataset as ds

    from featurepipe.config import data_dir

    table = ds.dataset(data_dir(repo) / "raw" / "transactions", format="parquet",
                       partitioning="hive").head(20 * count, columns=["user_id", "merchant_id"])
    pairs = list(dict.fromkeys(zip(table.column("user_id").to_pylist(),
                                   table.column("merchant_id").to_pylist(), strict=True)))[:count]
    return {"user_id": [u for u, _ in pairs], "merchant_id": [m for _, m in pairs]}


def request_fields(entities: dict[str, list[int]]) -> dict[str, list[Any]]:
    n = len(entities["user_id"])
    return {**entities, "amount": [42.5] * n, "txn_epoch": [time.time()] * n}


def grpc_body(rows: dict[str, list[Any]], folder: Path, name: str) -> Path:
    """The length-prefixed gRPC message (request fields ride with the entities, as Feast's
    SDK sends them; ``feast listen`` reads no request_context)."""
    from serving.client import build_request

    message = build_request(rows, feature_service=SERVICE).SerializeToString()
    path = folder / f"{name}.grpc"
    path.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    return path


def http_body(rows: dict[str, list[Any]], folder: Path, name: str) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"feature_service": SERVICE, "entities": rows}))
    return path


# --- servers --------------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    kind: str  # grpc | http
    path: str  # request path
    command: list[str]
    port: int
    check: Callable[[Server, dict[str, list[Any]]], int]  # one real call: response bytes
    cwd: Path | None = None  # the old checkout's server runs from there
    expected_bytes: dict[str, int] = field(default_factory=dict)  # per case, from check()
    process: subprocess.Popen[bytes] | None = None
    startup_seconds: float = float("nan")
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self, rows: dict[str, list[Any]], log: Path, timeout: float = 120) -> None:
        started = time.perf_counter()
        env = None if self.cwd is None else {**os.environ, "PYTHONPATH": str(self.cwd)}
        self.process = subprocess.Popen(self.command, stdout=log.open("ab"), cwd=self.cwd, env=env,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {log}")
            try:
                self.check(self, rows)
                self.startup_seconds = time.perf_counter() - started
                return
            except Exception as exc:
                code = getattr(exc, "code", lambda: None)()
                if code is not None and code.name not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    # it answers, with an error: report that instead of measuring errors
                    self.startup_seconds = time.perf_counter() - started
                    details = (exc.details() or "").strip().splitlines()  # type: ignore[attr-defined]
                    self.results["error"] = f"{code.name}: {details[-1] if details else ''}"
                    raise RuntimeError(f"answers every request with {self.results['error']}") \
                        from None
                time.sleep(0.01)
        raise RuntimeError(f"{self.name} did not serve within {timeout}s; see {log}")

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # our own session: the server and its workers
            self.process.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        self.process = None


def grpc_check(server: Server, rows: dict[str, list[Any]]) -> int:
    import grpc

    from serving import protos
    from serving.client import build_request

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(server.path)
        body = call(build_request(rows, feature_service=SERVICE).SerializeToString(), timeout=5)
    if server.name != "echo floor":
        response = protos.GetOnlineFeaturesResponse.FromString(body)
        names = list(response.metadata.feature_names.val)
        assert "amount_sum_24h" in names, names
        statuses = [s for r in response.results for s in r.statuses]
        assert 1 in statuses, "no PRESENT value: is Redis materialised?"
    return len(body)


def http_check(server: Server, rows: dict[str, list[Any]]) -> int:
    request = urllib.request.Request(
        server.url, data=json.dumps({"feature_service": SERVICE, "entities": rows}).encode(),
        headers={"content-type": "application/json"})
    body = urllib.request.urlopen(request, timeout=5).read()
    assert b"amount_sum_24h" in body, body[:300]
    return len(body)


def free_port() -> int:
    from featurepipe.redis_server import free_port as port

    return port()


def servers(repo: Path, selected: set[str], old_checkout: Path | None = None) -> list[Server]:
    py, feast = str(BIN / "python"), str(BIN / "feast")
    out = []

    def add(name: str, kind: str, path: str, command: Callable[[int], list[str]],
            check: Callable[[Server, dict[str, list[Any]]], int], cwd: Path | None = None) -> None:
        key = name.replace(" ", "-").replace("(", "").replace(")", "")
        if key in selected or not selected:
            port = free_port()
            out.append(Server(name, kind, path, command(port), port, check, cwd))

    serving = "/feast.serving.ServingService/GetOnlineFeatures"
    add("echo floor", "grpc", serving,
        lambda p: [py, str(Path(__file__).resolve()), "--echo-server", str(p)], grpc_check)
    add("featurepipe-1", "grpc", serving,
        lambda p: [py, "-m", "serving", "--repo", str(repo), "--port", str(p)], grpc_check)
    if old_checkout is not None:  # today's server, on the same Redis (it reads Feast's fields only)
        add("featurepipe-old-1", "grpc", serving,
            lambda p: [py, "-m", "serving", "--repo", str(repo), "--port", str(p)], grpc_check, old_checkout)
    add("featurepipe-2", "grpc", serving,
        lambda p: [py, "-m", "serving", "--repo", str(repo), "--port", str(p), "--workers", "2"],
        grpc_check)
    add("feast listen", "grpc", "/GrpcFeatureServer/GetOnlineFeatures",
        lambda p: [feast, "--chdir", str(repo), "listen", "-a", f"127.0.0.1:{p}", "-w", "8"],
        grpc_check)
    for workers in (1, 2):
        add(f"feast-serve-{workers}", "http", "/get-online-features",
            lambda p, w=workers: [feast, "--chdir", str(repo), "serve", "-h", "127.0.0.1", "-p",
                                  str(p), "-w", str(w), "--max-requests", "0", "--no-access-log"],
            http_check)
    return out


# --- load ---------------------------------------------------------------------------------------

def ensure_h2load() -> str:
    found = shutil.which("h2load")
    if found:
        return found
    print("h2load not found: installing Debian's nghttp2-client (apt-get) ...", file=sys.stderr)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", "nghttp2-client"], env=env,
                          capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "nghttp2-client"], env=env,
                           capture_output=True)
    found = shutil.which("h2load")
    if not found:
        sys.exit("this benchmark needs h2load: sudo apt-get install -y nghttp2-client")
    return found


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def h2load(server: Server, body: Path, seconds: float, *, rps: float | None, log: Path,
           h2load_bin: str) -> dict[str, Any]:
    """One h2load run: open loop at ``rps`` requests/s in total, else closed loop."""
    http1 = server.kind == "http"
    if rps is not None:
        # gRPC: one connection, up to 100 calls in flight (several connections' timers fire
        # together, bursts that inflate every figure); HTTP/1.1 needs connections instead
        clients = 4 if http1 else 1
        load = ["-c", str(clients), "-m", "1" if http1 else "100", f"--rps={rps / clients:g}"]
    else:
        load = ["-c", "64", "-m", "1"] if http1 else ["-c", "16", "-m", "4"]
    headers = ["content-type: application/json"] if http1 else GRPC_HEADERS
    log.unlink(missing_ok=True)
    command = [h2load_bin, server.url, "-d", str(body), "-t", "1", "-D", f"{seconds:g}",
               "--warm-up-time", "1", f"--log-file={log}", *load]
    for h in headers:
        command += ["-H", h]
    if http1:
        command.append("--h1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    out = done.stdout
    latencies = sorted(int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines()
                       if line.count("\t") >= 2 and line.split("\t")[1].startswith("2"))
    finished = [line for line in out.splitlines() if line.startswith("finished in")]
    requests = [line for line in out.splitlines() if line.startswith("requests:")]
    traffic = [line for line in out.splitlines() if line.startswith("traffic:")]
    req_s = float(finished[0].split(",")[1].split()[0]) if finished else float("nan")
    counts = {}
    if requests:
        for part in requests[0].split(":", 1)[1].split(","):
            number, _, what = part.strip().partition(" ")
            counts[what] = int(number)
    data_bytes = float("nan")
    if traffic and counts.get("succeeded"):
        # "traffic: 1.23MB (1289010) total, 12.34KB (12634) headers (space savings ...), 1.00MB (1048576) data"
        data_bytes = int(traffic[0].rsplit("(", 1)[1].split(")")[0]) / counts["succeeded"]
    return {
        "rps_target": rps, "req_s": req_s, "ok": counts.get("succeeded", 0),
        "failed": counts.get("failed", 0) + counts.get("errored", 0) + counts.get("timeout", 0),
        "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
        "p999": percentile(latencies, 0.999), "bytes_per_response": data_bytes,
    }


def redis_floor(repo: Path, rows: dict[str, list[Any]], count: int, rate: float | None = None
                ) -> dict[str, Any]:
    """The HMGETs of one request (the server's plan), written at once and read back,
    ``count`` times in a loop: the Redis round trip alone. With ``rate``, one call every
    1/rate seconds (open loop, as the servers are measured): on an idle machine each call
    then also pays for waking redis-server and this process, which a closed loop hides."""
    from serving import backend
    from serving.catalog import Catalog
    from serving.client import build_request
    from serving.fetch import RedisFetcher
    from serving.layout import encode_entity_value
    from serving.registry import parse_registry, registry_bytes
    from serving.repo_config import read_repo_config
    from serving.validation import parse_request

    config = read_repo_config(repo)
    catalog = Catalog(parse_registry(registry_bytes(config), config.project))
    plan = catalog.plan_for_service(SERVICE, False)
    request = parse_request(build_request(rows, feature_service=SERVICE).SerializeToString())
    n = len(request.entities["user_id"].val)
    keys = []
    for h in plan.hashes:
        columns = [[encode_entity_value(v, jk.value_type, jk.column, i)
                    for i, v in enumerate(request.entities[jk.column].val)] for jk in h.join_keys]
        keys.append(list(dict.fromkeys(
            b"".join([h.key_prefix, *(c[i] for c in columns), h.key_suffix]) for i in range(n))))
    fetcher = RedisFetcher(backend.connect(config.connection_string))
    times = []
    due = time.perf_counter()
    for _ in range(count):
        if rate:
            due += 1 / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        t0 = time.perf_counter()
        replies = fetcher.fetch(plan, keys)
        times.append((time.perf_counter() - t0) * 1000)
    assert any(v is not None for reply in replies for v in reply)
    fetcher.close()
    times.sort()
    return {"p50": percentile(times, 0.5), "p99": percentile(times, 0.99),
            "p999": percentile(times, 0.999), "req_s": 1000 / statistics.mean(times)}


# --- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measured seconds per run (after 1 s of warm-up)")
    parser.add_argument("--rates", default="200,1000",
                        help="open-loop request rates (requests/s), 1-entity case")
    parser.add_argument("--rates-100", default="50,150",
                        help="open-loop request rates (requests/s), 100-entity case")
    parser.add_argument("--rows", type=int, default=100_000, help="transactions to generate")
    parser.add_argument("--repo", type=Path, default=None,
                        help="use this materialised repo (Redis from $REDIS_URL) instead of building one")
    parser.add_argument("--only", default="", help="comma-separated servers to run (default: all): "
                        "echo-floor, featurepipe-1, featurepipe-2, feast-listen, feast-serve-1, feast-serve-2")
    parser.add_argument("--skip", default="", help="comma-separated servers to skip")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--old-checkout", type=Path, default=None,
                        help="also run this checkout's server (featurepipe-old-1), e.g. ../main: "
                        "today's latency on the same Redis, side by side")
    parser.add_argument("--echo-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server is not None:
        echo_server(args.echo_server)
        return 0

    h2load_bin = ensure_h2load()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    redis_server = None
    try:
        if args.repo is None:
            from featurepipe.redis_server import RedisServer

            redis_server = RedisServer(workdir=work / "redis").start()
            t0 = time.perf_counter()
            repo = build_repo(work, args.rows, redis_server.url)
            print(f"built repo with {args.rows:,} transactions in {time.perf_counter() - t0:.1f}s "
                  f"(Redis {redis_server.url})", file=sys.stderr)
        else:
            from featurepipe.config import export_redis_env

            repo = args.repo.resolve()
            os.environ["FEATUREPIPE_REPO"] = str(repo)
            export_redis_env()
        cases = {"1 entity": request_fields(sample_entities(repo, 1)),
                 "100 entities": request_fields(sample_entities(repo, 100))}
        assert len(cases["100 entities"]["user_id"]) == 100
        rates = {"1 entity": [float(r) for r in args.rates.split(",") if r],
                 "100 entities": [float(r) for r in args.rates_100.split(",") if r]}
        bodies = {(case, kind): (grpc_body if kind == "grpc" else http_body)(rows, work, f"{i}")
                  for i, (case, rows) in enumerate(cases.items()) for kind in ("grpc", "http")}
        floors = {case: redis_floor(repo, rows, 3000) for case, rows in cases.items()}
        paced = {(case, r): redis_floor(repo, rows, max(200, int(r * min(args.seconds, 3))), rate=r)
                 for case, rows in cases.items() for r in rates[case]}
        for case, floor in floors.items():
            print(f"redis floor, {case}: p50 {floor['p50']:.3f} ms  p99 {floor['p99']:.3f} ms  "
                  f"p99.9 {floor['p999']:.3f} ms (closed loop); "
                  + "; ".join(f"at {r:.0f}/s p50 {paced[case, r]['p50']:.3f} p99 {paced[case, r]['p99']:.3f}"
                              for r in rates[case]), file=sys.stderr)
        selected = {s for s in args.only.split(",") if s}
        old = args.old_checkout.resolve() if args.old_checkout else None
        chosen = [s for s in servers(repo, selected, old) if s.name.replace(" ", "-") not in
                  set(args.skip.split(","))]
        for server in chosen:
            log = work / f"{server.name.replace(' ', '_')}.log"
            try:
                server.start(cases["1 entity"], log)
            except Exception as exc:
                print(f"{server.name}: {exc} (after {server.startup_seconds:.2f}s)",
                      file=sys.stderr)
                server.stop()
                continue
            print(f"{server.name}: serving after {server.startup_seconds:.2f}s "
                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
            try:
                for case, rows in cases.items():
                    server.expected_bytes[case] = server.check(server, rows)
                    body = bodies[(case, server.kind)]
                    runs = [h2load(server, body, args.seconds, rps=r, log=work / "h2.log",
                                   h2load_bin=h2load_bin) for r in rates[case]]
                    runs.append(h2load(server, body, args.seconds, rps=None, log=work / "h2.log",
                                       h2load_bin=h2load_bin))
                    server.results[case] = runs
                    for run in runs:
                        # h2load counts HTTP 200s: a gRPC error is a 200 too, but a short one
                        run["short_responses"] = bool(
                            run["bytes_per_response"] < 0.8 * server.expected_bytes[case])
                        what = f"{run['rps_target']:.0f} req/s" if run["rps_target"] else "saturation"
                        print(f"  {case:>12} {what:>14}: {run['req_s']:8.0f} req/s  p50 "
                              f"{run['p50']:7.3f}  p99 {run['p99']:7.3f}  p99.9 {run['p999']:7.3f} ms"
                              f"  ok {run['ok']} failed {run['failed']}  "
                              f"{run['bytes_per_response']:.0f} B/resp"
                              f"{'  ERRORS? (short responses)' if run['short_responses'] else ''}",
                              file=sys.stderr)
            finally:
                server.stop()
        cli_port = free_port()
        cli = Server("featurepipe serve (CLI)", "grpc",
                     "/feast.serving.ServingService/GetOnlineFeatures",
                     [str(BIN / "featurepipe"), "serve", "--repo", str(repo), "--port",
                      str(cli_port)], cli_port, grpc_check)
        try:  # start-up only: the CLI runs the same server as python -m serving
            cli.start(cases["1 entity"], work / "cli.log")
            print(f"{cli.name}: serving after {cli.startup_seconds:.2f}s", file=sys.stderr)
        except Exception as exc:
            print(f"{cli.name}: {exc}", file=sys.stderr)
        finally:
            cli.stop()
        report([*chosen, cli], floors, rates, paced)
        if args.json:
            args.json.write_text(json.dumps({
                "floors": floors,
                "paced_floors": {f"{case} at {r:g}/s": v for (case, r), v in paced.items()},
                "servers": {s.name: {"startup_seconds": s.startup_seconds, **s.results}
                            for s in chosen},
                "load": os.getloadavg(),
            }, indent=1, default=str))
    finally:
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(chosen: list[Server], floors: dict[str, dict[str, Any]],
           rates: dict[str, list[float]], paced: dict[tuple[str, float], dict[str, Any]]) -> None:
    print("\n| server | start-up s | case | rate | req/s | p50 ms | p99 ms | p99.9 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in chosen:
        if "error" in s.results:
            print(f"| {s.name} | {s.startup_seconds:.2f} | all | - | - | {s.results['error']} | | |")
            continue
        for case, runs in s.results.items():
            for run in runs:
                what = f"{run['rps_target']:.0f}/s" if run["rps_target"] else "saturation"
                print(f"| {s.name} | {s.startup_seconds:.2f} | {case} | {what} | {run['req_s']:.0f} "
                      f"| {run['p50']:.3f} | {run['p99']:.3f} | {run['p999']:.3f} |")
    for case, floor in floors.items():
        print(f"| redis floor (Python loop) | - | {case} | closed | {floor['req_s']:.0f} "
              f"| {floor['p50']:.3f} | {floor['p99']:.3f} | {floor['p999']:.3f} |")
        for r in rates[case]:
            f = paced[case, r]
            print(f"| redis floor (Python loop) | - | {case} | {r:.0f}/s | {r:.0f} "
                  f"| {f['p50']:.3f} | {f['p99']:.3f} | {f['p999']:.3f} |")
    by_name = {s.name: s for s in chosen}
    fp, echo = by_name.get("featurepipe-1"), by_name.get("echo floor")
    print()
    for case in rates:
        if not (fp and echo and case in fp.results and case in echo.results):
            continue
        for i, rate in enumerate(rates[case]):
            ours, base = fp.results[case][i], echo.results[case][i]
            closed = base["p50"] + floors[case]["p50"]
            at_rate = base["p50"] + paced[case, rate]["p50"]
            print(f"{case} at {rate:.0f} req/s: featurepipe p50 {ours['p50']:.3f} ms vs echo + redis floor "
                  f"{at_rate:.3f} ms with the floor at the same rate (+{ours['p50'] - at_rate:.3f} ms), "
                  f"{closed:.3f} ms with it closed-loop (+{ours['p50'] - closed:.3f} ms); "
                  f"p99 {ours['p99']:.3f} ms")
    for workers in (1, 2):
        ours_s, theirs_s = by_name.get(f"featurepipe-{workers}"), by_name.get(f"feast-serve-{workers}")
        if ours_s and theirs_s:
            for case in ours_s.results:
                if case in theirs_s.results:
                    a, b = ours_s.results[case][-1]["req_s"], theirs_s.results[case][-1]["req_s"]
                    print(f"saturation, {case}, {workers} worker(s): featurepipe {a:.0f} req/s, "
                          f"feast serve {b:.0f} req/s: x{a / b:.1f}")
    starts = {s.name: s.startup_seconds for s in chosen}
    print("start-up to first served request: " + ", ".join(f"{k} {v:.2f}s" for k, v in starts.items()))


if __name__ == "__main__":
    sys.exit(main())
