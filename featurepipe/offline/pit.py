"""Point-in-time join SQL: one DuckDB ASOF join per feature view.

For every entity row and view, the matching feature row is the newest one with the same
join keys and event time at or before the row's as-of time; among rows with the same
event time, the newest created timestamp wins. With a TTL, a match older than
``as_of - ttl`` counts as no match (the newest row is the only candidate: every older one
is older still, which is what Feast's filter-then-deduplicate gives).

Each view's result goes into a temp table keyed by the entity row number; the final
SELECT joins them back onto the entity rows in their original order. (Chaining several
ASOF joins in one query made DuckDB plan a huge intermediate; one at a time streams.)

With ``filter_by_created_timestamp`` a feature row also needs ``created <= as_of``. That
is no longer a single inequality, so those views use a range join plus ``arg_max``: exact
and slower, and only used when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import duckdb

from featurepipe.batch.sql import literal, quote
from featurepipe.errors import InvalidInput
from featurepipe.offline.entity import ROW, EntityFrame, check_join_key_types

if TYPE_CHECKING:
    from feast.feature_view import FeatureView

ENTITY = "__fp_entity"


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

    @classmethod
    def from_feature_view(
        cls, fv: FeatureView, features: list[str], path: str, full_feature_names: bool
    ) -> ViewRequest:
        """Resolve names through the source's field mapping and the projection's join-key map."""
        source = fv.batch_source
        reverse = {v: k for k, v in (source.field_mapping or {}).items()}
        view_name = fv.projection.name_to_use()
        join_keys = {
            reverse.get(c.name, c.name): fv.projection.join_key_map.get(c.name, c.name)
            for c in fv.entity_columns
        }
        created = source.created_timestamp_column or None
        ttl = fv.ttl if isinstance(fv.ttl, timedelta) and fv.ttl > timedelta(0) else None
        return cls(
            name=view_name,
            path=path,
            join_keys=join_keys,
            timestamp=reverse.get(source.timestamp_field, source.timestamp_field),
            created=reverse.get(created, created) if created else None,
            features={reverse.get(f, f): f"{view_name}__{f}" if full_feature_names else f for f in features},
            ttl=ttl,
        )

    def scan(self) -> str:
        return f"read_parquet({literal(self.path)}, union_by_name = true)"


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


def _check_columns(view: ViewRequest, types: dict[str, str]) -> None:
    wanted = [*view.join_keys, view.timestamp, *([view.created] if view.created else []), *view.features]
    missing = [c for c in wanted if c not in types]
    if missing:
        raise InvalidInput(
            f"feature view {view.name!r}: its offline table {view.path} has no column(s) {missing} "
            f"(it has {sorted(types)}); fix the view's schema/field_mapping or the source data"
        )


def _feature_rows(view: ViewRequest, lo: str, hi: str, dedup: bool) -> str:
    """The view's rows that can match some entity row, with join keys renamed ``__k<i>``."""
    cols = [f"{quote(src)} AS __k{i}" for i, src in enumerate(view.join_keys)]
    cols.append(f"CAST({quote(view.timestamp)} AS TIMESTAMPTZ) AS __fp_ts")
    if view.created:
        cols.append(f"CAST({quote(view.created)} AS TIMESTAMPTZ) AS __fp_created")
    cols += [f"{quote(src)} AS {quote(out)}" for src, out in view.features.items()]
    # rows older than the earliest as-of time minus the TTL can match nothing (no TTL: all can)
    lower = (
        f" AND CAST({quote(view.timestamp)} AS TIMESTAMPTZ) >= {lo} - INTERVAL ({_micros(view.ttl)}) MICROSECONDS"
        if view.ttl
        else ""
    )
    keys = ", ".join(f"__k{i}" for i in range(len(view.join_keys)))
    qualify = (
        f" QUALIFY row_number() OVER (PARTITION BY {keys}, __fp_ts ORDER BY __fp_created DESC NULLS LAST) = 1"
        if dedup and view.created
        else ""
    )
    return (
        f"SELECT {', '.join(cols)} FROM {view.scan()} "
        f"WHERE CAST({quote(view.timestamp)} AS TIMESTAMPTZ) <= {hi}{lower}{qualify}"
    )


def _micros(delta: timedelta | None) -> int:
    return int((delta or timedelta(0)) / timedelta(microseconds=1))


def _ttl_condition(view: ViewRequest, as_of: str) -> str | None:
    if view.ttl is None:
        return None
    return f"f.__fp_ts >= {as_of} - INTERVAL ({_micros(view.ttl)}) MICROSECONDS"


def build_join(
    con: duckdb.DuckDBPyConnection,
    frame: EntityFrame,
    views: list[ViewRequest],
    filter_by_created_timestamp: bool = False,
) -> str:
    """Create one temp table per view in ``con`` and return the final SELECT.

    ``frame.table`` must be registered in ``con`` as ``__fp_entity``.
    """
    as_of = f"e.{quote(frame.timestamp_column)}"
    lo_scalar, hi_scalar = frame.time_range()
    if not lo_scalar.is_valid:  # no entity rows: any bound works
        lo = hi = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"
    else:
        lo = f"TIMESTAMPTZ {literal(lo_scalar.as_py().isoformat())}"
        hi = f"TIMESTAMPTZ {literal(hi_scalar.as_py().isoformat())}"
    selects = [f"e.{quote(c)}" for c in frame.columns]
    taken = set(frame.columns)
    joins = []
    for i, view in enumerate(views):
        types = source_types(con, view)
        _check_columns(view, types)
        check_join_key_types(frame, {ent: types[src] for src, ent in view.join_keys.items()}, view.name)
        clash = sorted(taken & set(view.features.values()))
        if clash:
            raise InvalidInput(
                f"feature view {view.name!r}: output column(s) {clash} already exist in the result "
                "(in entity_df or another view); pass full_feature_names=True or rename them"
            )
        taken |= set(view.features.values())
        alias = f"__fp_v{i}"
        key_match = [f"e.{quote(ent)} = f.__k{j}" for j, ent in enumerate(view.join_keys.values())]
        ttl = _ttl_condition(view, as_of)
        if filter_by_created_timestamp and view.created:
            conds = [*key_match, f"f.__fp_ts <= {as_of}", f"f.__fp_created <= {as_of}"]
            if ttl:
                conds.append(ttl)
            outs = ", ".join(f"f.{quote(o)}" for o in view.features.values())
            con.execute(
                f"CREATE TEMP TABLE {alias} AS SELECT {ROW}, {', '.join(quote(o) for o in view.features.values())} FROM ("
                f"SELECT e.{ROW}, {outs}, row_number() OVER (PARTITION BY e.{ROW} "
                f"ORDER BY f.__fp_ts DESC, f.__fp_created DESC NULLS LAST) AS __rn "
                f"FROM {ENTITY} e JOIN ({_feature_rows(view, lo, hi, dedup=False)}) f ON {' AND '.join(conds)}"
                f") WHERE __rn = 1"
            )
            join_kind = "LEFT JOIN"
        else:
            cols = []
            for out in view.features.values():
                value = f"f.{quote(out)}"
                cols.append(f"CASE WHEN {ttl} THEN {value} END AS {quote(out)}" if ttl else f"{value} AS {quote(out)}")
            on = " AND ".join([*key_match, f"{as_of} >= f.__fp_ts"])
            con.execute(
                f"CREATE TEMP TABLE {alias} AS SELECT e.{ROW}, {', '.join(cols) or 'NULL AS __none'} "
                f"FROM {ENTITY} e ASOF LEFT JOIN ({_feature_rows(view, lo, hi, dedup=True)}) f ON {on}"
            )
            join_kind = "JOIN"
        selects += [f"{alias}.{quote(o)}" for o in view.features.values()]
        joins.append(f"{join_kind} {alias} ON {alias}.{ROW} = e.{ROW}")
    return f"SELECT {', '.join(selects)} FROM {ENTITY} e {' '.join(joins)} ORDER BY e.{ROW}"
