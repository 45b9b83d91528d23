"""A Feast offline store whose point-in-time join is one DuckDB ASOF query.

Configure it in ``feature_store.yaml``::

    offline_store:
      type: featurepipe.offline.store.FeaturepipeOfflineStore

``get_historical_features`` runs here; the other reads (``pull_latest_from_table_or_query``,
``pull_all_from_table_or_query``, ``offline_write_batch``...) are Feast's own DuckDB store,
which this class extends. Feast's ibis-based join pairs every entity row with every
feature row of its key before filtering, which is quadratic in the rows per key; an ASOF
join is a merge of two sorted streams.

Semantics are Feast's: a feature row matches an entity row when its event time is at or
before the entity row's ``event_timestamp`` and, with a TTL, not older than
``event_timestamp - ttl``; ties on event time go to the greatest created timestamp;
unmatched rows get nulls; entity rows keep their order, their extra columns and their
duplicates. Naive entity timestamps are taken as UTC.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from feast.feature_view import FeatureView
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.offline_stores.offline_utils import (
    DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL,
)
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from feast.saved_dataset import SavedDatasetStorage

from featurepipe.batch.sql import literal, quote
from featurepipe.errors import InvalidInput

ROW = "__fp_row"


class FeaturepipeOfflineStoreConfig(DuckDBOfflineStoreConfig):
    """Configuration of :class:`FeaturepipeOfflineStore` (same options as Feast's DuckDB store)."""

    type: Literal["featurepipe.offline.store.FeaturepipeOfflineStore"] = (  # type: ignore[assignment]
        "featurepipe.offline.store.FeaturepipeOfflineStore"
    )


def _entity_table(entity_df: pd.DataFrame | str, con: duckdb.DuckDBPyConnection) -> tuple[pa.Table, str]:
    """The entity rows as Arrow with a row number and a UTC ``TIMESTAMPTZ`` as-of column."""
    if isinstance(entity_df, str):
        try:
            table = con.sql(entity_df).to_arrow_table()
        except duckdb.Error as exc:
            raise InvalidInput(f"entity_df query failed in DuckDB: {exc}") from exc
    elif isinstance(entity_df, pd.DataFrame):
        table = pa.Table.from_pandas(entity_df, preserve_index=False)
    else:
        raise InvalidInput(
            f"entity_df must be a pandas DataFrame or a SQL query string, got {type(entity_df).__name__}"
        )
    schema = {f.name: f.type for f in table.schema}
    ts_col = (
        DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL
        if DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL in schema
        else None
    )
    if ts_col is None:
        candidates = [n for n, t in schema.items() if pa.types.is_timestamp(t)]
        if len(candidates) != 1:
            raise InvalidInput(
                "entity_df has no column 'event_timestamp'; pass the as-of time of each row in a "
                f"column named 'event_timestamp' (timestamp columns found: {candidates or 'none'})"
            )
        ts_col = candidates[0]
    ts_type = schema[ts_col]
    if not pa.types.is_timestamp(ts_type):
        raise InvalidInput(
            f"entity_df column {ts_col!r} must hold timestamps, got {ts_type}; convert it with "
            "pd.to_datetime(df[...], utc=True)"
        )
    column = table.column(ts_col)
    if ts_type.tz is None:
        column = column.cast(pa.timestamp(ts_type.unit, tz="UTC"))
    column = column.cast(pa.timestamp("us", tz="UTC"))
    if column.null_count:
        raise InvalidInput(f"entity_df column {ts_col!r} has {column.null_count} null timestamps")
    table = table.set_column(table.schema.get_field_index(ts_col), ts_col, column)
    table = table.append_column(ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return table, ts_col


class FeaturepipeRetrievalJob(RetrievalJob):
    """The result of a point-in-time join; runs when ``to_df``/``to_arrow`` is called."""

    def __init__(
        self,
        run: Any,
        full_feature_names: bool,
        on_demand_feature_views: list[OnDemandFeatureView],
        metadata: RetrievalMetadata | None,
    ) -> None:
        self._run = run
        self._full_feature_names = full_feature_names
        self._on_demand_feature_views = on_demand_feature_views
        self._metadata = metadata

    @property
    def full_feature_names(self) -> bool:
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return self._on_demand_feature_views

    @property
    def metadata(self) -> RetrievalMetadata | None:
        return self._metadata

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self._run()

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._run().to_pandas()

    def persist(
        self,
        storage: SavedDatasetStorage,
        allow_overwrite: bool = False,
        timeout: int | None = None,
    ) -> None:
        from pathlib import Path

        import pyarrow.parquet as pq
        from feast.errors import SavedDatasetLocationAlreadyExists

        path = Path(storage.file_options.uri)  # type: ignore[attr-defined]
        if path.exists() and not allow_overwrite:
            raise SavedDatasetLocationAlreadyExists(location=str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.to_arrow(), path)


def _feature_table_sql(fv: FeatureView, features: list[str], out_names: dict[str, str]) -> tuple[str, list[str], str]:
    """SELECT over a view's batch source: mapped join keys, event time, requested features."""
    source = fv.batch_source
    if not isinstance(source, FileSource):
        raise InvalidInput(
            f"feature view {fv.name!r}: the featurepipe offline store reads FileSource (Parquet) "
            f"sources, got {type(source).__name__}"
        )
    reverse = {v: k for k, v in source.field_mapping.items()}
    keys, selections = [], []
    for col in fv.entity_columns:
        alias = fv.projection.join_key_map.get(col.name, col.name)
        keys.append(alias)
        selections.append(f"{quote(reverse.get(col.name, col.name))} AS {quote('__k_' + alias)}")
    ts = quote(reverse.get(source.timestamp_field, source.timestamp_field))
    created = source.created_timestamp_column
    order = f"ORDER BY {quote(reverse.get(created, created))} DESC" if created else ""
    feature_sel = [f"{quote(reverse.get(f, f))} AS {quote(out_names[f])}" for f in features]
    key_list = ", ".join(quote("__k_" + k) for k in keys)
    sql = f"""
        SELECT {", ".join([*selections, f"CAST({ts} AS TIMESTAMPTZ) AS __fp_ts", *feature_sel])}
        FROM read_parquet({literal(source.path)}, hive_partitioning = true, union_by_name = true)
        WHERE {ts} IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY {key_list}, {ts} {order}) = 1
    """
    return sql, keys, ts


class FeaturepipeOfflineStore(DuckDBOfflineStore):
    """Feast's DuckDB offline store with an ASOF point-in-time join."""

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str,
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
        fv_to_features, _ = _get_requested_feature_views_to_features_dict(
            feature_refs, feature_views, odfvs
        )
        plan = [(fv, list(dict.fromkeys(feats))) for fv, feats in fv_to_features.items() if feats]

        def run() -> pa.Table:
            con = duckdb.connect()
            try:
                con.execute("SET TimeZone = 'UTC'")
                entity, ts_col = _entity_table(entity_df, con)
                con.register("__fp_entity", entity)
                names = set(entity.column_names)
                selects = [f"e.{quote(c)}" for c in entity.column_names if c != ROW]
                joins = []
                for i, (fv, feats) in enumerate(plan):
                    view_name = fv.projection.name_to_use()
                    out_names = {
                        f: f"{view_name}__{f}" if full_feature_names else f for f in feats
                    }
                    sql, keys, _ = _feature_table_sql(fv, feats, out_names)
                    missing = [k for k in keys if k not in names]
                    if missing:
                        raise InvalidInput(
                            f"entity_df has no column(s) {missing}, the join key(s) of feature view "
                            f"{view_name!r}; add them to entity_df (or map them with "
                            f".with_join_key_map())"
                        )
                    alias = f"v{i}"
                    on = " AND ".join(
                        [f"e.{quote(k)} = f.{quote('__k_' + k)}" for k in keys]
                        + [f"e.{quote(ts_col)} >= f.__fp_ts"]
                    )
                    ttl = fv.ttl if isinstance(fv.ttl, timedelta) and fv.ttl > timedelta(0) else None
                    cols = []
                    for f in feats:
                        col = f"f.{quote(out_names[f])}"
                        if ttl is not None:
                            micros = int(ttl / timedelta(microseconds=1))
                            col = (
                                f"CASE WHEN f.__fp_ts >= e.{quote(ts_col)} - "
                                f"INTERVAL ({micros}) MICROSECONDS THEN {col} END"
                            )
                        cols.append(f"{col} AS {quote(out_names[f])}")
                        selects.append(f"{alias}.{quote(out_names[f])}")
                    # one ASOF join per view, materialised, then joined on the row number:
                    # DuckDB plans chained ASOF joins poorly (it spilled tens of GB here)
                    con.execute(
                        f"CREATE TEMP TABLE {alias} AS SELECT e.{ROW}, {', '.join(cols)} "
                        f"FROM __fp_entity e ASOF LEFT JOIN ({sql}) f ON {on}"
                    )
                    joins.append(f"JOIN {alias} ON {alias}.{ROW} = e.{ROW}")
                query = (
                    f"SELECT {', '.join(selects)} FROM __fp_entity e {' '.join(joins)} "
                    f"ORDER BY e.{ROW}"
                )
                try:
                    return con.sql(query).to_arrow_table()
                except duckdb.Error as exc:
                    raise InvalidInput(f"point-in-time join failed: {exc}") from exc
            finally:
                con.close()

        return FeaturepipeRetrievalJob(
            run=run,
            full_feature_names=full_feature_names,
            on_demand_feature_views=odfvs,
            metadata=RetrievalMetadata(
                features=feature_refs,
                keys=[],
                min_event_timestamp=None,
                max_event_timestamp=None,
            ),
        )
