"""What a stream job reads and computes, resolved from the registry and the contracts.

A job names a Feast data source; its views are the windowed-aggregate views read back
from the registry that read that source by its timestamp field. The source's column
types come from its raw Parquet files (each file's own schema checked first), or, with no
files yet, from the columns its contract declares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from featurepipe.batch.sql import SourceColumns
from featurepipe.config import resolve_source_path
from featurepipe.core.errors import InvalidInput, NotFound
from featurepipe.core.sql import literal
from featurepipe.core.windows import ViewShape, horizon, micros, validate
from featurepipe.definitions import AggregateView, aggregate_views
from featurepipe.online.plan import view_plan
from featurepipe.online.window import ViewPlan
from featurepipe.quality.checks import row_checks
from featurepipe.quality.contracts import load_contracts
from featurepipe.stream.admission import Condition
from featurepipe.stream.history import check_raw_history
from featurepipe.stream.options import StreamOptions

if TYPE_CHECKING:
    from feast import FeatureStore


@dataclass(frozen=True)
class StreamView:
    """A view the job keeps up to date: its definition, its online plan, the columns its
    state keeps (join keys, event time, aggregated columns), what the kernel needs of it
    (``shape``) and how long after an event it can still change a value (``horizon_us``:
    the state keeps events back to the watermark minus that)."""

    spec: AggregateView
    plan: ViewPlan
    columns: SourceColumns
    needed: tuple[str, ...]
    shape: ViewShape
    horizon_us: int


@dataclass(frozen=True)
class JobSpec:
    """The source a job reads, its contract's checks, and the views it computes."""

    source: Any  # the Feast data source
    source_glob: str  # its raw Parquet files
    timestamp: str
    input_root: Path  # where its raw history lives (and the job archives raw events)
    types: dict[str, str]  # DuckDB type per source column
    contract: Any  # featurepipe.quality.contracts.TableContract | None
    checks: tuple[Condition, ...]  # the contract's row checks but uniqueness
    unique: tuple[str, ...]  # the contract's unique columns (deduplicated by the job)
    key_columns: tuple[str, ...]  # every view's join keys
    views: tuple[StreamView, ...]


def resolve_spec(store: FeatureStore, options: StreamOptions, con: duckdb.DuckDBPyConnection, repo: Path) -> JobSpec:
    """The job's source, checks and views; raises :class:`InvalidInput` (or
    :class:`NotFound` for a source without files or declared types) saying what to fix."""
    o = options
    source, specs = source_views(store, o.source, o.views, repo)
    glob, timestamp = str(resolve_source_path(repo, source.path)), source.timestamp_field
    contracts = load_contracts(repo)
    contract = contracts.sources.get(o.source)
    # each raw file's own schema, before its types are taken or its rows bootstrapped
    check_raw_history(con, glob, o.source, contracts, who=f"stream job {o.job!r}", then="restart the job")
    types = source_types(con, glob, o.source, contract)
    checks = contract_conditions(contract, types) if contract else ()
    key_columns = sorted({k for v in specs for k in v.join_keys})
    missing = [c for c in [*key_columns, timestamp] if c not in types]
    if missing:
        raise InvalidInput(f"source {o.source!r} has no column(s) {missing}")
    columns = SourceColumns(types)
    views = []
    for spec in specs:
        columns.require(spec)
        if any(a.window is None and a.function != "last" for a in spec.aggregations):
            raise InvalidInput(f"view {spec.name!r}: streaming needs a time window on every aggregation but 'last'")
        validate(spec.aggregations, spec.name)
        plan = view_plan(store.get_feature_view(spec.name), store.config, store.project)
        needed = (*spec.join_keys, timestamp,
                  *sorted({a.column for a in spec.aggregations} - {timestamp, *spec.join_keys}))
        shape = ViewShape(spec.join_keys, timestamp, spec.aggregations, {c: types[c] for c in needed})
        views.append(StreamView(spec, plan, columns, needed, shape, micros(horizon(spec.aggregations))))
    return JobSpec(
        source=source, source_glob=glob, timestamp=timestamp, input_root=Path(glob.split("/**")[0]),
        types=types, contract=contract, checks=checks,
        unique=tuple(contract.unique) if contract and contract.unique else (),
        key_columns=tuple(key_columns), views=tuple(views),
    )


def source_views(store: FeatureStore, source_name: str, views: Sequence[str] | None,
                 repo: Path) -> tuple[Any, list[AggregateView]]:
    """The Feast data source ``source_name`` and the windowed-aggregate views (of ``views``,
    default all) that read it by its timestamp field; :class:`InvalidInput` when there is
    no such source or no such view."""
    try:
        source = store.get_data_source(source_name)
    except Exception as exc:  # feast raises DataSourceObjectNotFoundException
        raise InvalidInput(f"the registry has no data source {source_name!r}; check --source or run feast apply") from exc
    source_glob = resolve_source_path(repo, source.path) if hasattr(source, "path") else None
    specs = [v for v in aggregate_views(store, views)
             if v.input_path == source_glob
             and v.timestamp_field == source.timestamp_field]
    if not specs:
        raise InvalidInput(
            f"no windowed-aggregate view reads source {source_name!r} by {source.timestamp_field!r}; "
            "nothing to compute from this stream"
        )
    return source, specs


def source_types(con: duckdb.DuckDBPyConnection, path: str, source: str, contract: Any) -> dict[str, str]:
    """DuckDB type per column of the raw files at ``path`` (hive ``date`` left out), else
    the types ``contract`` declares; :class:`NotFound` when neither says."""
    try:
        rows = con.execute(
            f"DESCRIBE SELECT * FROM read_parquet({literal(path)}, hive_partitioning = true, union_by_name = true)"
        ).fetchall()
        types = {r[0]: str(r[1]) for r in rows if r[0] != "date"}
    except duckdb.IOException:
        types = {}
    if not types and contract is not None:
        types = {c.name: c.type for c in contract.columns if c.type}
    if not types:
        raise NotFound(
            f"cannot tell the schema of source {source!r}: no Parquet files match {path} "
            "and contracts.yaml declares no column types for it"
        )
    return types


def contract_conditions(contract: Any, types: dict[str, str]) -> tuple[Condition, ...]:
    """The row checks of ``contract`` (a :class:`~featurepipe.quality.contracts.TableContract`)
    on the columns in ``types``, as admission conditions; uniqueness is left out (the job
    deduplicates against the events it has seen, not within a table)."""
    return tuple(Condition(c.fails, c.name, c.reason, c.severity)
                 for c in row_checks(contract, types) if "__dup_rank" not in c.fails)
