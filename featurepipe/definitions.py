"""Windowed aggregate features, declared once as data.

A :class:`WindowedFeatures` declaration (entity, raw source, Feast ``Aggregation``
objects) produces an ordinary Feast ``FeatureView`` whose offline source is the feature
table that featurepipe's batch engine writes and whose stream source is a ``PushSource``
for streamed updates. The declaration itself is stored in the view's tags, so every
engine (batch SQL, streaming, serving) reads it back from the registry that
``feast apply`` writes: nothing is declared twice.

Semantics (request-time windows, computed by :mod:`featurepipe.core.windows` for every
engine): a windowed aggregate asked at time ``t`` covers the entity's input events with
event time in ``[floor(t, hop) - window, t)``, where the hop is 5 minutes for windows
under 12 hours, 1 hour under 12 days and 1 day beyond (so a 1h window covers 60 to 65
minutes, 24h covers 24 to 25 hours, 7d covers 7 days to 7 days 1 hour); events at exactly
``t`` are out. A window must be a multiple of its hop. ``t`` is the request's clock online
and the entity row's timestamp offline. An empty window gives ``count`` and ``sum`` 0 and
``mean``, ``min``, ``max`` null. ``last`` of a timestamp column is the epoch seconds of the
latest event before ``t``. ``count`` gives Int64, every other function Float64. The feature
table holds one row per *change point* (just after each event, and where a hop bucket
leaves a window), valid until the entity's next row, so Feast's point-in-time join reads
the value at any ``t``. docs/windows.md has the details and the measured bounds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feast import Entity, FeatureView, Field, FileSource, PushSource
from feast.aggregation import Aggregation
from feast.types import Float64, Int64, from_value_type

from featurepipe.config import resolve_source_path
from featurepipe.core.windows import ViewShape, validate
from featurepipe.errors import InvalidInput

if TYPE_CHECKING:
    from feast import FeatureStore

FUNCTIONS = ("count", "sum", "mean", "min", "max", "last")
TAG_KIND = "featurepipe.kind"
TAG_INPUT = "featurepipe.input_source"
TAG_TIMESTAMP = "featurepipe.timestamp_field"
TAG_AGGREGATIONS = "featurepipe.aggregations"
KIND = "windowed_aggregates"


@dataclass(frozen=True)
class WindowedFeatures:
    """A feature view of windowed aggregates over one raw event source.

    Example::

        user_stats = WindowedFeatures(
            name="user_transaction_stats", entity=user, source=transactions,
            aggregations=[Aggregation(column="amount", function="sum",
                                      time_window=timedelta(hours=1), name="amount_sum_1h")],
            ttl=timedelta(days=7), offline_root=DATA / "offline",
        )
        user_stats_fv = user_stats.feature_view()
    """

    name: str
    entity: Entity
    source: FileSource
    aggregations: Sequence[Aggregation]
    ttl: timedelta
    offline_root: Path
    timestamp_field: str | None = None
    description: str = ""
    owner: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [a.resolved_name(a.time_window) for a in self.aggregations]
        if len(set(names)) != len(names):
            raise InvalidInput(f"{self.name}: aggregation names must be unique, got {names}")
        for agg in self.aggregations:
            if agg.function not in FUNCTIONS:
                raise InvalidInput(
                    f"{self.name}: aggregation function {agg.function!r} is not supported; "
                    f"use one of {', '.join(FUNCTIONS)}"
                )
            if agg.time_window is not None and agg.time_window <= timedelta(0):
                raise InvalidInput(f"{self.name}: time_window of {agg.column} must be positive")
        validate([_spec(a) for a in self.aggregations], self.name)

    @property
    def offline_path(self) -> Path:
        """Folder of the view's Parquet feature table, partitioned by ``date=YYYY-MM-DD``."""
        return Path(self.offline_root) / self.name

    def schema(self) -> list[Field]:
        """Feast fields: the entity's join key, then the aggregate outputs in declaration order.

        The join key is declared explicitly so the view compares equal to its registered
        copy (otherwise ``feast plan`` reports a change after every ``feast apply``).
        """
        key = Field(name=self.entity.join_key, dtype=from_value_type(self.entity.value_type))
        return [key] + [
            Field(name=a.resolved_name(a.time_window), dtype=Int64 if a.function == "count" else Float64)
            for a in self.aggregations
        ]

    def push_source(self) -> PushSource:
        """The push source that streamed updates of this view arrive through."""
        batch = FileSource(
            name=f"{self.name}_table",
            path=str(self.offline_path / "**" / "*.parquet"),
            timestamp_field="event_timestamp",
            description=f"Offline feature table of {self.name}, written by featurepipe backfill",
        )
        return PushSource(name=f"{self.name}_push", batch_source=batch)

    def feature_view(self) -> FeatureView:
        """The Feast FeatureView, carrying this declaration in its tags."""
        spec = [
            {
                "name": a.resolved_name(a.time_window),
                "function": a.function,
                "column": a.column,
                "window_seconds": a.time_window.total_seconds() if a.time_window else None,
            }
            for a in self.aggregations
        ]
        tags = {
            **self.tags,
            TAG_KIND: KIND,
            TAG_INPUT: self.source.name,
            TAG_TIMESTAMP: self.timestamp_field or self.source.timestamp_field,
            TAG_AGGREGATIONS: json.dumps(spec, separators=(",", ":")),
        }
        return FeatureView(
            name=self.name,
            entities=[self.entity],
            ttl=self.ttl,
            schema=self.schema(),
            source=self.push_source(),
            online=True,
            description=self.description,
            owner=self.owner,
            tags=tags,
        )


def _spec(agg: Aggregation) -> AggregateSpec:
    return AggregateSpec(name=agg.resolved_name(agg.time_window), function=agg.function, column=agg.column,
                         window=agg.time_window)


@dataclass(frozen=True)
class AggregateSpec:
    """One aggregate as the engines see it."""

    name: str
    function: str
    column: str
    window: timedelta | None


@dataclass(frozen=True)
class AggregateView:
    """A windowed-aggregate view read back from the registry: what engines compute."""

    name: str
    join_keys: tuple[str, ...]
    input_path: str
    timestamp_field: str
    aggregations: tuple[AggregateSpec, ...]
    offline_path: Path
    push_source: str
    ttl: timedelta | None

    @property
    def max_window(self) -> timedelta:
        """The longest window: how much history a partial recompute must read."""
        windows = [a.window for a in self.aggregations if a.window is not None]
        return max(windows, default=timedelta(0))

    @property
    def feature_names(self) -> list[str]:
        return [a.name for a in self.aggregations]


def shape(view: AggregateView, types: dict[str, str]) -> ViewShape:
    """What the window kernel needs of ``view`` (:func:`featurepipe.core.windows.change_point_sql`),
    given the DuckDB types of its input's columns (name -> type)."""
    return ViewShape(view.join_keys, view.timestamp_field, view.aggregations, types)


def _parse_view(store: FeatureStore, fv: FeatureView) -> AggregateView:
    tags = fv.tags
    try:
        specs = json.loads(tags[TAG_AGGREGATIONS])
    except (KeyError, json.JSONDecodeError) as exc:
        raise InvalidInput(
            f"feature view {fv.name!r} has a broken {TAG_AGGREGATIONS!r} tag; re-run feast apply"
        ) from exc
    source = store.get_data_source(tags[TAG_INPUT])
    if not isinstance(source, FileSource):
        raise InvalidInput(
            f"feature view {fv.name!r}: input source {source.name!r} must be a FileSource "
            f"(Parquet), got {type(source).__name__}"
        )
    batch = fv.batch_source
    assert isinstance(batch, FileSource)
    offline = Path(resolve_source_path(store.repo_path, batch.path).split("/**")[0])
    join_keys = tuple(sorted(c.name for c in fv.entity_columns))
    view = AggregateView(
        name=fv.name,
        join_keys=join_keys,
        input_path=resolve_source_path(store.repo_path, source.path),
        timestamp_field=tags[TAG_TIMESTAMP],
        aggregations=tuple(
            AggregateSpec(
                name=s["name"],
                function=s["function"],
                column=s["column"],
                window=timedelta(seconds=s["window_seconds"]) if s["window_seconds"] else None,
            )
            for s in specs
        ),
        offline_path=offline,
        push_source=fv.stream_source.name if fv.stream_source is not None else "",
        ttl=fv.ttl if fv.ttl else None,
    )
    validate(view.aggregations, view.name)  # a view applied before windows were checked
    return view


def aggregate_views(store: FeatureStore, names: Sequence[str] | None = None) -> list[AggregateView]:
    """All windowed-aggregate views in the registry (or the named ones), sorted by name."""
    views = [
        fv for fv in store.list_feature_views() if fv.tags.get(TAG_KIND) == KIND
    ]
    if names:
        known = {fv.name for fv in views}
        unknown = sorted(set(names) - known)
        if unknown:
            raise InvalidInput(
                f"unknown aggregate feature view(s) {unknown}; known: {sorted(known)}. "
                "Run `featurepipe apply` after changing feature_repo/"
            )
        views = [fv for fv in views if fv.name in set(names)]
    if not views:
        raise InvalidInput(
            "the registry holds no windowed-aggregate feature views; run `featurepipe apply` first"
        )
    return [_parse_view(store, fv) for fv in sorted(views, key=lambda v: v.name)]


def describe(view: AggregateView) -> dict[str, Any]:
    """A JSON-friendly summary of a view (for ``--help`` style listings and lineage)."""
    return {
        "name": view.name,
        "join_keys": list(view.join_keys),
        "timestamp_field": view.timestamp_field,
        "features": view.feature_names,
    }
