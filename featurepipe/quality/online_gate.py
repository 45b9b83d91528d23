"""The quality gate and run record of one view's materialisation (offline table → Redis).

Before anything is written, the offline table's columns are checked against the view's
contract (a renamed or retyped column blocks, as at the other stages). The contract's
row-level checks (nulls, ranges, allowed values) become
:class:`~featurepipe.online.latest.RowCondition` s, evaluated by DuckDB in the query that
selects the latest row per entity: a failing ``warn`` row is quarantined with the engine's
other bad rows and the rest is written; a failing ``block`` check (and a null join key the
contract blocks on) stops the view before the first write. Every materialisation appends a
run record (``kind: materialize``) to the run log: the offline files read, rows in, written,
not newer, quarantined, check results, the definitions hash, code version and duration.

A windowed-aggregate view is written from its raw events (each entity's window schedule,
:mod:`featurepipe.online.schedule_scan`): its contract's schema checks apply to the columns
the kernel computes, its row checks to *every* row of a schedule (an entity with a failing
row is quarantined whole), and raw rows that fail the input source's contract checks are
left out, as the backfill's gate leaves them out (so online and offline see the same
events; uniqueness is not checked here).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from featurepipe.config import data_dir, online_target, resolve_source_path
from featurepipe.core.db import connect
from featurepipe.core.sql import DUCKDB, Dialect
from featurepipe.definitions import TAG_INPUT
from featurepipe.online.latest import DUCKDB_TYPES, RowCondition
from featurepipe.online.schedule_scan import schedule_types
from featurepipe.online.window import MaterializationBlocked, ViewMaterialization, ViewPlan
from featurepipe.quality import checks
from featurepipe.quality.contracts import Contracts, TableContract, load_contracts
from featurepipe.quality.gate_base import Gate
from featurepipe.quality.records import CheckResult, RunInput, RunOutput, RunRecord
from featurepipe.quality.runlog import feature_view_hash

STAGE = "materialize"


class MaterializeGate(Gate):
    """Contract checks and the run record of one view's materialisation window."""

    log: ClassVar[logging.Logger] = logging.getLogger(__name__)  # failed warnings are said here

    def __init__(self, contracts: Contracts, data: Path, view: str, definition_hash: str | None,
                 online_store: str, start: datetime, end: datetime, dialect: Dialect = DUCKDB) -> None:
        super().__init__(contracts, data, "materialize")
        self.dialect = dialect  # the SQL of the row conditions: the engine's that evaluates them
        self.contract: TableContract | None = contracts.feature_views.get(view)
        self.source_contract: TableContract | None = None  # a windowed view's input (see prepare)
        self.view = view
        self.definition_hash = definition_hash
        self.online_store = online_store
        self.start, self.end = start, end
        self.conditions: list[RowCondition] = []
        self.keys: list[str] = []
        self.offline_path = ""
        self.start_lineage(view)

    def prepare(self, plan: ViewPlan) -> ViewPlan:
        """Check the offline table's schema (raises on a blocking failure) and return the plan
        with the contract's row conditions."""

        self.offline_path = plan.query.path
        if plan.kernel is not None and self.source_contract is not None:
            # the raw files the schedules are computed from: each file's schema, as the backfill checks them
            with connect() as con:
                raw = checks.table_schema_checks(con, STAGE, self.source_contract, plan.kernel.path)[1]
            self.keep(raw)
            if self.any_blocking(raw):
                raise self.blocked(STAGE, self.view, raw, stopped="the view", fix=f"the raw files ({plan.kernel.path})",
                                   consequence="Nothing of this view was written to Redis")
            plan = replace(plan, kernel=replace(plan.kernel, exclude=self._input_exclusions(plan.kernel.path)))
        if self.contract is None:
            return plan
        if plan.kernel is not None:
            results = checks.schema_checks(STAGE, self.contract, schedule_types(plan.query, plan.kernel))
        else:
            results = self._describe(plan.query.path)
        self.keep(results)
        if self.any_blocking(results):
            fix = "the view's definition" if plan.kernel is not None else "the offline table"
            raise self.blocked(STAGE, self.view, results, stopped="the view", fix=fix,
                               consequence="Nothing of this view was written to Redis")
        features = {f.name: DUCKDB_TYPES.get(f.value_type, "") for f in plan.query.features}
        self.conditions = [
            RowCondition(rc.name, rc.column, rc.fails, rc.reason, rc.severity == "block")
            for rc in checks.row_checks(self.contract, features, self.dialect) if rc.column in features
        ]
        keys = [(k.name, self.contract.column(k.name)) for k in plan.query.join_keys]
        self.keys = [name for name, spec in keys if spec is not None and not spec.nullable]
        block_keys = any(spec is not None and not spec.nullable and spec.severity == "block" for _, spec in keys)
        return replace(plan, query=replace(plan.query, conditions=tuple(self.conditions)), block_null_keys=block_keys)

    def _input_exclusions(self, path: str) -> tuple[str, ...]:
        """SQL true for the raw rows the input source's contract row checks fail."""
        assert self.source_contract is not None
        return _exclusions(self.source_contract, path, self.dialect)

    def _describe(self, path: str) -> list[CheckResult]:
        """The contract's schema checks on the offline table's combined schema and on each
        file's own (footers only, one query): the combined schema hides a file whose column
        DuckDB cannot cast, and the latest-row scan would then stop on it."""

        assert self.contract is not None
        with connect() as con:
            return checks.table_schema_checks(con, STAGE, self.contract, path)[1]

    def _row_results(self, result: ViewMaterialization, blocked: dict[str, int] | None) -> list[CheckResult]:
        """One result per contract check that applied: the join keys' not-null checks and the
        row conditions evaluated on the latest rows."""
        assert self.contract is not None
        failures = {**result.check_failures, **(blocked or {})}
        out = []
        for key in self.keys:
            spec = self.contract.column(key)
            assert spec is not None
            n, rows = result.null_key_rows, result.window_rows + result.null_key_rows
            where = "stopped the view" if blocked and f"{key}.not_null" in blocked else "quarantined"
            out.append(CheckResult(STAGE, self.view, f"{key}.not_null", key, spec.severity, n == 0, failed_rows=n,
                                   rows=rows, detail=f"{n:,} of {rows:,} window rows have a null {key}: {where}" if n else ""))
        for c in self.conditions:
            n = failures.get(c.name, 0)
            verb = "stopped the view" if blocked and c.name in blocked else "quarantined"
            out.append(CheckResult(STAGE, self.view, c.name, c.column, "block" if c.block else "warn", n == 0,
                                   failed_rows=n, rows=result.entities,
                                   detail=f"{n:,} of {result.entities:,} latest rows: {verb}" if n else ""))
        return out

    def finish(self, result: ViewMaterialization | None, error: BaseException | None = None) -> RunRecord:
        """Append the run record (and publish metrics and lineage events); return it."""

        blocked = error.failures if isinstance(error, MaterializationBlocked) else None
        if result is None and isinstance(error, MaterializationBlocked):
            result = error.result
        if result is not None and self.contract is not None:
            self.keep(self._row_results(result, blocked))
        record = RunRecord(
            **self.record_head(error, {self.view: self.definition_hash or ""}),
            window=(self.start.isoformat(), self.end.isoformat()),
            # rows: the latest row per entity plus the window's rows without a join key;
            # rows = passed (written + not newer in Redis) + quarantined when the run is ok
            inputs=(RunInput(
                name=self.view, path=self.offline_path,
                files=tuple(result.files) if result else (),
                window_rows=(result.window_rows + result.null_key_rows) if result else 0,
                rows=(result.entities + result.null_key_rows) if result else 0,
                passed=(result.written + result.skipped) if result else 0,
                quarantined=result.quarantined if result else 0,
            ),),
            outputs=(RunOutput(
                view=self.view, path=self.online_store, definition_hash=self.definition_hash,
                entities=result.entities if result else 0,
                rows=(result.written + result.skipped) if result else 0,
                written=result.written if result else 0,
                skipped=result.skipped if result else 0,
                quarantined=result.quarantined if result else 0,
                quarantine_files=tuple(result.quarantine_files) if result else (),
                newest_event=result.newest_event.isoformat() if result and result.newest_event else None,
                seconds=round(result.seconds, 4) if result else None,
            ),),
            checks=tuple(self.results),
        )
        self.publish(record)
        return record



def open_materialize_gate(repo_config: Any, view: Any, project: str, registry: Any,
                          start: datetime, end: datetime, sources: dict[str, Any] | None = None,
                          dialect: Dialect = DUCKDB) -> MaterializeGate:
    """The gate of one view's materialisation by the featurepipe engine: the repo's
    contracts, its data folder, the view's definition hash and the Redis it writes to.

    ``sources`` keeps the registry's data sources by name across the views of one call
    (each lookup reads the registry file again). ``dialect``: the SQL dialect of the engine
    that evaluates the row conditions (DuckDB's, or Spark's for ``--engine spark``)."""

    repo = Path(repo_config.repo_path)
    source = None
    name = view.tags.get(TAG_INPUT)
    if registry is not None and name:
        if sources is not None and name in sources:
            source = sources[name]
        else:
            try:
                source = registry.get_data_source(name, project)
            except Exception:  # a missing source only leaves it out of the hash
                source = None
            if sources is not None:
                sources[name] = source
    online = online_target(repo_config).describe()
    contracts = load_contracts(repo)
    gate = MaterializeGate(contracts, data_dir(repo), view.name, feature_view_hash(view, source), online, start, end,
                           dialect)
    gate.source_contract = _source_contract(contracts, repo, source, registry, project, sources)
    return gate


def _exclusions(contract: TableContract, path: str, dialect: Dialect = DUCKDB) -> tuple[str, ...]:
    """SQL (in ``dialect``) true for the rows of the Parquet ``path`` that ``contract``'s row
    checks fail."""
    with connect() as con:
        types = checks.describe(con, checks.parquet_relation(path))
    return tuple(c.fails for c in checks.row_checks(contract, types, dialect) if "__dup_rank" not in c.fails)


def input_exclusions(repo_config: Any, view: Any, project: str, registry: Any, path: str) -> tuple[str, ...]:
    """The raw rows a gated materialisation of the windowed ``view`` leaves out (SQL true for
    them, see :meth:`MaterializeGate.prepare`), from the repo's contracts: what the backfill
    prepares a view's schedules with, so that such a materialisation can read them."""
    name = view.tags.get(TAG_INPUT)
    try:
        source = registry.get_data_source(name, project) if name else None
    except Exception:  # noqa: BLE001 - as open_materialize_gate: no source, no contract
        source = None
    repo = Path(repo_config.repo_path)
    contract = _source_contract(load_contracts(repo), repo, source, registry, project, None)
    return _exclusions(contract, path) if contract is not None else ()


def _source_contract(contracts: Contracts, repo: Path, source: Any, registry: Any, project: str,
                     sources: dict[str, Any] | None) -> TableContract | None:
    """The contract of a windowed view's input source: its own, else that of a source
    reading the same files (``transaction_labels`` reads the files ``transactions`` names)."""
    if source is None:
        return None
    if source.name in contracts.sources:
        return contracts.sources[source.name]
    path = getattr(source, "path", None)
    for name in sorted(contracts.sources):
        other = (sources or {}).get(name)
        if other is None and registry is not None:
            try:
                other = registry.get_data_source(name, project)
            except Exception:  # a contract for a source the registry does not hold
                other = None
            if sources is not None:
                sources[name] = other
        if other is not None and path and resolve_source_path(repo, getattr(other, "path", "")) == \
                resolve_source_path(repo, path):
            return contracts.sources[name]
    return None
