"""Feast ``RetrievalJob`` for featurepipe's offline store: a DuckDB query run on demand.

The job holds a plan (a function that prepares a DuckDB connection and returns the final
SELECT). ``to_arrow``/``to_df`` run it and fetch Arrow; ``persist`` streams the result
into a Parquet file with DuckDB's ``COPY`` so a result larger than memory never passes
through Python.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import duckdb
import pandas as pd
import pyarrow as pa
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata

from featurepipe.core.db import one_row
from featurepipe.core.sql import literal
from featurepipe.errors import InvalidInput
from featurepipe.offline.infra import connect
from featurepipe.offline.pit import SqlPlan

if TYPE_CHECKING:
    from feast.on_demand_feature_view import OnDemandFeatureView
    from feast.repo_config import RepoConfig
    from feast.saved_dataset import SavedDatasetStorage

T = TypeVar("T")


@dataclass(frozen=True)
class QueryPlan:
    """How to produce a result: ``plan(con)`` prepares ``con`` and returns a :class:`SqlPlan`."""

    config: RepoConfig | None
    plan: Callable[[duckdb.DuckDBPyConnection], SqlPlan]

    def run(self, consume: Callable[[duckdb.DuckDBPyConnection, SqlPlan], T]) -> T:
        # a stand-in with the connection's attributes, opened on first use
        con = cast(duckdb.DuckDBPyConnection, LazyConnection(self.config))
        try:
            query = self.plan(con)
            try:
                return consume(con, query)
            except duckdb.Error as exc:
                raise InvalidInput(f"offline query failed in DuckDB: {exc}") from exc
        finally:
            con.close()


class LazyConnection:
    """A DuckDB cursor (:func:`featurepipe.offline.infra.connect`) opened on first use.

    A warm retrieval through the offline index with integer keys needs no DuckDB at all.
    """

    def __init__(self, config: RepoConfig | None) -> None:
        self._config = config
        self._con: duckdb.DuckDBPyConnection | None = None

    def __getattr__(self, name: str) -> Any:
        if self._con is None:
            self._con = connect(self._config)
        return getattr(self._con, name)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()


class FeaturepipeRetrievalJob(RetrievalJob):
    """A point-in-time join or a table pull, run when its result is asked for."""

    def __init__(
        self,
        query: QueryPlan,
        full_feature_names: bool = False,
        on_demand_feature_views: list[OnDemandFeatureView] | None = None,
        metadata: Callable[[], RetrievalMetadata] | None = None,
    ) -> None:
        """``metadata`` is computed on first use (it reads the entity rows once more)."""
        self._query = query
        self._full_feature_names = full_feature_names
        self._on_demand_feature_views = on_demand_feature_views or []
        self._metadata_factory = metadata
        self._metadata: RetrievalMetadata | None = None

    @property
    def full_feature_names(self) -> bool:
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return self._on_demand_feature_views

    @property
    def metadata(self) -> RetrievalMetadata | None:
        if self._metadata is None and self._metadata_factory is not None:
            self._metadata = self._metadata_factory()
        return self._metadata

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self._query.run(lambda con, plan: plan.to_arrow(con))

    def to_df(self, validation_reference: Any = None, timeout: int | None = None) -> pd.DataFrame:
        """Feast's ``to_df`` without its ``reset_index`` copy: Arrow gives a RangeIndex already."""
        frame: pd.DataFrame = self.to_arrow(validation_reference=validation_reference, timeout=timeout).to_pandas()
        if not isinstance(frame.index, pd.RangeIndex) or frame.index.start != 0 or frame.index.step != 1:
            frame = frame.reset_index(drop=True)
        return frame

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        frame: pd.DataFrame = self._to_arrow_internal(timeout).to_pandas()
        return frame

    def to_parquet(self, path: str | Path) -> int:
        """Stream the result (before on-demand views) into one Parquet file; returns its rows."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)

        def copy(con: duckdb.DuckDBPyConnection, plan: SqlPlan) -> int:
            plan.prepare(con)
            con.execute(f"COPY ({plan.sql()}) TO {literal(str(target))} (FORMAT parquet)")
            return int(one_row(con, f"SELECT count(*) FROM read_parquet({literal(str(target))})")[0])

        return self._query.run(copy)

    def persist(
        self,
        storage: SavedDatasetStorage,
        allow_overwrite: bool = False,
        timeout: int | None = None,
    ) -> None:
        """Write the result to a saved dataset's Parquet file (Feast's ``create_saved_dataset``)."""
        import pyarrow.parquet as pq
        from feast.errors import SavedDatasetLocationAlreadyExists

        path = Path(storage.file_options.uri)  # type: ignore[attr-defined]
        if path.exists() and not allow_overwrite:
            raise SavedDatasetLocationAlreadyExists(location=str(path))
        if self._on_demand_feature_views:
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(self.to_arrow(), path)  # on-demand views run in Python, on the whole result
        else:
            self.to_parquet(path)
