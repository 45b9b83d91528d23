"""The entity frame of a point-in-time join: read, checked and normalised as Arrow.

Feast's rules: the as-of column is ``event_timestamp``, or the only timestamp column when
there is no such column; naive timestamps are UTC; strings are parsed as timestamps.
Entity rows keep their order, their extra columns and their duplicates: each gets a row
number (``ROW``) that the join keys its results on.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from featurepipe.errors import InvalidInput

ROW = "__fp_row"
DEFAULT_TIMESTAMP = "event_timestamp"


@dataclass(frozen=True)
class EntityFrame:
    """Entity rows as Arrow, with a row number and a UTC microsecond as-of column."""

    table: pa.Table
    timestamp_column: str

    @property
    def columns(self) -> list[str]:
        """The caller's columns, in their order."""
        return [c for c in self.table.column_names if c != ROW]

    def time_range(self) -> tuple[pa.Scalar, pa.Scalar]:
        """Earliest and latest as-of time."""
        bounds = pc.min_max(self.table.column(self.timestamp_column))
        return bounds["min"], bounds["max"]


def read_entity_frame(entity_df: pd.DataFrame | str | None, con: duckdb.DuckDBPyConnection) -> EntityFrame:
    """Turn ``entity_df`` (a DataFrame or a SQL query run in ``con``) into an :class:`EntityFrame`."""
    if isinstance(entity_df, str):
        try:
            table = con.sql(entity_df).to_arrow_table()
        except duckdb.Error as exc:
            raise InvalidInput(f"the entity_df SQL query failed in DuckDB: {exc}") from exc
    elif isinstance(entity_df, pd.DataFrame):
        try:
            table = pa.Table.from_pandas(entity_df, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InvalidInput(
                f"entity_df cannot be converted to Arrow ({exc}); give each column one type"
            ) from exc
    else:
        raise InvalidInput(
            f"entity_df must be a pandas DataFrame or a SQL query string, got {type(entity_df).__name__}"
        )
    if ROW in table.column_names:
        raise InvalidInput(f"entity_df has a column named {ROW!r}, which featurepipe reserves; rename it")
    ts_col = _timestamp_column(table)
    column = _as_utc_micros(table.column(ts_col), ts_col)
    table = table.set_column(table.schema.get_field_index(ts_col), ts_col, column)
    table = table.append_column(ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return EntityFrame(table=table, timestamp_column=ts_col)


def _timestamp_column(table: pa.Table) -> str:
    if DEFAULT_TIMESTAMP in table.column_names:
        return DEFAULT_TIMESTAMP
    candidates: list[str] = [f.name for f in table.schema if pa.types.is_timestamp(f.type)]
    if len(candidates) == 1:
        return candidates[0]
    raise InvalidInput(
        f"entity_df has no column {DEFAULT_TIMESTAMP!r}; pass the as-of time of each row in a column "
        f"named {DEFAULT_TIMESTAMP!r} (timestamp columns found: {candidates or 'none'})"
    )


def _as_utc_micros(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            parsed = pd.to_datetime(column.to_pandas(), utc=True, format="mixed")  # each value on its own, as before
        except (ValueError, TypeError) as exc:
            raise InvalidInput(
                f"entity_df column {name!r} holds strings that are not timestamps ({exc}); "
                "use ISO 8601 values or convert with pd.to_datetime(..., utc=True)"
            ) from exc
        column = pa.chunked_array([pa.array(parsed)])
        kind = column.type
    if not pa.types.is_timestamp(kind):
        raise InvalidInput(
            f"entity_df column {name!r} must hold timestamps, got {kind}; "
            "convert it with pd.to_datetime(df[...], utc=True)"
        )
    if kind.tz is None:
        column = column.cast(pa.timestamp(kind.unit, tz="UTC"))
    if column.null_count:
        raise InvalidInput(
            f"entity_df column {name!r} has {column.null_count} null timestamps; every entity row "
            "needs an as-of time"
        )
    # nanoseconds are truncated towards the past, so an as-of time never moves later
    if kind.unit == "ns":
        micros = pc.floor_temporal(column, unit="microsecond")
        return micros.cast(pa.timestamp("us", tz="UTC"))
    return column.cast(pa.timestamp("us", tz="UTC"))


def check_join_key_types(frame: EntityFrame, keys: dict[str, str], view: str) -> None:
    """Fail fast when an entity join-key column cannot compare with the feature table's.

    ``keys`` maps entity-frame column to the feature table's DuckDB type.
    """
    for column, feature_type in keys.items():
        if column not in frame.table.column_names:
            raise InvalidInput(
                f"entity_df has no column {column!r}, a join key of feature view {view!r}; add it "
                "to entity_df (or map the view's key to another column with .with_join_key_map())"
            )
        given = frame.table.schema.field(column).type
        if _family(given) != _duckdb_family(feature_type):
            raise InvalidInput(
                f"entity_df column {column!r} is {given}, but feature view {view!r} stores that key "
                f"as {feature_type}; cast the column (e.g. df[{column!r}].astype(...)) to match"
            )


def _family(kind: pa.DataType) -> str:
    if pa.types.is_integer(kind):
        return "integer"
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "float"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "binary"
    if pa.types.is_boolean(kind):
        return "boolean"
    if pa.types.is_timestamp(kind):
        return "timestamp"
    if pa.types.is_null(kind):
        return "null"
    return str(kind)


def _duckdb_family(kind: str) -> str:
    kind = kind.upper()
    if kind in {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}:
        return "integer"
    if kind in {"FLOAT", "DOUBLE"} or kind.startswith("DECIMAL"):
        return "float"
    if kind == "VARCHAR":
        return "string"
    if kind == "BLOB":
        return "binary"
    if kind == "BOOLEAN":
        return "boolean"
    if kind.startswith("TIMESTAMP"):
        return "timestamp"
    return kind
