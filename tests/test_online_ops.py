"""Disaster recovery of the online store: ``featurepipe online rebuild`` and ``online verify``.

On copies of the demo repo, each with a Redis of its own (a private server, a 3-node cluster):
after a materialisation the verification finds every entity equal; after FLUSHALL a rebuild
gives back every key's fields exactly, and a rebuild into an empty cluster the single server's
content; a value, a schedule, a key and a stray key changed behind the engine's back are
reported as exactly those (one different with its field named, one missing, one extra), exit
status 1 through the CLI. The oracle is the content a plain materialisation wrote (itself
checked against Feast's writer in ``tests/test_materialize.py``), not the verifier's own path.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
from feast.protos.feast.types.Value_pb2 import Value

from featurepipe.config import online_target
from featurepipe.online.layout import entity_key_prefix, feature_field, timestamp_field
from featurepipe.online.schedule import schedule_field
from featurepipe.online.verify import split_key
from featurepipe.redis_server import RedisClusterServers, RedisServer
from tests.cli_batch import run_commands
from tests.conftest import Pipeline
from tests.test_materialize import (
    EPOCH,
    Server,
    _typed_store,
    _types_objects,
    _types_table,
    store_at,
)
from tests.test_redis_cluster import Content, cluster_content, cluster_yaml, repo_at

pytestmark = pytest.mark.integration

USERS, MERCHANTS = "user_transaction_stats", "merchant_activity"
VIEWS = {USERS, MERCHANTS, "merchant_fraud"}


@pytest.fixture(scope="module", autouse=True)
def own_data_folders() -> Iterator[None]:
    """Run logs and metrics of the repo copies stay in their own data folders (see
    ``tests/test_redis_cluster.py``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FEATUREPIPE_DATA_DIR", raising=False)
        yield


@dataclass
class Single:
    """A repo copy (with the demo's contracts) on a private redis-server, materialised once."""

    pipeline: Pipeline
    base: Path
    folder: Path
    port: int
    store: Any
    result: Any  # the materialisation
    content: Content  # every key's fields after it

    @property
    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def env(self) -> dict[str, str]:
        return {k: v for k, v in self.pipeline.env.items() if k != "FEATUREPIPE_DATA_DIR"}


def fields_of(client: redis.Redis) -> Content:
    return {k: client.hgetall(k) for k in client.scan_iter(count=1000)}


def demo_repo(base: Path, name: str, pipeline: Pipeline, online: str) -> Path:
    folder = repo_at(base, name, pipeline.repo / "data" / "registry.db", online)
    shutil.copy(pipeline.repo / "contracts.yaml", folder / "contracts.yaml")  # the engine's gate, as deployed
    return folder


@pytest.fixture(scope="module")
def single(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Single]:
    from featurepipe.jobs.materialize import materialize

    base = tmp_path_factory.mktemp("online-ops")
    with RedisServer() as server:
        folder = demo_repo(base, "single", pipeline, f"  connection_string: \"127.0.0.1:{server.port}\"\n")
        store = store_at(folder)
        result = materialize(store)
        client = redis.Redis(port=server.port)
        yield Single(pipeline, base, folder, server.port, store, result, fields_of(client))
        client.close()


def view_keys(content: Content, view: str) -> list[bytes]:
    return sorted(k for k, fs in content.items() if timestamp_field(view) in fs)


def user_key(user_id: int, project: str) -> bytes:
    return entity_key_prefix(["user_id"]) + struct.pack("<IIq", 4, 8, user_id) + project.encode()


def test_verify_after_a_materialisation_finds_every_entity_equal(single: Single) -> None:
    from featurepipe.jobs.online_ops import verify_online

    result = verify_online(single.store, progress=False)
    assert result.ok and not result.skipped
    assert {v.view for v in result.views} == VIEWS
    written = {r.view: r for r in single.result.per_view}
    for v in result.views:
        assert v.missing == v.different == v.extra == 0 and not v.examples and not v.blocked
        assert v.checked == v.equal == written[v.view].written > 50
        assert v.entities == written[v.view].entities and v.checked == v.entities - v.quarantined
        # the engine's plan, gate included: the schedules the backfill prepared are read as it read them
        assert v.prepared == written[v.view].prepared
        assert len(view_keys(single.content, v.view)) == v.checked
    sampled = verify_online(single.store, [USERS], sample=40, seed=3, progress=False)
    assert sampled.ok and sampled.views[0].checked == 40 and sampled.views[0].entities == written[USERS].entities


def test_rebuild_after_flushall_gives_back_every_key(single: Single) -> None:
    """FLUSHALL, then a rebuild: its verification equal, and every key's fields exactly those
    of the materialisation before."""
    from featurepipe.jobs.online_ops import rebuild_online, verify_online

    single.client.flushall()
    t0 = time.perf_counter()
    result = rebuild_online(single.store, progress=False)
    wall = time.perf_counter() - t0
    assert result.keys_before == 0 and result.verification.ok
    assert result.entities == sum(r.entities for r in single.result.per_view)
    assert {r.view: r.written for r in result.materialized.per_view} == \
        {v: len(view_keys(single.content, v)) for v in VIEWS}
    print(f"\nrebuild of the demo test data: {result.entities:,} rows in {result.materialized.seconds:.2f}s "
          f"({result.rows_per_second:,.0f} rows/s); with the verification "
          f"({result.verification.seconds:.2f}s) {wall:.2f}s")
    assert fields_of(single.client) == single.content
    assert verify_online(single.store, progress=False).ok


def test_changes_behind_the_engine_are_reported_exactly(single: Single) -> None:
    """One feature value and one schedule replaced by other valid values, one key deleted, one
    stray key: one different (its field named), one missing, one extra, exit status 1; a
    rebuild then brings the deleted key back and keeps what it must not overwrite."""
    from featurepipe.jobs.online_ops import rebuild_online, verify_online

    client, project = single.client, single.store.project
    assert fields_of(client) == single.content
    users, merchants = view_keys(single.content, USERS), view_keys(single.content, MERCHANTS)
    count = feature_field(USERS, "txn_count_7d")
    changed = next(k for k in users[1:] if single.content[k][count] != single.content[users[0]][count])
    client.hset(changed, count, single.content[users[0]][count])
    sched = schedule_field(MERCHANTS)
    assert single.content[merchants[0]][sched] != single.content[merchants[1]][sched]
    client.hset(merchants[0], sched, single.content[merchants[1]][sched])
    deleted = next(k for k in reversed(users) if k != changed)
    client.delete(deleted)
    stray = user_key(10**12, project)
    client.hset(stray, mapping={timestamp_field(USERS): single.content[users[0]][timestamp_field(USERS)],
                                count: single.content[users[0]][count]})

    verbose, as_json, rebuilt = run_commands([
        ("online", "verify", "--no-progress", "--repo", str(single.folder)),
        ("online", "verify", "--json", "--repo", str(single.folder)),
        ("online", "rebuild", "--no-progress", "--repo", str(single.folder)),
    ], env=single.env())
    assert verbose.returncode == as_json.returncode == 1, verbose.stdout + verbose.stderr[-3000:]
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    by_view = {v["view"]: v for v in report["views"]}
    user_id = split_key(changed)[0]["user_id"]
    got = {name: (v["missing"], v["different"], v["extra"], v["differing_fields"]) for name, v in by_view.items()}
    assert got == {USERS: (1, 1, 1, {"txn_count_7d": 1}), MERCHANTS: (0, 1, 0, {sched.decode(): 1}),
                   "merchant_fraud": (0, 0, 0, {})}
    examples = {(e["kind"], json.dumps(e["entity"])) for e in by_view[USERS]["examples"]}
    assert examples == {("different", json.dumps({"user_id": user_id})),
                        ("missing", json.dumps(split_key(deleted)[0])),
                        ("extra", json.dumps({"user_id": 10**12}))}
    [diff] = [e for e in by_view[USERS]["examples"] if e["kind"] == "different"]
    assert diff["key"] == changed.hex()
    assert [f["field"] for f in diff["fields"]] == ["txn_count_7d"]
    assert diff["fields"][0]["expected"] != diff["fields"][0]["found"]
    text = verbose.stdout
    assert f"different user_id={user_id}: txn_count_7d expected" in text
    assert "extra user_id=1000000000000" in text and "DIFFERS" in text and f"{sched.decode()} (1)" in text

    # a rebuild into this store: the deleted key comes back; a value of the same event time is not
    # rewritten (newest wins, equal is not newer), and a key the offline store lacks stays: exit 1
    assert rebuilt.returncode == 1, rebuilt.stdout + rebuilt.stderr[-3000:]
    assert f"held {len(single.content):,} keys of project 'featurepipe_demo'" in rebuilt.stdout  # -1 +1
    assert re.search(r"rebuilt .*: [\d,]+ rows in [\d.]+s \([\d,]+ rows/s\)", rebuilt.stdout), rebuilt.stdout
    assert "DIFFERS" in rebuilt.stdout
    assert client.hgetall(deleted) == single.content[deleted]
    after = {v.view: (v.missing, v.different, v.extra) for v in verify_online(single.store, progress=False).views}
    assert after == {USERS: (0, 1, 1), MERCHANTS: (0, 1, 0), "merchant_fraud": (0, 0, 0)}
    # the runbook's remedy (docs/runbook.md): delete the keys listed different (same event time) or
    # extra, then rebuild
    listed = {bytes.fromhex(e["key"]) for v in report["views"] for e in v["examples"]
              if e["kind"] in ("different", "extra") and f"_ts:{v['view']}" not in {f["field"] for f in e["fields"]}}
    assert listed == {changed, merchants[0], stray}
    client.delete(*listed)
    assert rebuild_online(single.store, progress=False).verification.ok
    assert fields_of(client) == single.content


def test_cluster_rebuild_equals_the_single_server(single: Single) -> None:
    """A rebuild into an empty 3-node Redis Cluster writes the single server's content, every key on
    the primary owning its slot; the verification scans every primary and reads through the
    cluster's pipeline: a key deleted and a stray key on any node are found."""
    from featurepipe.jobs.online_ops import rebuild_online, verify_online

    with RedisClusterServers() as cluster:
        store = store_at(demo_repo(single.base, "cluster", single.pipeline, cluster_yaml(cluster)))
        t0 = time.perf_counter()
        result = rebuild_online(store, progress=False)
        wall = time.perf_counter() - t0
        assert result.keys_before == 0 and result.verification.ok
        assert result.target.startswith("redis-cluster://")
        assert cluster_content(cluster) == single.content
        print(f"\nrebuild into a 3-node cluster: {result.entities:,} rows in {result.materialized.seconds:.2f}s "
              f"({result.rows_per_second:,.0f} rows/s); with the verification {wall:.1f}s")
        deleted = view_keys(single.content, USERS)[0]
        writer = online_target(store.config).client()
        assert writer.delete(deleted) == 1
        stray = user_key(-7, store.project)
        writer.hset(stray, timestamp_field(USERS), single.content[deleted][timestamp_field(USERS)])
        writer.close()
        found = verify_online(store, [USERS], progress=False)
        [v] = found.views
        assert (v.missing, v.different, v.extra) == (1, 0, 1) and not found.ok
        assert {e.kind: e.entity for e in v.examples} == {"missing": split_key(deleted)[0],
                                                          "extra": {"user_id": -7}}


def test_plain_views_every_type_and_compound_keys(tmp_path: Path) -> None:
    """A plain view (latest row per entity: every Feast type, a compound key of an integer and a
    string, created-time ties) verifies equal; a string value changed is named with both values."""
    from featurepipe.jobs.materialize import materialize
    from featurepipe.jobs.online_ops import verify_online

    end = datetime(2027, 1, 1, tzinfo=timezone.utc)
    pq.write_table(_types_table(np.random.default_rng(5), 150), tmp_path / "typed.parquet")
    with RedisServer() as server:
        store = _typed_store(tmp_path / "ours", Server("127.0.0.1", server.port), 0, "featurepipe",
                             tmp_path / "registry.db")
        store.apply(_types_objects(tmp_path / "typed.parquet"))
        materialize(store, EPOCH, end)
        result = verify_online(store, end=end, progress=False)
        [v] = result.views
        assert result.ok and v.checked == v.equal == v.entities == 150
        client = redis.Redis(port=server.port)
        key = sorted(client.scan_iter(count=1000))[0]
        field = feature_field("typed_view", "f_string")
        client.hset(key, field, Value(string_val="changed").SerializeToString())
        [v] = verify_online(store, end=end, progress=False).views
        assert (v.missing, v.different, v.extra, v.differing_fields) == (0, 1, 0, {"f_string": 1})
        [example] = v.examples
        assert example.entity == split_key(key)[0]
        assert set(example.entity) == {"customer_id", "region"}
        [diff] = example.fields
        assert diff.field == "f_string" and diff.found == "'changed'" and diff.expected != diff.found
        client.close()


def test_field_comparison_and_key_parsing_against_references() -> None:
    """The batch comparison flags exactly the rows a plain ``!=`` flags (equal, a missing field,
    an empty value, the same length with other bytes, another length); a Redis key splits into the
    join key values Feast serialised."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    from featurepipe.online import rows
    from featurepipe.online.verify import _differing, _differing_fields

    want = [b"abc", b"", b"xyz", b"12345", b"q", b"same"]
    piece = rows.from_flat(np.frombuffer(b"".join(want), dtype=np.uint8),
                           np.cumsum([0, *(len(w) for w in want)]))
    cases: list[list[bytes | None]] = [
        list(want),
        [b"abc", None, b"xyz", b"12345", b"q", b"same"],
        [b"abc", b"", b"xyw", b"12345", b"r", b"same"],
        [b"abc", b"", b"xyz", b"1234", b"q", b"samee"],
        [None, b"x", b"xyz", b"12345", b"q", b""],
    ]
    for found in cases:
        oracle = [f != w for f, w in zip(found, want)]
        assert _differing(piece, found).tolist() == oracle, found
        both = _differing_fields([piece, piece], [[f, w] for f, w in zip(found, want)])
        assert both[:, 0].tolist() == oracle and not both[:, 1].any()

    key = EntityKey(join_keys=["user_id", "region", "shard", "blob"],
                    entity_values=[ValueProto(int64_val=-42), ValueProto(string_val="eu-ß"),
                                   ValueProto(int32_val=7), ValueProto(bytes_val=b"\x00*[")])
    raw = serialize_entity_key(key, entity_key_serialization_version=3) + b"featurepipe_demo"
    assert split_key(raw) == ({"blob": "002a5b", "region": "eu-ß", "shard": 7, "user_id": -42}, b"featurepipe_demo")
    assert split_key(b"not a key") is None and split_key(user_key(5, "p")) == ({"user_id": 5}, b"p")
