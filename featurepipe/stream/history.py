"""The raw Parquet history streaming reads: each file's own schema, before any row.

A stream job works out its source's column types from the raw files, and a new job
bootstraps its windows from them; ``push`` appends its events there and recomputes
features over them. DuckDB reads the files together with one combined schema, which hides
a file whose column it cannot cast (an INT64 epoch-ms ``event_timestamp`` among
TIMESTAMPTZ files still reads as TIMESTAMPTZ) until a scan stops on it. So, as the batch
gates do, these readers first check each file's own schema from the Parquet footers (one
query, no data): against the source's contract, or without one against the type most of
the files have (see :func:`featurepipe.quality.checks.history_schema_checks`).
"""

from __future__ import annotations

import logging

import duckdb

from featurepipe.core.errors import InvalidInput
from featurepipe.quality import checks
from featurepipe.quality.contracts import Contracts

log = logging.getLogger(__name__)

STAGE = "stream"


def check_raw_history(con: duckdb.DuckDBPyConnection, glob: str, source: str, contracts: Contracts, *,
                      who: str, then: str) -> None:
    """Raise :class:`InvalidInput` naming each file and column of ``glob`` that does not
    match (``who``: what stops, e.g. ``stream job 'x'``; ``then``: what to do once the
    file is fixed, e.g. ``restart the job``). Non-blocking differences (a contract with
    ``schema_severity: warn``) are logged."""
    contract = contracts.sources.get(source)
    results = checks.history_schema_checks(con, STAGE, source, contract, glob)
    for r in results:
        if not r.blocking:
            log.warning("%s: source %r: %s (schema severity warn: going on)", who, source, r.detail)
    blocking = [r for r in results if r.blocking]
    if not blocking:
        return
    where = contracts.path or "contracts.yaml"
    against = (f"does not match its contract in {where}" if contract is not None else
               f"has files that differ from the type most of its files have (no contract for it in {where})")
    raise InvalidInput(
        f"{who}: the raw history of source {source!r} ({glob}) {against}: "
        + "; ".join(r.detail for r in blocking)
        + f". Nothing was read from it and nothing written; fix or move each file named{_or(contract)}, then {then}"
    )


def _or(contract: object) -> str:
    return " (or correct the contract)" if contract is not None else ""


def unreadable_history(con: duckdb.DuckDBPyConnection, glob: str, source: str, contracts: Contracts,
                       exc: duckdb.Error, *, who: str, then: str, done: str = "Nothing was written") -> InvalidInput:
    """The error for a read of the history that DuckDB stopped with ``exc`` after
    :func:`check_raw_history` let it through (``schema_severity: warn``): the files that
    differ, whatever the severity, and DuckDB's own first line."""
    contract = contracts.sources.get(source)
    differ = [r.detail for r in checks.history_schema_checks(con, STAGE, source, contract, glob)]
    duck = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return InvalidInput(
        f"{who}: cannot read the raw history of source {source!r} ({glob}): "
        + "".join(f"{d}; " for d in differ)
        + f"DuckDB says: {duck}. {done}; fix or move each file named{_or(contract)}, then {then}"
    )
