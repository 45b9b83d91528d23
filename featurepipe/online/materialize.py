"""``featurepipe materialize``: latest feature values from the offline tables into Redis.

For now this drives Feast's own materialisation (its Redis writer keeps Feast's layout
and never overwrites a newer event time), configured in feature_store.yaml to pull only
the latest row per entity and to write in batches of 10,000.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from feast import FeatureStore

EPOCH = datetime(1970, 1, 2, tzinfo=timezone.utc)


@dataclass(frozen=True)
class MaterializeResult:
    views: list[str]
    start: datetime
    end: datetime
    seconds: float


def materialize(
    store: FeatureStore,
    start: datetime | None = None,
    end: datetime | None = None,
    views: list[str] | None = None,
) -> MaterializeResult:
    """Load the latest value per entity with event time in ``[start, end]`` into Redis."""
    start = start or EPOCH
    end = end or datetime.now(timezone.utc)
    start = start if start.tzinfo else start.replace(tzinfo=timezone.utc)
    end = end if end.tzinfo else end.replace(tzinfo=timezone.utc)
    names = views or sorted(fv.name for fv in store.list_feature_views() if fv.online)
    t0 = time.perf_counter()
    store.materialize(start_date=start, end_date=end, feature_views=names)
    return MaterializeResult(views=names, start=start, end=end, seconds=time.perf_counter() - t0)
