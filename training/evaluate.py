"""Evaluation report of a fraud model on a (time-ordered) test split: plots and a Markdown page.

``write_report(model, test_frame, out_dir)`` writes ``roc.png``, ``pr.png``,
``calibration.png``, ``importance.png``, ``slices.png`` and ``report.md`` (the numbers
behind every plot as tables), and returns the figures as an :class:`Evaluation`.

Feature importance is permutation importance on average precision (model-agnostic, on
at most ``importance_rows`` rows); time slices are calendar days of the test split, so a
model that decays over time shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.dataset import LABEL
from training.model import features_matrix, model_threads

if TYPE_CHECKING:
    import pandas as pd

    from training.model import FraudModel


@dataclass(frozen=True)
class Evaluation:
    """The figures of a report."""

    rows: int
    fraud_rate: float
    roc_auc: float
    pr_auc: float
    brier: float
    importance: dict[str, float]
    slices: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None


def evaluate(model: FraudModel, test: pd.DataFrame, importance_rows: int = 20_000, seed: int = 0) -> tuple[Evaluation, np.ndarray]:
    """Score ``test`` and compute the report's figures; returns them and the scores."""
    from sklearn.inspection import permutation_importance
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    cols = model.metadata["feature_columns"]
    x = features_matrix(test, cols)
    y = test[LABEL].to_numpy()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(test), size=min(importance_rows, len(test)), replace=False)
    with model_threads(len(test)):  # one tree walk per tree, repeat and feature: thousands of small calls
        scores = model.model.predict_proba(x)[:, 1]
        perm = permutation_importance(
            model.model, x[pick], y[pick], scoring="average_precision", n_repeats=3, random_state=seed
        )
    importance = dict(sorted(zip(cols, perm.importances_mean.tolist()), key=lambda kv: -kv[1]))
    slices = []
    days = test["transaction_time"].dt.strftime("%Y-%m-%d").to_numpy()
    for day in sorted(set(days)):
        mask = days == day
        ys = y[mask]
        both = 0 < ys.sum() < len(ys)
        slices.append({
            "day": day,
            "rows": int(mask.sum()),
            "fraud_rate": float(ys.mean()),
            "roc_auc": float(roc_auc_score(ys, scores[mask])) if both else float("nan"),
            "pr_auc": float(average_precision_score(ys, scores[mask])) if both else float("nan"),
        })
    result = Evaluation(
        rows=len(test),
        fraud_rate=float(y.mean()),
        roc_auc=float(roc_auc_score(y, scores)),
        pr_auc=float(average_precision_score(y, scores)),
        brier=float(brier_score_loss(y, scores)),
        importance=importance,
        slices=slices,
    )
    return result, scores


def write_report(model: FraudModel, test: pd.DataFrame, out_dir: Path) -> Evaluation:
    """Evaluate on ``test`` and write the plots and ``report.md`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    result, scores = evaluate(model, test)
    y = test[LABEL].to_numpy()
    out_dir.mkdir(parents=True, exist_ok=True)

    fpr, tpr, _ = roc_curve(y, scores)
    _plot(plt, out_dir / "roc.png", fpr, tpr, "false positive rate", "true positive rate",
          f"ROC (AUC {result.roc_auc:.3f})", diagonal=True)
    precision, recall, _ = precision_recall_curve(y, scores)
    _plot(plt, out_dir / "pr.png", recall, precision, "recall", "precision",
          f"precision / recall (AP {result.pr_auc:.3f}, base rate {result.fraud_rate:.2%})")
    prob_true, prob_pred = calibration_curve(y, scores, n_bins=10, strategy="quantile")
    _plot(plt, out_dir / "calibration.png", prob_pred, prob_true, "predicted probability", "observed fraud rate",
          f"calibration (Brier {result.brier:.4f})", diagonal=True, marker="o")

    top = list(result.importance.items())[:15][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(top) + 1.2))
    ax.barh([k for k, _ in top], [v for _, v in top], color="#4c72b0")
    ax.set_xlabel("drop in average precision when shuffled")
    ax.set_title("permutation feature importance")
    fig.tight_layout()
    fig.savefig(out_dir / "importance.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    days = [s["day"][5:] for s in result.slices]
    ax.plot(days, [s["roc_auc"] for s in result.slices], marker="o", label="ROC AUC")
    ax.plot(days, [s["pr_auc"] for s in result.slices], marker="o", label="PR AUC")
    ax.set_ylim(0, 1)
    ax.set_title("metrics per day of the test period")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "slices.png", dpi=110)
    plt.close(fig)

    meta = model.metadata
    lines = [
        f"# Evaluation: {meta['feature_service']}",
        "",
        f"Test split: {result.rows:,} transactions, {meta['holdout_range'][0][:19]} .. {meta['holdout_range'][1][:19]}, "
        f"fraud rate {result.fraud_rate:.3%}. Trained on {meta['train_rows']:,} older transactions; "
        f"training-set fingerprint `{meta.get('training_set_fingerprint', '')[:16]}`.",
        "",
        "| metric | value |", "| --- | --- |",
        f"| ROC AUC | {result.roc_auc:.4f} |",
        f"| PR AUC (average precision) | {result.pr_auc:.4f} |",
        f"| Brier score | {result.brier:.5f} |",
        "",
        "![ROC](roc.png) ![PR](pr.png)", "", "![calibration](calibration.png)", "",
        "## Feature importance (permutation, average precision)", "",
        "| feature | importance |", "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in result.importance.items()],
        "", "![importance](importance.png)", "",
        "## Per day", "",
        "| day | rows | fraud rate | ROC AUC | PR AUC |", "| --- | --- | --- | --- | --- |",
        *[f"| {s['day']} | {s['rows']:,} | {s['fraud_rate']:.3%} | {s['roc_auc']:.3f} | {s['pr_auc']:.3f} |" for s in result.slices],
        "", "![per day](slices.png)", "",
    ]
    (out_dir / "report.md").write_text("\n".join(lines))
    return Evaluation(**{**result.__dict__, "path": out_dir / "report.md"})


def _plot(plt: Any, path: Path, x: Any, y: Any, xlabel: str, ylabel: str, title: str,
          diagonal: bool = False, marker: str | None = None) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(x, y, marker=marker)
    if diagonal:
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
