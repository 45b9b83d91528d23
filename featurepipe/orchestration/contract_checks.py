"""The asset checks of a feature view: its ``contracts.yaml`` rules in a few groups, and
their results read back from the run record of the backfill that ran them.

A view's backfill runs the quality gate (:mod:`featurepipe.quality.gate`) on its raw input
(stage ``raw``, the source's contract) and on its feature rows (stage ``features``, the
view's contract). Each stage's rules fall into five kinds: ``schema`` (columns and types),
``rows`` (not null, range, allowed values, unique keys), ``volume``, ``freshness`` and
``anomalies``. One asset check per stage and kind (``raw_rows``, ``features_freshness``, ...)
keeps a view's checks few enough to read, with every rule's own result in its metadata.

Nothing here imports Dagster: :mod:`featurepipe.orchestration.dagster` turns these into
asset check specs and results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from featurepipe.quality.contracts import TableContract
from featurepipe.quality.gate import STAGE_FEATURES, STAGE_RAW
from featurepipe.quality.records import KIND_BACKFILL, BadRunRecord, CheckResult, RunRecord
from featurepipe.quality.runlog import runs_path

KINDS = ("schema", "rows", "volume", "freshness", "anomalies")
STAGES = (STAGE_RAW, STAGE_FEATURES)


@dataclass(frozen=True)
class CheckGroup:
    """One asset check of a view: the rules of one ``kind`` that the gate runs on ``table``
    at ``stage``. ``blocking``: one of them stops the run when it fails."""

    stage: str
    table: str
    kind: str
    rules: tuple[str, ...]
    blocking: bool

    @property
    def name(self) -> str:
        return f"{self.stage}_{self.kind}"

    @property
    def description(self) -> str:
        where = "sources" if self.stage == STAGE_RAW else "feature_views"
        return f"contracts.yaml {where}.{self.table}, checked by the backfill's gate: " + ", ".join(self.rules)


def kind_of(check: str) -> str:
    """The kind of a gate's check, by its name (``amount.range`` -> ``rows``)."""
    if check.startswith("schema"):
        return "schema"
    if check.startswith("anomaly"):
        return "anomalies"
    if check in ("volume", "freshness"):
        return check
    return "rows"  # <column>.not_null / .range / .allowed, unique(...)


def check_groups(stage: str, contract: TableContract) -> list[CheckGroup]:
    """The checks of one table's contract at ``stage``, one per kind that has rules."""
    rows: list[tuple[str, str]] = []
    for col in contract.columns:
        if not col.nullable:
            rows.append((f"{col.name}.not_null", col.severity))
        if col.min is not None or col.max is not None:
            rows.append((f"{col.name}.range", col.severity))
        if col.allowed is not None:
            rows.append((f"{col.name}.allowed", col.severity))
    if contract.unique:
        rows.append((f"unique({', '.join(contract.unique)})", contract.unique_severity))
    # a file DuckDB cannot read, or whose type cannot be cast, blocks whatever the severity
    rules: dict[str, list[tuple[str, str]]] = {
        "schema": [(f"schema of {sum(c.type is not None for c in contract.columns)} typed columns",
                    contract.schema_severity), ("readable files", "block")],
        "rows": rows,
        "volume": [(f"volume (at least {contract.volume.min_rows:,} rows"
                    + (f", no day below {contract.volume.min_day_ratio:.0%} of the median)"
                       if contract.volume.min_day_ratio is not None else ")"),
                    contract.volume.severity)] if contract.volume else [],
        "freshness": [(f"freshness (newest event at most {contract.freshness.max_age} old)",
                       contract.freshness.severity)] if contract.freshness else [],
        "anomalies": [(f"anomalies of {', '.join(contract.anomalies.columns or ('numeric columns',))}",
                       contract.anomalies.severity)] if contract.anomalies else [],
    }
    return [
        CheckGroup(stage, contract.name, kind, tuple(f"{rule} ({severity})" for rule, severity in rules[kind]),
                   any(severity == "block" for _, severity in rules[kind]))
        for kind in KINDS if rules[kind]
    ]


@dataclass(frozen=True)
class GroupOutcome:
    """The results of one group's rules in one run."""

    group: CheckGroup
    results: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def blocked(self) -> bool:
        """A failed rule of ``block`` severity (the gate stopped the run on it)."""
        return any(r.blocking for r in self.results)

    @property
    def failed_rows(self) -> int:
        return sum(r.failed_rows for r in self.results)

    def summary(self) -> str:
        """What failed, rule by rule (or that all passed)."""
        failed = [r for r in self.results if not r.passed]
        if not failed:
            return f"{len(self.results)} check(s) of {self.group.stage}/{self.group.table} passed"
        return "; ".join(
            f"{r.check} ({r.severity}) failed" + (f" on {r.failed_rows:,} of {r.rows:,} rows" if r.failed_rows else "")
            + (f": {r.detail}" if r.detail else "") for r in failed
        )


def outcomes(groups: Sequence[CheckGroup], checks: Sequence[CheckResult]) -> list[GroupOutcome]:
    """Each group's results among a run's ``checks``; a group none of whose rules ran (the
    gate stopped before them) is left out."""
    out = []
    for group in groups:
        results = tuple(c for c in checks if c.stage == group.stage and c.table == group.table
                        and kind_of(c.check) == group.kind)
        if results:
            out.append(GroupOutcome(group, results))
    return out


def run_log_size(data: Path) -> int:
    """Where the run log ends now (bytes): :func:`runs_since` reads the records after it."""
    path = runs_path(data)
    return path.stat().st_size if path.is_file() else 0


def runs_since(data: Path, offset: int) -> list[RunRecord]:
    """The run records appended to ``data``'s run log after byte ``offset``, oldest first
    (a line that is not a record, e.g. one being written, is skipped)."""
    path = runs_path(data)
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    runs = []
    for line in lines:
        try:
            runs.append(RunRecord.from_json(line))
        except BadRunRecord:
            continue
    return runs


def backfill_record(runs: Sequence[RunRecord], views: Sequence[str], error: BaseException | None) -> RunRecord | None:
    """The record of the backfill of ``views`` among ``runs`` (others may have run meanwhile):
    the last backfill that failed with ``error``'s message, or that wrote every view."""
    for run in reversed(runs):
        if run.kind != KIND_BACKFILL:
            continue
        if error is not None and run.error == str(error):
            return run
        if error is None and run.ok and all(run.output(v) is not None for v in views):
            return run
    return None
