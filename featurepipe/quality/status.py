"""Freshness per feature view and lineage of feature values, from the tables and the run log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurepipe.errors import NotFound
from featurepipe.quality.contracts import Contracts
from featurepipe.quality.runlog import read_runs

if TYPE_CHECKING:
    from featurepipe.definitions import AggregateView


@dataclass(frozen=True)
class Freshness:
    """Newest event time of a feature view's offline table against its SLA."""

    view: str
    newest: datetime | None
    age: timedelta | None
    sla: timedelta | None

    @property
    def state(self) -> str:
        if self.newest is None or self.age is None:
            return "EMPTY"
        if self.sla is None:
            return "no SLA"
        return "OK" if self.age <= self.sla else "STALE"


def freshness(views: list[AggregateView], contracts: Contracts, now: datetime | None = None) -> list[Freshness]:
    """Freshness of every view's offline table (max event time from Parquet statistics)."""
    import duckdb

    from featurepipe.batch.sql import literal

    now = now or datetime.now(timezone.utc)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    out = []
    for view in views:
        newest = None
        if any(Path(view.offline_path).glob("date=*/*.parquet")):
            newest = con.execute(
                f"SELECT max(event_timestamp) FROM read_parquet({literal(str(view.offline_path / '**' / '*.parquet'))})"
            ).fetchone()[0]
        contract = contracts.feature_views.get(view.name)
        sla = contract.freshness.max_age if contract and contract.freshness else None
        out.append(Freshness(view.name, newest, now - newest if newest else None, sla))
    con.close()
    return out


def format_age(delta: timedelta | None) -> str:
    """``3.2h``, ``1.5d``, ``12m``."""
    if delta is None:
        return "-"
    seconds = delta.total_seconds()
    if abs(seconds) >= 86_400:
        return f"{seconds / 86_400:.1f}d"
    if abs(seconds) >= 3_600:
        return f"{seconds / 3_600:.1f}h"
    return f"{seconds / 60:.0f}m"


def resolve(views: list[AggregateView], name: str) -> tuple[AggregateView, str | None]:
    """A view by name, or the view of a feature (``feature`` or ``view:feature``)."""
    view_name, _, feature = name.partition(":")
    for view in views:
        if view.name == view_name:
            if feature and feature not in view.feature_names:
                raise NotFound(f"feature view {view.name!r} has no feature {feature!r}; it has {view.feature_names}")
            return view, feature or None
    owners = [v for v in views if name in v.feature_names]
    if len(owners) == 1:
        return owners[0], name
    if len(owners) > 1:
        raise NotFound(f"feature {name!r} is in several views {[v.name for v in owners]}; write view:feature")
    raise NotFound(
        f"no feature view or feature named {name!r}; views: {[v.name for v in views]} "
        "(a feature: its name or view:feature)"
    )


def lineage(data: Path, view: AggregateView, feature: str | None, current_hash: str | None) -> dict[str, Any]:
    """Where the published values of ``view`` (or one ``feature`` of it) came from: per
    published day partition, the last successful run that wrote it, with that run's input
    files, quarantined rows, definitions hash and code version; and the last successful
    materialisation that put its values online."""
    published = sorted(p.name for p in Path(view.offline_path).glob("date=*") if p.is_dir())
    runs = [r for r in read_runs(data) if r.get("status") == "ok" and r.get("kind") != "materialize"]
    writer: dict[str, dict[str, Any]] = {}
    for run in runs:  # oldest first: later runs overwrite
        for out in run.get("outputs", []):
            if out.get("view") == view.name:
                for part in out.get("partitions", []):
                    writer[part] = run
    by_run: dict[str, dict[str, Any]] = {}
    unknown = [p for p in published if p not in writer]
    for part in published:
        run = writer.get(part)
        if run is None:
            continue
        entry = by_run.get(run["run_id"])
        if entry is None:
            out = next(o for o in run["outputs"] if o.get("view") == view.name)
            inputs = [i for i in run.get("inputs", []) if i.get("path") == out.get("input_path")]
            entry = by_run[run["run_id"]] = {
                "run_id": run["run_id"], "finished": run["finished"], "kind": run["kind"],
                "definition_hash": out.get("definition_hash"),
                "definitions_hash": run.get("definitions_hash"),
                "definitions_changed_since": bool(current_hash and out.get("definition_hash")
                                                  and out.get("definition_hash") != current_hash),
                "code_version": run.get("code_version"),
                "inputs": inputs, "rows_written": out.get("rows"),
                "rows_quarantined": out.get("quarantined", 0), "partitions": [],
            }
        entry["partitions"].append(part)
    agg = next((a for a in view.aggregations if a.name == feature), None)
    online = None
    for run in read_runs(data):  # the last successful materialisation of the view
        out = next((o for o in run.get("outputs", []) if o.get("view") == view.name), None)
        if run["kind"] == "materialize" and run["status"] == "ok" and out is not None:
            online = {
                "run_id": run["run_id"], "finished": run["finished"], "window": run.get("window"),
                "online_store": out.get("online_store"), "written": out.get("written"),
                "not_newer": out.get("skipped"), "quarantined": out.get("quarantined"),
                "newest_event": out.get("newest_event"), "definition_hash": out.get("definition_hash"),
                "definitions_changed_since": bool(current_hash and out.get("definition_hash")
                                                  and out.get("definition_hash") != current_hash),
                "files": len(run["inputs"][0].get("files", [])) if run.get("inputs") else 0,
            }
    return {
        "view": view.name,
        "feature": feature,
        "declaration": None if agg is None else {
            "function": agg.function, "column": agg.column,
            "window_seconds": agg.window.total_seconds() if agg.window else None,
        },
        "input_path": view.input_path,
        "offline_path": str(view.offline_path),
        "current_definition_hash": current_hash,
        "published_partitions": len(published),
        "partitions_without_run": unknown,
        "runs": list(by_run.values()),
        "online": online,
    }


@dataclass(frozen=True)
class RunSummary:
    """The figures of a run record that the status table and the report show."""

    rows_in: int
    published: int
    quarantined: int
    checks: int
    failed: int
    views: list[str]


def run_summary(run: dict[str, Any]) -> RunSummary:
    """Rows in, rows published, rows quarantined (at any stage), checks, failed checks and the
    views written, of one run record."""
    inputs, outputs = run.get("inputs", []), run.get("outputs", [])
    checks = run.get("checks", [])
    if run["kind"] == "materialize":
        quarantined = sum(int(i.get("quarantined", 0)) for i in inputs)
        published = sum(int(o.get("rows", 0)) for o in outputs)
    else:
        quarantined = sum(int(i.get("quarantined", 0)) for i in inputs) + sum(
            int(o.get("quarantined", 0) or 0) for o in outputs)
        published = sum(int(o.get("rows", 0) or 0) for o in outputs)
    return RunSummary(
        rows_in=sum(int(i.get("rows", 0)) for i in inputs),
        published=published,
        quarantined=quarantined,
        checks=len(checks),
        failed=sum(not c["passed"] for c in checks),
        views=[o["view"] for o in outputs if "rows" in o],
    )


def latest_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest backfill, then the latest materialisation of each view (by name)."""
    backfills = [r for r in runs if r["kind"] != "materialize"]
    latest = {}
    for run in runs:
        if run["kind"] == "materialize" and run.get("outputs"):
            latest[run["outputs"][0]["view"]] = run
    return backfills[-1:] + [latest[v] for v in sorted(latest)]


@dataclass(frozen=True)
class OnlineFreshness:
    """The newest event time a view's last successful materialisation wrote to Redis."""

    view: str
    newest: datetime
    age: timedelta
    run_id: str


def online_freshness(runs: list[dict[str, Any]], now: datetime | None = None) -> dict[str, OnlineFreshness]:
    """Per view, from its last successful materialisation that wrote something."""
    now = now or datetime.now(timezone.utc)
    out = {}
    for run in runs:
        if run["kind"] != "materialize" or run["status"] != "ok":
            continue
        for o in run.get("outputs", []):
            if o.get("newest_event"):
                newest = datetime.fromisoformat(o["newest_event"])
                out[o["view"]] = OnlineFreshness(o["view"], newest, now - newest, run["run_id"])
    return out
