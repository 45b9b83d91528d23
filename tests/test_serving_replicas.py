"""Serving replicas: one client balancing over several real server processes, a replica
SIGKILLed or answering UNAVAILABLE, and the registry check that stays cheap.

The replica tests start ``python -m serving`` processes against the session ``pipeline``
repo (real feast apply, backfill, materialisation into a real redis-server) and count the
calls each served on its own Prometheus ``/metrics``; the oracle is a client of one server.
The registry tests apply real Feast objects to a SQLite SQL registry (Feast's ``sql`` type)
and to a file, and count the fetches and parses of :class:`~serving.registry.RegistryWatcher`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from serving.client import FeatureClient, OnlineFeatures, channel_target
from serving.registry import RegistryWatcher
from serving.repo_config import ServingRepoConfig, read_repo_config

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "fraud_detection_v1"
CALLS = 20
integration = pytest.mark.integration  # the registry tests below need no server: fast tier


# --- replicas: real server processes ------------------------------------------------------

@dataclass
class Replica:
    """One ``python -m serving`` process: its gRPC address and its metrics port."""

    process: subprocess.Popen[bytes]
    address: str
    metrics_port: int
    log: Path

    def requests(self) -> dict[str, int]:
        """Calls served so far, by status code (``featurepipe_serving_requests_total``)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()
        counts: dict[str, int] = {}
        for code, value in re.findall(
                r'^featurepipe_serving_requests_total\{code="(\w+)",[^}]*\} (\S+)$', text, re.M):
            counts[code] = counts.get(code, 0) + int(float(value))
        return counts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _start(repo: Path, env: dict[str, str], log: Path, clock: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # a file, not a pipe: a chatty server never blocks on it
        return subprocess.Popen(
            [sys.executable, "-m", "serving", "--repo", str(repo), "--port", "0",
             "--metrics-port", "0", "--redis-timeout", "0.3", "--clock", clock, "--grace", "1"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )


def _ready(process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> Replica:
    """Wait for the server's announcement line (its bound ports)."""
    pattern = re.compile(r"serving \S+ on (127\.0\.0\.1:\d+) .*metrics on http://127\.0\.0\.1:(\d+)/")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(log.read_text(errors="replace"))
        if found:
            return Replica(process, found.group(1), int(found.group(2)), log)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text(errors='replace')[-3000:]}")


def _start_replicas(pipeline: Any, tmp: Path, count: int, clock: str,
                    env: dict[str, str] | None = None) -> list[Replica]:
    """``count`` servers started at once (each pays its imports in parallel), then awaited."""
    logs = [tmp / f"replica-{i}-{time.monotonic_ns()}.log" for i in range(count)]
    processes = [_start(pipeline.repo, env or pipeline.env, log, clock) for log in logs]
    return [_ready(p, log) for p, log in zip(processes, logs, strict=True)]


@pytest.fixture(scope="module")
def rp_clock() -> str:
    """One clock for every server here, so windowed features agree between them."""
    return datetime.now(timezone.utc).isoformat()


@pytest.fixture(scope="module")
def rp_replicas(pipeline: Any, tmp_path_factory: pytest.TempPathFactory,
                rp_clock: str) -> Iterator[list[Replica]]:
    replicas = _start_replicas(pipeline, tmp_path_factory.mktemp("replicas"), 2, rp_clock)
    try:
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


@pytest.fixture(scope="module")
def rp_request(pipeline: Any) -> dict[str, Any]:
    """A few (user, merchant) pairs in the online store, with the request context."""
    import pyarrow.dataset as ds

    table = ds.dataset(pipeline.data / "raw" / "transactions", format="parquet",
                       partitioning="hive").head(200, columns=["user_id", "merchant_id"])
    entities = {name: table.column(name).to_pylist()[:50:10] for name in ("user_id", "merchant_id")}
    rows = len(entities["user_id"])
    return {"entities": entities, "feature_service": SERVICE,
            "request_context": {"amount": [12.5] * rows, "txn_epoch": [1.7e9] * rows}}


def _answer(features: OnlineFeatures) -> tuple[Any, ...]:
    return features.to_dict(), features.statuses, features.event_timestamps


@pytest.fixture(scope="module")
def rp_expected(rp_replicas: list[Replica], rp_request: dict[str, Any]) -> tuple[Any, ...]:
    """The oracle: a single-address client's answer (the second server's)."""
    with FeatureClient(rp_replicas[1].address, timeout=5) as client:
        expected = _answer(client.get_features(**rp_request))
    assert "PRESENT" in expected[1]["amount_sum_24h"]
    return expected


def _served(replicas: list[Replica]) -> list[int]:
    return [sum(r.requests().values()) for r in replicas]


@integration
def test_calls_spread_over_the_replicas(rp_replicas: list[Replica], rp_request: dict[str, Any],
                                        rp_expected: tuple[Any, ...]) -> None:
    """A list of addresses, and gRPC's ipv4: name for the same two: both servers answer,
    and every answer equals the single server's."""
    a, b = (r.address for r in rp_replicas)
    for target in ([a, b], f"ipv4:{a},{b}"):
        before = _served(rp_replicas)
        with FeatureClient(target, timeout=5) as client:
            answers = [_answer(client.get_features(**rp_request)) for _ in range(CALLS)]
        after = _served(rp_replicas)
        spread = [n - m for n, m in zip(after, before, strict=True)]
        assert sum(spread) == CALLS and min(spread) > 0, (target, spread)
        assert all(answer == rp_expected for answer in answers), target


@integration
def test_the_async_client_spreads_too(rp_replicas: list[Replica], rp_request: dict[str, Any],
                                      rp_expected: tuple[Any, ...]) -> None:
    import asyncio

    from serving.client import AsyncFeatureClient

    async def fetch() -> list[OnlineFeatures]:
        async with AsyncFeatureClient([r.address for r in rp_replicas], timeout=5) as client:
            return [await client.get_features(**rp_request) for _ in range(CALLS)]

    before = _served(rp_replicas)
    answers = asyncio.run(fetch())
    spread = [n - m for n, m in zip(_served(rp_replicas), before, strict=True)]
    assert sum(spread) == CALLS and min(spread) > 0, spread
    assert all(_answer(answer) == rp_expected for answer in answers)


@integration
def test_a_retry_goes_to_another_replica(pipeline: Any, tmp_path: Path, rp_clock: str,
                                         rp_replicas: list[Replica], rp_request: dict[str, Any],
                                         rp_expected: tuple[Any, ...]) -> None:
    """A replica that is up but answers UNAVAILABLE (its Redis is gone): every call still
    succeeds, the retry picked from the other replica (round robin, not the same one)."""
    from featurepipe.redis_server import free_port

    no_redis = {**pipeline.env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    (broken,) = _start_replicas(pipeline, tmp_path, 1, rp_clock, env=no_redis)
    try:
        with FeatureClient([broken.address, rp_replicas[1].address], timeout=5) as client:
            answers = [_answer(client.get_features(**rp_request)) for _ in range(CALLS)]
        assert all(answer == rp_expected for answer in answers)
        refused = broken.requests()
        assert refused.get("UNAVAILABLE", 0) > 0 and refused.get("OK", 0) == 0, refused
    finally:
        broken.stop()


@integration
def test_a_killed_replica_leaves_the_rotation(rp_replicas: list[Replica],
                                              rp_request: dict[str, Any],
                                              rp_expected: tuple[Any, ...]) -> None:
    """SIGKILL one of two replicas while four threads call through one client: the calls
    it had in flight are retried on the other, and every call after it succeeds there,
    with the same answers. (Last in the module: it kills a shared server.)"""
    import threading

    victim, survivor = rp_replicas
    answers: list[tuple[Any, ...]] = []
    errors: list[Exception] = []

    def caller(client: FeatureClient) -> None:
        for _ in range(10):
            try:
                answers.append(_answer(client.get_features(**rp_request)))
            except Exception as exc:  # collected: the assertion below shows them
                errors.append(exc)

    with FeatureClient([victim.address, survivor.address], timeout=5) as client:
        threads = [threading.Thread(target=caller, args=(client,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(answers) < 8 and time.monotonic() < deadline:  # both replicas busy
            time.sleep(0.005)
        os.kill(victim.process.pid, signal.SIGKILL)
        for thread in threads:
            thread.join(30)
        assert victim.process.wait(10) == -signal.SIGKILL
        before = sum(survivor.requests().values())
        after_kill = [_answer(client.get_features(**rp_request)) for _ in range(CALLS)]
    assert errors == [] and len(answers) == 40
    assert all(answer == rp_expected for answer in answers + after_kill)
    assert sum(survivor.requests().values()) - before == CALLS


# --- the client's targets (no server) -----------------------------------------------------

def test_targets_one_address_is_unchanged_several_balance() -> None:
    one = channel_target("127.0.0.1:6566")
    assert (one.target, one.options) == ("127.0.0.1:6566", ())
    assert channel_target(["features.internal:6566"]).options == ()
    pair = channel_target(" 10.0.0.1:6566, 10.0.0.2:6566 ")
    assert pair == channel_target(["10.0.0.1:6566", "10.0.0.2:6566"])
    assert pair.target == "ipv4:10.0.0.1:6566,10.0.0.2:6566"
    assert ("grpc.lb_policy_name", "round_robin") in pair.options
    assert channel_target(["[::1]:1", "[::1]:2"]).target == "ipv6:[::1]:1,[::1]:2"
    authority = ("grpc.default_authority", "10.0.0.1:6566")  # the name TLS checks
    assert authority in pair.options
    assert authority in channel_target("ipv4:10.0.0.1:6566,10.0.0.2:6566").options
    named = channel_target(["localhost:1", "localhost:2"])  # resolved once, one family
    assert named.target.startswith(("ipv4:", "ipv6:")) and named.display == "localhost:1,localhost:2"
    dns = channel_target("dns:///features.internal:6566")  # gRPC resolves it: every address
    assert dns.target == "dns:///features.internal:6566" and dns.options[0][1] == "round_robin"
    from featurepipe.errors import InvalidInput

    with pytest.raises(InvalidInput, match="not 'host:port'"):
        channel_target(["10.0.0.1", "10.0.0.2:6566"])
    with pytest.raises(InvalidInput, match="no server address"):
        channel_target([])


# --- the registry check: unchanged -> no fetch or no parse --------------------------------

PROJECT = "replicas_registry"


def _objects(repo: Path, services: int) -> list[Any]:
    """An entity, a view and ``services`` feature services, as `feast apply` registers them."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64

    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    source = FileSource(path=str(repo / "stats.parquet"), timestamp_field="event_timestamp")
    view = FeatureView(name="user_stats", entities=[user], source=source,
                       schema=[Field(name="user_id", dtype=Int64),
                               Field(name="amount_mean", dtype=Float64)])
    return [user, view, *(FeatureService(name=f"service_{i}", features=[view])
                          for i in range(services))]


@pytest.fixture(scope="module")
def sql_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo whose registry is Feast's SQL registry in a SQLite file, with one feature
    service applied."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from feast import FeatureStore

    repo = tmp_path_factory.mktemp("sql_registry")
    (repo / "feature_store.yaml").write_text(
        f"project: {PROJECT}\nprovider: local\n"
        f"registry:\n  registry_type: sql\n  path: sqlite:///{repo / 'registry.db'}\n"
        f"online_store:\n  type: sqlite\n  path: {repo / 'online.db'}\n"
        "entity_key_serialization_version: 3\n"
    )
    pq.write_table(pa.table({
        "user_id": pa.array([1], pa.int64()), "amount_mean": [1.0],
        "event_timestamp": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
    }), repo / "stats.parquet")
    FeatureStore(repo_path=str(repo)).apply(_objects(repo, 1))
    return repo


def _services(definitions: Any) -> list[str]:
    return sorted(s.name for s in definitions.services)


def test_sql_registry_unchanged_is_not_parsed_again(sql_repo: Path) -> None:
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(sql_repo))
    config = read_repo_config(sql_repo)
    assert config.registry_file is None  # read through Feast's SqlRegistry
    # A server clock at the epoch: every stamp looks fresh (younger than RACY_SECONDS), so
    # every check fetches and compares digests, as right after an apply.
    watcher = RegistryWatcher(config, clock=lambda: 0.0)
    assert _services(watcher.check(force=True)) == ["service_0"]
    assert watcher.check() is None  # fetched, same digest: not parsed
    assert (watcher.fetches, watcher.parses) == (2, 1)
    store.apply(_objects(sql_repo, 2))  # maybe within the same second: the stamp may not move
    assert _services(watcher.check()) == ["service_0", "service_1"]
    assert watcher.check() is None and (watcher.fetches, watcher.parses) == (4, 2)

    # A stamp older than RACY_SECONDS (here: a server clock a minute ahead) is trusted alone:
    # one query, no fetch, no parse; a later apply moves it.
    later = RegistryWatcher(config, clock=lambda: time.time() + 60)
    later.check(force=True)
    stamp = int(time.time())
    assert later.check() is None and later.check() is None
    assert (later.fetches, later.parses) == (1, 1)
    while int(time.time()) <= stamp:  # the next apply is stamped in a later second
        time.sleep(0.05)
    store.apply(_objects(sql_repo, 3))
    assert _services(later.check()) == ["service_0", "service_1", "service_2"]
    assert (later.fetches, later.parses) == (2, 2)


def test_file_registry_touched_but_unchanged_is_not_parsed_again(sql_repo: Path,
                                                                 tmp_path: Path) -> None:
    from feast import FeatureStore

    registry = FeatureStore(repo_path=str(sql_repo)).registry.proto()
    file = tmp_path / "registry.db"
    file.write_bytes(registry.SerializeToString())
    config = ServingRepoConfig(tmp_path, PROJECT, file, "redis", "redis", "")
    watcher = RegistryWatcher(config)
    first = watcher.check(force=True)
    assert first is not None and first.services
    os.utime(file, ns=(time.time_ns(), time.time_ns() + 10**9))  # `touch`: same bytes
    assert watcher.check() is None
    assert (watcher.fetches, watcher.parses) == (2, 1)
    del registry.feature_services[:]
    file.write_bytes(registry.SerializeToString())
    changed = watcher.check()
    assert changed is not None and changed.services == () and watcher.parses == 2
    file.unlink()  # a missing file reads as an empty registry, as before
    gone = watcher.check()
    assert gone is not None and gone.views == ()
