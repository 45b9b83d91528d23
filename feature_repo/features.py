"""Card-transaction fraud features: entities, sources, views and the feature service.

Windowed aggregates are declared once, as Feast ``Aggregation`` objects inside
``WindowedFeatures``; featurepipe's batch engine generates its DuckDB SQL from them and
the streaming path computes the same declaration.
"""

from datetime import timedelta
from pathlib import Path
from typing import Any

from feast import Entity, FeatureService, Field, FileSource, RequestSource, ValueType
from feast.aggregation import Aggregation
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64

from featurepipe.config import data_dir, find_repo, registered_path
from featurepipe.definitions import WindowedFeatures

REPO = find_repo(Path(__file__).parent)
# Registered relative to the repo (``data/...``), so a copied or moved repo reads its own data.
DATA = Path(registered_path(REPO, data_dir(REPO)))
RAW_TRANSACTIONS = str(DATA / "raw" / "transactions" / "**" / "*.parquet")
HOUR, DAY = timedelta(hours=1), timedelta(days=1)

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64,
              description="A card holder")
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.INT64,
                  description="A card acceptor")

transactions = FileSource(
    name="transactions",
    path=RAW_TRANSACTIONS,
    timestamp_field="event_timestamp",
    description="Raw card transactions (featurepipe generate), Parquet partitioned by day",
)
# The same files seen from the label side: a fraud label counts from the moment it arrives.
transaction_labels = FileSource(
    name="transaction_labels",
    path=RAW_TRANSACTIONS,
    timestamp_field="label_timestamp",
    description="Fraud labels (chargebacks), visible from label_timestamp on",
)


def _amount_aggs(window: timedelta, suffix: str) -> list[Aggregation]:
    return [
        Aggregation(column="amount", function="count", time_window=window, name=f"txn_count_{suffix}"),
        Aggregation(column="amount", function="sum", time_window=window, name=f"amount_sum_{suffix}"),
        Aggregation(column="amount", function="mean", time_window=window, name=f"amount_mean_{suffix}"),
        Aggregation(column="amount", function="max", time_window=window, name=f"amount_max_{suffix}"),
    ]


user_transaction_stats = WindowedFeatures(
    name="user_transaction_stats",
    entity=user,
    source=transactions,
    aggregations=[
        *_amount_aggs(HOUR, "1h"),
        *_amount_aggs(DAY, "24h"),
        *_amount_aggs(7 * DAY, "7d"),
        Aggregation(column="event_timestamp", function="last", name="last_txn_epoch"),
    ],
    ttl=7 * DAY,
    offline_root=DATA / "offline",
    description="Per-user spending in the 1h / 24h / 7d before the moment asked (request-time windows)",
)

merchant_activity = WindowedFeatures(
    name="merchant_activity",
    entity=merchant,
    source=transactions,
    aggregations=[
        Aggregation(column="amount", function="count", time_window=DAY, name="merchant_txn_count_24h"),
        Aggregation(column="amount", function="count", time_window=7 * DAY, name="merchant_txn_count_7d"),
        Aggregation(column="amount", function="mean", time_window=7 * DAY, name="merchant_amount_mean_7d"),
    ],
    ttl=7 * DAY,
    offline_root=DATA / "offline",
    description="Per-merchant transaction volume",
)

merchant_fraud = WindowedFeatures(
    name="merchant_fraud",
    entity=merchant,
    source=transaction_labels,
    aggregations=[
        Aggregation(column="is_fraud", function="mean", time_window=30 * DAY, name="merchant_fraud_rate_30d"),
        Aggregation(column="is_fraud", function="count", time_window=30 * DAY, name="merchant_labels_30d"),
    ],
    ttl=30 * DAY,
    offline_root=DATA / "offline",
    description="Share of fraud among the merchant's labels that arrived in the last 30 days",
)

user_transaction_stats_fv = user_transaction_stats.feature_view()
merchant_activity_fv = merchant_activity.feature_view()
merchant_fraud_fv = merchant_fraud.feature_view()

transaction_request = RequestSource(
    name="transaction_request",
    schema=[Field(name="amount", dtype=Float64), Field(name="txn_epoch", dtype=Float64)],
    description="The transaction being scored: its amount and time (epoch seconds)",
)


@on_demand_feature_view(
    sources=[user_transaction_stats_fv, transaction_request],
    schema=[
        Field(name="amount_to_mean_7d", dtype=Float64),
        Field(name="seconds_since_last_txn", dtype=Float64),
    ],
    mode="python",
    description="The scored transaction relative to the user's recent behaviour",
)
def transaction_context(inputs: dict[str, Any]) -> dict[str, Any]:
    ratio, since = [], []
    for amount, mean7d, txn_epoch, last_epoch in zip(
        inputs["amount"], inputs["amount_mean_7d"], inputs["txn_epoch"], inputs["last_txn_epoch"]
    ):
        ratio.append(amount / mean7d if amount is not None and mean7d else None)
        since.append(txn_epoch - last_epoch if txn_epoch is not None and last_epoch is not None else None)
    return {"amount_to_mean_7d": ratio, "seconds_since_last_txn": since}


fraud_detection_v1 = FeatureService(
    name="fraud_detection_v1",
    features=[
        user_transaction_stats_fv,
        merchant_activity_fv,
        merchant_fraud_fv,
        transaction_context,
    ],
    description="Features of the card-fraud model, version 1",
)
