"""Scoring in a model service: features over gRPC, the saved model, the same rules as training.

A value the server marks other than PRESENT (NOT_FOUND, NULL_VALUE, OUTSIDE_MAX_AGE) is
missing: the training set had nulls exactly there (no row, or a row older than the view's
TTL), so the model must see a missing value too.

Example::

    from serving.client import FeatureClient
    from training.inference import FraudScorer
    from training.model import FraudModel

    with FeatureClient("127.0.0.1:6566") as client:
        scorer = FraudScorer(client, FraudModel.load(Path("feature_repo/data/models/fraud_detection_v1")))
        scorer.score([{"user_id": 42, "merchant_id": 7, "amount": 12.5}])   # array([0.0031])
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from serving.client import FeatureClient, OnlineFeatures
    from training.model import FraudModel


def present_values(features: OnlineFeatures) -> dict[str, list[Any]]:
    """Feature values with every value whose status is not PRESENT replaced by None."""
    statuses = features.statuses
    return {
        name: [v if s == "PRESENT" else None for v, s in zip(values, statuses[name], strict=True)]
        for name, values in features.values.items()
    }


@dataclass
class FraudScorer:
    """Fetch a transaction's features from the feature server and score it."""

    client: FeatureClient
    model: FraudModel

    def features(self, transactions: Sequence[Mapping[str, Any]], now: float | None = None) -> dict[str, list[Any]]:
        """The model's features for each transaction, as the server returns them now."""
        epoch = time.time() if now is None else now
        online = self.client.get_features(
            {"user_id": [t["user_id"] for t in transactions], "merchant_id": [t["merchant_id"] for t in transactions]},
            feature_service=self.model.metadata["feature_service"],
            request_context={"amount": [t["amount"] for t in transactions],
                             "txn_epoch": [t.get("txn_epoch", epoch) for t in transactions]},
        )
        return present_values(online)

    def score(self, transactions: Sequence[Mapping[str, Any]], now: float | None = None) -> np.ndarray:
        """Fraud probability per transaction; refuses when served features differ from training's."""
        return self.model.score(self.features(transactions, now))
