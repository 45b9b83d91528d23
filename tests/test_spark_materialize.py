"""Materialisation from Spark writes the very Redis bytes featurepipe's DuckDB engine writes.

One module fixture builds a small store: a private redis-server, a copy of feature_repo/
(its contracts included, so the quality gate leaves raw rows out) plus a plain view over the
raw transactions, generated data with a few bad rows added, and the real ``feast apply``.
The test materialises with the DuckDB engine (``featurepipe materialize``), DUMPs every key,
flushes, materialises from Spark (``materialize_spark``: the rows computed in Spark, written
by its executors in several partitions), and DUMPs again: every key's bytes must be equal.
The bad rows make the comparison bite: if Spark counted a raw row the contract leaves out, a
window's sum would differ; a plain view's null key and a value that does not fit its type
are quarantined by both engines, never written.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import redis
import redis.crc

from featurepipe.redis_server import RedisServer
from tests.conftest import feast_cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SOURCE_REPO = ROOT / "feature_repo"
PLAIN = "user_tx_latest"  # sorts after user_transaction_stats: it writes into existing keys
WINDOWED = ("merchant_activity", "merchant_fraud", "user_transaction_stats")

PLAIN_VIEW = f'''

from feast import FeatureView
from feast.types import Float64, Int32, Int64, String

# a plain view (latest row per user), added by tests/test_spark_materialize.py
{PLAIN} = FeatureView(
    name="{PLAIN}",
    entities=[user],
    ttl=7 * DAY,
    schema=[
        Field(name="user_id", dtype=Int64),
        Field(name="amount", dtype=Float64),
        Field(name="category", dtype=String),
        Field(name="transaction_id", dtype=Int32),
        Field(name="is_fraud", dtype=Int64),
    ],
    source=transactions,
    online=True,
)
'''


@dataclass
class Deployed:
    repo: Path
    store: Any
    client: redis.Redis
    end: datetime


def _add_bad_rows(raw: Path, end: datetime) -> None:
    """Rows after every generated one, for users that have events: a negative amount, a
    category outside the allowed ones (the contract leaves them out of the windows; they are
    the plain view's latest rows), a null user (left out; the plain view
    quarantines it) and a transaction id past INT32 (a valid event; the plain view
    quarantines the row: the value does not fit)."""
    files = sorted(raw.rglob("*.parquet"))
    last = pq.read_table(files[-1])
    users = sorted(set(last.column("user_id").to_pylist()))[:3]
    base = pc.max(last.column("event_timestamp")).as_py() + timedelta(minutes=1)
    assert base < end
    template = last.slice(0, 1).to_pylist()[0]
    bad = [
        {"user_id": users[0], "amount": -5.0},
        {"user_id": users[1], "category": "bitcoin"},
        {"user_id": None},
        {"user_id": users[2], "transaction_id": 2**40},
    ]
    rows = [{**template, "transaction_id": 10**9 + i, "event_timestamp": base + timedelta(seconds=i),
             "is_fraud": None, "label_timestamp": None, **row} for i, row in enumerate(bad)]
    pq.write_table(pa.Table.from_pylist(rows, schema=last.schema), files[-1].parent / "part-bad.parquet")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """A copy of feature_repo with a plain view, data with bad rows, `feast apply`, a private Redis."""
    from featurepipe.config import load_store
    from featurepipe.generate import generate_transactions

    root = tmp_path_factory.mktemp("spark_materialize")
    repo, data = root / "repo", root / "data"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py", "contracts.yaml"):
        shutil.copy(SOURCE_REPO / name, repo / name)
    with (repo / "features.py").open("a", encoding="utf-8") as f:
        f.write(PLAIN_VIEW)
    with RedisServer(workdir=root / "redis") as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDIS_URL", server.url)
        mp.setenv("FEATUREPIPE_DATA_DIR", str(data))
        mp.setenv("FEATUREPIPE_REPO", str(repo))
        mp.delenv("FEATUREPIPE_CLOCK", raising=False)
        end = datetime.now(timezone.utc).replace(microsecond=0)
        generate_transactions(8_000, data / "raw" / "transactions", days=9, seed=23)
        _add_bad_rows(data / "raw" / "transactions", end)
        applied = feast_cli(repo, server.url, "apply")
        assert applied.returncode == 0, applied.stderr[-3000:]
        client = redis.Redis.from_url(server.url)
        yield Deployed(repo, load_store(repo), client, end)
        client.close()


def _dump(client: redis.Redis) -> dict[bytes, bytes]:
    return {k: client.dump(k) for k in client.scan_iter(count=1000)}  # type: ignore[misc]


def _content(client: redis.Redis) -> dict[bytes, dict[bytes, bytes]]:
    return {k: client.hgetall(k) for k in client.scan_iter(count=1000)}  # type: ignore[misc]


def _outcome(result: Any) -> dict[str, tuple[Any, ...]]:
    return {r.view: (r.window_rows, r.entities, r.written, r.skipped, r.restored, r.quarantined, r.null_key_rows,
                     r.check_failures, r.schedule_rows, r.newest_event) for r in result.per_view}


def test_spark_materialisation_writes_the_bytes_duckdb_writes(deployed: Deployed, spark: Any) -> None:
    from featurepipe.config import load_store
    from featurepipe.jobs.materialize import materialize
    from featurepipe.jobs.spark_materialize import materialize_spark

    client, start, end = deployed.client, datetime(2020, 1, 1, tzinfo=timezone.utc), deployed.end
    client.flushdb()
    duck = materialize(deployed.store, start=start, end=end, progress=False)
    expected = _dump(client)
    client.flushdb()
    sparked = materialize_spark(deployed.store, start=start, end=end, progress=False, partitions=3, spark=spark)
    got = _dump(client)

    outcome = _outcome(sparked)
    assert set(outcome) == {*WINDOWED, PLAIN}
    assert all(outcome[v][2] > 0 for v in outcome), outcome  # every view wrote, windowed and plain
    assert _outcome(duck) == outcome
    # the plain view quarantined its null key and the transaction id past INT32; the gate
    # left the bad rows out of the windows (no null key reached them)
    plain = next(r for r in sparked.per_view if r.view == PLAIN)
    assert (plain.quarantined, plain.null_key_rows) == (2, 1)
    assert plain.quarantine_files and all(Path(f).is_file() for f in plain.quarantine_files)
    assert [r.null_key_rows for r in sparked.per_view if r.view != PLAIN] == [0, 0, 0]
    assert expected, "DuckDB wrote nothing"
    differ = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
    assert not differ, f"{len(differ)} of {len(expected)} keys differ, e.g. {differ[:3]}"

    # Feast's registry records the interval, as after `feast materialize`
    reloaded = load_store(deployed.repo)
    for view in outcome:
        assert reloaded.get_feature_view(view).materialization_intervals[-1] == (start, end)

    # a rerun writes nothing (the newest value wins; equal times are not rewritten), the
    # content stays (content, not DUMP: a hashtable-encoded hash may change its DUMP order
    # on any read, as Redis rehashes it step by step)
    before = _content(client)
    again = materialize_spark(deployed.store, start=start, end=end, views=["merchant_fraud", PLAIN],
                              progress=False, spark=spark)
    assert [(r.written, r.skipped) for r in again.per_view] == [
        (0, outcome["merchant_fraud"][1]), (0, outcome[PLAIN][1] - 1)]  # (the plain view's quarantined row)
    assert _content(client) == before


def test_spark_executors_write_into_a_redis_cluster(deployed: Deployed, spark: Any) -> None:
    """A materialisation from Spark (a windowed view and the plain one) into a 3-node Redis
    Cluster (``redis_type: redis_cluster``): each executor's writer splits its rows per
    primary; every key, found on the primary owning its slot, holds the fields DuckDB's
    engine writes into one server."""
    from featurepipe.feast.online_store import FeaturepipeRedisOnlineStoreConfig
    from featurepipe.jobs.materialize import materialize
    from featurepipe.jobs.spark_materialize import materialize_spark
    from featurepipe.redis_server import RedisClusterServers

    client, start, end = deployed.client, datetime(2020, 1, 1, tzinfo=timezone.utc), deployed.end
    views = ["merchant_fraud", PLAIN]
    client.flushdb()
    materialize(deployed.store, start=start, end=end, views=views, progress=False)
    expected = _content(client)
    with RedisClusterServers() as cluster:
        from feast import FeatureStore

        online = FeaturepipeRedisOnlineStoreConfig(redis_type="redis_cluster",
                                                   connection_string=cluster.connection_string)
        config = deployed.store.config.model_copy()
        config.online_config, config._online_store = online, None  # (Feast builds online_store from these)
        store = FeatureStore(repo_path=str(deployed.repo), config=config)
        assert store.config.online_store.redis_type.value == "redis_cluster"
        sparked = materialize_spark(store, start=start, end=end, views=views, progress=False, partitions=3,
                                    spark=spark)
        assert all(r.written > 0 for r in sparked.per_view), [(r.view, r.written, r.skipped, r.entities) for r in sparked.per_view]
        got: dict[bytes, dict[bytes, bytes]] = {}
        for i, port in enumerate(cluster.ports):
            first, last = cluster.slot_ranges(i)
            node = _content(redis.Redis(port=port))
            assert node and all(first <= redis.crc.key_slot(k) <= last for k in node)
            got.update(node)
    assert got == expected
