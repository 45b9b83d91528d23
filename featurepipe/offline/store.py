"""featurepipe's offline store for Feast: Parquet tables, DuckDB ASOF point-in-time joins.

Configure it in ``feature_store.yaml``::

    offline_store:
      type: featurepipe.offline.store.FeaturepipeOfflineStore
      memory_limit: 2GB          # optional: DuckDB spills to temp_directory beyond it
      temp_directory: /var/tmp   # optional: where DuckDB spills (default: system temp)

Every read Feast makes of the offline store runs here in DuckDB, Arrow in and out:
``get_historical_features`` (see :mod:`featurepipe.offline.pit` for the semantics),
``pull_latest_from_table_or_query`` and ``pull_all_from_table_or_query`` (materialisation
and Feast's other paths), and ``offline_write_batch`` (pushes to the offline store).
Feast's own DuckDB store builds its joins with ibis, pairing every entity row with every
feature row of its key before filtering: quadratic in the rows per key.

What the options set up (the DuckDB database, source paths, the index folder) is in
:mod:`featurepipe.offline.infra`; ``featurepipe index`` is
:func:`featurepipe.offline.prebuild.build_indexes`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast.data_source import DataSource
from feast.feature_view import FeatureView
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import RepoConfig

from featurepipe.core.sql import literal, quote, ts_literal
from featurepipe.definitions import KIND, TAG_KIND
from featurepipe.errors import InvalidInput
from featurepipe.offline.entity import read_entity_frame
from featurepipe.offline.infra import connect, index_directory, source_path
from featurepipe.offline.job import FeaturepipeRetrievalJob, QueryPlan
from featurepipe.offline.pit import SqlPlan, build_join
from featurepipe.offline.view import ViewRequest


class FeaturepipeOfflineStoreConfig(DuckDBOfflineStoreConfig):
    """Configuration of :class:`FeaturepipeOfflineStore` (read by :mod:`featurepipe.offline.infra`).

    It lives beside the store class: Feast finds the store class in the config class's module.
    """

    type: Literal["featurepipe.offline.store.FeaturepipeOfflineStore"] = (
        "featurepipe.offline.store.FeaturepipeOfflineStore"
    )
    memory_limit: str | None = None
    """DuckDB ``memory_limit`` (e.g. ``"2GB"``); beyond it DuckDB spills to ``temp_directory``."""
    temp_directory: str | None = None
    """Where DuckDB spills; default a fresh folder in the system temp directory."""
    threads: int | None = None
    """DuckDB threads; default all cores."""
    index: bool = True
    """Match through a sorted copy of each view's rows, built once per version of its files
    (see :mod:`featurepipe.offline.index`); False: scan the files on every retrieval."""
    index_directory: str | None = None
    """Where the sorted copies live; default ``<repo>/.featurepipe/offline-index``."""


class FeaturepipeOfflineStore(DuckDBOfflineStore):
    """Feast offline store over Parquet: DuckDB ASOF point-in-time joins, Arrow in and out."""

    supports_filter_by_created_timestamp = True

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str | None,  # None (Feast's time-range retrieval): InvalidInput
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        from feast.utils import (
            _get_requested_feature_views_to_features_dict,
            _get_requested_on_demand_feature_views,
        )

        odfvs = _get_requested_on_demand_feature_views(feature_refs, project, registry)
        fv_to_features, _ = _get_requested_feature_views_to_features_dict(feature_refs, feature_views, odfvs)
        views = [
            ViewRequest.from_feature_view(
                fv, list(dict.fromkeys(feats)), source_path(config, fv.batch_source, fv.name), full_feature_names
            )
            for fv, feats in fv_to_features.items()
            if feats
        ]

        def plan(con: duckdb.DuckDBPyConnection) -> SqlPlan:
            frame = read_entity_frame(entity_df, con)
            return build_join(con, frame, views, filter_by_created_timestamp, index_directory(config))

        return FeaturepipeRetrievalJob(
            QueryPlan(config=config, plan=plan),
            full_feature_names=full_feature_names,
            on_demand_feature_views=odfvs,
            metadata=lambda: _metadata(config, entity_df, feature_refs),
        )

    @staticmethod
    def pull_latest_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None,
        start_date: datetime,
        end_date: datetime,
    ) -> RetrievalJob:
        """The newest row per join key with event time in ``[start_date, end_date]``."""
        path = source_path(config, data_source)
        cols = [*join_key_columns, *feature_name_columns, timestamp_field]
        order = [f"{quote(timestamp_field)} DESC"]
        if created_timestamp_column:
            cols.append(created_timestamp_column)
            order.append(f"{quote(created_timestamp_column)} DESC NULLS LAST")
        partition = ", ".join(quote(k) for k in join_key_columns) or "1"
        sql = (
            f"SELECT {', '.join(quote(c) for c in dict.fromkeys(cols))} "
            f"FROM read_parquet({literal(path)}, union_by_name = true) "
            f"WHERE CAST({quote(timestamp_field)} AS TIMESTAMPTZ) BETWEEN {ts_literal(start_date)} AND {ts_literal(end_date)} "
            f"QUALIFY row_number() OVER (PARTITION BY {partition} ORDER BY {', '.join(order)}) = 1"
        )
        return FeaturepipeRetrievalJob(QueryPlan(config=config, plan=lambda con: SqlPlan(sql)))

    @staticmethod
    def pull_all_from_table_or_query(
        config: RepoConfig,
        data_source: DataSource,
        join_key_columns: list[str],
        feature_name_columns: list[str],
        timestamp_field: str,
        created_timestamp_column: str | None = None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
        **_: Any,
    ) -> RetrievalJob:
        """Every row with event time in ``[start_date, end_date]`` (either bound optional)."""
        path = source_path(config, data_source)
        cols = [*join_key_columns, *feature_name_columns, timestamp_field]
        if created_timestamp_column:
            cols.append(created_timestamp_column)
        ts = f"CAST({quote(timestamp_field)} AS TIMESTAMPTZ)"
        where = [f"{ts} >= {ts_literal(start_date)}"] if start_date else []
        if end_date:
            where.append(f"{ts} <= {ts_literal(end_date)}")
        sql = (
            f"SELECT {', '.join(quote(c) for c in dict.fromkeys(cols))} "
            f"FROM read_parquet({literal(path)}, union_by_name = true)"
            + (f" WHERE {' AND '.join(where)}" if where else "")
        )
        return FeaturepipeRetrievalJob(QueryPlan(config=config, plan=lambda con: SqlPlan(sql)))

    def get_table_column_names_and_types_from_data_source(
        self, config: RepoConfig, data_source: DataSource
    ) -> list[tuple[str, str]]:
        """Column names and Arrow types of a Parquet source; globs and partition folders work."""
        schema = _source_schema(source_path(config, data_source))
        return [(f.name, str(f.type)) for f in schema]

    @staticmethod
    def offline_write_batch(
        config: RepoConfig,
        feature_view: FeatureView,
        table: pa.Table,
        progress: Callable[[int], Any] | None,
    ) -> None:
        """Append rows to the view's offline table (new files; never rewrites existing ones).
        Refused for a windowed-aggregate view, whose table only ``featurepipe backfill`` writes.

        A glob source (``root/**/*.parquet``) gets one new file per day under
        ``root/date=YYYY-MM-DD/``, as the backfill lays them out; a single-file source is
        rewritten atomically with the rows appended.
        """
        if feature_view.tags.get(TAG_KIND) == KIND:
            raise InvalidInput(
                f"offline write to feature view {feature_view.name!r}: its offline table holds windowed aggregates "
                "computed by `featurepipe backfill` (one row per change point); rows written beside them would "
                "mix meanings. Append the raw events to its input source instead (featurepipe push) and run "
                f"`featurepipe backfill --view {feature_view.name}`"
            )
        source = feature_view.batch_source
        path = source_path(config, source, feature_view.name)
        assert source is not None  # source_path raised InvalidInput otherwise
        expected = _source_schema(path)
        missing = [c for c in expected.names if c not in table.column_names]
        extra = [c for c in table.column_names if c not in expected.names]
        if missing or extra:
            raise InvalidInput(
                f"offline write to feature view {feature_view.name!r}: the table's columns do not match "
                f"its offline table ({path}): missing {missing}, unexpected {extra}"
            )
        table = table.select([c for c in expected.names if c in table.column_names])
        try:
            table = table.cast(pa.schema([expected.field(c) for c in table.column_names]))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidInput(
                f"offline write to feature view {feature_view.name!r}: values do not fit the offline "
                f"table's types ({exc})"
            ) from exc
        if "*" in path:
            root = Path(path.split("*", 1)[0])
            ts = table.column(source.timestamp_field)
            days = pc.strftime(ts, format="%Y-%m-%d")
            for day in pc.unique(days).to_pylist():
                part = table.filter(pc.equal(days, day))
                folder = root / f"date={day}"
                folder.mkdir(parents=True, exist_ok=True)
                _atomic_write(part, folder / f"push-{uuid.uuid4().hex}.parquet")
        else:
            target = Path(path)
            merged = pa.concat_tables([pq.read_table(target), table]) if target.exists() else table
            _atomic_write(merged, target)
        if progress:
            progress(table.num_rows)


def _metadata(config: RepoConfig, entity_df: pd.DataFrame | str | None, feature_refs: list[str]) -> RetrievalMetadata:
    """Keys and as-of range of the entity rows (Feast records them with saved datasets)."""
    con = connect(config)
    try:
        frame = read_entity_frame(entity_df, con)
        lo, hi = frame.time_range()
    finally:
        con.close()
    return RetrievalMetadata(
        features=feature_refs,
        keys=[c for c in frame.columns if c != frame.timestamp_column],
        min_event_timestamp=lo.as_py() if lo.is_valid else None,
        max_event_timestamp=hi.as_py() if hi.is_valid else None,
    )


def _source_schema(path: str) -> pa.Schema:
    """The columns stored in the files (hive partition folders like ``date=`` are not columns)."""
    con = connect()
    try:
        scan = f"read_parquet({literal(path)}, union_by_name = true, hive_partitioning = false)"
        return con.sql(f"SELECT * FROM {scan} LIMIT 0").to_arrow_table().schema
    except duckdb.IOException as exc:
        raise InvalidInput(f"no offline table at {path} to append to ({exc}); run `featurepipe backfill` first") from exc
    finally:
        con.close()


def _atomic_write(table: pa.Table, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)
