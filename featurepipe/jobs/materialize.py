"""``featurepipe materialize``: feature values into Redis, in Feast's layout.

Drives Feast's own ``FeatureStore.materialize`` / ``materialize_incremental`` (so the
registry records the materialised intervals as Feast does), which hands each view to the
batch engine configured in ``feature_store.yaml``: featurepipe's
:class:`~featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine`. Its per-view
outcomes (rows, entities, rows written, rows quarantined, seconds) come back in the result.

A plain view gets the latest row per entity of its offline table. A windowed-aggregate view
gets, per entity with an event in the range, its window schedule computed from the raw
events (:mod:`featurepipe.online.schedule_scan`): readers (the feature server,
:func:`featurepipe.online.read.online_features`) pick the values at their own clock, so a
"1h count" is the hour before the request. Feast's own fields hold the values right after
the entity's newest event (Feast's SDK reads those: they do not slide with time). Online data
written before request-time windows is rebuilt by one run over the whole range (the default).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from featurepipe.feast.materialization_engine import collect_results, run_options
from featurepipe.online.window import ViewMaterialization

if TYPE_CHECKING:
    from feast import FeatureStore


EPOCH = datetime(1970, 1, 2, tzinfo=timezone.utc)


@dataclass(frozen=True)
class MaterializeResult:
    """What one ``materialize`` call did: the views, the window, and each view's outcome.

    ``per_view`` is empty for views materialised by another engine (e.g. Feast's ``local``).
    """

    views: list[str]
    start: datetime | None  # None: incremental, each view from its last materialisation
    end: datetime
    seconds: float
    per_view: list[ViewMaterialization] = field(default_factory=list)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


@contextlib.contextmanager
def _engine_hooks(**options: object) -> Iterator[list[ViewMaterialization]]:

    with run_options(**options), collect_results() as results:
        yield results


def materialize(
    store: FeatureStore,
    start: datetime | None = None,
    end: datetime | None = None,
    views: list[str] | None = None,
    *,
    incremental: bool = False,
    max_rows_per_second: float | None = None,
    batch_rows: int | None = None,
    progress: bool | None = None,
) -> MaterializeResult:
    """Load the values of every entity with event time in ``[start, end]`` into Redis: the
    latest row (plain views), the window schedule from the raw events (windowed views).

    With ``incremental``, each view starts where its previous materialisation ended (as
    ``feast materialize-incremental``); ``start`` must then be None.
    """
    end = _utc(end or datetime.now(timezone.utc))
    names = views or sorted(fv.name for fv in store.list_feature_views() if fv.online)
    t0 = time.perf_counter()
    options = {"max_rows_per_second": max_rows_per_second, "batch_rows": batch_rows, "progress": progress}
    with _engine_hooks(**options) as results:
        if incremental:
            if start is not None:
                raise ValueError("incremental materialisation starts where the last one ended; drop start")
            store.materialize_incremental(end_date=end, feature_views=names)
        else:
            start = _utc(start or EPOCH)
            store.materialize(start_date=start, end_date=end, feature_views=names)
    return MaterializeResult(
        views=names, start=start, end=end, seconds=time.perf_counter() - t0, per_view=list(results)
    )
