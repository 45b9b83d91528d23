"""The data scientist's commands: train, evaluate, leakage, skew (``featurepipe --help``)."""

from __future__ import annotations

from pathlib import Path

import click

from featurepipe.cli.options import (
    EVENTS_SOURCE,
    FEATURE_SERVICE,
    FEATURE_SERVICE_OPTION,
    LABELLED_LIMIT_OPTION,
    REPO_OPTION,
)
from featurepipe.report import table


def _model_dir(repo: Path | None, feature_service: str) -> Path:
    """Where a model of ``feature_service`` lives by default: <data>/models/<feature service>."""
    from featurepipe.config import data_dir, find_repo

    return data_dir(find_repo(repo)) / "models" / feature_service


@click.command()
@FEATURE_SERVICE_OPTION
@click.option("--holdout", type=click.FloatRange(0.01, 0.99), default=0.2, show_default=True,
              help="Newest share of labelled transactions kept for evaluation.")
@LABELLED_LIMIT_OPTION
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model folder (default: <repo>/data/models/<feature service>).")
@click.option("--save-dataset", default=None, metavar="NAME",
              help="Also save the training set as a Feast saved dataset NAME (with its fingerprint).")
@REPO_OPTION
def train(
    feature_service: str, holdout: float, limit: int | None, out: Path | None, save_dataset: str | None, repo: Path | None
) -> None:
    """Build a point-in-time training set, train a classifier, print validation and holdout ROC/PR AUC.

    Splits by time (train, validation, newest holdout), saves the model with its feature
    service, feature list and types and the definitions' fingerprint, and writes an
    evaluation report (plots + report.md) beside it.
    """
    from featurepipe.config import load_store, source_path
    from training.dataset import build_training_set, labelled_transactions
    from training.train import train_model

    store = load_store(repo)
    entity_df, cutoff = labelled_transactions(source_path(store, EVENTS_SOURCE), limit=limit)
    click.echo(f"training set: {len(entity_df):,} labelled transactions (labels known by {cutoff:%Y-%m-%d %H:%M})")
    ts = build_training_set(store, entity_df, feature_service, cutoff)
    result = train_model(ts, out or _model_dir(repo, feature_service), holdout)
    m = result.metadata
    click.echo(
        f"validation ({m.validation_rows:,} rows): ROC AUC {m.validation_roc_auc:.3f}  PR AUC {m.validation_pr_auc:.3f}\n"
        f"holdout ({m.holdout_rows:,} rows, fraud rate {m.fraud_rate_holdout:.3%}): "
        f"ROC AUC {m.roc_auc:.3f}  PR AUC {m.pr_auc:.3f}\nmodel saved to {result.path}\n"
        f"evaluation report: {result.path / 'report' / 'report.md'}"
    )
    if save_dataset:
        from training.dataset import save_training_set

        target = result.path / f"{save_dataset}.parquet"
        save_training_set(store, entity_df, ts, save_dataset, str(target))
        click.echo(f"training set saved as Feast saved dataset {save_dataset!r} ({target})")


@click.command()
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model folder (default: <repo>/data/models/fraud_detection_v1).")
@REPO_OPTION
def evaluate(model: Path | None, repo: Path | None) -> None:
    """Rebuild the model's test split point in time and write its evaluation report.

    Checks first that the feature definitions did not change since training (fingerprint).
    The report (ROC, PR, calibration, feature importance, per-day metrics) goes to
    <model>/report/report.md with its PNG plots.
    """
    import pandas as pd

    from featurepipe.config import load_store, source_path
    from training.dataset import build_training_set, labelled_transactions
    from training.evaluate import write_report
    from training.model import FraudModel

    store = load_store(repo)
    folder = model or _model_dir(repo, FEATURE_SERVICE)
    fraud_model = FraudModel.load(folder)
    fraud_model.check_definitions(store)
    meta = fraud_model.metadata
    entity_df, cutoff = labelled_transactions(
        source_path(store, EVENTS_SOURCE), cutoff=pd.Timestamp(meta["label_cutoff"]).to_pydatetime()
    )
    lo, hi = (pd.Timestamp(t) for t in meta["holdout_range"])
    test = entity_df[(entity_df["transaction_time"] >= lo) & (entity_df["transaction_time"] <= hi)]
    ts = build_training_set(store, test, meta["feature_service"], cutoff)
    result = write_report(fraud_model, ts.frame, folder / "report")
    click.echo(table(["metric", "value"], [
        ("test rows", f"{result.rows:,}"), ("ROC AUC", f"{result.roc_auc:.4f}"),
        ("PR AUC", f"{result.pr_auc:.4f}"), ("Brier", f"{result.brier:.5f}"),
        ("top feature", next(iter(result.importance))),
    ]))
    click.echo(f"report: {result.path}")


@click.command()
@LABELLED_LIMIT_OPTION
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for leakage.png (default: <repo>/data/reports).")
@REPO_OPTION
def leakage(limit: int | None, out: Path | None, repo: Path | None) -> None:
    """Show why point in time matters: the same model on a naive latest-value join vs a PIT join.

    Both models train on the same older transactions and are evaluated on the same newer
    ones with the features a model service really gets.
    """
    from featurepipe.config import data_dir, find_repo, load_store, source_path
    from training.dataset import build_training_set, labelled_transactions
    from training.leakage import compare

    store = load_store(repo)
    entity_df, cutoff = labelled_transactions(source_path(store, EVENTS_SOURCE), limit=limit)
    pit = build_training_set(store, entity_df, FEATURE_SERVICE, cutoff=cutoff)
    result = compare(store, entity_df, pit, out or data_dir(find_repo(repo)) / "reports")
    click.echo(table(["training features", "PR AUC", "ROC AUC"], result.table()))
    click.echo(f"plot: {result.plot}")


@click.command()
@click.option("--sample", type=int, default=500, show_default=True, help="Entity pairs to compare.")
@click.option("--server", default=None, help="host:port of a running feature server (default: start one here).")
@FEATURE_SERVICE_OPTION
@REPO_OPTION
def skew(sample: int, server: str | None, feature_service: str, repo: Path | None) -> None:
    """Compare online features (gRPC) with offline point-in-time features at the same instant.

    Per feature: mismatch rate, values missing or extra online, mean SMAPE; exits with
    status 1 when any feature is inconsistent, and prints the worst examples.
    """
    import sys
    from contextlib import ExitStack

    from featurepipe.config import export_redis_env, find_repo, load_store, source_path
    from serving.client import FeatureClient
    from training.skew import check_skew, sample_entities

    export_redis_env(repo)
    store = load_store(repo)
    entities = sample_entities(source_path(store, EVENTS_SOURCE), sample)
    with ExitStack() as stack:
        if server is None:
            from serving.server import FeatureServer

            server = stack.enter_context(FeatureServer(find_repo(repo), port=0)).address
        client = stack.enter_context(FeatureClient(server))
        report = check_skew(store, client, entities, feature_service)
    click.echo(f"{report.rows} entity pairs at {report.at:%Y-%m-%d %H:%M:%S} UTC")
    click.echo(table(["feature", "mismatch", "missing online", "extra online", "SMAPE"], report.table()))
    bad = [f for f in report.features if f.worst]
    for f in bad:
        click.echo(f"worst {f.feature}: {f.worst}")
    if not report.clean:
        sys.exit(1)
    click.echo("online and offline agree")
