"""A backfill run: the batch stage behind the repo's quality gates, with its run record."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import date, datetime
from typing import TYPE_CHECKING

from tqdm import tqdm

from featurepipe.batch import backfill as batch
from featurepipe.batch.backfill import BackfillResult
from featurepipe.core.spark import default_engine
from featurepipe.definitions import aggregate_views
from featurepipe.online.plan import view_plan
from featurepipe.online.schedule_scan import prepare_schedules
from featurepipe.quality.gate import open_gate
from featurepipe.quality.online_gate import input_exclusions

if TYPE_CHECKING:
    from feast import FeatureStore


def backfill(
    store: FeatureStore,
    views: Sequence[str] | None = None,
    start: datetime | date | None = None,
    end: datetime | date | None = None,
    progress: bool = True,
    quality: bool = True,
    engine: str | None = None,
) -> list[BackfillResult]:
    """Backfill every windowed-aggregate view of the registry (or the named ones).

    With ``quality`` (default), the repo's ``contracts.yaml`` gates the raw input and the
    feature rows, and the run is recorded under ``<data>/runs/`` (``featurepipe.quality``);
    without, the views are computed and published as they are.

    ``engine``: ``duckdb`` or ``spark`` (default: the repo's, :func:`featurepipe.core.spark.default_engine`).
    Both write the same tables. On DuckDB the windowed views' online schedules are then
    prepared from the same files (:func:`prepare_online`); on Spark a materialisation from
    Spark computes them itself.
    """
    engine = engine or default_engine(store.repo_path)
    if engine == "spark":
        from featurepipe.jobs.spark_backfill import backfill_spark

        return backfill_spark(store, views, start, end, progress, quality)
    if not quality:
        results = batch.backfill(store, views, start, end, progress)
    else:
        names = [v.name for v in aggregate_views(store, views)]
        with open_gate(store, names) as gate:
            results = batch.backfill(store, views, start, end, progress, gate=gate)
    prepare_online(store, [r.view for r in results], quality, progress)
    return results


def prepare_online(store: FeatureStore, views: Sequence[str], quality: bool = True, progress: bool = True) -> None:
    """Compute each windowed view's online schedules from its raw events now
    (:func:`featurepipe.online.schedule_scan.prepare_schedules`), as a materialisation of
    the same files (gated by the repo's contracts, with ``quality``) would: such a
    materialisation then only reads them. Done after a backfill, which has just read
    those events; a later change of the files makes the materialisation compute again."""
    registry = store.registry
    for name in tqdm(views, desc="prepare online", unit="view", disable=not progress or not views):
        view = store.get_feature_view(name)
        plan = view_plan(view, store.config, store.project, registry)
        if plan.kernel is None:
            continue
        kernel = plan.kernel
        if quality:
            kernel = replace(kernel, exclude=input_exclusions(store.config, view, store.project, registry,
                                                              kernel.path))
        prepare_schedules(plan.query, kernel)
