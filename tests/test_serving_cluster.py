"""The gRPC feature server on a real 3-node Redis Cluster, against the same server on one Redis.

The oracle: a small store is materialised into a private redis-server (a copy of
feature_repo/ with test_serving's plain ``user_profile`` view, applied, backfilled and
materialised through Feast), then every key is copied byte for byte into a Redis Cluster
(DUMP, RESTORE on the owning node). A server reading the single node and one reading the
cluster (``redis_type: redis_cluster``), both with the clock pinned, must send byte-identical
GetOnlineFeatures responses, for entities on every node and entities that exist nowhere;
while a slot migrates (ASK, then MOVED); with a node down (UNAVAILABLE naming the node for
the requests that touch it, the others still identical) and after it comes back. Feast's own
SDK on the cluster reads the same values. Fixture names start with ``cl_``.
"""

from __future__ import annotations

import random
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from redis.cluster import RedisCluster
from redis.crc import key_slot

from featurepipe.errors import InvalidInput
from featurepipe.redis_server import RedisClusterServers, RedisServer
from serving.client import FeatureClient, build_request
from serving.cluster_fetch import ClusterFetcher
from serving.server import SERVICE_NAME, FeatureServer
from tests.test_serving import PROFILE_DEFINITION, PROFILE_VIEW, _apply, _write_profiles

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SOURCE_REPO = ROOT / "feature_repo"
SERVICE = "fraud_detection_v1"
UTC = timezone.utc
CLOCK = datetime.now(UTC).replace(microsecond=0).isoformat()  # both servers' clock
PROFILE_REFS = [f"{PROFILE_VIEW}:credit_limit", f"{PROFILE_VIEW}:risk_band"]
REFS = ["user_transaction_stats:amount_sum_24h", "merchant_activity:merchant_txn_count_7d",
        "transaction_context:amount_to_mean_7d", *PROFILE_REFS]
UNKNOWN = 10_000_000  # user and merchant ids from here on exist nowhere


@dataclass
class ClEnv:
    root: Path
    repo: Path  # the single node's repo
    data: Path
    single: RedisServer
    cluster: RedisClusterServers
    cluster_repo: Path  # the same registry, online store redis_type: redis_cluster
    project: str


@pytest.fixture(scope="module")
def cl_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClEnv]:
    """The store materialised into a private redis-server and copied into a 3-node cluster."""
    from featurepipe.config import load_store
    from featurepipe.generate import generate_transactions
    from featurepipe.jobs.backfill import backfill

    root = tmp_path_factory.mktemp("cluster")
    repo, data = root / "repo", root / "data"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(SOURCE_REPO / name, repo / name)
    with (repo / "features.py").open("a") as definitions:
        definitions.write(PROFILE_DEFINITION)
    with RedisServer(workdir=root / "redis") as single, RedisClusterServers() as cluster, \
            pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDIS_URL", single.url)
        mp.setenv("FEATUREPIPE_REDIS", "")
        mp.setenv("FEATUREPIPE_DATA_DIR", str(data))
        mp.delenv("FEATUREPIPE_REPO", raising=False)
        generate_transactions(16_000, data / "raw" / "transactions", days=6)
        _write_profiles(data)
        store = load_store(repo)
        _apply(store, repo)
        backfill(store, progress=False)
        store.materialize(datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC))
        _copy_keys(single.url, cluster)
        config = yaml.safe_load((repo / "feature_store.yaml").read_text())
        config["registry"] = str(repo / config["registry"])
        config["online_store"].update(redis_type="redis_cluster",
                                      connection_string=cluster.connection_string)
        cluster_repo = root / "cluster_repo"
        cluster_repo.mkdir()
        (cluster_repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
        yield ClEnv(root, repo, data, single, cluster, cluster_repo, store.project)


def _copy_keys(source_url: str, cluster: RedisClusterServers,
               keep: Callable[[int], bool] = lambda slot: True) -> int:
    """Copy every key (of the slots ``keep`` accepts) from one Redis into the cluster, bytes
    unchanged: DUMP, then RESTORE on the owning node."""
    with redis.Redis.from_url(source_url) as src, \
            RedisCluster(host="127.0.0.1", port=cluster.ports[0], require_full_coverage=False) as dst:
        keys = [k for k in src.scan_iter(count=1000) if keep(key_slot(k))]
        dumps = src.pipeline(transaction=False)
        for key in keys:
            dumps.dump(key)
        restores = dst.pipeline()
        for key, dump in zip(keys, dumps.execute(), strict=True):
            restores.restore(key, 0, dump, replace=True)
        restores.execute()
    return len(keys)


@pytest.fixture(scope="module")
def cl_single(cl_env: ClEnv) -> Iterator[FeatureServer]:
    with FeatureServer(cl_env.repo, port=0, clock=CLOCK) as server:
        yield server


@pytest.fixture(scope="module")
def cl_server(cl_env: ClEnv) -> Iterator[FeatureServer]:
    """The server on the cluster ($REDIS_URL still names the single node: a cluster repo's
    connection_string is used as given)."""
    with FeatureServer(cl_env.cluster_repo, port=0, clock=CLOCK, redis_timeout=0.5,
                       health_interval=0.2, metrics_port=0) as server:
        yield server


Call = Callable[[Any], bytes]


@pytest.fixture(scope="module")
def cl_calls(cl_single: FeatureServer, cl_server: FeatureServer) -> Iterator[tuple[Call, Call]]:
    """GetOnlineFeatures on each server, returning the serialized response as sent."""
    channels = [grpc.insecure_channel(s.address) for s in (cl_single, cl_server)]
    calls: list[Call] = [c.unary_unary(f"/{SERVICE_NAME}/GetOnlineFeatures",
                                       request_serializer=lambda m: m.SerializeToString())
                         for c in channels]
    yield calls[0], calls[1]
    for channel in channels:
        channel.close()


@dataclass(frozen=True)
class Entities:
    users: list[int]
    merchants: list[int]


@pytest.fixture(scope="module")
def cl_entities(cl_env: ClEnv) -> Entities:
    """Every user and merchant of the data set, and some that exist nowhere."""
    import pyarrow.dataset as ds

    table = ds.dataset(cl_env.data / "raw" / "transactions", format="parquet",
                       partitioning="hive").to_table(columns=["user_id", "merchant_id"])
    users = sorted(set(table.column("user_id").to_pylist()))
    merchants = sorted(set(table.column("merchant_id").to_pylist()))
    return Entities(users + list(range(UNKNOWN, UNKNOWN + 20)),
                    merchants + list(range(UNKNOWN, UNKNOWN + 20)))


def _key(project: str, join_key: str, value: int) -> bytes:
    """The Redis key Feast stores an entity under."""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    entity = EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=value)])
    return bytes(_redis_key(project, entity))


def _requests(users: list[int], merchants: list[int]) -> list[Any]:
    """The same rows asked two ways: the feature service (with its on-demand view) and a list
    of refs with the plain view."""
    rng = random.Random(len(users))
    context = {"amount": [round(rng.uniform(1, 500), 2) for _ in users],
               "txn_epoch": [1.7e9 + rng.uniform(0, 3600) for _ in users]}
    entities = {"user_id": users, "merchant_id": merchants}
    return [build_request(entities, feature_service=SERVICE, request_context=context),
            build_request(entities, features=REFS, request_context=context)]


def _rows(entities: Entities, n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return rng.sample(entities.users, n), [rng.choice(entities.merchants) for _ in range(n)]


def _owner(cluster: RedisClusterServers, slot: int) -> int:
    return next(i for i in range(cluster.count) if cluster.slot_ranges(i)[0] <= slot <= cluster.slot_ranges(i)[1])


def test_cluster_answers_byte_identical(cl_env: ClEnv, cl_calls: tuple[Call, Call],
                                        cl_entities: Entities) -> None:
    """A few hundred entities on all three nodes (and unknown ones): the same bytes."""
    from serving.protos import GetOnlineFeaturesResponse

    single, cluster = cl_calls
    users, merchants = _rows(cl_entities, 300, seed=1)
    owners = {_owner(cl_env.cluster, key_slot(_key(cl_env.project, "user_id", u))) for u in users}
    assert owners == {0, 1, 2}
    for n in (300, 100, 7, 1):
        for request in _requests(users[:n], merchants[:n]):
            assert cluster(request) == single(request), n
    body = GetOnlineFeaturesResponse.FromString(single(_requests(users, merchants)[1]))
    statuses = {s for vector in body.results for s in vector.statuses}
    assert {1, 3} <= statuses  # PRESENT and NOT_FOUND both there: not a comparison of empties


def test_one_write_per_node_per_request(cl_env: ClEnv, cl_server: FeatureServer,
                                        cl_calls: tuple[Call, Call], cl_entities: Entities,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100-entity request on three nodes: one buffer written to each node."""
    writes: list[int] = []
    original: Any = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        packed = b"".join(command) if isinstance(command, (list, tuple)) else bytes(command)
        if b"HMGET" in packed:  # (the health loop PINGs the nodes meanwhile)
            writes.append(self.port)
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    users, merchants = _rows(cl_entities, 100, seed=2)
    cl_calls[1](_requests(users, merchants)[0])
    assert sorted(writes) == sorted(cl_env.cluster.ports)


def test_key_slots_match_the_cluster(cl_env: ClEnv, cl_entities: Entities) -> None:
    """redis-py's key_slot (the hash-tag rule) gives CLUSTER KEYSLOT's answer on Feast's keys
    and on binary keys with braces."""
    rng = random.Random(4)
    keys = [_key(cl_env.project, "user_id", u) for u in cl_entities.users[:500]]
    keys += [b"{", b"}", b"{}", b"{}x", b"x{}", b"{a}", b"x{a}y", b"{a}{b}", b"{{a}}", b"a{{b}",
             b"\x00{\xff}\x00", b"}{a}", b"{\x00}", "{é}".encode()]
    keys += [bytes(rng.choice(b"{}ab\x00\xff") for _ in range(rng.randint(1, 12))) for _ in range(300)]
    with redis.Redis(port=cl_env.cluster.ports[0]) as node:
        pipe = node.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", key)
        assert pipe.execute() == [key_slot(k) for k in keys]


def test_feast_sdk_on_the_cluster_reads_the_same(cl_env: ClEnv, cl_server: FeatureServer,
                                                 cl_entities: Entities) -> None:
    """Feast's own SDK, ``redis_type: redis_cluster`` on the same cluster: what it reads on
    the single node, and for the plain view what featurepipe's server answers."""
    from feast import FeatureStore

    config = yaml.safe_load((cl_env.cluster_repo / "feature_store.yaml").read_text())
    config["online_store"] = {"type": "redis", "redis_type": "redis_cluster",
                              "connection_string": cl_env.cluster.connection_string}
    feast_repo = cl_env.root / "feast_cluster_repo"
    feast_repo.mkdir(exist_ok=True)
    (feast_repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    users = list(range(50)) + _rows(cl_entities, 40, seed=3)[0] + [UNKNOWN]
    rows = [{"user_id": u} for u in users]
    refs = [*PROFILE_REFS, "user_transaction_stats:txn_count_24h", "user_transaction_stats:amount_sum_7d"]

    theirs = FeatureStore(repo_path=str(feast_repo)).get_online_features(features=refs, entity_rows=rows).to_dict()
    single = FeatureStore(repo_path=str(cl_env.repo)).get_online_features(
        features=refs, entity_rows=rows).to_dict()
    assert theirs == single
    assert any(v is not None for v in theirs["risk_band"])
    with FeatureClient(cl_server.address) as client:
        ours = client.get_features({"user_id": users}, features=PROFILE_REFS)
    for name in ("credit_limit", "risk_band"):
        assert ours[name] == theirs[name], name


def test_a_migrating_slot_is_followed(cl_env: ClEnv, cl_server: FeatureServer,
                                      cl_calls: tuple[Call, Call], cl_entities: Entities) -> None:
    """Between requests a slot moves from node 0 to node 2: half its keys moved (ASK for
    those), then all and the slot given away (MOVED): the answers stay the same bytes."""
    cluster, project = cl_env.cluster, cl_env.project
    by_slot: dict[int, list[int]] = {}
    for u in cl_entities.users:
        by_slot.setdefault(key_slot(_key(project, "user_id", u)), []).append(u)
    slot, in_slot = max(((s, us) for s, us in by_slot.items() if _owner(cluster, s) == 0),
                        key=lambda item: len(item[1]))
    assert len(in_slot) >= 2, "no slot of node 0 holds two users"
    users = in_slot + _rows(cl_entities, 60, seed=5)[0]
    merchants = _rows(cl_entities, len(users), seed=6)[1]
    requests = _requests(users, merchants)
    single, on_cluster = cl_calls

    def asking_calls() -> int:
        with redis.Redis(port=cluster.ports[2]) as dst:
            return int(dst.info("commandstats").get("cmdstat_asking", {}).get("calls", 0))

    src, dst = (redis.Redis(port=cluster.ports[i]) for i in (0, 2))
    others = [redis.Redis(port=p) for p in cluster.ports]
    try:
        src_id, dst_id = (r.execute_command("CLUSTER", "MYID") for r in (src, dst))
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        moved = _key(project, "user_id", in_slot[0])
        rest = [k for k in src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100) if k != moved]
        assert rest
        src.execute_command("MIGRATE", "127.0.0.1", cluster.ports[2], "", 0, 5000, "KEYS", moved)
        before = asking_calls()
        for request in requests:
            assert on_cluster(request) == single(request)
        assert asking_calls() > before  # the moved key was read after ASKING

        src.execute_command("MIGRATE", "127.0.0.1", cluster.ports[2], "", 0, 5000, "KEYS", *rest)
        for node in others:
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for request in requests:
            assert on_cluster(request) == single(request)
        assert _fetcher(cl_server).slot_map.owners[slot] == f"127.0.0.1:{cluster.ports[2]}"
    finally:
        for r in (src, dst, *others):
            r.close()


def test_a_hung_node_times_out(cl_env: ClEnv, cl_server: FeatureServer,
                               cl_calls: tuple[Call, Call], cl_entities: Entities) -> None:
    """Node 2 stopped (SIGSTOP: it takes connections but never answers) for about a second:
    requests that touch it are UNAVAILABLE within the server's redis_timeout (0.5 s), the
    others are answered; once it resumes, everything is."""
    cluster, project = cl_env.cluster, cl_env.project
    single, on_cluster = cl_calls
    owner = _fetcher(cl_server).slot_map.owners
    hung = f"127.0.0.1:{cluster.ports[2]}"
    users = [u for u in cl_entities.users if owner[key_slot(_key(project, "user_id", u))] != hung]
    merchants = [m for m in cl_entities.merchants
                 if owner[key_slot(_key(project, "merchant_id", m))] != hung]
    live = _requests(users[:50], merchants[:1] * 50)[0]
    touching = _requests(*_rows(cl_entities, 50, seed=9))[0]
    process = cluster.servers[2].process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            on_cluster(touching)
        assert time.monotonic() - started < 1.2
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert hung in str(info.value.details()) and "Timeout" in str(info.value.details())
        assert on_cluster(live) == single(live)
    finally:
        process.send_signal(signal.SIGCONT)
    _wait(lambda: _succeeds(on_cluster, touching))
    assert on_cluster(touching) == single(touching)


def _fetcher(server: FeatureServer) -> ClusterFetcher:
    fetcher = server._reader.fetcher if server._reader is not None else None
    assert isinstance(fetcher, ClusterFetcher)
    return fetcher


def _succeeds(call: Call, request: Any) -> bool:
    try:
        call(request)
    except grpc.RpcError:
        return False
    return True


def test_a_node_down_fails_only_its_keys(cl_env: ClEnv, cl_server: FeatureServer,
                                         cl_calls: tuple[Call, Call], cl_entities: Entities) -> None:
    """Node 1 killed: requests whose keys are all on nodes 0 and 2 get the same bytes, the
    others UNAVAILABLE naming node 1 and its slots; health stays SERVING (degraded: the
    others' keys are served) and the node's gauge is 0. Restarted (and its keys copied back: no persistence), everything is served again."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cluster, project = cl_env.cluster, cl_env.project
    single, on_cluster = cl_calls
    down_port, (first, last) = cluster.ports[1], cluster.slot_ranges(1)

    def on_live_nodes(join_key: str, value: int) -> bool:
        return _owner(cluster, key_slot(_key(project, join_key, value))) != 1

    live_users = [u for u in cl_entities.users if on_live_nodes("user_id", u)]
    live_merchants = [m for m in cl_entities.merchants if on_live_nodes("merchant_id", m)]
    rng = random.Random(7)
    live = _requests(rng.sample(live_users, 100), [rng.choice(live_merchants) for _ in range(100)])
    users, merchants = _rows(cl_entities, 100, seed=8)
    touching = _requests(users, merchants)
    assert not all(on_live_nodes("user_id", u) for u in users)

    def metric(port: int) -> str:
        url = f"http://127.0.0.1:{cl_server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        line = next(x for x in text.splitlines() if f'redis_node_up{{node="127.0.0.1:{port}"}}' in x)
        return str(line.rsplit(" ", 1)[1])

    with grpc.insecure_channel(cl_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            return int(health.Check(request).status)  # type: ignore[attr-defined]  # no stub

        assert status() == health_pb2.HealthCheckResponse.SERVING
        assert metric(down_port) == "1.0"
        cluster.kill(1)
        try:
            for request in live:
                assert on_cluster(request) == single(request)
            for request in touching:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    on_cluster(request)
                assert time.monotonic() - started < 2
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert f"127.0.0.1:{down_port}" in str(info.value.details())
                assert f"{first}-{last}" in str(info.value.details())
            for request in live:  # degraded: the other nodes' keys are still served, health stays SERVING
                assert on_cluster(request) == single(request)
            _wait(lambda: metric(down_port) == "0.0" and metric(cluster.ports[0]) == "1.0")
            assert status() == health_pb2.HealthCheckResponse.SERVING
        finally:
            cluster.restart(1)
        assert _copy_keys(cl_env.single.url, cluster, keep=lambda slot: first <= slot <= last) > 0
        _wait(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
        assert metric(down_port) == "1.0"
        for request in touching + live:
            assert on_cluster(request) == single(request)


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_cluster_settings_are_checked(cl_env: ClEnv, tmp_path: Path) -> None:
    """Malformed node lists, db other than 0, Sentinel and a cluster with no
    connection_string are refused with a message that says what to write."""
    from featurepipe.config import cluster_target
    from serving.repo_config import check_servable, read_repo_config

    assert cluster_target(cl_env.cluster.connection_string + ",password=x,db=0").kwargs == {"password": "x"}
    for bad, fragment in (("", "names no node"), ("127.0.0.1", "not host:port"),
                          ("h:1,h:x", "'h:x' is not"), (":7000", "not host:port"),
                          ("h:1,db=2", "db=2")):
        with pytest.raises(InvalidInput, match=fragment):
            cluster_target(bad)

    config = yaml.safe_load((cl_env.cluster_repo / "feature_store.yaml").read_text())
    parsed = read_repo_config(cl_env.cluster_repo)
    assert parsed.connection_string == cl_env.cluster.connection_string  # not $REDIS_URL
    check_servable(parsed)
    for online, fragment in (({"redis_type": "redis_cluster", "connection_string": ""}, "host1:port1"),
                             ({"redis_type": "redis_sentinel"}, "redis_sentinel")):
        config["online_store"] = {**config["online_store"], **online}
        (tmp_path / "feature_store.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(InvalidInput, match=fragment):
            check_servable(read_repo_config(tmp_path))
