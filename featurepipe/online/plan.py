"""A Feast feature view resolved into what a materialisation reads and writes (its ViewPlan)."""

from __future__ import annotations

from typing import Any

from feast import FeatureView
from feast.infra.offline_stores.file_source import FileSource

from featurepipe.config import resolve_source_path
from featurepipe.online.latest import Column, LatestQuery
from featurepipe.online.window import ViewPlan


def view_plan(view: FeatureView, repo_config: Any, project: str) -> ViewPlan:
    """Resolve a Feast feature view into what :func:`materialize_window` reads and writes."""
    from feast.infra.online_stores.helpers import compute_versioned_name

    source = view.batch_source
    assert isinstance(source, FileSource)
    reverse = {v: k for k, v in (source.field_mapping or {}).items()}
    path = resolve_source_path(repo_config.repo_path, source.path)
    versioning = bool(getattr(repo_config.registry, "enable_online_feature_view_versioning", False))
    query = LatestQuery(
        path=path,
        timestamp=reverse.get(source.timestamp_field, source.timestamp_field),
        created=reverse.get(source.created_timestamp_column, source.created_timestamp_column) or None,
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
    )
