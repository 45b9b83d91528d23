"""Training workflow: label cutoff, artifact checks, evaluation report, leakage comparison, skew check."""

from __future__ import annotations

from datetime import timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import redis

from featurepipe.config import redis_connection_kwargs, source_path
from featurepipe.errors import InvalidInput
from featurepipe.jobs.backfill import backfill
from featurepipe.online import codec, schedule
from featurepipe.online.schedule import schedule_field
from serving.client import FeatureClient
from serving.server import FeatureServer
from tests.conftest import Pipeline
from training.dataset import (
    build_training_set,
    definitions_fingerprint,
    labelled_transactions,
    save_training_set,
)
from training.leakage import compare
from training.model import FraudModel
from training.skew import check_skew, sample_entities
from training.train import train_model


def _raw(pipeline: Pipeline) -> str:
    return source_path(pipeline.store, "transactions")


@pytest.fixture(scope="module")
def trained(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, pd.DataFrame]:
    entity_df, cutoff = labelled_transactions(_raw(pipeline))
    ts = build_training_set(pipeline.store, entity_df, "fraud_detection_v1", cutoff=cutoff)
    out = tmp_path_factory.mktemp("model") / "model"
    train_model(ts, out)
    return out, ts, entity_df


def test_labels_after_the_cutoff_are_excluded(pipeline: Pipeline) -> None:
    con = duckdb.connect()
    raw = con.execute(
        f"SELECT transaction_id, label_timestamp FROM read_parquet('{_raw(pipeline)}', hive_partitioning = true)"
    ).df()
    stamps = raw["label_timestamp"].dropna().sort_values()
    cutoff = stamps.iloc[len(stamps) // 2].to_pydatetime().replace(tzinfo=timezone.utc)
    frame, used = labelled_transactions(_raw(pipeline), cutoff=cutoff)
    assert used == cutoff
    labels = pd.to_datetime(raw["label_timestamp"], utc=True)
    expected = set(raw.loc[labels <= pd.Timestamp(cutoff), "transaction_id"])
    assert 0 < len(expected) < len(stamps)
    assert set(frame["transaction_id"]) == expected
    assert (pd.to_datetime(frame["label_timestamp"], utc=True) <= pd.Timestamp(cutoff)).all()


def test_artifact_records_features_and_refuses_other_features(pipeline: Pipeline, trained: tuple) -> None:
    import json

    out, ts, _ = trained
    meta = json.loads((out / "model.json").read_text())
    assert meta["feature_columns"] == ts.feature_columns
    assert set(meta["feature_types"]) == set(ts.feature_columns)
    assert meta["training_set_fingerprint"] == ts.fingerprint and len(ts.fingerprint) == 64
    model = FraudModel.load(out)
    row = {c: [1.0] for c in ts.feature_columns}
    assert model.score(row).shape == (1,)
    with pytest.raises(InvalidInput, match="missing"):
        model.score({k: v for k, v in row.items() if k != ts.feature_columns[0]})
    with pytest.raises(InvalidInput, match="unexpected"):
        model.score({**row, "surprise_feature": [1.0]})
    model.check_definitions(pipeline.store)  # unchanged registry: fine
    model.metadata["training_set_fingerprint"] = "0" * 64
    with pytest.raises(InvalidInput, match="changed since this model was trained"):
        model.check_definitions(pipeline.store)


def test_evaluation_report_is_written(trained: tuple) -> None:
    out, _, _ = trained
    report = out / "report"
    for name in ("roc.png", "pr.png", "calibration.png", "importance.png", "slices.png"):
        assert (report / name).stat().st_size > 1000, name
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (report / "report.md").read_text()
    assert "ROC AUC" in text and "permutation" in text and "| day |" in text


def test_evaluate_cli_rebuilds_the_test_split(pipeline: Pipeline, trained: tuple) -> None:
    import json

    out, _, _ = trained
    result = pipeline.run("evaluate", "--model", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "model.json").read_text())
    roc = float(next(line for line in result.stdout.splitlines() if line.startswith("ROC AUC")).split()[-1])
    assert roc == pytest.approx(meta["roc_auc"], abs=1e-4)  # same rows, same features, same model


def test_leakage_comparison_shows_the_naive_join_overpromises(pipeline: Pipeline, trained: tuple, tmp_path: Path) -> None:
    _, ts, entity_df = trained
    result = compare(pipeline.store, entity_df, ts, tmp_path)
    assert result.plot is not None and result.plot.exists()
    # on naive features the naive model looks better than it really is...
    assert result.naive_believed_pr_auc > result.naive_test_pr_auc
    # ...and on the features it really gets, the point-in-time model beats it
    assert result.pit_test_pr_auc > result.naive_test_pr_auc


def test_skew_check_is_clean_then_finds_an_injected_value(pipeline: Pipeline) -> None:
    store = pipeline.store
    backfill(store, progress=False)  # pushes in earlier tests wrote online only; make offline catch up
    entities = sample_entities(_raw(pipeline), 200, seed=3)
    with FeatureServer(pipeline.repo, port=0) as server, FeatureClient(server.address) as client:
        clean = check_skew(store, client, entities, "fraud_detection_v1")
        assert clean.clean, [(f.feature, f.mismatches, f.missing_online, f.extra_online, f.worst) for f in clean.features if not f.mismatches == f.missing_online == f.extra_online == 0]
        # inject: one user's 24h sum changes online only (in every row of its schedule, which
        # is what the server reads; Feast's own fields are not served)
        user = int(entities["user_id"].iloc[0])
        names = [f.name for f in store.get_feature_view("user_transaction_stats").features]
        keys = codec.encode_entity_keys({"user_id": pa.array([user], pa.int64())},
                                        [codec.JoinKeySpec("user_id", "INT64")], store.project)
        key = bytes(keys.data[0, :keys.row_lengths()[0]])
        db = redis.Redis(**redis_connection_kwargs(pipeline.env["REDIS_URL"]))  # type: ignore[arg-type]
        (field,) = [f for f in db.hkeys(key) if f.startswith(schedule_field("user_transaction_stats"))]
        stored = db.hget(key, field)
        assert stored is not None
        decoded = schedule.decode(stored, names)
        columns = [np.array(c) for c in decoded.columns]
        columns[names.index("amount_sum_24h")] += 1000.0
        whole_rows = np.array([-1] + [0] * (len(decoded.v) - 1))  # one group holding every column
        db.hset(key, field, schedule.encode(np.array(decoded.v), whole_rows, columns, [0] * len(names), names))
        try:
            dirty = check_skew(store, client, entities, "fraud_detection_v1")
            by_name = {f.feature: f for f in dirty.features}
            assert not dirty.clean
            assert by_name["amount_sum_24h"].mismatches >= 1 and by_name["amount_sum_24h"].worst[0]["user_id"] == user
            assert by_name["txn_count_24h"].mismatches == 0
        finally:  # restore what was written
            db.hset(key, field, stored)
            db.close()
    assert np.isfinite(clean.features[0].smape)


def test_a_user_idle_past_the_ttl_counts_zero_online_and_offline(pipeline: Pipeline) -> None:
    """A known user whose last purchase is older than the view's TTL (7 days) has empty
    windows, not missing ones: counts and sums 0, means and maxima null, the last purchase
    kept, and the on-demand features computed from them; the online store (read in-process
    at the same instant) says the same. A user never seen is missing in both."""
    from featurepipe.online.read import online_features

    store = pipeline.store
    raw = duckdb.sql(f"SELECT user_id, max(event_timestamp) AS last FROM read_parquet('{_raw(pipeline)}') "
                     "GROUP BY user_id ORDER BY user_id LIMIT 5").df()
    view = store.get_feature_view("user_transaction_stats")
    at = pd.Timestamp(raw["last"].max()) + view.ttl + timedelta(hours=2)  # past every window and the TTL
    never = 999_999_001
    users = [*map(int, raw["user_id"]), never]
    entity_df = pd.DataFrame({"user_id": users, "merchant_id": 1, "amount": 50.0, "event_timestamp": at,
                              "txn_epoch": at.timestamp()})
    refs = [f"user_transaction_stats:{f.name}" for f in view.features]
    offline = store.get_historical_features(
        entity_df=entity_df, features=[*refs, "transaction_context:seconds_since_last_txn",
                                       "transaction_context:amount_to_mean_7d"],
    ).to_df().set_index("user_id").loc[users]
    known = offline.loc[users[:-1]]
    for window in ("1h", "24h", "7d"):
        assert (known[f"txn_count_{window}"] == 0).all() and (known[f"amount_sum_{window}"] == 0).all()
        assert known[f"amount_mean_{window}"].isna().all() and known[f"amount_max_{window}"].isna().all()
    expected_last = [t.timestamp() for t in pd.to_datetime(raw["last"], utc=True)]
    assert known["last_txn_epoch"].tolist() == pytest.approx(expected_last)
    assert known["seconds_since_last_txn"].tolist() == pytest.approx([at.timestamp() - t for t in expected_last])
    assert known["amount_to_mean_7d"].isna().all()  # no 7-day mean to compare with
    assert offline.loc[never].drop(["merchant_id", "amount", "event_timestamp", "txn_epoch"]).isna().all()
    online = online_features(store, [{"user_id": u} for u in users], refs, at=at.to_pydatetime()).set_index("user_id")
    for f in view.features:
        ours = online.loc[users, f.name].astype("float64").to_numpy()
        np.testing.assert_array_equal(ours, offline[f.name].astype("float64").to_numpy(), err_msg=f.name)


def test_training_set_saved_as_feast_dataset_with_its_fingerprint(pipeline: Pipeline, trained: tuple, tmp_path: Path) -> None:
    _, ts, entity_df = trained
    sample = entity_df.head(500)
    save_training_set(pipeline.store, sample, ts, "fraud_sample", str(tmp_path / "saved.parquet"))
    saved = pipeline.store.get_saved_dataset("fraud_sample")
    assert saved.tags["featurepipe.fingerprint"] == ts.fingerprint == definitions_fingerprint(pipeline.store, "fraud_detection_v1")
    assert set(saved.features) == set(ts.feature_refs)
    # Feast's SavedDataset.to_df returns join keys and features only; the file keeps every column
    back = pd.read_parquet(tmp_path / "saved.parquet").sort_values("transaction_id").reset_index(drop=True)
    fresh = ts.frame[ts.frame["transaction_id"].isin(sample["transaction_id"])].sort_values("transaction_id").reset_index(drop=True)
    assert len(back) == len(sample)
    for column in ts.feature_columns:
        np.testing.assert_allclose(back[column].astype("float64"), fresh[column].astype("float64"), rtol=1e-12, err_msg=column)
