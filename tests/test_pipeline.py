"""End to end on a real Feast repo and a real Redis: backfill, materialize, train, serve, push.

Oracles: a brute-force recomputation of the windowed aggregates from the raw events at the
instant asked (:func:`tests.offline_oracle.window_reference`), Feast's own
``get_online_features`` and the offline tables read back with DuckDB.
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
from featurepipe.core.windows import hop_for, micros
from featurepipe.definitions import aggregate_views
from tests.conftest import Pipeline
from tests.offline_oracle import WindowAgg, WindowView, window_reference

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


def window_spec(p: Pipeline, name: str) -> WindowView:
    """The brute force's view of a windowed view, read back from the registry."""
    view = next(v for v in aggregate_views(p.store) if v.name == name)
    return WindowView(name, list(view.join_keys),
                      [WindowAgg(a.name, a.function, a.column, a.window) for a in view.aggregations])


def change_points(events: pd.Series, windows: list[timedelta]) -> set[pd.Timestamp]:
    """Where an entity's values can change: 1 us after each event, and when each event's hop
    bucket leaves each window (``floor(x, hop) + hop + W``)."""
    us = pd.Timedelta(microseconds=1)
    points = {x + us for x in events}
    for w in windows:
        hop = pd.Timedelta(microseconds=hop_for(w))
        points |= {x.floor(hop) + hop + pd.Timedelta(microseconds=micros(w)) for x in events}
    return points


def test_feast_plan_reports_no_changes_after_apply(pipeline: Pipeline) -> None:
    plan = pipeline.plan_after_apply
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "Updated" not in plan.stdout and "Created" not in plan.stdout, plan.stdout[-2000:]
    assert "No changes to infrastructure" in plan.stdout, plan.stdout[-2000:]


def test_backfill_matches_brute_force(pipeline: Pipeline) -> None:
    """Each user's rows sit exactly at its change points, the last drops after the input's
    end included, and each row holds the brute-force values over the raw events at its own
    instant."""
    raw = raw_frame(pipeline)
    table = offline(pipeline, "user_transaction_stats")
    spec = window_spec(pipeline, "user_transaction_stats")
    lo = raw["event_timestamp"].min().floor("D")  # the default range covers every change point from there on
    rng = np.random.default_rng(3)
    users = rng.choice(raw["user_id"].unique(), 25, replace=False)
    checked = []
    for user in users:
        events = raw[raw["user_id"] == user]
        rows = table[table["user_id"] == user]
        expected = {v for v in change_points(events["event_timestamp"], list(WINDOWS.values())) if lo <= v}
        assert set(rows["event_timestamp"]) == expected, user
        checked.append(rows.sample(min(6, len(rows)), random_state=1))
    sample = pd.concat(checked, ignore_index=True)
    assert len(sample) >= 100
    expected_values = window_reference(sample, raw, spec, timestamp="event_timestamp")
    for name in [*USER_FEATURES, "last_txn_epoch"]:
        ours, theirs = sample[name].astype("float64").to_numpy(), expected_values[name].astype("float64").to_numpy()
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    assert (sample["txn_count_1h"] == 0).sum() > 10  # rows where a window emptied: 0, not missing


def test_merchant_fraud_rate_uses_only_arrived_labels(pipeline: Pipeline) -> None:
    """The label view counts labels by the time they arrived: at each row's instant, the
    labels with label_timestamp in the 30-day window before it."""
    raw = raw_frame(pipeline)
    table = offline(pipeline, "merchant_fraud").sample(60, random_state=2).reset_index(drop=True)
    spec = window_spec(pipeline, "merchant_fraud")
    expected = window_reference(table, raw, spec, timestamp="label_timestamp")
    np.testing.assert_array_equal(table["merchant_labels_30d"].to_numpy(), expected["merchant_labels_30d"].to_numpy())
    np.testing.assert_array_equal(table["merchant_fraud_rate_30d"].astype("float64").to_numpy(),
                                  expected["merchant_fraud_rate_30d"].astype("float64").to_numpy())


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


def test_grpc_equals_offline_at_the_same_instant(pipeline: Pipeline) -> None:
    """The server's values at its clock equal the offline join at that instant; Feast's SDK,
    which reads Feast's own fields, gets the row in force when they were written: the
    offline values at the event timestamp Feast returns with them (to the second)."""
    from serving.client import FeatureClient
    from serving.server import FeatureServer

    store = pipeline.store
    users = [int(u) for u in raw_frame(pipeline)["user_id"].drop_duplicates().sample(40, random_state=4)]
    names = [*USER_FEATURES, "last_txn_epoch"]
    refs = [f"user_transaction_stats:{f}" for f in names]

    def offline_at(instants: list[pd.Timestamp]) -> pd.DataFrame:
        entity_df = pd.DataFrame({"user_id": users, "event_timestamp": instants})
        return store.get_historical_features(entity_df=entity_df, features=refs).to_df()

    with FeatureServer(pipeline.repo, port=0) as server, FeatureClient(server.address) as client:
        before = pd.Timestamp.now(tz="UTC")
        ours = client.get_features({"user_id": users}, features=refs).values
        after = pd.Timestamp.now(tz="UTC")
    first, last = offline_at([before] * len(users)), offline_at([after] * len(users))
    steady = np.ones(len(users), dtype=bool)  # no value changed while the request ran
    for name in names:
        a, b = first[name].astype("float64").to_numpy(), last[name].astype("float64").to_numpy()
        steady &= (a == b) | (np.isnan(a) & np.isnan(b))
    assert steady.sum() >= 35
    for name in names:
        got = np.array([np.nan if v is None else float(v) for v in ours[name]])[steady]
        np.testing.assert_array_equal(got, first[name].astype("float64").to_numpy()[steady], err_msg=name)
    feast = store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in users]).to_dict(
        include_event_timestamps=True)
    # Feast's Redis store keeps whole seconds of the row's time (its change point v): v is in that second
    written = pd.to_datetime(feast[f"{names[0]}__ts"], unit="s", utc=True) + pd.Timedelta(seconds=1) - pd.Timedelta(microseconds=1)
    at_write = offline_at(list(written))
    for name in names:
        theirs = np.array([np.nan if v is None else float(v) for v in feast[name]])
        np.testing.assert_array_equal(theirs, at_write[name].astype("float64").to_numpy(), err_msg=name)


def test_training_rows_only_see_the_past(pipeline: Pipeline) -> None:
    """Each training row holds the values at its transaction's own time: the brute force over
    the user's events before that instant, the transaction itself never counted."""
    from training.dataset import SCORING_OFFSET, build_training_set, labelled_transactions

    raw = raw_frame(pipeline)
    entity_df, cutoff = labelled_transactions(source_path(pipeline.store, "transactions"))
    assert SCORING_OFFSET == timedelta(0) and (entity_df["event_timestamp"] == entity_df["transaction_time"]).all()
    sample = entity_df.sample(300, random_state=5)
    frame = build_training_set(pipeline.store, sample, "fraud_detection_v1", cutoff=cutoff).frame
    expected = window_reference(frame, raw, window_spec(pipeline, "user_transaction_stats"), timestamp="event_timestamp")
    for name in [*USER_FEATURES, "last_txn_epoch"]:
        np.testing.assert_array_equal(frame[name].astype("float64").to_numpy(),
                                      expected[name].astype("float64").to_numpy(), err_msg=name)
    own_time = frame["transaction_time"].map(lambda t: t.value / 1e9)
    known = frame["last_txn_epoch"].notna()
    assert (frame.loc[known, "last_txn_epoch"] < own_time[known]).all()  # never this transaction or a later one
    assert frame.loc[known, "txn_count_7d"].notna().all()  # a known user's empty windows are 0, however old
    assert (frame.loc[known, "seconds_since_last_txn"] > 0).all()
    # one microsecond later the transaction itself is in the windows
    later = sample.assign(event_timestamp=sample["transaction_time"] + pd.Timedelta(microseconds=1))
    after = build_training_set(pipeline.store, later, "fraud_detection_v1", cutoff=cutoff).frame
    assert after["last_txn_epoch"].tolist() == pytest.approx(after["transaction_time"].map(lambda t: t.value / 1e9).tolist())
    assert (after["txn_count_1h"] >= 1).all()


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
    """A push appends the events and writes the touched users' windows online: the server's
    values at its clock equal the brute force over the raw events at that instant."""
    from featurepipe.demo import random_events
    from featurepipe.stream.push import push_events
    from serving.client import FeatureClient
    from serving.server import FeatureServer

    events = random_events(pipeline.store, 2, seed=11)
    users = events.column("user_id").to_pylist()
    refs = ["user_transaction_stats:txn_count_1h", "user_transaction_stats:last_txn_epoch"]
    with FeatureServer(pipeline.repo, port=0) as server, FeatureClient(server.address) as client:
        result = push_events(pipeline.store, events, "transactions")
        before = pd.Timestamp.now(tz="UTC")
        after = client.get_features({"user_id": users}, features=refs).values
        later = pd.Timestamp.now(tz="UTC")
    assert result.rows_by_view["user_transaction_stats"] == len(set(users))
    raw = raw_frame(pipeline)
    assert events.column("transaction_id").to_pylist()[0] in set(raw["transaction_id"])
    spec = window_spec(pipeline, "user_transaction_stats")
    at = [window_reference(pd.DataFrame({"user_id": users, "event_timestamp": t}), raw, spec,
                           timestamp="event_timestamp") for t in (before, later)]
    for i in range(len(users)):
        if at[0]["txn_count_1h"][i] != at[1]["txn_count_1h"][i]:  # a window edge passed during the request
            continue
        assert after["txn_count_1h"][i] == at[0]["txn_count_1h"][i]
        assert after["last_txn_epoch"][i] == at[0]["last_txn_epoch"][i]
