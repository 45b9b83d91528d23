"""The gRPC feature server against Feast's own online path, on real Redis and a real repo.

Module fixtures build a small store once (~20k transactions, 10 days): a private
redis-server, a copy of feature_repo/ in a temp folder with one more, plain feature view
(``user_profile``: values as Feast stores them, with a TTL), registered with Feast,
backfilled by featurepipe and materialised through Feast's ``materialize``. The server runs
in-process on an ephemeral port, its clock pinned (``SRV_CLOCK``).

What is compared with what: the plain view's values, statuses and event times with Feast's
own SDK; the windowed views' values (request-time windows, which Feast's SDK does not
compute) with featurepipe's library call at the server's clock
(:func:`featurepipe.online.read.online_features`; ``tests/test_request_time_online.py``
checks both against the raw events), and their on-demand outputs with the transformation
applied to those. Names, order and the statuses of unknown entities come from Feast.
Fixture names start with ``srv_``.
"""

from __future__ import annotations

import random
import runpy
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest

from featurepipe.errors import BackendUnavailable, InvalidInput, NotFound
from featurepipe.redis_server import RedisServer
from serving.client import FeatureClient, OnlineFeatures
from serving.server import SERVICE_NAME, FeatureServer

ROOT = Path(__file__).resolve().parents[1]
SOURCE_REPO = ROOT / "feature_repo"
SERVICE = "fraud_detection_v1"
USER_VIEW = "user_transaction_stats"
PROFILE_VIEW = "user_profile"  # a plain view (not windowed), added to the repo copy
UTC = timezone.utc
SRV_CLOCK = datetime.now(UTC).replace(microsecond=0)  # the pinned server's clock
PROFILE_DEFINITION = '''

# Added by tests/test_serving.py: a plain feature view, served as Feast stores it.
from feast import FeatureView as _FeatureView
from feast.types import Int64 as _Int64

user_profile = _FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(days=7),
    schema=[Field(name="user_id", dtype=_Int64), Field(name="credit_limit", dtype=Float64),
            Field(name="risk_band", dtype=_Int64)],
    source=FileSource(name="user_profile_source", path=str(DATA / "profiles" / "*.parquet"),
                      timestamp_field="event_timestamp"),
    online=True,
)
'''


@dataclass
class SrvEnv:
    root: Path
    repo: Path
    data: Path
    redis: RedisServer


@pytest.fixture(scope="module")
def srv_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SrvEnv]:
    """A private redis-server and a copy of the feature repo, with the env pointing at them."""
    root = tmp_path_factory.mktemp("serving")
    repo, data = root / "repo", root / "data"
    repo.mkdir()
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(SOURCE_REPO / name, repo / name)
    with (repo / "features.py").open("a") as definitions:
        definitions.write(PROFILE_DEFINITION)
    with RedisServer(workdir=root / "redis") as redis_server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDIS_URL", redis_server.url)
        mp.setenv("FEATUREPIPE_REDIS", "")  # load_store() sets it; restored afterwards
        mp.setenv("FEATUREPIPE_DATA_DIR", str(data))
        mp.delenv("FEATUREPIPE_REPO", raising=False)
        yield SrvEnv(root, repo, data, redis_server)


def _apply(store: Any, repo: Path) -> None:
    """What `feast apply` registers: every Feast object defined in the repo's features.py."""
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView
    from feast.data_source import DataSource

    kinds = (Entity, DataSource, FeatureView, OnDemandFeatureView, FeatureService)
    namespace = runpy.run_path(str(repo / "features.py"))
    store.apply([obj for obj in namespace.values() if isinstance(obj, kinds)])


@pytest.fixture(scope="module")
def srv_store(srv_env: SrvEnv) -> Any:
    """The Feast store: registered, backfilled, materialised into Redis by Feast."""
    from featurepipe.config import load_store
    from featurepipe.generate import generate_transactions
    from featurepipe.jobs.backfill import backfill

    generate_transactions(20_000, srv_env.data / "raw" / "transactions", days=10)
    _write_profiles(srv_env.data)
    store = load_store(srv_env.repo)
    _apply(store, srv_env.repo)
    backfill(store)
    store.materialize(datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC))
    return store


def _write_profiles(data: Path) -> None:
    """The plain view's table: users 0..49 with a credit limit (every fifth null) and a risk
    band, half of them stamped 30 days ago (older than the view's TTL)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (data / "profiles").mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    pq.write_table(pa.table({
        "user_id": pa.array(range(50), pa.int64()),
        "credit_limit": [None if u % 5 == 0 else 1000.0 + u for u in range(50)],
        "risk_band": pa.array([u % 3 for u in range(50)], pa.int64()),
        "event_timestamp": pa.array([now - timedelta(days=30 if u % 2 else 1) for u in range(50)],
                                    pa.timestamp("us", tz="UTC")),
    }), data / "profiles" / "profiles.parquet")


@pytest.fixture(scope="module")
def srv_server(srv_env: SrvEnv, srv_store: Any) -> Iterator[FeatureServer]:
    """The server, opening the repo itself (as `featurepipe serve` does), at SRV_CLOCK."""
    with FeatureServer(
        srv_env.repo, port=0, registry_refresh_seconds=0.5, health_interval=0.25,
        clock=SRV_CLOCK.isoformat(),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def srv_client(srv_server: FeatureServer) -> Iterator[FeatureClient]:
    with FeatureClient(srv_server.address, timeout=5.0) as client:
        yield client


@pytest.fixture(scope="module")
def srv_stub(srv_server: FeatureServer) -> Iterator[Any]:
    from feast.protos.feast.serving.ServingService_pb2_grpc import ServingServiceStub

    with grpc.insecure_channel(srv_server.address) as channel:
        yield ServingServiceStub(channel)


@pytest.fixture(scope="module")
def srv_sample(srv_env: SrvEnv) -> dict[str, list[Any]]:
    """~50 real (user, merchant) pairs, half from the least recently active users, plus
    two unknown ids; with a request context for the on-demand view."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(
        srv_env.data / "raw" / "transactions", format="parquet", partitioning="hive"
    ).to_table(columns=["user_id", "merchant_id", "event_timestamp"])
    last = table.group_by("user_id").aggregate([("event_timestamp", "max")])
    by_age = last.sort_by("event_timestamp_max").column("user_id").to_pylist()
    users = by_age[:25] + random.Random(3).sample(by_age[25:], 23)
    merchant_of = {}
    for user in users:
        rows = table.filter(pc.equal(table["user_id"], user))
        merchant_of[user] = rows.column("merchant_id")[0].as_py()
    rng = random.Random(5)
    now = time.time()
    users = users[:10] + list(range(10)) + users[10:]  # ten users with a profile too
    users += [10_000_000, by_age[-1]]
    merchants = [merchant_of.get(u, 99_999) for u in users]
    merchants[-1] = 99_999  # a known user with an unknown merchant
    return {
        "user_id": users,
        "merchant_id": merchants,
        "amount": [round(rng.uniform(1, 500), 2) for _ in users],
        "txn_epoch": [now - rng.uniform(0, 3600) for _ in users],
    }


def _feast(store: Any, features: Any, sample: dict[str, list[Any]], **kwargs: Any) -> dict[str, Any]:
    rows = [dict(zip(sample, values, strict=True)) for values in zip(*sample.values(), strict=True)]
    return store.get_online_features(features=features, entity_rows=rows, **kwargs).to_dict(
        include_event_timestamps=True
    )


def _ours(client: FeatureClient, sample: dict[str, list[Any]], **kwargs: Any) -> OnlineFeatures:
    entities = {k: sample[k] for k in ("user_id", "merchant_id")}
    context = {k: sample[k] for k in ("amount", "txn_epoch")}
    return client.get_features(entities, request_context=context, **kwargs)


def _expected(store: Any, sample: dict[str, list[Any]], theirs: dict[str, Any], name: str) -> list[Any]:
    """What the server must answer for ``name`` (a plain name or ``view__name``): Feast's
    answer (``theirs``) for join keys and plain views; for windowed views the values at the
    server's clock from featurepipe's library call; for the on-demand outputs, the
    transformation of those."""
    from featurepipe.online.plan import is_windowed
    from featurepipe.online.read import online_features

    feature = name.split("__")[-1]
    odfv = store.get_on_demand_feature_view("transaction_context")
    windowed = {f.name: fv.name for fv in store.list_feature_views() if is_windowed(fv) for f in fv.features}
    if feature in {f.name for f in odfv.features}:
        rows = online_features(store, [{"user_id": u} for u in sample["user_id"]],
                               [f"{USER_VIEW}:amount_mean_7d", f"{USER_VIEW}:last_txn_epoch"], at=SRV_CLOCK)
        inputs = {"amount": sample["amount"], "txn_epoch": sample["txn_epoch"],
                  "amount_mean_7d": [_none(x) for x in rows["amount_mean_7d"]],
                  "last_txn_epoch": [_none(x) for x in rows["last_txn_epoch"]]}
        return [_none(x) for x in odfv.feature_transformation.udf(inputs)[feature]]
    if feature in windowed:
        view = windowed[feature]
        keys = [k.name for k in store.get_feature_view(view).entity_columns]
        rows = online_features(store, [{k: sample[k][i] for k in keys} for i in range(len(sample[keys[0]]))],
                               [f"{view}:{feature}"], at=SRV_CLOCK)
        return [_none(x) for x in rows[feature].tolist()]
    return list(theirs[name])


def _none(x: Any) -> Any:
    return None if x is None or (isinstance(x, float) and x != x) else x


def _service_columns(store: Any) -> list[tuple[str, str]]:
    service = store.get_feature_service(SERVICE)
    return [(p.name, f.name) for p in service.feature_view_projections for f in p.features]


def test_feature_service_matches_feast(srv_store: Any, srv_client: FeatureClient, srv_sample: dict) -> None:
    ours = _ours(srv_client, srv_sample, feature_service=SERVICE)
    theirs = _feast(srv_store, srv_store.get_feature_service(SERVICE), srv_sample)

    expected_names = ["user_id", "merchant_id"] + [f for _, f in _service_columns(srv_store)]
    assert list(ours) == expected_names  # join keys first, then the service's declared order
    for name in expected_names:
        assert ours[name] == _expected(srv_store, srv_sample, theirs, name), name
    odfv = {f.name for f in srv_store.get_on_demand_feature_view("transaction_context").features}
    for name in set(expected_names) - odfv - {"user_id", "merchant_id"}:
        # a windowed value's event time: the change point of its row in force, at most the clock
        assert all(ts is None or ts <= SRV_CLOCK for ts in ours.event_timestamps[name]), name

    # the unknown user: NOT_FOUND with no value (Feast reports PRESENT with an empty value)
    assert ours.statuses["amount_sum_24h"][-2] == "NOT_FOUND"
    assert ours["amount_sum_24h"][-2] is None
    assert ours.statuses["merchant_txn_count_7d"][-1] == "NOT_FOUND"
    assert ours.statuses["amount_to_mean_7d"][-2] == "NULL_VALUE"
    first = _expected(srv_store, srv_sample, theirs, "amount_to_mean_7d")[0]
    assert ours.statuses["amount_to_mean_7d"][0] == ("PRESENT" if first is not None else "NULL_VALUE")


def test_statuses_follow_the_ttl(srv_store: Any, srv_stub: Any, srv_sample: dict) -> None:
    """A plain view's value older than its TTL is OUTSIDE_MAX_AGE (still returned); a windowed
    view's never is: its value at the clock is exact however long ago the entity's last event
    was (an idle entity's count is 0), so it is PRESENT, NULL_VALUE or NOT_FOUND."""
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    from featurepipe.online.plan import is_windowed

    profile = [f"{PROFILE_VIEW}:credit_limit", f"{PROFILE_VIEW}:risk_band"]
    refs = [f"{v}:{f}" for v, f in _service_columns(srv_store)] + profile
    response = srv_stub.GetOnlineFeatures(_request(None, srv_sample, features=refs))
    on_demand = {v.name for v in srv_store.list_on_demand_feature_views()}
    view_of = {f: v for v, f in (r.split(":") for r in refs) if v not in on_demand}
    seen: dict[bool, set[str]] = {True: set(), False: set()}
    for name, vector in zip(response.metadata.feature_names.val, response.results, strict=True):
        if name not in view_of:
            continue
        fv = srv_store.get_feature_view(view_of[name])
        for value, status, ts in zip(vector.values, vector.statuses, vector.event_timestamps, strict=True):
            if not ts.seconds and value.WhichOneof("val") is None:
                expected = {FieldStatus.NOT_FOUND, FieldStatus.NULL_VALUE}
            elif value.WhichOneof("val") is None:
                expected = {FieldStatus.NULL_VALUE}
            elif is_windowed(fv):
                expected = {FieldStatus.PRESENT}
            else:
                age = SRV_CLOCK - ts.ToDatetime(tzinfo=UTC)
                if abs(age - fv.ttl) < timedelta(minutes=1):
                    continue  # too close to the boundary to call
                expected = {FieldStatus.OUTSIDE_MAX_AGE if age > fv.ttl else FieldStatus.PRESENT}
            assert status in expected, (name, value, ts)
            seen[is_windowed(fv)].add(FieldStatus.Name(status))
    assert {"PRESENT", "NOT_FOUND"} <= seen[True] and "OUTSIDE_MAX_AGE" not in seen[True]
    assert {"PRESENT", "OUTSIDE_MAX_AGE", "NULL_VALUE", "NOT_FOUND"} <= seen[False]


def test_null_and_stale_values_written_by_feast(srv_store: Any, srv_client: FeatureClient) -> None:
    import pandas as pd

    now = datetime.now(UTC)
    rows = [{"user_id": user, "event_timestamp": ts, "credit_limit": None, "risk_band": 1}
            for user, ts in ((20_000_001, now - timedelta(minutes=5)), (20_000_002, now - timedelta(days=8)))]
    srv_store.write_to_online_store(PROFILE_VIEW, pd.DataFrame(rows))

    got = srv_client.get_features(
        {"user_id": [20_000_001, 20_000_002]},
        features=[f"{PROFILE_VIEW}:credit_limit", f"{PROFILE_VIEW}:risk_band"],
    )
    assert got.statuses["credit_limit"] == ["NULL_VALUE", "NULL_VALUE"]
    assert got.statuses["risk_band"] == ["PRESENT", "OUTSIDE_MAX_AGE"]
    assert got["risk_band"] == [1, 1]  # a stale value is still returned
    assert got.event_timestamps["risk_band"][1] < now - timedelta(days=7)


def test_feature_refs_keep_the_requested_order(srv_store: Any, srv_client: FeatureClient,
                                               srv_sample: dict) -> None:
    refs = ["merchant_fraud:merchant_labels_30d", f"{USER_VIEW}:amount_sum_24h",
            "transaction_context:amount_to_mean_7d", f"{USER_VIEW}:txn_count_1h"]
    ours = _ours(srv_client, srv_sample, features=refs)
    theirs = _feast(srv_store, refs, srv_sample)
    assert list(ours) == ["merchant_id", "user_id", "merchant_labels_30d", "amount_sum_24h",
                          "amount_to_mean_7d", "txn_count_1h"]
    for name in ours:
        assert ours[name] == _expected(srv_store, srv_sample, theirs, name), name


def test_full_feature_names(srv_store: Any, srv_client: FeatureClient, srv_sample: dict) -> None:
    ours = _ours(srv_client, srv_sample, feature_service=SERVICE, full_feature_names=True)
    plain = _feast(srv_store, srv_store.get_feature_service(SERVICE), srv_sample)
    full = _feast(srv_store, srv_store.get_feature_service(SERVICE), srv_sample,
                  full_feature_names=True)
    expected = ["user_id", "merchant_id"] + [f"{v}__{f}" for v, f in _service_columns(srv_store)]
    assert list(ours) == expected
    for name in expected[2:]:
        # Feast drops on-demand outputs when full_feature_names=True: compare those to its
        # plain-named answer.
        if name in full:
            assert ours[name] == _expected(srv_store, srv_sample, full, name), name
        else:
            assert ours[name] == _expected(srv_store, srv_sample, plain, name.split("__", 1)[1]), name


def test_request_context_may_come_with_the_entities(srv_client: FeatureClient,
                                                    srv_sample: dict) -> None:
    # Feast's SDK sends request data among the entity columns; accept that too.
    together = srv_client.get_features(dict(srv_sample), feature_service=SERVICE)
    apart = _ours(srv_client, srv_sample, feature_service=SERVICE)
    assert together["amount_to_mean_7d"] == apart["amount_to_mean_7d"]


def test_repeated_entities_and_concurrency(srv_env: SrvEnv, srv_client: FeatureClient,
                                           srv_sample: dict) -> None:
    import redis

    one = {k: v[:3] for k, v in srv_sample.items()}
    base = _ours(srv_client, one, feature_service=SERVICE).to_dict()
    stats = redis.Redis.from_url(srv_env.redis.url)

    def hmgets() -> int:
        return int(stats.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))

    before = hmgets()
    many = _ours(srv_client, {k: v * 100 for k, v in one.items()}, feature_service=SERVICE)
    assert many.to_dict() == {k: v * 100 for k, v in base.items()}
    distinct = len(set(one["user_id"])) + len(set(one["merchant_id"]))
    assert hmgets() - before == distinct  # 300 rows: one HMGET per distinct entity key
    stats.close()

    results: list[dict] = []
    def worker() -> None:
        for _ in range(20):
            results.append(_ours(srv_client, one, feature_service=SERVICE).to_dict())
    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 120 and all(r == base for r in results)


def _request(feature_service: str | None, sample: dict[str, list[Any]] | None = None, *,
             features: list[str] | None = None, entities: dict[str, list[Any]] | None = None,
             context: dict[str, list[Any]] | None = None) -> Any:
    """A raw GetOnlineFeaturesRequest (Feast's protos), for requests the client refuses."""
    from feast.protos.feast.serving.ServingService_pb2 import GetOnlineFeaturesRequest
    from feast.protos.feast.types.Value_pb2 import Value

    from serving.values import to_value

    request = GetOnlineFeaturesRequest()
    if feature_service is not None:
        request.feature_service = feature_service
    if features is not None:
        request.features.val.extend(features)
    sample = sample or {}
    if entities is None:
        entities = {k: sample[k] for k in ("user_id", "merchant_id") if k in sample}
    if context is None:
        context = {k: sample[k] for k in ("amount", "txn_epoch") if k in sample}
    for name, values in entities.items():
        request.entities[name].val.extend(to_value(v, Value) for v in values)
    for name, values in context.items():
        request.request_context[name].val.extend(to_value(v, Value) for v in values)
    return request


ROW = {"user_id": [1], "merchant_id": [1], "amount": [10.0], "txn_epoch": [1.7e9]}
CTX = {"amount": [10.0], "txn_epoch": [1.7e9]}
BAD_REQUESTS = {
    "unknown feature service": (
        _request("no_such_service", ROW), grpc.StatusCode.NOT_FOUND, "no_such_service"),
    "unknown feature view": (
        _request(None, ROW, features=["no_such_view:x"]), grpc.StatusCode.NOT_FOUND, "no_such_view"),
    "unknown feature": (
        _request(None, ROW, features=[f"{USER_VIEW}:nope"]), grpc.StatusCode.NOT_FOUND, "nope"),
    "malformed ref": (
        _request(None, ROW, features=["amount_sum_24h"]), grpc.StatusCode.INVALID_ARGUMENT,
        "view:feature"),
    "missing join key": (
        _request(SERVICE, entities={"user_id": [1]}, context=CTX),
        grpc.StatusCode.INVALID_ARGUMENT, "merchant_id"),
    "join key of the wrong type": (
        _request(SERVICE, entities={"user_id": ["1"], "merchant_id": [1]}, context=CTX),
        grpc.StatusCode.INVALID_ARGUMENT, "INT64"),
    "entity columns of different lengths": (
        _request(SERVICE, entities={"user_id": [1, 2], "merchant_id": [1]}, context=CTX),
        grpc.StatusCode.INVALID_ARGUMENT, "lengths"),
    "no features named": (
        _request(None, ROW), grpc.StatusCode.INVALID_ARGUMENT, "feature_service"),
    "empty feature list": (
        _request(None, ROW, features=[]), grpc.StatusCode.INVALID_ARGUMENT, "feature_service"),
    "no entities": (
        _request(SERVICE, entities={}, context=CTX), grpc.StatusCode.INVALID_ARGUMENT,
        "user_id"),
    "zero rows": (
        _request(SERVICE, entities={"user_id": [], "merchant_id": []}, context=CTX),
        grpc.StatusCode.INVALID_ARGUMENT, "no rows"),
    "too many rows": (
        _request(None, features=[f"{USER_VIEW}:amount_sum_24h"],
                 entities={"user_id": list(range(1001))}),
        grpc.StatusCode.INVALID_ARGUMENT, "1000"),
    "missing request field": (
        _request(SERVICE, entities={"user_id": [1], "merchant_id": [1]}, context={"amount": [1.0]}),
        grpc.StatusCode.INVALID_ARGUMENT, "txn_epoch"),
    "request field of the wrong type": (
        _request(SERVICE, entities={"user_id": [1], "merchant_id": [1]},
                 context={"amount": ["ten"], "txn_epoch": [1.0]}),
        grpc.StatusCode.INVALID_ARGUMENT, "amount"),
    "same feature twice": (
        _request(None, ROW, features=[f"{USER_VIEW}:txn_count_1h", f"{USER_VIEW}:txn_count_1h"]),
        grpc.StatusCode.INVALID_ARGUMENT, "more than once"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_clear_status_codes(srv_stub: Any, case: str) -> None:
    request, code, fragment = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        srv_stub.GetOnlineFeatures(request, timeout=5)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()


def test_client_maps_codes_to_featurepipe_errors(srv_client: FeatureClient) -> None:
    with pytest.raises(NotFound, match="no_such_service"):
        srv_client.get_features({"user_id": [1]}, feature_service="no_such_service")
    with pytest.raises(InvalidInput, match="merchant_id"):
        srv_client.get_features({"user_id": [1]}, feature_service=SERVICE, request_context=CTX)
    with pytest.raises(InvalidInput, match="exactly one"):
        srv_client.get_features({"user_id": [1]})
    with pytest.raises(InvalidInput, match="one value per row"):
        srv_client.get_features({"user_id": 1}, feature_service=SERVICE)


def test_health_reflection_and_info(srv_server: FeatureServer, srv_client: FeatureClient) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(srv_server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", SERVICE_NAME):
            answer = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)
    assert srv_client.server_version() == __import__("feast").__version__


def test_serve_runs_until_stopped(srv_env: SrvEnv, srv_store: Any) -> None:
    from serving.server import serve

    ready, stop, lines = threading.Event(), threading.Event(), []
    thread = threading.Thread(
        target=serve, args=(srv_env.repo,),
        kwargs={"port": 0, "ready": ready, "stop": stop, "announce": lines.append},
    )
    thread.start()
    try:
        assert ready.wait(30), "serve() never became ready"
        address = lines[0].split(" on ", 1)[1].split(" ", 1)[0]
        with FeatureClient(address) as client:
            assert client.get_features({"user_id": [1]}, features=[f"{USER_VIEW}:txn_count_1h"])
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_a_taken_port_is_a_clear_error(srv_env: SrvEnv, srv_server: FeatureServer) -> None:
    with pytest.raises(InvalidInput, match="cannot listen"):
        FeatureServer(srv_env.repo, port=srv_server.port).start()


def test_registry_changes_apply_without_restart(srv_store: Any, srv_client: FeatureClient) -> None:
    from feast import FeatureService

    view = srv_store.get_feature_view(USER_VIEW)
    srv_store.apply(FeatureService(name="srv_added_later", features=[view[["txn_count_24h"]]]))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                got = srv_client.get_features({"user_id": [1]}, feature_service="srv_added_later")
                break
            except NotFound:
                assert time.monotonic() < deadline, "the server never saw the new feature service"
                time.sleep(0.2)
        assert list(got) == ["user_id", "txn_count_24h"]
    finally:
        srv_store.delete_feature_service("srv_added_later")


def test_redis_outage_is_unavailable_then_recovers(srv_env: SrvEnv, srv_store: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A server on its own Redis: stop Redis, get UNAVAILABLE fast, restart it, recover."""
    import pandas as pd
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from featurepipe.config import load_store

    def write_one(store: Any) -> None:
        row = {"user_id": 7, "credit_limit": 2.0, "risk_band": 3, "event_timestamp": datetime.now(UTC)}
        store.write_to_online_store(PROFILE_VIEW, pd.DataFrame([row]))

    redis_server = RedisServer(workdir=srv_env.root / "redis-outage").start()
    try:
        monkeypatch.setenv("REDIS_URL", redis_server.url)
        monkeypatch.setenv("FEATUREPIPE_REDIS", "")
        store = load_store(srv_env.repo)
        write_one(store)
        request = {"user_id": [7]}, [f"{PROFILE_VIEW}:risk_band"]
        with FeatureServer(srv_env.repo, port=0, health_interval=0.2) as server, \
                FeatureClient(server.address, timeout=2.0, retries=0) as client, \
                grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status

            assert client.get_features(request[0], features=request[1])["risk_band"] == [3]

            redis_server.stop()
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="Redis"):
                client.get_features(request[0], features=request[1])
            assert time.monotonic() - started < 3
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING

            redis_server = RedisServer(workdir=srv_env.root / "redis-outage",
                                       port=redis_server.port).start()
            write_one(store)
            assert client.get_features(request[0], features=request[1])["risk_band"] == [3]
            deadline = time.monotonic() + 3
            while status() != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health never went back to SERVING"
                time.sleep(0.1)
    finally:
        redis_server.stop()


def test_client_does_not_load_the_feast_sdk() -> None:
    code = (
        "import sys, serving, serving.client\n"
        "heavy = [m for m in ('feast', 'pandas', 'duckdb', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_entity_keys_match_feast_serialisation() -> None:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from serving.layout import encode_entity_value, entity_key_prefix
    from serving.registry import ServedValueType

    cases = [
        ({"user_id": Value(int64_val=42)}, {"user_id": ServedValueType.INT64}),
        ({"b": Value(string_val="x"), "a": Value(int32_val=-3)},
         {"b": ServedValueType.STRING, "a": ServedValueType.INT32}),
    ]
    for values, types in cases:
        keys = sorted(values)
        ours = entity_key_prefix(keys) + b"".join(
            encode_entity_value(values[k], types[k], k, 0) for k in keys
        )
        theirs = serialize_entity_key(
            EntityKey(join_keys=list(values), entity_values=list(values.values())),
            entity_key_serialization_version=3,
        )
        assert ours == theirs



def test_the_checkers_value_types_match_the_runtime_enum() -> None:
    """serving.registry declares ServedValueType's members for mypy (under TYPE_CHECKING) and
    builds the enum at run time from Feast's protos: the two must name the same numbers."""
    import ast

    from serving import protos
    from serving.registry import ServedValueType

    tree = ast.parse((ROOT / "serving" / "registry.py").read_text(encoding="utf-8"))
    declared = next(node for node in ast.walk(tree)
                    if isinstance(node, ast.ClassDef) and node.name == "ServedValueType")
    members = {stmt.targets[0].id: ast.literal_eval(stmt.value) for stmt in declared.body
               if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)}
    assert members == protos.VALUE_TYPES == {m.name: m.value for m in ServedValueType}
def test_client_value_conversions() -> None:
    from serving import protos
    from serving.values import from_value, to_value

    for obj in (3, -2**40, 2.5, "x", b"\x00", True, None, [1, 2], [1.5, 2], ["a"],
                datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)):
        assert from_value(to_value(obj, protos.Value)) == obj, obj
    assert to_value(True, protos.Value).WhichOneof("val") == "bool_val"
    assert to_value(7, protos.Value).WhichOneof("val") == "int64_val"
    for bad in (object(), [1.5, None], [1, "a"]):
        with pytest.raises(InvalidInput):
            to_value(bad, protos.Value)
