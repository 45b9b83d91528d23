"""A backfill run: the batch stage behind the repo's quality gates, with its run record."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING

from featurepipe.batch import backfill as batch
from featurepipe.batch.backfill import BackfillResult
from featurepipe.definitions import aggregate_views
from featurepipe.quality.gate import open_gate

if TYPE_CHECKING:
    from feast import FeatureStore


def backfill(
    store: FeatureStore,
    views: Sequence[str] | None = None,
    start: datetime | date | None = None,
    end: datetime | date | None = None,
    progress: bool = True,
    quality: bool = True,
) -> list[BackfillResult]:
    """Backfill every windowed-aggregate view of the registry (or the named ones).

    With ``quality`` (default), the repo's ``contracts.yaml`` gates the raw input and the
    feature rows, and the run is recorded under ``<data>/runs/`` (``featurepipe.quality``);
    without, the views are computed and published as they are.
    """
    if not quality:
        return batch.backfill(store, views, start, end, progress)
    names = [v.name for v in aggregate_views(store, views)]
    with open_gate(store, names) as gate:
        return batch.backfill(store, views, start, end, progress, gate=gate)
