"""A backfill run on Spark: the Spark batch engine behind the repo's quality gates on Spark,
with the same run record as DuckDB's (:func:`featurepipe.jobs.backfill.backfill` with
``engine="spark"`` lands here). Loads pyspark: imported only when the Spark engine is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING

from featurepipe.batch import spark as spark_batch
from featurepipe.batch.backfill import BackfillResult
from featurepipe.core.spark import require_spark, spark_session
from featurepipe.definitions import aggregate_views

if TYPE_CHECKING:
    from feast import FeatureStore


def backfill_spark(store: FeatureStore, views: Sequence[str] | None = None, start: datetime | date | None = None,
                   end: datetime | date | None = None, progress: bool = True,
                   quality: bool = True) -> list[BackfillResult]:
    """Backfill the windowed views (all, or the named ones) on the repo's Spark session; with
    ``quality``, through the repo's contracts (:class:`featurepipe.quality.spark_gate.SparkBatchGate`)."""
    require_spark()
    from featurepipe.quality.spark_gate import open_spark_gate

    spark = spark_session(store.repo_path)
    if not quality:
        return spark_batch.backfill(store, views, start, end, progress, spark=spark)
    names = [v.name for v in aggregate_views(store, views)]
    with open_spark_gate(store, names) as gate:
        return spark_batch.backfill(store, views, start, end, progress, gate=gate, spark=spark)
