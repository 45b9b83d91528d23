"""Train and evaluate the fraud model on a point-in-time training set, save it as an artifact.

The split is by time (the newest ``holdout_fraction`` of transactions is the holdout), the
model is scikit-learn's ``HistGradientBoostingClassifier`` (native missing values, so
features outside their TTL stay missing), and the artifact records the feature service
and the exact, ordered feature list so inference asks the server for the same features.
The artifact's reader, :class:`~training.model.FraudModel`, is in :mod:`training.model`
(``from training.train import FraudModel`` keeps working).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurepipe.errors import InvalidInput
from training.dataset import LABEL, TrainingSet
from training.evaluate import write_report
from training.model import FraudModel, features_matrix, model_threads

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ModelMetadata:
    """What the model was trained on; saved beside it as ``model.json``."""

    feature_service: str
    feature_refs: list[str]
    feature_columns: list[str]
    feature_types: dict[str, str]
    training_set_fingerprint: str
    train_rows: int
    validation_rows: int
    holdout_rows: int
    train_range: tuple[str, str]
    holdout_range: tuple[str, str]
    label_cutoff: str
    roc_auc: float
    pr_auc: float
    validation_roc_auc: float
    validation_pr_auc: float
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


def time_splits(
    frame: pd.DataFrame, validation_fraction: float = 0.1, test_fraction: float = 0.2
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train / validation / test by transaction time, oldest to newest (no shuffling: no peeking)."""
    rest, test = time_split(frame, test_fraction)
    train, validation = time_split(rest, validation_fraction / (1 - test_fraction))
    return train, validation, test


def train_model(
    training_set: TrainingSet,
    out_dir: Path,
    holdout_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    report: bool = True,
) -> TrainResult:
    """Fit on the oldest part, check on validation, evaluate on the newest part; save the artifact.

    Writes ``model.joblib``, ``model.json`` (:class:`ModelMetadata`) and, with ``report``,
    the evaluation report of the test split (``report/``, see :mod:`training.evaluate`).
    """
    import joblib
    from sklearn.metrics import average_precision_score, roc_auc_score

    t0 = time.perf_counter()
    train, validation, holdout = time_splits(training_set.frame, validation_fraction, holdout_fraction)
    for name, part in (("training", train), ("holdout", holdout)):
        if part[LABEL].nunique() < 2:
            raise InvalidInput(
                f"the {name} split has only one class; generate more rows (featurepipe generate --rows)"
            )
    cols = training_set.feature_columns
    model = fit_classifier(train, cols)

    def metrics(part: pd.DataFrame) -> tuple[float, float]:
        y = part[LABEL].to_numpy()
        if len(set(y.tolist())) < 2:  # a short validation window may hold no fraud: no AUC to report
            return float("nan"), float("nan")
        scores = model.predict_proba(features_matrix(part, cols))[:, 1]
        return float(roc_auc_score(y, scores)), float(average_precision_score(y, scores))

    def span(part: pd.DataFrame) -> tuple[str, str]:
        return (part["transaction_time"].min().isoformat(), part["transaction_time"].max().isoformat())

    roc, pr = metrics(holdout)
    val_roc, val_pr = metrics(validation)
    meta = ModelMetadata(
        feature_service=training_set.feature_service,
        feature_refs=training_set.feature_refs,
        feature_columns=cols,
        feature_types=training_set.feature_types or {},
        training_set_fingerprint=training_set.fingerprint,
        train_rows=len(train),
        validation_rows=len(validation),
        holdout_rows=len(holdout),
        train_range=span(train),
        holdout_range=span(holdout),
        label_cutoff=training_set.cutoff.isoformat(),
        roc_auc=roc,
        pr_auc=pr,
        validation_roc_auc=val_roc,
        validation_pr_auc=val_pr,
        fraud_rate_holdout=float(holdout[LABEL].mean()),
        trained_at=datetime.now(timezone.utc).isoformat(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out_dir / "model.joblib")
    (out_dir / "model.json").write_text(json.dumps(asdict(meta), indent=2))
    if report:
        write_report(FraudModel(model, asdict(meta)), holdout, out_dir / "report")
    return TrainResult(metadata=meta, path=out_dir, seconds=time.perf_counter() - t0)


def fit_classifier(train: pd.DataFrame, columns: list[str]) -> Any:
    """The classifier: gradient-boosted trees that take missing values (features outside their TTL)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=0)
    with model_threads(len(train)):
        return model.fit(features_matrix(train, columns), train[LABEL].to_numpy())
