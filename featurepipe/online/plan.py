"""A Feast feature view resolved into what a materialisation reads and writes (its ViewPlan)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

from feast import FeatureView
from feast.infra.offline_stores.file_source import FileSource

from featurepipe.config import resolve_source_path
from featurepipe.core.windows import validate
from featurepipe.definitions import (
    KIND,
    TAG_AGGREGATIONS,
    TAG_INPUT,
    TAG_KIND,
    TAG_TIMESTAMP,
    AggregateSpec,
)
from featurepipe.errors import InvalidInput
from featurepipe.online.latest import Column, LatestQuery
from featurepipe.online.schedule_scan import KernelInput, prepared_path
from featurepipe.online.window import ViewPlan


def is_windowed(view: FeatureView) -> bool:
    """Whether ``view`` is a windowed-aggregate view (``featurepipe.definitions.WindowedFeatures``)."""
    return bool(view.tags.get(TAG_KIND) == KIND)


def view_plan(view: FeatureView, repo_config: Any, project: str, registry: Any = None) -> ViewPlan:
    """Resolve a Feast feature view into what :func:`materialize_window` reads and writes.

    A windowed-aggregate view is computed from its raw input source, which ``registry``
    (Feast's) is asked for; the plan then has a :class:`KernelInput`.
    """
    from feast.infra.online_stores.helpers import compute_versioned_name

    source = view.batch_source
    assert isinstance(source, FileSource)
    reverse = {v: k for k, v in (source.field_mapping or {}).items()}
    path = resolve_source_path(repo_config.repo_path, source.path)
    versioning = bool(getattr(repo_config.registry, "enable_online_feature_view_versioning", False))
    kernel = kernel_input(view, repo_config, project, registry) if is_windowed(view) else None
    if kernel is not None:  # the keys and features are the kernel's columns, named as the view's
        kernel = replace(kernel, prepared=str(prepared_path(path)))  # beside the offline table
        path, reverse = kernel.path, {}
    query = LatestQuery(
        path=path,
        timestamp=kernel.timestamp if kernel else reverse.get(source.timestamp_field, source.timestamp_field),
        created=None if kernel else reverse.get(source.created_timestamp_column, source.created_timestamp_column) or None,
        join_keys=[Column(k.name, reverse.get(k.name, k.name), k.dtype.to_value_type().name)
                   for k in view.entity_columns],
        features=[Column(f.name, reverse.get(f.name, f.name), f.dtype.to_value_type().name)
                  for f in view.features],
    )
    return ViewPlan(
        view=compute_versioned_name(view, versioning),
        project=project,
        query=query,
        key_ttl_seconds=repo_config.online_store.key_ttl_seconds,
        kernel=kernel,
    )


def aggregations(view: FeatureView) -> tuple[AggregateSpec, ...]:
    """The aggregates of a windowed-aggregate view, read back from its tags."""
    try:
        return tuple(
            AggregateSpec(name=s["name"], function=s["function"], column=s["column"],
                          window=timedelta(seconds=s["window_seconds"]) if s["window_seconds"] else None)
            for s in json.loads(view.tags[TAG_AGGREGATIONS])
        )
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise InvalidInput(
            f"feature view {view.name!r} has a broken {TAG_AGGREGATIONS!r} tag ({exc}); run `featurepipe apply`"
        ) from exc


def kernel_input(view: FeatureView, repo_config: Any, project: str, registry: Any = None) -> KernelInput:
    """The raw input and aggregates of a windowed-aggregate view, from its tags and the
    registry's data source they name."""
    specs = aggregations(view)
    try:
        name, timestamp = view.tags[TAG_INPUT], view.tags[TAG_TIMESTAMP]
    except KeyError as exc:
        raise InvalidInput(f"feature view {view.name!r} has no {exc} tag; run `featurepipe apply`") from exc
    validate(specs, view.name)
    if registry is None:
        from feast.infra.registry.registry import Registry

        registry = Registry(project, repo_config.registry, repo_path=repo_config.repo_path)
    source = registry.get_data_source(name, project)
    if not isinstance(source, FileSource):
        raise InvalidInput(
            f"feature view {view.name!r}: input source {name!r} must be a FileSource (Parquet), "
            f"got {type(source).__name__}"
        )
    return KernelInput(path=resolve_source_path(repo_config.repo_path, source.path), timestamp=timestamp,
                       aggregations=specs)
