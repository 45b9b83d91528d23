"""Request-time windows online: materialised schedules, the gRPC server at pinned clocks and
the library call, against a brute-force reference from the raw events.

Module fixtures build a small store once: a private redis-server, a copy of feature_repo/
in a temp folder, the real ``feast apply``, and ``featurepipe materialize`` (Feast's
``materialize`` through featurepipe's engine: no backfill is needed, windowed views are
computed from their raw events). Servers run in-process on ephemeral ports, their clock
pinned (``ServerOptions(clock=...)``). The reference is :mod:`tests.window_oracle`: every
aggregate's value at ``t`` straight from the raw events, in plain Python.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
import redis

from featurepipe.core.windows import horizon
from featurepipe.online.schedule import StaleSchedule, decode, schedule_field
from featurepipe.redis_server import RedisServer
from serving.client import FeatureClient
from serving.server import FeatureServer
from tests.conftest import feast_cli
from tests.window_oracle import Event, empty_values, values_at

ROOT = Path(__file__).resolve().parents[1]
SOURCE_REPO = ROOT / "feature_repo"
UTC = timezone.utc
USERS, MERCHANTS, LABELS = "user_transaction_stats", "merchant_activity", "merchant_fraud"
VIEWS = (USERS, MERCHANTS, LABELS)
US = 1_000_000


@dataclass
class Raw:
    """The raw events per view and key, and what the oracle needs to read them."""

    events: dict[str, dict[tuple[Any, ...], list[Event]]]  # view -> key -> events
    aggregations: dict[str, tuple[Any, ...]]
    types: dict[str, str]
    newest_us: int  # the newest event time (event_timestamp) in the data

    def truth(self, view: str, key: tuple[Any, ...], t_us: int) -> dict[str, Any]:
        return values_at(self.events[view].get(key, []), self.aggregations[view], self.types, key, t_us)

    def last_us(self, view: str, key: tuple[Any, ...]) -> int:
        return max(e.t_us for e in self.events[view][key])


@dataclass
class Online:
    root: Path
    repo: Path
    redis: RedisServer
    store: Any
    raw: Raw
    result: Any  # the first materialisation's MaterializeResult

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port)


def _micros(value: datetime) -> int:
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * US + delta.microseconds


def _iso(t_us: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=t_us)).isoformat()


def _raw(data: Path, store: Any) -> Raw:
    """Every raw event, per view and key, as the oracle reads them (times in microseconds)."""
    from featurepipe.online.plan import aggregations, kernel_input

    table = ds.dataset(data / "raw" / "transactions", format="parquet", partitioning="hive").to_table(
        columns=["user_id", "merchant_id", "event_timestamp", "label_timestamp", "amount", "is_fraud"])
    columns = table.to_pydict()
    events: dict[str, dict[tuple[Any, ...], list[Event]]] = {v: {} for v in VIEWS}
    aggs, types = {}, {"amount": "DOUBLE", "is_fraud": "BIGINT", "event_timestamp": "TIMESTAMP WITH TIME ZONE",
                       "label_timestamp": "TIMESTAMP WITH TIME ZONE"}
    for view in VIEWS:
        fv = store.get_feature_view(view)
        aggs[view] = aggregations(fv)
        spec = kernel_input(fv, store.config, store.project, store.registry)
        key_column = fv.entity_columns[0].name
        for i in range(table.num_rows):
            stamp = columns[spec.timestamp][i]
            if stamp is None or columns[key_column][i] is None:
                continue
            t_us = _micros(stamp)
            values = {"amount": columns["amount"][i], "is_fraud": columns["is_fraud"][i],
                      "event_timestamp": _micros(columns["event_timestamp"][i]),
                      "label_timestamp": None if columns["label_timestamp"][i] is None
                      else _micros(columns["label_timestamp"][i])}
            events[view].setdefault((columns[key_column][i],), []).append(Event((columns[key_column][i],), t_us, values))
    newest = max(_micros(t) for t in columns["event_timestamp"])
    return Raw(events, aggs, types, newest)


@pytest.fixture(scope="module")
def online(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Online]:
    """generate -> `feast apply` -> `featurepipe materialize`, in a private Redis."""
    from featurepipe.config import load_store
    from featurepipe.generate import generate_transactions
    from featurepipe.jobs.materialize import materialize

    root = tmp_path_factory.mktemp("request_time_online")
    repo, data = root / "repo", root / "data"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(SOURCE_REPO / name, repo / name)
    with RedisServer(workdir=root / "redis") as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDIS_URL", server.url)
        mp.setenv("FEATUREPIPE_DATA_DIR", str(data))
        mp.setenv("FEATUREPIPE_REPO", str(repo))
        mp.delenv("FEATUREPIPE_CLOCK", raising=False)
        generate_transactions(12_000, data / "raw" / "transactions", days=10, seed=11)
        applied = feast_cli(repo, server.url, "apply")
        assert applied.returncode == 0, applied.stderr[-3000:]
        store = load_store(repo)
        result = materialize(store, progress=False)
        yield Online(root, repo, server, store, _raw(data, store), result)


@pytest.fixture(scope="module")
def clocks(online: Online) -> list[int]:
    """Instants after the data's end (hours, days, a week and more later), on hop boundaries
    and just before and after them, and between the newest events."""
    end = online.raw.newest_us
    five, hour, day = 300 * US, 3600 * US, 86_400 * US
    on_hop = end - end % five + five
    newest = sorted({e.t_us for es in online.raw.events[USERS].values() for e in es})[-40:]
    between = [newest[i] + (newest[i + 1] - newest[i]) // 2 for i in range(0, 39, 13)]
    return sorted({
        end + 1, on_hop, on_hop - 1, on_hop + 1, end + hour, end - end % hour + 2 * hour,
        end + day, end - end % day + 2 * day + 1, end + 7 * day, end - end % hour + 7 * day + 2 * hour,
        end + 31 * day, *between, newest[-1], newest[-1] + 1,
    })


def _server(online: Online, t_us: int) -> FeatureServer:
    return FeatureServer(online.repo, port=0, clock=_iso(t_us), registry_refresh_seconds=3600)


def _keys(online: Online, view: str) -> list[tuple[Any, ...]]:
    return sorted(online.raw.events[view])


def _expected(online: Online, view: str, key: tuple[Any, ...], t_us: int) -> dict[str, Any]:
    """What a reader of the online store gives at ``t``: the truth once the key's newest event
    is before ``t``; before that the schedule (which starts right after that event) has no
    row in force, and the reader gives the values of empty windows."""
    if online.raw.last_us(view, key) < t_us:
        return online.raw.truth(view, key, t_us)
    return empty_values(online.raw.aggregations[view])


# ---------------------------------------------------------------- what materialisation wrote


def test_materialised_schedules_hold_every_row_from_the_newest_event_on(online: Online) -> None:
    """Each key's schedule: its first row is right after the key's newest event, and every
    row equals the reference at its change point (and just before the next); Feast's own
    fields hold the first row, stamped with its change point."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from featurepipe.feast.online_store import FeaturepipeRedisOnlineStore
    from featurepipe.online.layout import entity_key_prefix, key_suffix

    client = online.client()
    for view in VIEWS:
        names = [a.name for a in online.raw.aggregations[view]]
        keys = _keys(online, view)[:60]
        join_key = online.store.get_feature_view(view).entity_columns[0].name
        for key in keys:
            redis_key = (entity_key_prefix([join_key]) + (4).to_bytes(4, "little") + (8).to_bytes(4, "little")
                         + int(key[0]).to_bytes(8, "little", signed=True) + key_suffix(online.store.project))
            schedule = decode(client.hget(redis_key, schedule_field(view)), names)
            last = online.raw.last_us(view, key)
            assert int(schedule.v[0]) == last + 1, (view, key)
            assert list(schedule.v) == sorted(set(schedule.v.tolist()))
            for r, v in enumerate(schedule.v.tolist()):
                row = {n: _plain(c[r]) for n, c in zip(names, schedule.columns)}
                assert row == online.raw.truth(view, key, v), (view, key, r)
                upto = int(schedule.v[r + 1]) - 1 if r + 1 < len(schedule.v) else v + 400 * 86_400 * US
                assert row == online.raw.truth(view, key, upto), (view, key, r, "just before the next row")
            assert all(_plain(c[-1]) in (0, 0.0, None) for n, c in zip(names, schedule.columns)
                       if not n.startswith("last")), "a schedule ends with every window empty"
        # Feast's SDK reads the first row, stamped with its change point
        fv = online.store.get_feature_view(view)
        entity_keys = [EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=int(k[0]))]) for k in keys]
        read = FeaturepipeRedisOnlineStore().online_read(online.store.config, fv, entity_keys)
        for key, (stamp, values) in zip(keys, read, strict=True):
            last = online.raw.last_us(view, key)
            assert abs(_micros(stamp) - (last + 1)) <= 1  # Feast reads it through a float
            first = online.raw.truth(view, key, last + 1)
            assert {n: _value(values[n]) for n in names} == first


def test_a_second_run_writes_nothing(online: Online) -> None:
    from featurepipe.jobs.materialize import materialize

    client = online.client()
    # (fields, not DUMP: a hashtable-encoded hash may change its DUMP order on any access, as
    # Redis rehashes it step by step)
    before = {k: client.hgetall(k) for k in client.scan_iter(count=1000)}
    again = materialize(online.store, progress=False)
    assert sum(r.written for r in again.per_view) == 0
    assert sum(r.skipped for r in again.per_view) == sum(r.entities for r in again.per_view) > 0
    assert {k: client.hgetall(k) for k in client.scan_iter(count=1000)} == before


def test_engine_reports_schedules(online: Online) -> None:
    by_view = {r.view: r for r in online.result.per_view}
    assert set(by_view) == set(VIEWS)
    for view in VIEWS:
        r = by_view[view]
        assert r.entities == r.written == len(online.raw.events[view]), view
        assert r.schedule_rows >= r.entities and r.quarantined == 0
        assert r.window_rows == sum(len(es) for es in online.raw.events[view].values())


# ---------------------------------------------------------------- the server at pinned clocks


def test_server_equals_the_raw_events_at_pinned_clocks(online: Online, clocks: list[int]) -> None:
    """Every user's and merchant's windowed values from the gRPC server, at instants after the
    data's end, on and next to hop boundaries and between the newest events, equal the
    reference from the raw events at that instant, value for value; statuses say NULL_VALUE
    for an empty window's mean and max, the event time is the row's change point."""
    users, merchants = _keys(online, USERS), _keys(online, MERCHANTS)
    labels = set(_keys(online, LABELS))
    user_features = [a.name for a in online.raw.aggregations[USERS]]
    merchant_features = [f"{v}:{a.name}" for v in (MERCHANTS, LABELS) for a in online.raw.aggregations[v]]
    for t_us in clocks:
        with _server(online, t_us) as server, FeatureClient(server.address, timeout=30) as client:
            got = client.get_features({"user_id": [k[0] for k in users]},
                                       features=[f"{USERS}:{f}" for f in user_features])
            for i, key in enumerate(users):
                expected = _expected(online, USERS, key, t_us)
                assert {f: got[f][i] for f in user_features} == expected, (_iso(t_us), key)
                for f in user_features:
                    assert got.statuses[f][i] == ("NULL_VALUE" if expected[f] is None else "PRESENT")
                stamp = got.event_timestamps[user_features[0]][i]
                if online.raw.last_us(USERS, key) < t_us:
                    assert stamp is not None and _micros(stamp) <= t_us
                else:
                    assert stamp is None
            got = client.get_features({"merchant_id": [k[0] for k in merchants]}, features=merchant_features)
            for i, key in enumerate(merchants):
                for view in (MERCHANTS, LABELS):
                    names = [a.name for a in online.raw.aggregations[view]]
                    values = {n: got[n][i] for n in names}
                    if view == LABELS and key not in labels:  # a merchant without labels: no such row
                        assert all(got.statuses[n][i] == "NOT_FOUND" for n in names)
                        continue
                    assert values == _expected(online, view, key, t_us), (_iso(t_us), view, key)


def test_library_call_equals_the_server(online: Online, clocks: list[int]) -> None:
    from featurepipe.online.read import online_features

    users = [k[0] for k in _keys(online, USERS)][:300]
    refs = [f"{USERS}:{a.name}" for a in online.raw.aggregations[USERS]]
    for t_us in clocks[::3]:
        with _server(online, t_us) as server, FeatureClient(server.address, timeout=30) as client:
            served = client.get_features({"user_id": users}, features=refs)
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=t_us)
        frame = online_features(online.store, [{"user_id": u} for u in users], refs, at=at)
        assert frame["user_id"].tolist() == users
        for ref in refs:
            name = ref.split(":")[1]
            assert [_nan_none(x) for x in frame[name].tolist()] == served[name], (_iso(t_us), name)


def test_a_user_idle_for_a_week_counts_zero(online: Online) -> None:
    """A week after a user's last purchase the server says 0 purchases in the last hour, day
    and week (means and maxima null), and the last purchase's time; Feast's own SDK still
    reads the values written right after that purchase (the documented difference)."""
    key = max(_keys(online, USERS), key=lambda k: len(online.raw.events[USERS][k]))
    last = online.raw.last_us(USERS, key)
    week_later = last + 7 * 86_400 * US + 2 * 3600 * US
    with _server(online, week_later) as server, FeatureClient(server.address, timeout=30) as client:
        got = client.get_features({"user_id": [key[0]]}, features=[f"{USERS}:{a.name}"
                                                                    for a in online.raw.aggregations[USERS]])
    for window in ("1h", "24h", "7d"):
        assert got[f"txn_count_{window}"] == [0] and got.statuses[f"txn_count_{window}"] == ["PRESENT"]
        assert got[f"amount_sum_{window}"] == [0.0]
        assert got[f"amount_mean_{window}"] == [None] and got.statuses[f"amount_mean_{window}"] == ["NULL_VALUE"]
        assert got[f"amount_max_{window}"] == [None]
    assert got["last_txn_epoch"] == [last / 1e6]
    feast = online.store.get_online_features([f"{USERS}:txn_count_7d"], [{"user_id": key[0]}]).to_dict()
    assert feast["txn_count_7d"] == [online.raw.truth(USERS, key, last + 1)["txn_count_7d"]] != [0]


def test_on_demand_views_read_request_time_values(online: Online) -> None:
    """fraud_detection_v1's on-demand outputs are computed from the values at the server's clock."""
    users = _keys(online, USERS)[:20]
    merchant_ids = [_keys(online, MERCHANTS)[0][0]] * len(users)
    t_us = online.raw.newest_us + 3 * 86_400 * US + 123
    amounts = [10.0 + i for i in range(len(users))]
    epochs = [t_us / 1e6] * len(users)
    with _server(online, t_us) as server, FeatureClient(server.address, timeout=30) as client:
        got = client.get_features({"user_id": [k[0] for k in users], "merchant_id": merchant_ids},
                                  feature_service="fraud_detection_v1",
                                  request_context={"amount": amounts, "txn_epoch": epochs})
    for i, key in enumerate(users):
        truth = _expected(online, USERS, key, t_us)
        mean = truth["amount_mean_7d"]
        assert got["amount_to_mean_7d"][i] == (amounts[i] / mean if mean else None)
        assert got["seconds_since_last_txn"][i] == epochs[i] - truth["last_txn_epoch"]
        assert got["txn_count_7d"][i] == truth["txn_count_7d"]


# ---------------------------------------------------------------- old and broken online data


def test_online_data_without_a_schedule_is_a_clear_error_until_rematerialised(online: Online) -> None:
    """A hash with a windowed view's Feast fields but no schedule (written before request-time
    windows) fails the request with FAILED_PRECONDITION and says to materialise; so does a
    schedule of another kernel version. `featurepipe materialize` rewrites both, even though
    their Feast timestamp is not older."""
    from featurepipe.jobs.materialize import materialize
    from featurepipe.online.read import online_features

    client = online.client()
    keys = [k for k in client.scan_iter(count=1000) if client.hexists(k, schedule_field(USERS))][:2]
    no_schedule, other_version = keys
    client.hdel(no_schedule, schedule_field(USERS))
    stored = client.hget(other_version, schedule_field(USERS))
    client.hset(other_version, schedule_field(USERS), stored[:3] + bytes([1]) + stored[4:])
    user_ids = [int.from_bytes(k[-len(online.store.project) - 8:-len(online.store.project)], "little", signed=True)
                for k in keys]
    t_us = online.raw.newest_us + 3600 * US
    with _server(online, t_us) as server, FeatureClient(server.address, timeout=30, retries=0) as c:
        for user in user_ids:
            with pytest.raises(StaleSchedule, match="run `featurepipe materialize`"):
                c.get_features({"user_id": [user]}, features=[f"{USERS}:txn_count_1h"])
        with pytest.raises(StaleSchedule, match="run `featurepipe materialize`"):
            online_features(online.store, [{"user_id": user_ids[0]}], [f"{USERS}:txn_count_1h"])
        import grpc
        from feast.protos.feast.serving.ServingService_pb2_grpc import ServingServiceStub

        from serving.client import build_request

        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                ServingServiceStub(channel).GetOnlineFeatures(
                    build_request({"user_id": [user_ids[0]]}, None, [f"{USERS}:txn_count_1h"], None, False))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "featurepipe materialize" in raised.value.details()

    result = materialize(online.store, views=[USERS], progress=False)
    assert result.per_view[0].written == 2
    with _server(online, t_us) as server, FeatureClient(server.address, timeout=30) as c:
        got = c.get_features({"user_id": user_ids}, features=[f"{USERS}:txn_count_24h"])
    assert got["txn_count_24h"] == [_expected(online, USERS, (u,), t_us)["txn_count_24h"] for u in user_ids]


def test_contract_checks_every_schedule_row(online: Online, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warn check of the view's contract applies to every row of a schedule: an entity with
    one failing change point is quarantined whole (all its rows, none written), the others
    are written."""
    import pyarrow.parquet as pq

    from featurepipe.config import load_store
    from featurepipe.jobs.materialize import materialize

    names = [a.name for a in online.raw.aggregations[USERS]]
    count_24h = names.index("txn_count_24h")
    schedules = {}
    for key in online.client().scan_iter(count=1000):
        data = online.client().hget(key, schedule_field(USERS))
        if data:
            schedules[key] = decode(data, names)
    failing = {k for k, sch in schedules.items() if int(sch.columns[count_24h].max()) > 2}
    assert 0 < len(failing) < len(schedules)
    (online.repo / "contracts.yaml").write_text(
        "feature_views:\n  user_transaction_stats:\n    columns:\n      txn_count_24h: {type: BIGINT, max: 2}\n")
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{online.redis.port}/3")
    try:
        result = materialize(load_store(online.repo), views=[USERS], progress=False).per_view[0]
    finally:
        (online.repo / "contracts.yaml").unlink()
    client = redis.Redis(port=online.redis.port, db=3)
    try:
        assert set(client.scan_iter(count=1000)) == set(schedules) - failing
        assert result.written == len(schedules) - len(failing)
        assert result.quarantined == sum(schedules[k].stored_rows for k in failing)
        assert result.check_failures["txn_count_24h.range"] == sum(
            int((schedules[k].stored[count_24h] > 2).sum()) for k in failing)
        kept = pq.read_table(result.quarantine_files[0])
        assert kept.num_rows == result.quarantined
        assert set(kept.column("quarantine_reason").to_pylist()) >= {"another change point of this entity failed a check"}
    finally:
        client.flushdb()


def test_memory_per_entity_key(online: Online, record_property: Any) -> None:
    """Redis MEMORY USAGE of a user key (one view) with its schedule, against the same hash
    without it (Feast's own fields only); every key within 8 KB (whole-row schedules, layout
    version 2, reached 10 KB on the demo data; benchmarks/online_memory.py)."""
    client = online.client()
    field = schedule_field(USERS)
    users = [k for k in client.scan_iter(count=1000) if client.hexists(k, field)][:200]
    with_schedule = [int(client.memory_usage(k, samples=0)) for k in users]
    sizes = [client.hstrlen(k, field) for k in users]
    copies = []
    for i, key in enumerate(users):
        fields = client.hgetall(key)
        fields.pop(field)
        copy = b"memory-probe:%d" % i
        client.hset(copy, mapping=fields)
        copies.append(int(client.memory_usage(copy, samples=0)))
        client.delete(copy)
    figures = {"user key p50 bytes": statistics.median(with_schedule), "user key max": max(with_schedule),
               "user key without schedule p50": statistics.median(copies),
               "schedule field p50 bytes": statistics.median(sizes), "schedule field max": max(sizes)}
    for name, value in figures.items():
        record_property(name, value)
    print(figures)
    assert max(with_schedule) <= 8 * 1024  # the bound: at most 8 KB per entity and view


# ---------------------------------------------------------------- the serving pieces alone


def test_scheduled_columns_read_the_row_in_force() -> None:
    """The server's reader on hand-made schedules: the row in force at the clock; before the
    first row an empty window (count 0 PRESENT, sum 0.0, mean null); NaN is null; another
    feature list or kernel version is refused."""
    from featurepipe.online.schedule import encode, names_crc
    from serving.columns import NULL_VALUE, PRESENT, scheduled_columns, stored_values
    from serving.plan import ViewFields
    from serving.values import python_value

    names = ["n", "s", "m"]
    data = encode(np.array([100, 200, 300]), np.array([-1, 0, 0]),
                  [np.array([1, 2, 0]), np.array([1.5, 4.0, 0.0]), np.array([1.5, 2.0, np.nan])], [0, 0, 0], names)
    vf = ViewFields("v", 0.0, 0, (1, 2, 3), schedule_field=4, names_crc=names_crc(names), columns=(0, 1, 2),
                    empty=(b"\x20\x00", b"\x29" + bytes(8), b""))
    block = [[b"\x08\x01", None, None, None, data]] * 5
    clocks = [99, 100, 250, 300, 10**12]
    got = [scheduled_columns(vf, [row], t) for row, t in zip(block, clocks, strict=True)]
    values = [[python_value(stored_values(c)[0]) if stored_values(c)[0] else None for c in cols] for cols in got]
    assert values == [[0, 0.0, None], [1, 1.5, 1.5], [2, 4.0, 2.0], [0, 0.0, None], [0, 0.0, None]]
    assert [cols[2].statuses[0] for cols in got] == [NULL_VALUE, PRESENT, PRESENT, NULL_VALUE, NULL_VALUE]
    assert [cols[0].statuses[0] for cols in got] == [PRESENT] * 5
    with pytest.raises(StaleSchedule, match="other feature names"):
        scheduled_columns(ViewFields("v", 0.0, 0, (1,), schedule_field=4, names_crc=names_crc(["x"]),
                                     columns=(0,), empty=(b"",)), block[:1], 150)
    with pytest.raises(StaleSchedule, match="materialize"):
        scheduled_columns(vf, [[b"\x08\x01", None, None, None, None]], 150)
    missing = scheduled_columns(vf, [[None] * 5], 150)
    assert missing[0].statuses == [3] and stored_values(missing[0]) == [None]  # NOT_FOUND


def test_the_server_reads_the_registry_tags_featurepipe_writes() -> None:
    from featurepipe import definitions
    from serving import registry

    assert (registry.TAG_KIND, registry.WINDOWED_KIND, registry.TAG_AGGREGATIONS) == (
        definitions.TAG_KIND, definitions.KIND, definitions.TAG_AGGREGATIONS)


def test_stale_schedules_map_to_failed_precondition() -> None:
    import grpc

    from serving.errors import error_for, status_for

    assert status_for(StaleSchedule("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(error_for(grpc.StatusCode.FAILED_PRECONDITION, "x"), StaleSchedule)


def test_pinned_clock_parses_iso_8601(monkeypatch: pytest.MonkeyPatch) -> None:
    from featurepipe.errors import InvalidInput
    from serving.clock import CLOCK_ENV, request_clock

    assert request_clock("2026-12-07T10:00:00+00:00")() == _micros(datetime(2026, 12, 7, 10, tzinfo=UTC))
    assert request_clock("2026-12-07T10:00:00.000001")() == _micros(datetime(2026, 12, 7, 10, tzinfo=UTC)) + 1
    monkeypatch.setenv(CLOCK_ENV, "2026-01-01T00:00:00Z")
    assert request_clock()() == _micros(datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(InvalidInput, match="ISO 8601"):
        request_clock("yesterday")
    monkeypatch.delenv(CLOCK_ENV)
    real = request_clock()()
    assert abs(real - _micros(datetime.now(UTC))) < 60 * US


def _plain(x: Any) -> Any:
    """A schedule cell as the reference gives it (NaN: None; NumPy scalars: Python's)."""
    value = x.item()
    return None if isinstance(value, float) and value != value else value


def _nan_none(x: Any) -> Any:
    return None if isinstance(x, float) and x != x else x


def _value(v: Any) -> Any:
    kind = v.WhichOneof("val")
    return None if kind in (None, "null_val") else getattr(v, kind)


def test_horizon_bounds_what_a_schedule_reads(online: Online) -> None:
    """A schedule's last row is within the view's horizon of the key's newest event: every
    window is empty by then (so reading events older than that would change nothing)."""
    client = online.client()
    for view in VIEWS:
        reach = int(horizon(online.raw.aggregations[view]) / timedelta(microseconds=1))
        for key in list(client.scan_iter(count=1000))[:50]:
            data = client.hget(key, schedule_field(view))
            if data:
                v = decode(data).v
                assert int(v[-1]) - int(v[0]) <= reach


# ---------------------------------------------------------------- schedules prepared by the backfill


def test_prepared_schedules_write_the_bytes_a_computation_writes(online: Online) -> None:
    """The schedules a backfill prepares (``prepare_online``) are read instead of computed by
    a materialisation of the same raw files up to their newest event or later, and Redis
    ends up with the very bytes the computation wrote; a changed raw file, a range ending
    before the newest event or a changed view make the materialisation compute again."""
    import os

    from featurepipe.jobs.backfill import prepare_online
    from featurepipe.jobs.materialize import materialize
    from featurepipe.online.plan import view_plan

    client = online.client()
    files = [Path(view_plan(online.store.get_feature_view(v), online.store.config, online.store.project,
                            online.store.registry).kernel.prepared) for v in VIEWS]
    end = datetime(2100, 1, 1, tzinfo=timezone.utc)

    def fresh(end: datetime) -> Any:
        client.flushdb()
        return materialize(online.store, start=datetime(1970, 1, 2, tzinfo=timezone.utc), end=end, progress=False)

    try:
        assert not any(r.prepared for r in fresh(end).per_view)
        computed = {k: client.dump(k) for k in client.scan_iter(count=1000)}
        prepare_online(online.store, list(VIEWS), progress=False)
        assert all(f.is_file() for f in files)
        read = fresh(end)
        assert {r.view: r.prepared for r in read.per_view} == dict.fromkeys(VIEWS, True)
        assert {k: client.dump(k) for k in client.scan_iter(count=1000)} == computed
        # a range from after some entities' newest event: only the others, as computed
        later = datetime.fromtimestamp(online.raw.newest_us / 1e6 - 86_400, timezone.utc)
        partial = materialize(online.store, start=later, end=end, progress=False)
        assert all(r.prepared for r in partial.per_view)
        assert 0 < sum(r.entities for r in partial.per_view) < sum(r.entities for r in read.per_view)
        # before the newest event: computed (the prepared rows are those after it; the
        # labels' view counts by label time, whose newest is earlier)
        before = fresh(datetime.fromtimestamp(online.raw.newest_us / 1e6 - 60, timezone.utc))
        assert {r.view: r.prepared for r in before.per_view if r.view != LABELS} == {USERS: False, MERCHANTS: False}
        # a raw file touched since: computed, the same bytes
        raw = sorted((online.root / "data" / "raw" / "transactions").rglob("*.parquet"))[0]
        stat = raw.stat()
        os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        again = fresh(end)
        assert not any(r.prepared for r in again.per_view)
        assert {k: client.dump(k) for k in client.scan_iter(count=1000)} == computed
    finally:
        for f in files:
            f.unlink(missing_ok=True)
