"""``featurepipe materialize --engine spark``: feature values into Redis, computed in Spark.

The same run as :func:`featurepipe.jobs.materialize.materialize` (the same views, range,
quality gate, run records, quarantine and Redis bytes), with each view's rows computed in
Spark and written by its executors (:mod:`featurepipe.online.spark_materialize`) instead of
by featurepipe's DuckDB engine behind Feast's ``FeatureStore.materialize``. So that Feast
knows what is online, each view's interval is recorded in the registry as Feast records it
(``registry.apply_materialization``, once the view is written): ``feast
materialize-incremental`` and ``--incremental`` start where this run ended.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from featurepipe.config import RedisTarget, online_target
from featurepipe.core.spark import spark_session
from featurepipe.core.sql import SPARK
from featurepipe.errors import InvalidInput
from featurepipe.feast.materialization_engine import (
    FeaturepipeMaterializationEngineConfig,
    gated,
    unsupported_reason,
    window_options,
)
from featurepipe.jobs.materialize import EPOCH, MaterializeResult
from featurepipe.online.plan import view_plan
from featurepipe.online.spark_materialize import materialize_view_spark
from featurepipe.online.window import ViewMaterialization, WindowOptions
from featurepipe.quality.online_gate import open_materialize_gate
from featurepipe.quality.publish import batch

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView
    from pyspark.sql import SparkSession


def materialize_spark(
    store: FeatureStore,
    start: datetime | None = None,
    end: datetime | None = None,
    views: list[str] | None = None,
    *,
    incremental: bool = False,
    max_rows_per_second: float | None = None,
    progress: bool | None = None,
    partitions: int | None = None,
    spark: SparkSession | None = None,
) -> MaterializeResult:
    """Load the values of every entity with event time in ``[start, end]`` into Redis from
    Spark: the latest row (plain views), the window schedule from the raw events (windowed
    views); views in name order, as ``featurepipe materialize`` does.

    With ``incremental``, each view starts where its previous materialisation ended (else
    its ttl before now, as ``feast materialize-incremental``); ``start`` must then be None.
    ``spark``: the session to run on (default: :func:`featurepipe.core.spark.spark_session`
    for the repo); ``partitions``: tasks writing each view (default: by entity count).
    The first view that fails stops the run; the views before it stay recorded.
    """
    if incremental and start is not None:
        raise ValueError("incremental materialisation starts where the last one ended; drop start")
    end = _utc(end or datetime.now(timezone.utc))
    names = views or sorted(fv.name for fv in store.list_feature_views() if fv.online)
    t0 = time.perf_counter()
    config = store.config
    engine = config.batch_engine
    settings = engine if isinstance(engine, FeaturepipeMaterializationEngineConfig) else \
        FeaturepipeMaterializationEngineConfig()
    overrides = {"max_rows_per_second": max_rows_per_second, "progress": progress}
    options = window_options(settings.model_copy(update={k: v for k, v in overrides.items() if v is not None}),
                             config.repo_path)
    quality = settings.quality and config.repo_path is not None
    target = online_target(config)
    session = spark or spark_session(config.repo_path)
    sources: dict[str, Any] = {}
    per_view: list[ViewMaterialization] = []
    with batch() if quality else contextlib.nullcontext():
        for name in names:
            view = store.get_feature_view(name)
            reason = unsupported_reason(view, config)
            if reason is not None:
                raise InvalidInput(f"feature view {name!r} cannot be materialised from Spark: {reason}; "
                                   "run `featurepipe materialize` without --engine spark (Feast's own engine "
                                   "handles it)")
            view_start = _incremental_start(view) if incremental else _utc(start or EPOCH)
            per_view.append(_one_view(store, view, view_start, end, session, target, options, partitions,
                                      quality, sources))
            store.registry.apply_materialization(view, store.project, view_start, end)
    return MaterializeResult(views=names, start=None if incremental else _utc(start or EPOCH), end=end,
                             seconds=time.perf_counter() - t0, per_view=per_view)


def _one_view(store: FeatureStore, view: FeatureView, start: datetime, end: datetime, spark: SparkSession,
              target: RedisTarget, options: WindowOptions, partitions: int | None, quality: bool,
              sources: dict[str, Any]) -> ViewMaterialization:
    """One view behind its quality gate (as the DuckDB engine runs it), with its run record."""
    plan = view_plan(view, store.config, store.project, store.registry)
    gate = open_materialize_gate(store.config, view, store.project, store.registry, start, end,
                                 sources=sources, dialect=SPARK) if quality else None
    return gated(gate, plan, lambda prepared: materialize_view_spark(spark, prepared, start, end, target,
                                                                    options, partitions))


def _incremental_start(view: FeatureView) -> datetime:
    """Where ``feast materialize-incremental`` starts a view: its last materialisation's end,
    else ``ttl`` before now (a year before now when the ttl is 0)."""
    if view.most_recent_end_time is not None:
        return _utc(view.most_recent_end_time)
    if view.ttl is None:
        raise InvalidInput(f"feature view {view.name!r} was never materialised and has no ttl: run a full "
                           "materialisation first (without --incremental)")
    back = view.ttl if view.ttl.total_seconds() > 0 else timedelta(weeks=52)
    return datetime.now(timezone.utc) - back


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value
