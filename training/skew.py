"""Online/offline skew check: what the server returns against what training would see.

For a sample of (user, merchant) pairs, at one instant ``t``: the online features come
from the gRPC server (as a model service gets them), the offline ones from
``get_historical_features`` as of ``t`` (as a training row at ``t`` gets them). Per
feature the report gives what Chronon's consistency jobs report: mismatch rate (both
present, values differ beyond ``rel_tol``), missing online (offline has a value, online
none), extra online (online has a value, offline none), mean SMAPE over present pairs,
and the worst examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from featurepipe.core import db
from featurepipe.core.sql import literal
from training.inference import present_values

if TYPE_CHECKING:
    from feast import FeatureStore

    from serving.client import FeatureClient


@dataclass(frozen=True)
class FeatureSkew:
    """Consistency figures of one feature."""

    feature: str
    compared: int
    mismatches: int
    missing_online: int
    extra_online: int
    smape: float
    worst: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mismatch_rate(self) -> float:
        return self.mismatches / self.compared if self.compared else 0.0


@dataclass(frozen=True)
class SkewReport:
    """Per-feature skew at one instant over a sample of entities."""

    at: datetime
    rows: int
    features: list[FeatureSkew]

    @property
    def clean(self) -> bool:
        return all(f.mismatches == 0 and f.missing_online == 0 and f.extra_online == 0 for f in self.features)

    def table(self) -> list[tuple[str, str, str, str, str]]:
        return [
            (f.feature, f"{f.mismatch_rate:.2%}", str(f.missing_online), str(f.extra_online), f"{f.smape:.4f}")
            for f in self.features
        ]


def sample_entities(raw_path: str, rows: int, seed: int = 0) -> pd.DataFrame:
    """Recent (user, merchant, amount) triples from the raw transactions."""
    con = db.connect()
    frame = con.execute(
        f"SELECT user_id, merchant_id, amount FROM read_parquet({literal(raw_path)}, hive_partitioning = true) "
        f"USING SAMPLE reservoir({int(rows)} ROWS) REPEATABLE ({int(seed)})"
    ).df()
    con.close()
    return frame


def check_skew(
    store: FeatureStore,
    client: FeatureClient,
    entities: pd.DataFrame,
    feature_service: str,
    at: datetime | None = None,
    rel_tol: float = 1e-9,
    worst: int = 5,
) -> SkewReport:
    """Compare online (gRPC) and offline (point in time at ``at``, default now) features."""
    at = at or datetime.now(timezone.utc)
    epoch = at.timestamp()
    keys = {"user_id": entities["user_id"].tolist(), "merchant_id": entities["merchant_id"].tolist()}
    context = {"amount": entities["amount"].tolist(), "txn_epoch": [epoch] * len(entities)}
    # stale (OUTSIDE_MAX_AGE) and absent values are missing, as training saw them
    online = present_values(client.get_features(keys, feature_service=feature_service, request_context=context))
    offline_df = entities.assign(event_timestamp=pd.Timestamp(at), txn_epoch=epoch)
    offline = store.get_historical_features(
        entity_df=offline_df, features=store.get_feature_service(feature_service)
    ).to_df()
    service = store.get_feature_service(feature_service)
    names = [f.name for p in service.feature_view_projections for f in p.features]
    results = []
    for name in names:
        on = np.array([np.nan if v is None else float(v) for v in online[name]], dtype=np.float64)
        off = offline[name].astype("float64").to_numpy()
        both = ~np.isnan(on) & ~np.isnan(off)
        close = np.isclose(on, off, rtol=rel_tol, atol=0.0)
        bad = both & ~close
        denom = np.abs(on) + np.abs(off)
        smape = np.where(denom > 0, 2 * np.abs(on - off) / np.where(denom > 0, denom, 1), 0.0)
        order = np.argsort(-np.where(bad, smape, -1))[: min(worst, int(bad.sum()))]
        results.append(FeatureSkew(
            feature=name,
            compared=int(both.sum()),
            mismatches=int(bad.sum()),
            missing_online=int((np.isnan(on) & ~np.isnan(off)).sum()),
            extra_online=int((~np.isnan(on) & np.isnan(off)).sum()),
            smape=float(smape[both].mean()) if both.any() else 0.0,
            worst=[{"user_id": keys["user_id"][i], "merchant_id": keys["merchant_id"][i],
                    "online": float(on[i]), "offline": float(off[i])} for i in order],
        ))
    return SkewReport(at=at, rows=len(entities), features=results)
