"""featurepipe's offline store on Spark: the same Parquet tables, point-in-time joins that scale out.

Configure it in ``feature_store.yaml``::

    offline_store:
      type: featurepipe.offline.spark_store.SparkOfflineStore
      master: spark://host:7077      # optional; default: featurepipe.yaml / $FEATUREPIPE_SPARK_MASTER / local[*]
      spark_conf: {spark.executor.memory: 8g}   # optional, over featurepipe.yaml's `spark: conf:`

It reads the views' ``FileSource`` Parquet files and gives the values the DuckDB store
(:mod:`featurepipe.offline.store`) gives, to the bit and with the same Arrow types; the
semantics are :mod:`featurepipe.offline.pit`'s (TTL, created-time tie-break,
``filter_by_created_timestamp``) and :mod:`featurepipe.offline.view`'s (windowed views: no
TTL, tables of this kernel version only).

**The join: one sort per view, no range join.** Entity rows and the view's feature rows
(pruned first to the entity rows' keys and time range) are unioned and sorted once by
(keys, time, kind, created time, position): at one instant feature rows sort before entity
rows, so a row at exactly the as-of time matches, and among feature rows of one instant the
newest created time sorts last. A running ``last(row, ignorenulls)`` over that order hands
each entity row its newest feature row as a whole struct (a null inside it is never filled
from an older row); the TTL is then checked on it. With ``filter_by_created_timestamp`` a
feature row counts from ``greatest(event, created)`` on, which is exactly when both cut-offs
let it in, and a running ``max_by(row, (event, created, position))`` picks the newest of the
rows counted so far (measured: ``last`` over the longer sort is a third faster than
``max_by``, so it is used wherever it gives the same answer). Views are chained (each view's
output is the next one's entity rows): a retrieval is one sort per view. Exact ties (same keys,
event and created time), which Feast leaves undefined, go to the later row of a file, between
files by a hash of the file's path: the same answer every time.

Entity input: a pandas DataFrame (as for the DuckDB store: only the keys and as-of times go
to Spark, the result is assembled in Arrow beside the caller's columns), a Spark SQL query
string over tables the session knows, or a Spark DataFrame (both checkpointed once, so the
time range used for pruning and the join see the same rows). ``offline_write_batch`` and the
source schema are the DuckDB store's (they touch files only); the pulls run on Spark.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast.infra.offline_stores.contrib.spark_offline_store.spark import SparkRetrievalJob
from feast.infra.offline_stores.file_source import SavedDatasetFileStorage
from feast.infra.offline_stores.offline_store import OfflineStore, RetrievalJob, RetrievalMetadata
from feast.repo_config import FeastConfigBaseModel, RepoConfig
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import from_arrow_type

from featurepipe.core.spark import spark_session
from featurepipe.core.sql import SPARK
from featurepipe.errors import InvalidInput
from featurepipe.offline.entity import DEFAULT_TIMESTAMP, ROW, read_entity_frame
from featurepipe.offline.infra import source_path
from featurepipe.offline.job import LazyConnection
from featurepipe.offline.store import FeaturepipeOfflineStore
from featurepipe.offline.versions import require_current_kernel
from featurepipe.offline.view import ViewRequest

if TYPE_CHECKING:
    from feast.data_source import DataSource
    from feast.feature_view import FeatureView
    from feast.infra.registry.base_registry import BaseRegistry
    from feast.on_demand_feature_view import OnDemandFeatureView
    from feast.saved_dataset import SavedDatasetStorage

PREFIX = "__fp_"  # featurepipe's working columns; entity columns may not start with it
_KEY, _TIME, _KIND, _CREATED, _POSITION, _VALUE, _MATCH = (
    f"{PREFIX}{n}" for n in ("k", "t", "kind", "created", "pos", "value", "match"))
FEATURE_ROW, ENTITY_ROW = 0, 1  # sort order at one instant: feature rows first


class SparkOfflineStoreConfig(FeastConfigBaseModel):
    """Configuration of :class:`SparkOfflineStore` (beside it: Feast finds the store class
    in the config class's module)."""

    type: Literal["featurepipe.offline.spark_store.SparkOfflineStore"] = (
        "featurepipe.offline.spark_store.SparkOfflineStore"
    )
    master: str | None = None
    """Spark master; default ``featurepipe.yaml``'s, ``$FEATUREPIPE_SPARK_MASTER`` or ``local[*]``."""
    spark_conf: dict[str, str] | None = None
    """Spark settings over the repo's (:func:`featurepipe.core.spark.spark_settings`)."""
    staging_location: str | None = None
    """Where ``to_remote_storage`` writes (Feast's ``SparkRetrievalJob``); None: not supported."""
    region: str | None = None
    """AWS region of an ``s3://`` staging location."""


def _session(config: RepoConfig) -> SparkSession:
    options = getattr(config, "offline_store", None)
    return spark_session(getattr(config, "repo_path", None), overrides=getattr(options, "spark_conf", None),
                         master=getattr(options, "master", None))


def _col(name: str) -> Column:
    return F.col("`" + name.replace("`", "``") + "`")


def _micros(value: datetime | timedelta) -> int:
    if isinstance(value, timedelta):
        return value // timedelta(microseconds=1)
    aware = value if value.tzinfo else value.replace(tzinfo=timezone.utc)  # naive: UTC, as ts_literal
    return (aware - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def _instant(micros: int) -> Column:
    return F.timestamp_micros(F.lit(micros))


# --- entity rows -----------------------------------------------------------------------------

class Entities:
    """Entity rows, checked: ``arrow`` for a pandas input (the caller's columns, exact; only
    the keys and as-of times go to Spark), else ``frame``, a Spark DataFrame. Both carry the
    row number ``ROW`` and a UTC as-of column.

    A Spark input is checkpointed on first use (:meth:`time_range`): the time range that
    prunes the feature rows and the join must see the same rows, even from a query with
    ``current_timestamp()`` or ``rand()`` in it.
    """

    def __init__(self, timestamp_column: str, columns: list[str], arrow: pa.Table | None = None,
                 frame: DataFrame | None = None) -> None:
        self.timestamp_column = timestamp_column
        self.columns = columns  # the caller's, in order
        self.arrow = arrow
        self.frame = frame
        self._range: tuple[int | None, int | None] | None = None

    @property
    def types(self) -> dict[str, T.DataType]:
        """Spark types of the caller's columns (for a pandas input: as Spark will see them)."""
        if self.frame is not None:
            return {f.name: f.dataType for f in self.frame.schema.fields}
        assert self.arrow is not None
        return {f.name: _spark_type(f.type) for f in self.arrow.schema}

    def time_range(self) -> tuple[int | None, int | None]:
        """Earliest and latest as-of time in microseconds (None, None: no rows)."""
        if self._range is None:
            ts = self.timestamp_column
            if self.frame is None:
                assert self.arrow is not None
                bounds = pc.min_max(self.arrow.column(ts))
                self._range = (_scalar_micros(bounds["min"]), _scalar_micros(bounds["max"]))
            else:
                rows = self.frame.localCheckpoint(eager=False)  # written by the job below
                try:
                    lo, hi, missing = rows.agg(F.min(F.unix_micros(_col(ts))), F.max(F.unix_micros(_col(ts))),
                                               F.count_if(_col(ts).isNull())).first() or (None, None, 0)
                except PySparkException as exc:
                    raise InvalidInput(f"reading the entity rows failed in Spark: {exc}") from exc
                if missing:
                    raise InvalidInput(f"entity_df column {ts!r} has {missing} null timestamps; every entity "
                                       "row needs an as-of time")
                self.frame, self._range = rows, (lo, hi)
        return self._range

    def spark(self, session: SparkSession, columns: list[str] | None) -> DataFrame:
        """The rows in Spark with ``columns`` (None: all) and ``ROW``."""
        self.time_range()
        if self.frame is not None:
            return self.frame
        assert self.arrow is not None
        wanted = list(dict.fromkeys([*(self.columns if columns is None else columns), ROW]))
        try:
            return session.createDataFrame(self.arrow.select(wanted))
        except (PySparkException, TypeError, ValueError, pa.ArrowException) as exc:
            raise InvalidInput(f"entity_df columns {wanted} cannot be sent to Spark ({exc}); "
                               "give them Spark-compatible types") from exc

    def metadata(self, features: list[str]) -> RetrievalMetadata:
        def instant(micros: int | None) -> datetime | None:
            return None if micros is None else datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=micros)

        lo, hi = self.time_range()
        return RetrievalMetadata(features=features, keys=[c for c in self.columns if c != self.timestamp_column],
                                 min_event_timestamp=instant(lo), max_event_timestamp=instant(hi))


def _spark_type(kind: pa.DataType) -> T.DataType:
    try:
        return from_arrow_type(kind, prefer_timestamp_ntz=True)
    except (TypeError, NotImplementedError):
        return T.NullType()  # no Spark type: compared as such, it fails the key check by name


def read_entities(session: SparkSession, entity_df: Any) -> Entities:
    """Check and normalise the entity input (pandas, a Spark SQL string or a Spark DataFrame);
    no Spark job runs here."""
    if isinstance(entity_df, pd.DataFrame):
        # the DuckDB store's reader: same checks, same messages; it opens no DuckDB for a DataFrame
        frame = read_entity_frame(entity_df, cast(duckdb.DuckDBPyConnection, LazyConnection(None)))
        _refuse_reserved(frame.columns)
        return Entities(frame.timestamp_column, frame.columns, arrow=frame.table)
    if isinstance(entity_df, str):
        try:
            entity_df = session.sql(entity_df)
        except PySparkException as exc:
            raise InvalidInput(f"the entity_df SQL query failed in Spark: {exc}") from exc
    if not isinstance(entity_df, DataFrame):
        raise InvalidInput("entity_df must be a pandas DataFrame, a Spark SQL query string or a Spark DataFrame, "
                           f"got {type(entity_df).__name__}")
    return _spark_entities(entity_df)


def _scalar_micros(value: pa.Scalar) -> int | None:
    return int(value.cast(pa.int64()).as_py()) if value.is_valid else None


def _refuse_reserved(columns: list[str]) -> None:
    reserved = [c for c in columns if c == ROW or c.startswith(PREFIX)]
    if reserved:
        raise InvalidInput(f"entity_df has column(s) {reserved}: names starting with {PREFIX!r} are featurepipe's; "
                           "rename them")


def _spark_entities(df: DataFrame) -> Entities:
    _refuse_reserved(df.columns)
    types = {f.name: f.dataType for f in df.schema.fields}
    if DEFAULT_TIMESTAMP in types:
        ts = DEFAULT_TIMESTAMP
    else:
        found = [n for n, t in types.items() if isinstance(t, (T.TimestampType, T.TimestampNTZType))]
        if len(found) != 1:
            raise InvalidInput(
                f"entity_df has no column {DEFAULT_TIMESTAMP!r}; pass the as-of time of each row in a column "
                f"named {DEFAULT_TIMESTAMP!r} (timestamp columns found: {found or 'none'})"
            )
        ts = found[0]
    if not isinstance(types[ts], (T.TimestampType, T.TimestampNTZType, T.StringType)):
        raise InvalidInput(f"entity_df column {ts!r} must hold timestamps, got {types[ts].simpleString()}; "
                           f"convert it with to_timestamp({ts})")
    # a timestamp without time zone is UTC (the session's zone); strings parse under ANSI rules
    as_of = _col(ts).cast("timestamp").alias(ts)
    rows = df.select(*[as_of if c == ts else _col(c) for c in df.columns], F.monotonically_increasing_id().alias(ROW))
    return Entities(ts, list(df.columns), frame=rows)


# --- the views -------------------------------------------------------------------------------

def _family(kind: T.DataType) -> str:
    if isinstance(kind, T.IntegralType):
        return "integer"
    if isinstance(kind, T.FractionalType):
        return "float"
    if isinstance(kind, (T.StringType, T.VarcharType, T.CharType)):
        return "string"
    if isinstance(kind, (T.TimestampType, T.TimestampNTZType)):
        return "timestamp"
    return kind.simpleString()


def _key_type(given: T.DataType, stored: T.DataType) -> T.DataType:
    """The type both sides of a key are compared in."""
    if given == stored:
        return stored
    return {"integer": T.LongType(), "float": T.DoubleType()}.get(_family(stored), stored)


@dataclass(frozen=True)
class SparkView:
    """A view resolved against its files: the pinned request and the Spark types of its columns."""

    request: ViewRequest
    types: dict[str, T.DataType] = field(default_factory=dict)

    @classmethod
    def open(cls, request: ViewRequest, entity_types: dict[str, T.DataType]) -> SparkView:
        lazy = LazyConnection(None)  # DuckDB lists and reads remote files only
        try:
            con = cast(duckdb.DuckDBPyConnection, lazy)
            view = request.pinned(con)
            require_current_kernel(view, con)
        finally:
            lazy.close()
        schema = _files_schema(view.files, view.name)
        wanted = [*view.join_keys, view.timestamp, *([view.created] if view.created else []), *view.features]
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise InvalidInput(
                f"feature view {view.name!r}: its offline table {view.path} has no column(s) {missing} "
                f"(it has {sorted(schema.names)}); fix the view's schema/field_mapping or the source data"
            )
        types = {c: from_arrow_type(schema.field(c).type, prefer_timestamp_ntz=True) for c in dict.fromkeys(wanted)}
        for src, column in view.join_keys.items():
            if column not in entity_types:
                raise InvalidInput(
                    f"entity_df has no column {column!r}, a join key of feature view {view.name!r}; add it "
                    "to entity_df (or map the view's key to another column with .with_join_key_map())"
                )
            if _family(entity_types[column]) != _family(types[src]):
                raise InvalidInput(
                    f"entity_df column {column!r} is {entity_types[column].simpleString()}, but feature view "
                    f"{view.name!r} stores that key as {types[src].simpleString()}; cast the column "
                    f"(e.g. df[{column!r}].astype(...)) to match"
                )
        return cls(view, types)

    def read(self, session: SparkSession) -> DataFrame:
        """The needed columns of the pinned files (schema given: Spark runs no inference job)."""
        schema = T.StructType([T.StructField(c, t, True) for c, t in self.types.items()])
        return session.read.schema(schema).parquet(*self.request.files)


def _files_schema(files: tuple[str, ...], name: str) -> pa.Schema:
    """The union of the files' schemas, from their footers (read on the driver)."""
    try:
        return pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInput(f"feature view {name!r}: cannot read the schema of its offline table files ({exc})") from exc


# up to this many distinct values per key column, a pandas input's keys prune the feature rows
# as an IN list (no Spark job); above it, through a broadcast semi join
IN_LIST_MAX = 10_000


def _position() -> Column:
    """A feature row's position: a 24-bit hash of its file's path, then its row number in the
    file (below 2^40); it breaks exact ties (same keys, event and created time) the same way
    every time."""
    return F.shiftleft(F.xxhash64(F.col("_metadata.file_path")), 40).bitwiseOR(F.col("_metadata.row_index"))


def _in_list_type(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _in_list(column: str, values: pa.Array) -> str:
    """``column IN (...)`` as Spark SQL text (integer or string values)."""
    if not len(values):
        return "false"
    if pa.types.is_integer(values.type):
        items = ", ".join(str(int(v)) for v in values.to_pylist())
    else:
        items = ", ".join(SPARK.literal(str(v)) for v in values.to_pylist())
    return f"{SPARK.quote(column)} IN ({items})"


def _feature_rows(session: SparkSession, view: SparkView, entities: Entities, first: DataFrame,
                  key_types: list[T.DataType], lo: int, hi: int, created_cutoff: bool) -> DataFrame:
    """The view's rows that can match some entity row (``first``: the entity rows in Spark),
    in the union's layout."""
    req = view.request
    source = view.read(session)
    ts = _col(req.timestamp).cast("timestamp")
    created = _col(req.created).cast("timestamp") if req.created else F.lit(None).cast("timestamp")
    keys = [_col(src).cast(t).alias(f"{_KEY}{j}") for j, (src, t) in enumerate(zip(req.join_keys, key_types))]
    keep = [ts <= _instant(hi), *[_col(src).isNotNull() for src in req.join_keys]]
    if req.ttl:  # older than the earliest as-of time minus the TTL: matches nothing
        keep.append(ts >= _instant(lo - _micros(req.ttl)))
    sort_time = ts
    if created_cutoff and req.created:  # counts once both its times have passed
        sort_time = F.greatest(ts, created)
        keep += [created.isNotNull(), created <= _instant(hi)]
    condition = keep[0]
    for extra in keep[1:]:
        condition = condition & extra
    value = F.struct(ts.alias("ts"), *[_col(src).alias(f"f{i}") for i, src in enumerate(req.features)])
    rows = source.where(condition).select(*keys, sort_time.alias(_TIME), F.lit(FEATURE_ROW).alias(_KIND),
                                          created.alias(_CREATED), _position().alias(_POSITION), value.alias(_VALUE))
    names = [f"{_KEY}{j}" for j in range(len(key_types))]
    if entities.arrow is None:  # Spark input: its distinct keys (broadcast when small, AQE decides)
        wanted = first.select(*[_col(c).cast(t).alias(n) for c, t, n in zip(req.join_keys.values(), key_types, names)])
        return rows.join(wanted.dropna().distinct(), on=names, how="left_semi")
    keys = entities.arrow.select(list(req.join_keys.values()))
    values = [pc.unique(keys.column(c)).drop_null() for c in keys.column_names]
    if max(len(v) for v in values) <= IN_LIST_MAX and all(_in_list_type(v.type) for v in values):
        for name, column in zip(names, values):  # each key on its own: the exact match is the join's
            rows = rows.where(F.expr(_in_list(name, column)))  # one expression, not a call per value
        return rows
    distinct = keys.group_by(keys.column_names).aggregate([]).drop_null().rename_columns(names)
    wanted = session.createDataFrame(distinct).select(*[F.col(n).cast(t) for n, t in zip(names, key_types)])
    return rows.join(F.broadcast(wanted), on=names, how="left_semi")


def as_of_join(session: SparkSession, entities: Entities, current: DataFrame, views: list[SparkView],
               created_cutoff: bool) -> DataFrame:
    """``current`` (entity rows) with each view's features appended, one sort per view."""
    ts = entities.timestamp_column
    first = current
    lo, hi = entities.time_range()
    if lo is None or hi is None:  # no entity rows: nothing can match
        lo = hi = 0
    types = {f.name: f.dataType for f in current.schema.fields}
    for view in views:
        req = view.request
        key_types = [_key_type(types[c], view.types[src]) for src, c in req.join_keys.items()]
        rows = _feature_rows(session, view, entities, first, key_types, lo, hi, created_cutoff)
        carried = current.columns
        mine = current.select("*", *[_col(c).cast(t).alias(f"{_KEY}{j}")
                                     for j, (c, t) in enumerate(zip(req.join_keys.values(), key_types))],
                              _col(ts).alias(_TIME), F.lit(ENTITY_ROW).alias(_KIND))
        partition = Window.partitionBy(*[F.col(f"{_KEY}{j}") for j in range(len(key_types))])
        if created_cutoff and req.created:  # the newest (event, created) of the rows counted so far
            newest = F.struct(F.col(f"{_VALUE}.ts"), F.col(_CREATED), F.col(_POSITION))
            window = partition.orderBy(F.col(_TIME), F.col(_KIND))
            match = F.max_by(F.col(_VALUE), F.when(F.col(_KIND) == FEATURE_ROW, newest))
        else:  # sorted by event time, created time (nulls first), position: the last row is the newest
            window = partition.orderBy(F.col(_TIME), F.col(_KIND), F.col(_CREATED), F.col(_POSITION))
            match = F.last(F.col(_VALUE), ignorenulls=True)
        window = window.rowsBetween(Window.unboundedPreceding, Window.currentRow)
        joined = (mine.unionByName(rows, allowMissingColumns=True)
                  .withColumn(_MATCH, match.over(window))
                  .where(F.col(_KIND) == ENTITY_ROW))
        valid = F.col(_MATCH).isNotNull()
        if req.ttl:
            valid = valid & (F.unix_micros(F.col(f"{_MATCH}.ts")) >= F.unix_micros(_col(ts)) - _micros(req.ttl))
        features = [F.when(valid, F.col(_MATCH)[f"f{i}"]).alias(out) for i, out in enumerate(req.features.values())]
        current = joined.select(*[_col(c) for c in carried], *features)
    return current


# --- the job ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SparkResult:
    """A prepared result: the whole of it as a Spark DataFrame (in order), and as Arrow."""

    frame: Callable[[], DataFrame]
    arrow: Callable[[], pa.Table]


class SparkJob(SparkRetrievalJob):
    """Feast's ``SparkRetrievalJob`` (``to_spark_df``, ``to_remote_storage``, ``persist`` to
    a ``SavedDatasetSparkStorage``) over a result prepared on first use; Arrow results keep
    Spark's column types (Feast's job goes through pandas), and ``persist`` also takes a
    ``SavedDatasetFileStorage`` (one Parquet file, as the DuckDB store writes)."""

    def __init__(self, session: SparkSession, config: RepoConfig, prepare: Callable[[], SparkResult],
                 full_feature_names: bool = False, on_demand_feature_views: list[OnDemandFeatureView] | None = None,
                 metadata: Callable[[], RetrievalMetadata | None] | None = None) -> None:
        super().__init__(session, "", full_feature_names, config, on_demand_feature_views)
        self._prepare = prepare
        self._prepared: SparkResult | None = None
        self._metadata_factory = metadata

    def _result(self) -> SparkResult:
        if self._prepared is None:
            self._prepared = _spark_errors(self._prepare)
        return self._prepared

    @property
    def metadata(self) -> RetrievalMetadata | None:
        if self._metadata is None and self._metadata_factory is not None:
            self._metadata = self._metadata_factory()
        return self._metadata

    def to_spark_df(self) -> DataFrame:
        return self._result().frame()

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        result = self._result()
        return _spark_errors(result.arrow)

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        frame: pd.DataFrame = self._to_arrow_internal(timeout).to_pandas()
        return frame

    def persist(self, storage: SavedDatasetStorage, allow_overwrite: bool | None = False,
                timeout: int | None = None) -> None:
        """Write the result where ``storage`` says; a file storage gets one Parquet file."""
        from feast.errors import SavedDatasetLocationAlreadyExists

        if not isinstance(storage, SavedDatasetFileStorage):
            super().persist(storage, allow_overwrite, timeout)
            return
        uri = storage.file_options.uri
        if "://" not in uri and Path(uri).exists() and not allow_overwrite:
            raise SavedDatasetLocationAlreadyExists(location=uri)
        if self.on_demand_feature_views or "://" in uri:  # on-demand views run in Python, on the whole result
            pq.write_table(self.to_arrow(), uri)
            return
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            _spark_errors(lambda: self.to_spark_df().coalesce(1).write.parquet(str(staging)))
            (part,) = staging.glob("part-*.parquet")
            os.replace(part, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _spark_errors(run: Callable[[], Any]) -> Any:
    try:
        return run()
    except PySparkException as exc:
        raise InvalidInput(f"offline query failed in Spark: {exc}") from exc


def _by_row(table: pa.Table, rows: int | None = None) -> pa.Table:
    """``table`` in ``ROW`` order, checked to hold ``rows`` rows when given."""
    table = table.take(pc.sort_indices(table.column(ROW)))
    if rows is not None and table.num_rows != rows:
        raise AssertionError(f"the Spark join returned {table.num_rows} rows for {rows} entity rows")
    return table


class SparkOfflineStore(OfflineStore):
    """Feast offline store over Parquet ``FileSource``s: point-in-time joins on Spark."""

    supports_filter_by_created_timestamp = True

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: Any,  # pandas, a Spark SQL string or a Spark DataFrame
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
        requests = [
            ViewRequest.from_feature_view(
                fv, list(dict.fromkeys(feats)), source_path(config, fv.batch_source, fv.name), full_feature_names
            )
            for fv, feats in fv_to_features.items()
            if feats
        ]
        session = _session(config)
        state: dict[str, Entities] = {}

        def entities() -> Entities:
            if "rows" not in state:
                state["rows"] = read_entities(session, entity_df)
            return state["rows"]

        def prepare() -> SparkResult:
            rows = entities()
            keys = list(dict.fromkeys(c for r in requests for c in r.join_keys.values()))
            types = rows.types
            views = [SparkView.open(r, types) for r in requests]  # before any Spark job
            taken = set(rows.columns)
            for view in views:
                clash = sorted(taken & set(view.request.features.values()))
                if clash:
                    raise InvalidInput(
                        f"feature view {view.request.name!r}: output column(s) {clash} already exist in the result "
                        "(in entity_df or another view); pass full_feature_names=True or rename them"
                    )
                taken |= set(view.request.features.values())
            outputs = [o for v in views for o in v.request.features.values()]

            def whole() -> DataFrame:
                joined = as_of_join(session, rows, rows.spark(session, None), views, filter_by_created_timestamp)
                return joined.orderBy(ROW).select(*[_col(c) for c in [*rows.columns, *outputs]])

            def arrow() -> pa.Table:
                if rows.arrow is None:  # Spark input: everything comes back from Spark
                    joined = as_of_join(session, rows, rows.spark(session, None), views, filter_by_created_timestamp)
                    table = joined.select(*[_col(c) for c in [ROW, *rows.columns, *outputs]]).toArrow()
                    return _by_row(table).drop_columns([ROW])
                narrow = rows.spark(session, [rows.timestamp_column, *keys])
                joined = as_of_join(session, rows, narrow, views, filter_by_created_timestamp)
                found = _by_row(joined.select(ROW, *[_col(o) for o in outputs]).toArrow(), rows.arrow.num_rows)
                result = rows.arrow.drop_columns([ROW])
                for name in outputs:
                    result = result.append_column(found.schema.field(name), found.column(name))
                return result

            return SparkResult(frame=whole, arrow=arrow)

        return SparkJob(session, config, prepare, full_feature_names, odfvs,
                        metadata=lambda: entities().metadata(feature_refs))

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
        order = [_col(timestamp_field).desc()]
        if created_timestamp_column:
            order.append(_col(created_timestamp_column).desc_nulls_last())
        window = Window.partitionBy(*[_col(k) for k in join_key_columns] or [F.lit(1)]).orderBy(*order)

        def latest(rows: DataFrame) -> DataFrame:
            number = f"{PREFIX}n"
            return rows.withColumn(number, F.row_number().over(window)).where(F.col(number) == 1).drop(number)

        return _pull(config, data_source, [*join_key_columns, *feature_name_columns, timestamp_field],
                     timestamp_field, created_timestamp_column, start_date, end_date, latest)

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
        return _pull(config, data_source, [*join_key_columns, *feature_name_columns, timestamp_field],
                     timestamp_field, created_timestamp_column, start_date, end_date, lambda rows: rows)

    # these touch files only: the DuckDB store's (Arrow and Parquet, no query engine at work)
    offline_write_batch = staticmethod(FeaturepipeOfflineStore.offline_write_batch)

    def get_table_column_names_and_types_from_data_source(
        self, config: RepoConfig, data_source: DataSource
    ) -> list[tuple[str, str]]:
        """Column names and Arrow types of a Parquet source (the DuckDB store's reading)."""
        return FeaturepipeOfflineStore().get_table_column_names_and_types_from_data_source(config, data_source)


def _pull(config: RepoConfig, data_source: DataSource, columns: list[str], timestamp_field: str,
          created: str | None, start: datetime | None, end: datetime | None,
          shape: Callable[[DataFrame], DataFrame]) -> RetrievalJob:
    path = source_path(config, data_source)
    wanted = list(dict.fromkeys([*columns, *([created] if created else [])]))
    session = _session(config)

    def prepare() -> SparkResult:
        matches = glob.glob(path, recursive=True) if glob.has_magic(path) else [path]
        files = tuple(sorted(f for f in matches if "://" in f or os.path.isfile(f)))
        if not files:
            raise InvalidInput(f"source {data_source.name!r}: no Parquet files at {path}")
        schema = _files_schema(files, data_source.name)
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise InvalidInput(f"source {data_source.name!r}: its files at {path} have no column(s) {missing}")
        spark_schema = T.StructType([T.StructField(c, from_arrow_type(schema.field(c).type, prefer_timestamp_ntz=True))
                                     for c in wanted])
        rows = session.read.schema(spark_schema).parquet(*files)
        ts = _col(timestamp_field).cast("timestamp")
        if start is not None:
            rows = rows.where(ts >= _instant(_micros(start)))
        if end is not None:
            rows = rows.where(ts <= _instant(_micros(end)))
        result = shape(rows)
        return SparkResult(frame=lambda: result, arrow=result.toArrow)

    return SparkJob(session, config, prepare)
