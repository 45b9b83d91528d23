"""The online store on a real 3-node Redis Cluster: the same contract as on one server.

The oracle is featurepipe's own engine on a single redis-server, itself checked byte for
byte against Feast's writer in ``tests/test_materialize.py``: a materialisation into the
cluster must give every key (found by scanning every primary) the same fields, values and
TTLs, each key on the primary that owns its slot; Feast's SDK configured with
``redis_type: redis_cluster`` must read the same values as from the single server; a second
run writes nothing; a newer value streamed in survives; and a primary lost in the middle of a
run stops it with a message naming the node and its slots, leaves no key half-written, and a
rerun after the node is back gives the content of an uninterrupted run.
"""

from __future__ import annotations

import shutil
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from featurepipe.redis_server import RedisClusterServers, RedisServer
from tests.conftest import Pipeline
from tests.test_materialize import EPOCH, KEY_TTL, forget_materializations, newest_event, store_at

pytestmark = pytest.mark.integration

ENGINE = "featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine"
Content = dict[bytes, dict[bytes, bytes]]


@pytest.fixture(scope="module", autouse=True)
def own_data_folders() -> Iterator[None]:
    """The repo copies here keep their run logs and metrics in their own data folders, not
    in the shared pipeline's (``$FEATUREPIPE_DATA_DIR``, which the session's pipeline fixture
    sets and other modules read). Session fixtures are set up before this one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FEATUREPIPE_DATA_DIR", raising=False)
        yield


def repo_at(base: Path, name: str, registry: Path, online: str, extra_engine: str = "") -> Path:
    """A repo folder with its own registry copy whose online store is ``online`` (the YAML
    lines under ``online_store:``), materialised by featurepipe's engine."""
    folder = base / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    shared = base / "data"  # the registry's sources are relative to its repo (../data/...)
    if not shared.exists():
        shared.symlink_to(registry.parent.parent.parent / "data", target_is_directory=True)
    shutil.copy(registry, folder / "data" / "registry.db")
    forget_materializations(folder / "data" / "registry.db")
    (folder / "feature_store.yaml").write_text(
        "project: featurepipe_demo\nprovider: local\nregistry: data/registry.db\n"
        f"online_store:\n  type: redis\n{online}  key_ttl_seconds: {KEY_TTL}\n"
        "offline_store:\n  type: duckdb\nentity_key_serialization_version: 3\n"
        f"batch_engine:\n  type: {ENGINE}\n  progress: false\n  quarantine_dir: {folder / 'quarantine'}\n"
        + extra_engine
    )
    return folder


def cluster_yaml(cluster: RedisClusterServers) -> str:
    return f"  redis_type: redis_cluster\n  connection_string: \"{cluster.connection_string}\"\n"


def primaries(cluster: RedisClusterServers) -> list[redis.Redis]:
    return [redis.Redis(port=port) for port in cluster.ports]


def cluster_content(cluster: RedisClusterServers) -> Content:
    """Every key of every primary with its fields; each key on one primary only, the one
    that owns its slot."""
    out: Content = {}
    for i, client in enumerate(primaries(cluster)):
        first, last = cluster.slot_ranges(i)
        for key in client.scan_iter(count=1000):
            assert key not in out, f"{key!r} is on two primaries"
            out[key] = client.hgetall(key)
            assert first <= key_slot(key) <= last, (key, i)
    return out


def cluster_ttls(cluster: RedisClusterServers) -> dict[bytes, int]:
    return {k: c.ttl(k) for c in primaries(cluster) for k in c.scan_iter(count=1000)}


def flush(cluster: RedisClusterServers) -> None:
    for client in primaries(cluster):
        client.flushall()


@dataclass
class Setup:
    pipeline: Pipeline
    base: Path
    registry: Path
    cluster: RedisClusterServers
    single: redis.Redis
    end: datetime
    oracle: Content  # featurepipe's engine on one server: every key's fields
    oracle_ttls: dict[bytes, int]
    single_store: Any
    store: Any  # the repo whose online store is the cluster
    result: Any  # its first materialisation

    def cluster_client(self) -> Any:
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in self.cluster.ports])


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def setup(pipeline: Pipeline, redis_cluster: RedisClusterServers,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from featurepipe.jobs.materialize import materialize

    base = tmp_path_factory.mktemp("cluster")
    registry = pipeline.repo / "data" / "registry.db"
    end = datetime.now(timezone.utc)
    with RedisServer() as server:
        single = redis.Redis(port=server.port)
        single_store = store_at(repo_at(base, "single", registry, f"  connection_string: \"127.0.0.1:{server.port}\"\n"))
        materialize(single_store, EPOCH, end)
        oracle = {k: single.hgetall(k) for k in single.scan_iter(count=1000)}
        oracle_ttls = {k: single.ttl(k) for k in oracle}
        flush(redis_cluster)
        store = store_at(repo_at(base, "cluster", registry, cluster_yaml(redis_cluster)))
        result = materialize(store, EPOCH, end)
        yield Setup(pipeline, base, registry, redis_cluster, single, end, oracle, oracle_ttls, single_store, store,
                    result)


def test_materialisation_equals_one_server(setup: Setup) -> None:
    """Every key, field and value equal to the single server's, spread over every primary;
    the same TTLs (within the seconds between the two runs)."""
    got = cluster_content(setup.cluster)
    assert len(got) == len(setup.oracle) > 500
    assert got == setup.oracle
    per_node = [c.dbsize() for c in primaries(setup.cluster)]
    assert all(n > len(got) / 6 for n in per_node), per_node
    ttls = cluster_ttls(setup.cluster)
    assert all(abs(ttls[k] - setup.oracle_ttls[k]) <= 120 and ttls[k] <= KEY_TTL for k in setup.oracle)
    assert sum(r.written for r in setup.result.per_view) == sum(r.entities for r in setup.result.per_view) > 0


def test_feast_sdk_reads_the_cluster_as_the_server(setup: Setup) -> None:
    """Feast's own SDK with ``redis_type: redis_cluster`` reads what featurepipe wrote, the
    same values and timestamps as from the single server."""
    view = setup.store.get_feature_view("user_transaction_stats")
    users = sorted(newest_event(setup.pipeline, "user_transaction_stats", setup.end))
    refs = [f"user_transaction_stats:{f.name}" for f in view.features]
    rows = [{"user_id": int(u)} for u in users[:200]] + [{"user_id": -1}]
    got = setup.store.get_online_features(refs, rows).to_dict()
    assert got == setup.single_store.get_online_features(refs, rows).to_dict()
    assert got["txn_count_1h"][-1] is None and any(v is not None for v in got["txn_count_1h"])
    merchants = setup.store.get_feature_view("merchant_fraud")
    refs = [f"merchant_fraud:{f.name}" for f in merchants.features]
    rows = [{"merchant_id": m} for m in range(0, 400)]
    assert setup.store.get_online_features(refs, rows).to_dict() == \
        setup.single_store.get_online_features(refs, rows).to_dict()


def test_featurepipe_reader_sees_the_cluster(setup: Setup) -> None:
    """featurepipe's own reader (request-time windows) gives the same values from the
    cluster as from the single server, at the same request time."""
    from featurepipe.online.read import online_features

    users = sorted(newest_event(setup.pipeline, "user_transaction_stats", setup.end))[:300]
    refs = ["user_transaction_stats:txn_count_1h", "user_transaction_stats:amount_sum_1h"]
    rows = [{"user_id": int(u)} for u in users] + [{"user_id": -1}]
    got = online_features(setup.store, rows, refs, at=setup.end)
    assert got.equals(online_features(setup.single_store, rows, refs, at=setup.end))
    assert got["txn_count_1h"].notna().sum() > 0


def test_second_run_writes_nothing(setup: Setup) -> None:
    from featurepipe.jobs.materialize import materialize

    again = materialize(setup.store, EPOCH, setup.end)
    assert sum(r.written for r in again.per_view) == 0
    assert sum(r.skipped for r in again.per_view) == sum(r.entities for r in again.per_view) > 0
    assert cluster_content(setup.cluster) == setup.oracle


def test_a_streamed_newer_value_survives(setup: Setup) -> None:
    """A newer row written with its schedule (as the stream job writes it; here by Feast's
    own cluster writer, then the schedule) survives a materialisation; every other key is
    what the engine writes."""
    import pandas as pd

    from featurepipe.jobs.materialize import materialize
    from featurepipe.online.layout import entity_key_prefix
    from featurepipe.online.schedule import schedule_field

    store = setup.store
    view = store.get_feature_view("user_transaction_stats")
    first = sorted(newest_event(setup.pipeline, "user_transaction_stats", setup.end))[0]
    newer = {f.name: [7] if f.name.startswith("txn_count") else [7.5] for f in view.features}
    store.write_to_online_store("user_transaction_stats", pd.DataFrame(
        {"user_id": [first], **newer, "event_timestamp": [pd.Timestamp(setup.end + pd.Timedelta(days=1))]}))
    key = entity_key_prefix(["user_id"]) + struct.pack("<IIq", 4, 8, first) + store.project.encode()
    client = setup.cluster_client()
    client.hset(key, schedule_field(view.name), setup.oracle[key][schedule_field(view.name)])
    pushed = client.hgetall(key)
    assert pushed != setup.oracle[key]
    result = materialize(store, EPOCH, setup.end, ["user_transaction_stats"])
    assert result.per_view[0].written == 0 and result.per_view[0].skipped == result.per_view[0].entities
    after = cluster_content(setup.cluster)
    assert after[key] == pushed
    assert {k: v for k, v in after.items() if k != key} == {k: v for k, v in setup.oracle.items() if k != key}
    client.delete(key)  # the next test starts from the oracle's content
    materialize(store, EPOCH, setup.end, ["user_transaction_stats"])
    assert cluster_content(setup.cluster) == setup.oracle


def test_a_primary_lost_mid_run_stops_it_and_a_rerun_completes_it(setup: Setup) -> None:
    """SIGKILL one primary while a (throttled) materialisation writes: the run stops with a
    message naming the node and its slots; every key written holds whole views (per-key
    writes are atomic); once the node is back, a rerun gives the uninterrupted content."""
    from featurepipe.errors import BackendUnavailable
    from featurepipe.jobs.materialize import materialize

    cluster = setup.cluster
    flush(cluster)
    store = store_at(repo_at(setup.base, "lost", setup.registry, cluster_yaml(cluster),
                             extra_engine="  batch_rows: 50\n  max_rows_per_second: 2000\n"))
    victim = 1
    port = cluster.ports[victim]
    first, last = cluster.slot_ranges(victim)

    def kill_when_writing() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(c.dbsize() for c in primaries(cluster)) < 300:
            time.sleep(0.01)
        cluster.kill(victim)

    killer = threading.Thread(target=kill_when_writing)
    killer.start()
    try:
        with pytest.raises(BackendUnavailable) as caught:
            materialize(store, EPOCH, setup.end)
    finally:
        killer.join()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and f"{first}-{last}" in message, message
    assert "rerun" in message
    partial: Content = {}
    for i, client in enumerate(primaries(cluster)):
        if i != victim:
            partial.update({k: client.hgetall(k) for k in client.scan_iter(count=1000)})
    assert 0 < len(partial) < len(setup.oracle)
    for key, got in partial.items():  # whole views only: every field of a view, or none of it
        want = setup.oracle[key]
        views = {f.split(b":", 1)[1] for f in want if f.startswith(b"_ts:")}
        for view in views:
            if b"_ts:" + view in got:
                assert got[b"_ts:" + view] == want[b"_ts:" + view]
        assert all(want[f] == v for f, v in got.items()), key
    cluster.restart(victim)
    materialize(store, EPOCH, setup.end)
    assert cluster_content(cluster) == setup.oracle
