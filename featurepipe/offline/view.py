"""One feature view of a point-in-time retrieval: where its rows are and which columns to return.

Both ways of matching a view, the sorted index (:mod:`featurepipe.offline.index`) and the
scan (:mod:`featurepipe.offline.pit`), take a :class:`ViewRequest`; it is resolved once from
the Feast ``FeatureView`` (field mapping, join-key map, TTL) and pinned to the files that
exist when the retrieval starts.

**Windowed-aggregate views have no TTL here.** Their table holds one row per change point
of each entity (:mod:`featurepipe.core.windows`), down to the row from which every window
is empty (counts and sums 0, means, minima and maxima null, ``last`` still the last event).
The newest row at or before the as-of time is therefore the value at that time however old
it is; a TTL cutoff would turn a known entity's count of 0 into a missing value. So a
windowed view's ``ttl`` is not applied: an entity with no row at or before the as-of time
(no event before it) gets nulls, every other entity its value. Plain views keep Feast's TTL.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

import duckdb

from featurepipe.core.sql import literal
from featurepipe.definitions import KIND, TAG_KIND
from featurepipe.errors import InvalidInput

if TYPE_CHECKING:
    from feast.feature_view import FeatureView


@dataclass(frozen=True)
class ViewRequest:
    """One feature view of a retrieval: where its rows are and which columns to return."""

    name: str
    path: str
    join_keys: dict[str, str]  # feature-table column -> entity-frame column
    timestamp: str
    created: str | None
    features: dict[str, str]  # feature-table column -> output column name
    ttl: timedelta | None
    files: tuple[str, ...] = ()  # pinned file list; empty: the path (or glob) itself
    windowed_view: str | None = None
    """The windowed-aggregate view whose change-point table this is (the name to backfill);
    None for a plain feature view."""

    @property
    def windowed(self) -> bool:
        return self.windowed_view is not None

    @classmethod
    def from_feature_view(
        cls, fv: FeatureView, features: list[str], path: str, full_feature_names: bool
    ) -> ViewRequest:
        """Resolve names through the source's field mapping and the projection's join-key map."""
        source = fv.batch_source
        assert source is not None, "source_path(), which gave `path`, refuses a view without a batch source"
        reverse = {v: k for k, v in (source.field_mapping or {}).items()}
        view_name = fv.projection.name_to_use()
        join_keys = {
            reverse.get(c.name, c.name): fv.projection.join_key_map.get(c.name, c.name)
            for c in fv.entity_columns
        }
        created = source.created_timestamp_column or None
        windowed = fv.tags.get(TAG_KIND) == KIND
        # windowed views: no TTL cutoff (see the module docstring)
        ttl = fv.ttl if isinstance(fv.ttl, timedelta) and fv.ttl > timedelta(0) and not windowed else None
        return cls(
            name=view_name,
            path=path,
            join_keys=join_keys,
            timestamp=reverse.get(source.timestamp_field, source.timestamp_field),
            created=reverse.get(created, created) if created else None,
            features={reverse.get(f, f): f"{view_name}__{f}" if full_feature_names else f for f in features},
            ttl=ttl,
            windowed_view=fv.name if windowed else None,
        )

    def scan(self) -> str:
        """``read_parquet`` of the view's files (the pinned list when there is one)."""
        files = "[" + ", ".join(literal(f) for f in self.files) + "]" if self.files else literal(self.path)
        return f"read_parquet({files}, union_by_name = true)"

    def pinned(self, con: duckdb.DuckDBPyConnection) -> ViewRequest:
        """The same view reading exactly the files that exist now.

        Both passes of a join (match, then fetch by position) must see the same files in the
        same order, even if a backfill adds a day in between.
        """
        if "://" in self.path:  # remote (s3://, gs://...): DuckDB's file systems
            files = tuple(row[0] for row in con.execute("SELECT file FROM glob(?) ORDER BY file", [self.path]).fetchall())
        else:  # local: no need to open DuckDB for it
            matches = glob.glob(self.path, recursive=True) if glob.has_magic(self.path) else [self.path]
            files = tuple(sorted(f for f in matches if os.path.isfile(f)))
        if not files:
            raise InvalidInput(
                f"feature view {self.name!r}: no offline table files at {self.path}; run "
                "`featurepipe backfill` (or write the source files) first"
            )
        return replace(self, files=files)


def source_types(con: duckdb.DuckDBPyConnection, view: ViewRequest) -> dict[str, str]:
    """Column name -> DuckDB type of the view's Parquet files."""
    try:
        rows = con.execute(f"DESCRIBE SELECT * FROM {view.scan()}").fetchall()
    except duckdb.IOException as exc:
        raise InvalidInput(
            f"feature view {view.name!r}: cannot read its offline table at {view.path} ({exc}); "
            "run `featurepipe backfill` (or write the source files) first"
        ) from exc
    return {name: kind for name, kind, *_ in rows}
