"""End to end on a real Feast repo and a real Redis: backfill, materialize, train, serve, push.

Oracles: a brute-force pandas recomputation of the windowed aggregates from the raw
events, Feast's own ``get_online_features`` and the offline tables read back with DuckDB.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from featurepipe.config import source_path
from tests.conftest import Pipeline

pytestmark = pytest.mark.slow

USER_FEATURES = [
    f"{kind}_{w}" for w in ("1h", "24h", "7d")
    for kind in ("txn_count", "amount_sum", "amount_mean", "amount_max")
]
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7)}


def raw_frame(p: Pipeline) -> pd.DataFrame:
    path = p.data / "raw" / "transactions" / "**" / "*.parquet"
    return duckdb.sql(f"SELECT * FROM read_parquet('{path}')").df()


def offline(p: Pipeline, view: str) -> pd.DataFrame:
    path = p.data / "offline" / view / "**" / "*.parquet"
    return duckdb.sql(f"SELECT * FROM read_parquet('{path}')").df()


def brute_user_features(events: pd.DataFrame, as_of: pd.Timestamp) -> dict[str, float]:
    """Aggregates over one user's events, as of the last event at or before ``as_of``."""
    seen = events[events["event_timestamp"] <= as_of]
    if seen.empty:
        return {}
    t = seen["event_timestamp"].max()
    out: dict[str, float] = {"last_txn_epoch": t.value / 1e9}
    for suffix, window in WINDOWS.items():
        amounts = seen.loc[seen["event_timestamp"] >= t - window, "amount"]
        out[f"txn_count_{suffix}"] = len(amounts)
        out[f"amount_sum_{suffix}"] = amounts.sum()
        out[f"amount_mean_{suffix}"] = amounts.mean()
        out[f"amount_max_{suffix}"] = amounts.max()
    return out


def test_feast_plan_reports_no_changes_after_apply(pipeline: Pipeline) -> None:
    plan = pipeline.plan_after_apply
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "Updated" not in plan.stdout and "Created" not in plan.stdout, plan.stdout[-2000:]
    assert "No changes to infrastructure" in plan.stdout, plan.stdout[-2000:]


def test_backfill_matches_brute_force(pipeline: Pipeline) -> None:
    raw = raw_frame(pipeline)
    table = offline(pipeline, "user_transaction_stats")
    rng = np.random.default_rng(3)
    users = rng.choice(raw["user_id"].unique(), 25, replace=False)
    checked = 0
    for user in users:
        events = raw[raw["user_id"] == user]
        rows = table[table["user_id"] == user]
        assert len(rows) == events["event_timestamp"].nunique()
        for _, row in rows.sample(min(5, len(rows)), random_state=1).iterrows():
            expected = brute_user_features(events, row["event_timestamp"])
            for name, value in expected.items():
                assert row[name] == pytest.approx(value, rel=1e-9), (user, name)
            checked += 1
    assert checked >= 50


def test_merchant_fraud_rate_uses_only_arrived_labels(pipeline: Pipeline) -> None:
    raw = raw_frame(pipeline).dropna(subset=["label_timestamp"])
    table = offline(pipeline, "merchant_fraud")
    for _, row in table.sample(40, random_state=2).iterrows():
        t = row["event_timestamp"]
        labels = raw[(raw["merchant_id"] == row["merchant_id"])
                     & (raw["label_timestamp"] <= t)
                     & (raw["label_timestamp"] >= t - timedelta(days=30))]
        assert row["merchant_labels_30d"] == len(labels)
        assert row["merchant_fraud_rate_30d"] == pytest.approx(labels["is_fraud"].mean())


def _digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.parquet"))}


def test_backfill_rerun_gives_the_same_files(pipeline: Pipeline) -> None:
    from featurepipe.jobs.backfill import backfill

    folder = pipeline.data / "offline"
    before = _digest(folder)
    backfill(pipeline.store, progress=False)
    assert _digest(folder) == before
    # a partial rerun replaces only its own days, with the same content
    day = sorted(p.name for p in (folder / "user_transaction_stats").iterdir())[5].split("=")[1]
    start = pd.Timestamp(day).date()
    backfill(pipeline.store, ["user_transaction_stats"], start, start + timedelta(days=1), progress=False)
    assert _digest(folder) == before


def test_grpc_equals_feast_equals_latest_offline(pipeline: Pipeline) -> None:
    from serving.client import FeatureClient
    from serving.server import FeatureServer

    store = pipeline.store
    latest = duckdb.sql(
        f"SELECT * FROM read_parquet('{pipeline.data}/offline/user_transaction_stats/**/*.parquet') "
        "QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY event_timestamp DESC) = 1"
    ).df().set_index("user_id")
    users = [int(u) for u in latest.sample(40, random_state=4).index]
    refs = [f"user_transaction_stats:{f}" for f in [*USER_FEATURES, "last_txn_epoch"]]
    feast = store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in users]).to_dict()
    with FeatureServer(pipeline.repo, port=0) as server, FeatureClient(server.address) as client:
        ours = client.get_features({"user_id": users}, features=refs)
    for name in [*USER_FEATURES, "last_txn_epoch"]:
        expected = [latest.loc[u, name] for u in users]
        assert ours.values[name] == pytest.approx(feast[name], rel=1e-12), name
        assert ours.values[name] == pytest.approx(expected, rel=1e-12), name


def test_training_rows_only_see_the_past(pipeline: Pipeline) -> None:
    """Each training row equals the brute-force state strictly before its transaction."""
    from training.dataset import build_training_set, labelled_transactions

    raw = raw_frame(pipeline)
    entity_df, cutoff = labelled_transactions(source_path(pipeline.store, "transactions"))
    sample = entity_df.sample(300, random_state=5)
    ts = build_training_set(pipeline.store, sample, "fraud_detection_v1", cutoff=cutoff)
    frame = ts.frame.set_index("transaction_id")
    mismatches = 0
    for tid, row in frame.iterrows():
        events = raw[raw["user_id"] == row["user_id"]]
        t = row["transaction_time"]
        expected = brute_user_features(events[events["event_timestamp"] < t], t)
        if not expected or t - pd.Timestamp(expected["last_txn_epoch"], unit="s", tz="UTC") > timedelta(days=7):
            assert pd.isna(row["txn_count_7d"]), tid  # nothing before, or outside the TTL
            continue
        assert row["last_txn_epoch"] < t.value / 1e9, tid  # never this transaction or a later one
        assert row["seconds_since_last_txn"] > 0
        for name in USER_FEATURES:
            if row[name] != pytest.approx(expected[name], rel=1e-9):
                mismatches += 1
    assert mismatches == 0
    # the leak we guard against: joining at the transaction's own time would count it
    own = sample.assign(event_timestamp=sample["transaction_time"])
    leaky = build_training_set(pipeline.store, own, "fraud_detection_v1", cutoff=cutoff).frame.set_index("transaction_id")
    own_time = leaky["transaction_time"].map(lambda t: t.value / 1e9)
    assert leaky["last_txn_epoch"].tolist() == pytest.approx(own_time.tolist()), "as-of t sees the txn itself"
    assert (frame.loc[leaky.index, "last_txn_epoch"].fillna(0) < own_time).all()


def test_train_cli_reports_metrics_and_saves_the_feature_list(pipeline: Pipeline) -> None:
    import json

    result = pipeline.run("train", "--out", str(pipeline.data / "models" / "t"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ROC AUC" in result.stdout and "PR AUC" in result.stdout
    meta = json.loads((pipeline.data / "models" / "t" / "model.json").read_text())
    assert meta["feature_service"] == "fraud_detection_v1"
    service = pipeline.store.get_feature_service("fraud_detection_v1")
    assert meta["feature_columns"] == [f.name for p in service.feature_view_projections for f in p.features]
    assert 0.5 < meta["roc_auc"] <= 1.0


def test_pushed_events_show_up_online(pipeline: Pipeline) -> None:
    from featurepipe.demo import random_events
    from featurepipe.stream.push import push_events
    from serving.client import FeatureClient
    from serving.server import FeatureServer

    events = random_events(pipeline.store, 2, seed=11)
    users = events.column("user_id").to_pylist()
    refs = ["user_transaction_stats:txn_count_1h", "user_transaction_stats:last_txn_epoch"]
    with FeatureServer(pipeline.repo, port=0) as server, FeatureClient(server.address) as client:
        push_events(pipeline.store, events, "transactions")
        after = client.get_features({"user_id": users}, features=refs).values
    raw = raw_frame(pipeline)
    for i, user in enumerate(users):
        expected = brute_user_features(raw[raw["user_id"] == user], pd.Timestamp.now(tz="UTC"))
        assert after["txn_count_1h"][i] == expected["txn_count_1h"]
        assert after["last_txn_epoch"][i] == pytest.approx(expected["last_txn_epoch"])
    assert events.column("transaction_id").to_pylist()[0] in set(raw["transaction_id"])
