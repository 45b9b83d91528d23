"""Why point-in-time joins matter: a naive "latest value" join against the correct one.

A common shortcut joins today's feature values onto historical labels. Each training row
then sees the future: the user's 7-day aggregates after the transaction (and after later
ones), the time of a *later* last transaction. Offline metrics look great; in production
the model only ever gets the state before the transaction, and does worse.

:func:`compare` trains the same model twice on the same (older) transactions, once on
point-in-time features and once on the naive join, and evaluates both on the same newer
transactions with the features the model would really get (point in time). It also
reports the naive model's score on the same test transactions joined the naive way, the
number its authors would have believed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.dataset import LABEL, build_training_set
from training.model import features_matrix
from training.train import fit_classifier, time_splits

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

    from training.dataset import TrainingSet


@dataclass(frozen=True)
class LeakageComparison:
    """PR / ROC AUC of the point-in-time model and the naive one."""

    pit_test_pr_auc: float
    pit_test_roc_auc: float
    naive_believed_pr_auc: float  # what the naive pipeline reports offline: its test rows, naive features
    naive_test_pr_auc: float  # what the naive model really does
    naive_test_roc_auc: float
    rows: int
    plot: Path | None = None

    def table(self) -> list[tuple[str, str, str]]:
        return [
            ("point-in-time join, evaluated on the future (real)", f"{self.pit_test_pr_auc:.3f}", f"{self.pit_test_roc_auc:.3f}"),
            ("naive latest-value join, its own (naive) test features (believed)", f"{self.naive_believed_pr_auc:.3f}", ""),
            ("naive latest-value join, evaluated on the future (real)", f"{self.naive_test_pr_auc:.3f}", f"{self.naive_test_roc_auc:.3f}"),
        ]


def compare(store: FeatureStore, entity_df: pd.DataFrame, pit: TrainingSet, out_dir: Path | None = None) -> LeakageComparison:
    """Train on point-in-time and on naive features; evaluate both on point-in-time future rows."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    train, _, test = time_splits(pit.frame)
    # the shortcut: every row joined as of the label cutoff ("the features as they are now")
    naive = build_training_set(store, entity_df.assign(event_timestamp=pit.cutoff), pit.feature_service, pit.cutoff)
    naive_frame = naive.frame.set_index("transaction_id")
    naive_train = naive_frame.loc[train["transaction_id"]].reset_index()
    naive_test = naive_frame.loc[test["transaction_id"]].reset_index()
    cols = pit.feature_columns

    def score(model: Any, part: pd.DataFrame) -> tuple[float, float]:  # a fit_classifier() model
        p = model.predict_proba(features_matrix(part, cols))[:, 1]
        y = part[LABEL].to_numpy()
        return float(average_precision_score(y, p)), float(roc_auc_score(y, p))

    pit_model = fit_classifier(train, cols)
    naive_model = fit_classifier(naive_train, cols)
    pit_pr, pit_roc = score(pit_model, test)
    naive_val_pr, _ = score(naive_model, naive_test)
    naive_pr, naive_roc = score(naive_model, test)
    result = LeakageComparison(pit_pr, pit_roc, naive_val_pr, naive_pr, naive_roc, rows=len(pit.frame))
    if out_dir is not None:
        result = LeakageComparison(**{**result.__dict__, "plot": _plot(result, out_dir)})
    return result


def _plot(result: LeakageComparison, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = ["point in time\n(future test)", "naive join\n(test, naive features)", "naive join\n(test, real features)"]
    values = [result.pit_test_pr_auc, result.naive_believed_pr_auc, result.naive_test_pr_auc]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#c44e52"])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel("PR AUC")
    ax.set_title("leakage: what the naive join promises and what it delivers")
    fig.tight_layout()
    path = out_dir / "leakage.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
