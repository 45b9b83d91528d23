"""Train and evaluate the fraud model on a point-in-time training set, save it as an artifact.

The split is by time (the newest ``holdout_fraction`` of transactions is the holdout), the
model is scikit-learn's ``HistGradientBoostingClassifier`` (native missing values, so
features outside their TTL stay missing), and the artifact records the feature service
and the exact, ordered feature list so inference asks the server for the same features.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurepipe.errors import InvalidInput, NotFound
from training.dataset import ENTITY_COLUMNS, LABEL, TrainingSet

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ModelMetadata:
    """What the model was trained on; saved beside it as ``model.json``."""

    feature_service: str
    feature_refs: list[str]
    feature_columns: list[str]
    train_rows: int
    holdout_rows: int
    train_range: tuple[str, str]
    holdout_range: tuple[str, str]
    label_cutoff: str
    roc_auc: float
    pr_auc: float
    fraud_rate_holdout: float
    trained_at: str


@dataclass(frozen=True)
class TrainResult:
    metadata: ModelMetadata
    path: Path
    seconds: float


def time_split(frame: pd.DataFrame, holdout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split by transaction time: everything before the cut trains, the rest is holdout."""
    if not 0 < holdout_fraction < 1:
        raise InvalidInput(f"holdout fraction must be between 0 and 1, got {holdout_fraction}")
    ordered = frame.sort_values("transaction_time", kind="stable")
    cut = ordered["transaction_time"].iloc[int(len(ordered) * (1 - holdout_fraction))]
    return ordered[ordered["transaction_time"] < cut], ordered[ordered["transaction_time"] >= cut]


def features_matrix(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """The model input: the feature columns in the artifact's order, as float64 (NaN = missing)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InvalidInput(f"feature columns {missing} are missing from the frame")
    return frame[columns].astype("float64").to_numpy()


def train_model(training_set: TrainingSet, out_dir: Path, holdout_fraction: float = 0.2) -> TrainResult:
    """Fit the classifier on the older part, evaluate on the newer part, save both files."""
    import joblib
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import average_precision_score, roc_auc_score

    t0 = time.perf_counter()
    train, holdout = time_split(training_set.frame, holdout_fraction)
    for name, part in (("training", train), ("holdout", holdout)):
        if part[LABEL].nunique() < 2:
            raise InvalidInput(
                f"the {name} split has only one class; generate more rows (featurepipe generate --rows)"
            )
    cols = training_set.feature_columns
    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=0)
    model.fit(features_matrix(train, cols), train[LABEL].to_numpy())
    scores = model.predict_proba(features_matrix(holdout, cols))[:, 1]
    y = holdout[LABEL].to_numpy()

    def span(part: pd.DataFrame) -> tuple[str, str]:
        return (part["transaction_time"].min().isoformat(), part["transaction_time"].max().isoformat())

    meta = ModelMetadata(
        feature_service=training_set.feature_service,
        feature_refs=training_set.feature_refs,
        feature_columns=cols,
        train_rows=len(train),
        holdout_rows=len(holdout),
        train_range=span(train),
        holdout_range=span(holdout),
        label_cutoff=training_set.cutoff.isoformat(),
        roc_auc=float(roc_auc_score(y, scores)),
        pr_auc=float(average_precision_score(y, scores)),
        fraud_rate_holdout=float(y.mean()),
        trained_at=datetime.now(timezone.utc).isoformat(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out_dir / "model.joblib")
    (out_dir / "model.json").write_text(json.dumps(asdict(meta), indent=2))
    return TrainResult(metadata=meta, path=out_dir, seconds=time.perf_counter() - t0)


@dataclass
class FraudModel:
    """A saved model and its metadata, ready to score rows of features."""

    model: Any
    metadata: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> FraudModel:
        import joblib

        if not (path / "model.joblib").exists():
            raise NotFound(f"no model in {path}; run `featurepipe train` first")
        return cls(joblib.load(path / "model.joblib"), json.loads((path / "model.json").read_text()))

    def check_features(self, names: list[str]) -> None:
        """Refuse to score when the served feature names differ from the training ones."""
        expected = self.metadata["feature_columns"]
        if sorted(names) != sorted(expected):
            raise InvalidInput(
                f"served features differ from training features: missing "
                f"{sorted(set(expected) - set(names))}, unexpected {sorted(set(names) - set(expected))}"
            )

    def score(self, features: dict[str, list[Any]]) -> np.ndarray:
        """Fraud probability per row, from a column dict (as the gRPC client returns)."""
        self.check_features([k for k in features if k not in ENTITY_COLUMNS])
        cols = self.metadata["feature_columns"]
        x = np.array(
            [[np.nan if v is None else float(v) for v in features[c]] for c in cols], dtype=np.float64
        ).T
        return self.model.predict_proba(x)[:, 1]
