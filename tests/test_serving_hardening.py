"""The feature server under stress: fuzzed requests, Redis outages under load, TLS and
tokens, the server process (imports, start-up, workers, metrics, logs, SIGTERM).

Reuses the session ``pipeline`` (real feast apply, backfill, materialise into a real
redis-server); tests that stop Redis use a private RedisServer with a copy of a few keys.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurepipe.redis_server import RedisServer
from serving.auth import TokenPolicy
from serving.client import FeatureClient
from serving.server import SERVICE_NAME, FeatureServer, TlsFiles

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "fraud_detection_v1"
USER_VIEW = "user_transaction_stats"
CTX = {"amount": [12.5], "txn_epoch": [1.7e9]}


@pytest.fixture(scope="module")
def hd_ids(pipeline: Any) -> dict[str, list[int]]:
    """A few (user, merchant) pairs that exist in the online store."""
    import pyarrow.dataset as ds

    table = ds.dataset(pipeline.data / "raw" / "transactions", format="parquet",
                       partitioning="hive").head(200, columns=["user_id", "merchant_id"])
    users = table.column("user_id").to_pylist()[:50:10]
    merchants = table.column("merchant_id").to_pylist()[:50:10]
    return {"user_id": users, "merchant_id": merchants}


@pytest.fixture(scope="module")
def hd_server(pipeline: Any) -> Iterator[FeatureServer]:
    with FeatureServer(pipeline.repo, port=0, metrics_port=0) as server:
        yield server


@pytest.fixture(scope="module")
def hd_stub(hd_server: FeatureServer) -> Iterator[Any]:
    from feast.protos.feast.serving.ServingService_pb2_grpc import ServingServiceStub

    with grpc.insecure_channel(hd_server.address) as channel:
        yield ServingServiceStub(channel)


# --- fuzz: malformed requests never yield INTERNAL nor hurt the server -----------------

_NAMES = st.sampled_from(["user_id", "merchant_id", "amount", "txn_epoch", "", "x", "user_id "])
_REFS = st.sampled_from([
    f"{USER_VIEW}:amount_sum_24h", "merchant_activity:merchant_txn_count_7d",
    "transaction_context:amount_to_mean_7d", f"{USER_VIEW}:", ":x", "a:b:c", "nope",
    f"{USER_VIEW}@v1:txn_count_1h", "merchant_fraud:merchant_labels_30d", "",
])


@st.composite
def _values(draw: Any) -> Any:
    from feast.protos.feast.types.Value_pb2 import Value

    kind = draw(st.sampled_from(["int64", "int32", "string", "double", "bool", "bytes", "none",
                                 "null", "list", "ts"]))
    if kind == "int64":
        return Value(int64_val=draw(st.integers(-(2**63), 2**63 - 1)))
    if kind == "int32":
        return Value(int32_val=draw(st.integers(-(2**31), 2**31 - 1)))
    if kind == "string":
        return Value(string_val=draw(st.text(max_size=8)))
    if kind == "double":
        return Value(double_val=draw(st.floats(allow_nan=True)))
    if kind == "bool":
        return Value(bool_val=draw(st.booleans()))
    if kind == "bytes":
        return Value(bytes_val=draw(st.binary(max_size=8)))
    if kind == "null":
        return Value(null_val=0)
    if kind == "list":
        value = Value()
        value.int64_list_val.val.extend(draw(st.lists(st.integers(0, 9), max_size=3)))
        return value
    if kind == "ts":
        return Value(unix_timestamp_val=draw(st.integers(0, 2**40)))
    return Value()


@st.composite
def _requests(draw: Any) -> Any:
    from feast.protos.feast.serving.ServingService_pb2 import GetOnlineFeaturesRequest

    request = GetOnlineFeaturesRequest(full_feature_names=draw(st.booleans()))
    kind = draw(st.sampled_from(["service", "features", "none"]))
    if kind == "service":
        request.feature_service = draw(st.sampled_from([SERVICE, "", "nope", SERVICE.upper()]))
    elif kind == "features":
        request.features.val.extend(draw(st.lists(_REFS, max_size=4)))
    for target in (request.entities, request.request_context):
        for name in draw(st.lists(_NAMES, max_size=4, unique=True)):
            target[name].val.extend(draw(st.lists(_values(), max_size=4)))
    return request


_BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(requests=st.lists(_requests(), min_size=4, max_size=4))
def test_fuzzed_requests_never_internal(hd_stub: Any, requests: list[Any]) -> None:
    """2,000 malformed requests, four at a time in flight."""
    calls = [hd_stub.GetOnlineFeatures.future(r, timeout=10) for r in requests]
    for request, call in zip(requests, calls, strict=True):
        try:
            call.result()
        except grpc.RpcError as exc:
            assert exc.code() not in _BAD_CODES, (exc.code(), exc.details(), request)
            assert exc.details(), "an error status must say what to fix"


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=64))
def test_garbage_bytes_are_invalid_argument(hd_server: FeatureServer, body: bytes) -> None:
    with grpc.insecure_channel(hd_server.address) as channel:
        call = channel.unary_unary("/feast.serving.ServingService/GetOnlineFeatures")
        try:
            call(body, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() not in _BAD_CODES, (exc.code(), exc.details(), body)


def test_server_survives_the_fuzz(hd_stub: Any, hd_server: FeatureServer,
                                  hd_ids: dict[str, list[int]]) -> None:
    with FeatureClient(hd_server.address) as client:
        got = client.get_features(hd_ids, feature_service=SERVICE,
                                  request_context={k: v * 5 for k, v in CTX.items()})
    assert got.statuses["amount_sum_24h"].count("PRESENT") >= 1


def test_unknown_fields_in_entity_columns_do_not_reach_the_response(hd_stub: Any,
                                                                    hd_ids: dict[str, list[int]]) -> None:
    """The entity columns are copied into the response as serialized: a field the schema does
    not know (here field 2, which in a FeatureVector holds the statuses) must not ride along."""
    from feast.protos.feast.serving.ServingService_pb2 import GetOnlineFeaturesRequest

    from serving.client import build_request

    plain = GetOnlineFeaturesRequest.FromString(
        build_request(hd_ids, feature_service=SERVICE, request_context=_ctx_rows(hd_ids)).SerializeToString())
    tampered = GetOnlineFeaturesRequest()
    tampered.CopyFrom(plain)
    tampered.entities["user_id"].MergeFromString(b"\x10\x05")  # unknown field 2 = 5
    assert len(tampered.SerializeToString()) == len(plain.SerializeToString()) + 2
    want, got = hd_stub.GetOnlineFeatures(plain, timeout=10), hd_stub.GetOnlineFeatures(tampered, timeout=10)
    assert list(got.results[0].statuses) == list(want.results[0].statuses)
    assert [r.values for r in got.results] == [r.values for r in want.results]


def _ctx_rows(ids: dict[str, list[int]]) -> dict[str, list[float]]:
    n = len(ids["user_id"])
    return {k: v * n for k, v in CTX.items()}


def test_limits_and_deadlines(pipeline: Any, redis_url: str,
                              hd_ids: dict[str, list[int]]) -> None:
    with FeatureServer(pipeline.repo, port=0, max_rows=10, max_message_bytes=4096) as server, \
            FeatureClient(server.address, retries=0) as client:
        from featurepipe.errors import InvalidInput

        with pytest.raises(InvalidInput, match="limit of 10"):
            client.get_features({"user_id": list(range(11))},
                                features=[f"{USER_VIEW}:txn_count_1h"])
        with pytest.raises(InvalidInput):  # RESOURCE_EXHAUSTED: the message is too large
            client.get_features({"user_id": ["x" * 5000]}, features=[f"{USER_VIEW}:txn_count_1h"])
        from feast.protos.feast.serving.ServingService_pb2_grpc import ServingServiceStub

        from serving.client import build_request

        with grpc.insecure_channel(server.address) as channel:
            stub = ServingServiceStub(channel)
            request = build_request(hd_ids, features=[f"{USER_VIEW}:txn_count_1h"])
            import redis

            with redis.Redis.from_url(redis_url) as admin:
                admin.execute_command("CLIENT", "PAUSE", "600")  # Redis hangs for 0.6 s
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    stub.GetOnlineFeatures(request, timeout=0.2)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - started < 0.5
                admin.execute_command("CLIENT", "UNPAUSE")
            assert stub.GetOnlineFeatures(request, timeout=5).results


def test_metrics_count_calls_by_service_and_code(hd_server: FeatureServer,
                                                 hd_ids: dict[str, list[int]]) -> None:
    with FeatureClient(hd_server.address) as client:
        client.get_features(hd_ids, feature_service=SERVICE,
                            request_context={k: v * 5 for k, v in CTX.items()})
        with pytest.raises(Exception):  # noqa: B017
            client.get_features({"user_id": [1]}, feature_service="no_such_service")
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{hd_server.metrics_port}/metrics", timeout=5).read().decode()
    ok = re.search(r'featurepipe_serving_requests_total\{code="OK",feature_service="'
                   rf'{SERVICE}"\}} (\d+)', text)
    assert ok and float(ok.group(1)) >= 1, text[:2000]
    assert 'code="NOT_FOUND",feature_service="unknown"' in text
    assert "featurepipe_serving_redis_seconds_bucket" in text
    assert "featurepipe_serving_redis_up 1.0" in text


# --- Redis outage under load ----------------------------------------------------------

def _copy_keys(source_url: str, target_url: str, count: int = 200) -> None:
    import redis

    src, dst = redis.Redis.from_url(source_url), redis.Redis.from_url(target_url)
    for key in list(src.scan_iter(count=1000))[:count]:
        dst.restore(key, 0, src.dump(key), replace=True)
    src.close()
    dst.close()


def test_redis_stopped_under_load(pipeline: Any, redis_url: str, tmp_path: Path,
                                  hd_ids: dict[str, list[int]],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Four callers in a loop; Redis stops for 1.5 s: every call ends within its deadline
    as OK or UNAVAILABLE, the server stays up, and serves again within 2 s of Redis."""
    import redis

    private = RedisServer(workdir=tmp_path / "redis").start()
    try:
        src = redis.Redis.from_url(redis_url)
        keys = [k for k in src.scan_iter(count=1000)][:5000]
        src.close()
        _copy_keys(redis_url, private.url, count=len(keys))
        monkeypatch.setenv("REDIS_URL", private.url)
        deadline_s = 1.0
        calls: list[tuple[float, float, grpc.StatusCode]] = []
        stop = threading.Event()
        with FeatureServer(pipeline.repo, port=0, redis_timeout=0.25,
                           health_interval=0.1) as server:
            request_features = [f"{USER_VIEW}:txn_count_24h", "merchant_activity:merchant_txn_count_7d"]

            def caller() -> None:
                from serving.client import build_request

                with grpc.insecure_channel(server.address) as channel:
                    call = channel.unary_unary("/feast.serving.ServingService/GetOnlineFeatures",
                                               request_serializer=lambda m: m.SerializeToString())
                    request = build_request(hd_ids, features=request_features)
                    while not stop.is_set():
                        t0 = time.monotonic()
                        try:
                            call(request, timeout=deadline_s)
                            code = grpc.StatusCode.OK
                        except grpc.RpcError as exc:
                            code = exc.code()
                        calls.append((t0, time.monotonic() - t0, code))

            threads = [threading.Thread(target=caller) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.7)
            port = private.port
            private.stop()
            down_at = time.monotonic()
            time.sleep(1.5)
            private = RedisServer(workdir=tmp_path / "redis", port=port).start()
            up_at = time.monotonic()
            _copy_keys(redis_url, private.url, count=len(keys))
            time.sleep(2.5)
            stop.set()
            for t in threads:
                t.join(10)
            assert not any(t.is_alive() for t in threads)
            codes = {c for _, _, c in calls}
            assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
            assert max(d for _, d, _ in calls) < deadline_s + 0.5
            outage = [c for t0, _, c in calls if down_at + 0.05 < t0 < up_at - 0.05]
            assert outage and all(c == grpc.StatusCode.UNAVAILABLE for c in outage)
            back = [t0 for t0, _, c in calls if t0 > up_at and c == grpc.StatusCode.OK]
            assert back and back[0] - up_at < 2.0, "did not serve again within 2 s of Redis"
            with FeatureClient(server.address) as client:  # the server is still fine
                got = client.get_features(hd_ids, features=request_features)
                assert "PRESENT" in got.statuses["txn_count_24h"]
    finally:
        private.stop()


# --- TLS and tokens ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def hd_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1 / localhost (openssl CLI)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return TlsFiles(cert, key)


def test_tls_and_tokens(pipeline: Any, hd_tls: TlsFiles, tmp_path: Path,
                        hd_ids: dict[str, list[int]]) -> None:
    from featurepipe.errors import BackendUnavailable, FeaturepipeError
    from serving.auth import PermissionDenied, Unauthenticated

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n  model-token: [fraud_detection_v1]\n  ops-token: '*'\n")
    root = hd_tls.cert.read_bytes()
    ctx = {k: v * len(hd_ids["user_id"]) for k, v in CTX.items()}
    refs = [f"{USER_VIEW}:txn_count_1h"]
    with FeatureServer(pipeline.repo, port=0, tls=hd_tls,
                       tokens=TokenPolicy.from_file(tokens)) as server:
        target = f"localhost:{server.port}"
        with FeatureClient(target, root_certificates=root, token="model-token") as client:
            got = client.get_features(hd_ids, feature_service=SERVICE, request_context=ctx)
            assert "PRESENT" in got.statuses["amount_sum_24h"]
            with pytest.raises(PermissionDenied, match="lists of feature references"):
                client.get_features(hd_ids, features=refs)
        with FeatureClient(target, root_certificates=root, token="ops-token") as client:
            assert client.get_features(hd_ids, features=refs)["txn_count_1h"]
        for token, error in (("wrong", Unauthenticated), (None, Unauthenticated)):
            with FeatureClient(target, root_certificates=root, token=token) as client, \
                    pytest.raises(error):
                client.get_features(hd_ids, feature_service=SERVICE, request_context=ctx)
        with FeatureClient(target, token="model-token", retries=0) as plaintext, \
                pytest.raises(BackendUnavailable):
            plaintext.get_features(hd_ids, feature_service=SERVICE, request_context=ctx)
        other = subprocess.run(  # a certificate the client does not trust
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
             str(tmp_path / "k2"), "-out", str(tmp_path / "c2"), "-days", "1", "-subj",
             "/CN=localhost"], capture_output=True, timeout=60)
        assert other.returncode == 0
        with FeatureClient(target, root_certificates=(tmp_path / "c2").read_bytes(),
                           token="model-token", retries=0, timeout=2) as client, \
                pytest.raises(FeaturepipeError):
            client.get_features(hd_ids, feature_service=SERVICE, request_context=ctx)


def test_async_client_and_dataframe(hd_server: FeatureServer,
                                    hd_ids: dict[str, list[int]]) -> None:
    import asyncio

    from serving.client import AsyncFeatureClient

    async def fetch() -> Any:
        async with AsyncFeatureClient(hd_server.address) as client:
            return await asyncio.gather(*[
                client.get_features(hd_ids, features=[f"{USER_VIEW}:txn_count_1h"])
                for _ in range(5)
            ])

    results = asyncio.run(fetch())
    assert all(r.to_dict() == results[0].to_dict() for r in results)
    frame = results[0].to_pandas()
    assert list(frame.columns) == ["user_id", "txn_count_1h"]
    assert len(frame) == len(hd_ids["user_id"])


# --- the server process ----------------------------------------------------------------

_LIGHT_PROCESS = """
import sys, time
t0 = time.perf_counter()
from serving.server import FeatureServer
from serving.client import FeatureClient
with FeatureServer(sys.argv[1], port=0) as server, FeatureClient(server.address) as client:
    got = client.get_features({"user_id": [1]}, features=["user_transaction_stats:txn_count_1h"])
    first = time.perf_counter() - t0
    heavy = [m for m in ("feast", "pandas", "duckdb", "sklearn", "pyarrow") if m in sys.modules]
    print(f"{first:.3f} {heavy}")
    assert not heavy, heavy
"""


def test_server_process_stays_light(pipeline: Any) -> None:
    done = subprocess.run([sys.executable, "-c", _LIGHT_PROCESS, str(pipeline.repo)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=pipeline.env)
    assert done.returncode == 0, done.stderr[-3000:]
    seconds = float(done.stdout.split()[0])
    assert seconds < 5.0, f"start to first served request took {seconds}s"


def _wait_line(process: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"no line matching {pattern!r}; got:\n{''.join(lines)[-3000:]}")


def _can_bind(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_workers_share_the_port_and_drain_on_sigterm(pipeline: Any,
                                                     hd_ids: dict[str, list[int]]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from featurepipe.redis_server import free_port

    port = free_port()
    while True:  # two free metrics ports in a row (worker i serves metrics on base + i)
        metrics = free_port()
        if port not in (metrics, metrics + 1) and _can_bind(metrics + 1):
            break
    process = subprocess.Popen(
        [sys.executable, "-m", "serving", "--repo", str(pipeline.repo), "--port", str(port),
         "--workers", "2", "--metrics-port", str(metrics), "--log-format", "json",
         "--grace", "3"],
        cwd=ROOT, env=pipeline.env, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_line(process, "supervising 2 server processes", 30)
        deadline = time.monotonic() + 60
        ready = 0
        while ready < 2 and time.monotonic() < deadline:  # each worker logs once it serves
            line = process.stderr.readline()  # type: ignore[union-attr]
            if '"msg": "serving feast.serving.ServingService' in line:
                record = json.loads(line)
                assert record["level"] == "INFO" and record["port"] == port
                ready += 1
        assert ready == 2, "both workers should serve"
        for _ in range(16):  # separate connections: the kernel spreads them over the workers
            # (a local subchannel pool: gRPC would otherwise reuse one pooled TCP connection)
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) \
                    as channel, FeatureClient(f"127.0.0.1:{port}", channel=channel) as client:
                assert client.get_features(hd_ids, features=[f"{USER_VIEW}:txn_count_1h"])
        per_worker = []
        for i in range(2):
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics + i}/metrics",
                                          timeout=5).read().decode()
            found = re.search(r'featurepipe_serving_requests_total\{code="OK",'
                              r'feature_service="features"\} (\d+)', text)
            per_worker.append(int(float(found.group(1))) if found else 0)
        assert sum(per_worker) == 16 and min(per_worker) > 0, per_worker
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_redis_password_comes_from_redis_url(pipeline: Any, redis_url: str, tmp_path: Path,
                                             hd_ids: dict[str, list[int]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that requires a password: the server authenticates with REDIS_URL's."""
    import redis

    from featurepipe.errors import BackendUnavailable
    from featurepipe.redis_server import ensure_binary, free_port

    port = free_port()
    process = subprocess.Popen(
        [ensure_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "s3cret"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://:s3cret@127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        _copy_keys(redis_url, url, count=100_000)
        monkeypatch.setenv("REDIS_URL", url)
        refs = [f"{USER_VIEW}:txn_count_24h"]
        with FeatureServer(pipeline.repo, port=0) as server, \
                FeatureClient(server.address) as client:
            assert "PRESENT" in client.get_features(hd_ids, features=refs).statuses["txn_count_24h"]
        monkeypatch.setenv("REDIS_URL", f"redis://:wrong@127.0.0.1:{port}/0")
        with FeatureServer(pipeline.repo, port=0) as server, \
                FeatureClient(server.address, retries=0) as client, \
                pytest.raises(BackendUnavailable, match="(?i)password"):
            client.get_features(hd_ids, features=refs)
    finally:
        process.terminate()
        process.wait(10)


# --- options, the status table, server info ------------------------------------------------

def test_cli_flags_build_the_server_options() -> None:
    """``python -m serving`` (and so ``featurepipe serve``) defaults are ServerOptions'; its
    flags become one ServerOptions, checked before any server starts."""
    from featurepipe.errors import InvalidInput
    from serving.command import parse_flags, server_options
    from serving.options import ServerOptions

    assert server_options(parse_flags([])) == ServerOptions()
    args = parse_flags(["--port", "0", "--threads", "3", "--max-rows", "7",
                        "--tls-cert", "c.pem", "--tls-key", "k.pem", "--reuse-port"])
    options = server_options(args)
    assert (options.port, options.max_workers, options.max_rows, options.reuse_port) == (0, 3, 7, True)
    assert options.tls is not None and options.tls.cert == Path("c.pem")
    with pytest.raises(InvalidInput, match="max_rows"):
        ServerOptions(max_rows=0)
    done = subprocess.run([sys.executable, "-m", "serving", "--max-rows", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "max_rows must be at least 1" in done.stderr


def test_every_server_option_has_one_flag() -> None:
    """The command's server flags and ServerOptions' fields map one to one (tls: a cert and a
    key flag), so a new field cannot be forgotten on the command line; ``--help`` lists each
    with its help text and ServerOptions' default."""
    from dataclasses import fields

    import click
    from click.testing import CliRunner

    from featurepipe.cli import main
    from serving.command import SERVER_FLAGS, serve
    from serving.options import ServerOptions

    flagged = [flag.field for flag in SERVER_FLAGS]
    assert sorted([*flagged, "tls"]) == sorted(f.name for f in fields(ServerOptions))
    assert len(set(flagged)) == len(flagged)
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    for flag in SERVER_FLAGS:
        assert flag.flag in help_text and flag.help.split()[0] in help_text, flag
    assert "[default: 6566]" in help_text and main.get_command(click.Context(main), "serve") is serve


def test_status_table_round_trips() -> None:
    """Every error class the server reports comes back as that class on the client."""
    from featurepipe.errors import FeaturepipeError
    from serving.errors import STATUS_BY_ERROR, error_for, status_for

    for cls, code in STATUS_BY_ERROR:
        assert status_for(cls("x")) == code
        if cls is not FeaturepipeError:  # INTERNAL: the root class on both sides
            assert isinstance(error_for(code, "x"), cls), (cls, code)


def test_server_info_takes_any_known_token(pipeline: Any, tmp_path: Path) -> None:
    from serving.auth import Unauthenticated

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n  model-token: [fraud_detection_v1]\n")
    with FeatureServer(pipeline.repo, port=0, tokens=tokens) as server:
        with FeatureClient(server.address, token="model-token") as client:
            assert client.server_version() == __import__("feast").__version__
        for token in ("wrong", None):
            with FeatureClient(server.address, token=token) as client, \
                    pytest.raises(Unauthenticated):
                client.server_version()
