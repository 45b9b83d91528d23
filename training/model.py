"""The saved fraud model and its input: what training writes and evaluation and inference read.

:func:`features_matrix` turns a frame into the model's input (the artifact's feature
columns, in its order); :class:`FraudModel` is a saved model with its metadata
(``model.joblib`` and ``model.json``, written by :func:`training.train.train_model`), with
the checks that keep scoring on the features it was trained on. Training, evaluation,
leakage comparison and inference all build on this module, so they need not import each other.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurepipe.errors import InvalidInput, NotFound
from training.dataset import ENTITY_COLUMNS, definitions_fingerprint

if TYPE_CHECKING:
    import pandas as pd


def features_matrix(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """The model input: the feature columns in the artifact's order, as float64 (NaN = missing)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InvalidInput(f"feature columns {missing} are missing from the frame")
    return frame[columns].astype("float64").to_numpy()


def model_threads(rows: int) -> AbstractContextManager[Any]:
    """The OpenMP threads to fit or score ``rows`` rows with: one below 200,000 rows.

    Small sets gain nothing from threads, and spinning threads crawl on a busy machine (the
    permutation importance of a 1,500-row test split, some 13,000 tree walks: 29 s with two
    threads on a loaded 2-core machine, 4 s with one). Enter it once the model's library is
    imported: threadpoolctl limits the thread pools already loaded.
    """
    from threadpoolctl import threadpool_limits

    limits: AbstractContextManager[Any] = threadpool_limits(limits=1 if rows < 200_000 else None)
    return limits


@dataclass
class FraudModel:
    """A saved model and its metadata, ready to score rows of features."""

    model: Any
    metadata: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> FraudModel:
        """The model saved in ``path`` by :func:`training.train.train_model`."""
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

    def check_definitions(self, store: Any) -> None:
        """Refuse when the registry's definitions of the model's features changed since training."""
        trained = self.metadata.get("training_set_fingerprint")
        live = definitions_fingerprint(store, self.metadata["feature_service"])
        if trained and trained != live:
            raise InvalidInput(
                f"feature service {self.metadata['feature_service']!r} changed since this model was trained "
                f"(fingerprint {trained[:12]} at training, {live[:12]} now); retrain with `featurepipe train`"
            )

    def score(self, features: dict[str, list[Any]]) -> np.ndarray:
        """Fraud probability per row, from a column dict (as the gRPC client returns)."""
        self.check_features([k for k in features if k not in ENTITY_COLUMNS])
        cols = self.metadata["feature_columns"]
        x = np.array(
            [[np.nan if v is None else float(v) for v in features[c]] for c in cols], dtype=np.float64
        ).T
        proba: np.ndarray = self.model.predict_proba(x)[:, 1]
        return proba
