"""Point-in-time correct training sets through Feast's ``get_historical_features``.

A transaction is scored *before* it is ingested: when the model service asks for its
features at time ``t``, every windowed aggregate covers the user's events *before* ``t``
(request-time windows, :mod:`featurepipe.core.windows`), never this transaction. The
training row asks for the same instant: its as-of time is the transaction's own time
(``SCORING_OFFSET`` is 0). The offline tables hold a row from each change point ``v`` on
(``v = x + 1µs`` after an event at ``x``), so Feast's point-in-time join (feature time <=
as-of time) at ``t`` returns the values over the events before ``t``, with events at ``t``
itself, this transaction included, excluded by construction. Labels only count once they
have arrived (``label_timestamp <= cutoff``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import duckdb
import pandas as pd

from featurepipe.core import db
from featurepipe.core.db import one_row
from featurepipe.core.sql import literal, ts_literal
from featurepipe.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from feast import FeatureStore
    from google.protobuf.message import Message

SCORING_OFFSET = timedelta(0)
"""How long before the transaction its features are asked for (0: at its time; the windows
exclude events at the instant asked)."""
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
    feature_types: dict[str, str] | None = None
    """Feast type of each feature column, as declared."""
    fingerprint: str = ""
    """Hash of the feature service's and its views' definitions (see :func:`definitions_fingerprint`)."""

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
    con = db.connect()
    src = f"read_parquet({literal(raw_path)}, hive_partitioning = true, union_by_name = true)"
    try:
        if cutoff is None:
            cutoff = one_row(con, f"SELECT max(label_timestamp) FROM {src}")[0]
    except duckdb.IOException as exc:
        raise NotFound(f"no raw transactions at {raw_path}; run `featurepipe generate` first") from exc
    if cutoff is None:
        raise NotFound(f"no labelled transactions in {raw_path}: every label_timestamp is null")
    cutoff = cutoff if cutoff.tzinfo else cutoff.replace(tzinfo=timezone.utc)
    query = f"""
        SELECT transaction_id, user_id, merchant_id, amount,
               event_timestamp AS transaction_time,
               event_timestamp - INTERVAL ({SCORING_OFFSET // timedelta(microseconds=1)}) MICROSECOND
                   AS event_timestamp,
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
    feature_service: str,
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
        feature_types={f.name: str(f.dtype) for proj in service.feature_view_projections for f in proj.features},
        fingerprint=definitions_fingerprint(store, feature_service),
    )


def definitions_fingerprint(store: FeatureStore, feature_service: str) -> str:
    """SHA-256 over the definitions a training set depends on.

    The feature service and every feature view (and on-demand view) it projects, as their
    protobuf *specs* (what a user declares; not the registry's timestamps or
    materialisation intervals), serialised deterministically. Equal fingerprints mean the
    same features computed the same way: a saved training set or a model can be checked
    against the live registry.
    """
    import hashlib

    service = store.get_feature_service(feature_service)
    digest = hashlib.sha256(service.to_proto().spec.SerializeToString(deterministic=True))
    seen: set[str] = set()
    names = sorted(p.name for p in service.feature_view_projections)
    while names:
        name = names.pop(0)
        if name in seen:
            continue
        seen.add(name)
        spec: Message  # a FeatureViewSpec or an OnDemandFeatureViewSpec
        try:
            spec = store.get_feature_view(name).to_proto().spec
        except Exception:  # noqa: BLE001 - an on-demand view lives in its own registry list
            odfv = store.get_on_demand_feature_view(name)
            odfv_spec = odfv.to_proto().spec
            # its sources embed whole views, registry metadata included: hash them by name instead
            names += sorted(p.name for p in odfv.source_feature_view_projections.values())
            odfv_spec.ClearField("sources")
            digest.update(repr(sorted(odfv.source_request_sources)).encode())
            spec = odfv_spec
        digest.update(name.encode())
        digest.update(spec.SerializeToString(deterministic=True))
    return digest.hexdigest()


def save_training_set(store: FeatureStore, entity_df: pd.DataFrame, training_set: TrainingSet, name: str, path: str) -> None:
    """Persist a training set as a Feast saved dataset, tagged with its fingerprint and cutoff.

    Rebuild it exactly with ``store.get_saved_dataset(name).to_df()`` (Feast reads the
    Parquet file back) or recompute it: same entity rows, same fingerprint, same result.
    """
    from feast.infra.offline_stores.file_source import SavedDatasetFileStorage

    job = store.get_historical_features(entity_df=entity_df, features=store.get_feature_service(training_set.feature_service))
    store.create_saved_dataset(
        from_=job,
        name=name,
        storage=SavedDatasetFileStorage(path=path),
        tags={
            "featurepipe.fingerprint": training_set.fingerprint,
            "featurepipe.label_cutoff": training_set.cutoff.isoformat(),
            "featurepipe.feature_service": training_set.feature_service,
        },
        allow_overwrite=True,
    )
