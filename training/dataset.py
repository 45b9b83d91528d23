"""Point-in-time correct training sets through Feast's ``get_historical_features``.

A transaction is scored *before* it is ingested: when the model service asks for
features of a transaction at time ``t``, the online store holds the user's aggregates up
to the previous transaction, not including this one. The training row must see exactly
the same, so its as-of time is ``t - 1µs`` (``SCORING_OFFSET``): Feast's point-in-time
join (feature time <= as-of time) then picks the feature row of the previous event, never
the one that already counts this transaction. Labels only count once they have arrived
(``label_timestamp <= cutoff``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import duckdb
import pandas as pd

from featurepipe.batch.sql import literal, ts_literal
from featurepipe.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from feast import FeatureStore

SCORING_OFFSET = timedelta(microseconds=1)
ENTITY_COLUMNS = ["transaction_id", "user_id", "merchant_id"]
LABEL = "is_fraud"


@dataclass(frozen=True)
class TrainingSet:
    """A training set and what it was built from."""

    frame: pd.DataFrame
    feature_service: str
    feature_refs: list[str]
    feature_columns: list[str]
    cutoff: datetime

    @property
    def time_range(self) -> tuple[datetime, datetime]:
        ts = self.frame["transaction_time"]
        return ts.min().to_pydatetime(), ts.max().to_pydatetime()


def labelled_transactions(
    raw_path: str, cutoff: datetime | None = None, limit: int | None = None
) -> tuple[pd.DataFrame, datetime]:
    """Transactions whose label has arrived by ``cutoff`` (default: the newest label).

    Returns the entity frame for ``get_historical_features`` (as-of time, join keys,
    request fields ``amount`` and ``txn_epoch``, label) and the cutoff used.
    """
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    src = f"read_parquet({literal(raw_path)}, hive_partitioning = true, union_by_name = true)"
    try:
        if cutoff is None:
            cutoff = con.execute(f"SELECT max(label_timestamp) FROM {src}").fetchone()[0]
    except duckdb.IOException as exc:
        raise NotFound(f"no raw transactions at {raw_path}; run `featurepipe generate` first") from exc
    if cutoff is None:
        raise NotFound(f"no labelled transactions in {raw_path}: every label_timestamp is null")
    cutoff = cutoff if cutoff.tzinfo else cutoff.replace(tzinfo=timezone.utc)
    query = f"""
        SELECT transaction_id, user_id, merchant_id, amount,
               event_timestamp AS transaction_time,
               event_timestamp - INTERVAL 1 MICROSECOND AS event_timestamp,
               epoch_us(event_timestamp) / 1e6 AS txn_epoch,
               CAST(is_fraud AS INTEGER) AS is_fraud, label_timestamp
        FROM {src}
        WHERE label_timestamp IS NOT NULL AND label_timestamp <= {ts_literal(cutoff)}
        ORDER BY transaction_time, transaction_id
        {f"LIMIT {int(limit)}" if limit else ""}
    """
    frame = con.execute(query).df()
    con.close()
    if frame.empty:
        raise NotFound(f"no transaction has a label that arrived by {cutoff:%Y-%m-%d %H:%M}")
    return frame, cutoff


def build_training_set(
    store: FeatureStore,
    entity_df: pd.DataFrame,
    feature_service: str = "fraud_detection_v1",
    cutoff: datetime | None = None,
) -> TrainingSet:
    """Join the feature service's features onto ``entity_df`` point-in-time correctly.

    ``entity_df`` needs the join keys, ``event_timestamp`` (the as-of time; use
    :func:`labelled_transactions` for transactions) and the request fields of the
    service's on-demand views.
    """
    if "event_timestamp" not in entity_df.columns:
        raise InvalidInput(
            "entity_df has no column 'event_timestamp'; pass the as-of time of each row in a "
            "column named 'event_timestamp'"
        )
    try:
        service = store.get_feature_service(feature_service)
    except Exception as exc:  # Feast raises its own FeatureServiceNotFoundException
        raise NotFound(f"feature service {feature_service!r} is not in the registry: {exc}") from exc
    job = store.get_historical_features(entity_df=entity_df, features=service)
    frame = job.to_df()
    refs = [
        f"{proj.name_to_use()}:{f.name}"
        for proj in service.feature_view_projections
        for f in proj.features
    ]
    columns = [ref.split(":", 1)[1] for ref in refs]
    sort_cols = [c for c in ("transaction_time", "transaction_id") if c in frame.columns]
    if sort_cols:
        frame = frame.sort_values(sort_cols, kind="stable").reset_index(drop=True)
    return TrainingSet(
        frame=frame,
        feature_service=feature_service,
        feature_refs=refs,
        feature_columns=columns,
        cutoff=cutoff or datetime.now(timezone.utc),
    )
