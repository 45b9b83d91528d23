"""Freshness per feature view and lineage of feature values, from the tables and the run log."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from featurepipe.core.db import connect, one_row
from featurepipe.core.sql import literal
from featurepipe.definitions import AggregateView
from featurepipe.errors import NotFound
from featurepipe.quality.contracts import Contracts
from featurepipe.quality.records import (
    KIND_BACKFILL,
    KIND_MATERIALIZE,
    KIND_STREAM,
    RunOutput,
    RunRecord,
)
from featurepipe.quality.runlog import read_runs


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


    now = now or datetime.now(timezone.utc)
    con = connect()
    out = []
    for view in views:
        newest = None
        if any(Path(view.offline_path).glob("date=*/*.parquet")):
            newest = one_row(
                con, f"SELECT max(event_timestamp) FROM read_parquet({literal(str(view.offline_path / '**' / '*.parquet'))})"
            )[0]
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
    all_runs = read_runs(data)
    writer: dict[str, tuple[RunRecord, RunOutput]] = {}
    for run in all_runs:  # oldest first: later runs overwrite
        out = run.output(view.name)
        if run.ok and run.kind == KIND_BACKFILL and out is not None:
            for part in out.partitions:
                writer[part] = (run, out)
    by_run: dict[str, dict[str, Any]] = {}
    unknown = [p for p in published if p not in writer]
    for part in published:
        if part not in writer:
            continue
        run, out = writer[part]
        entry = by_run.get(run.run_id)
        if entry is None:
            entry = by_run[run.run_id] = {
                "run_id": run.run_id, "finished": run.finished, "kind": run.kind,
                "definition_hash": out.definition_hash,
                "definitions_hash": run.definitions_hash,
                "definitions_changed_since": _changed(out.definition_hash, current_hash),
                "code_version": dict(run.code_version),
                "inputs": [asdict(i) for i in run.inputs if i.path == out.input_path],
                "rows_written": out.rows, "rows_quarantined": out.quarantined, "partitions": [],
            }
        entry["partitions"].append(part)
    agg = next((a for a in view.aggregations if a.name == feature), None)
    online = None
    for run in all_runs:  # the last successful materialisation of the view
        out = run.output(view.name)
        if run.kind == KIND_MATERIALIZE and run.ok and out is not None:
            online = {
                "run_id": run.run_id, "finished": run.finished, "window": run.window,
                "online_store": out.path, "written": out.written, "not_newer": out.skipped,
                "quarantined": out.quarantined, "newest_event": out.newest_event,
                "definition_hash": out.definition_hash,
                "definitions_changed_since": _changed(out.definition_hash, current_hash),
                "files": sum(len(i.files) for i in run.inputs),
            }
    stream = None
    for run in all_runs:  # the last stream checkpoint that wrote the view
        out = run.output(view.name)
        if run.kind == KIND_STREAM and run.ok and out is not None and run.stream is not None:
            stream = {"run_id": run.run_id, "finished": run.finished, "job": run.stream.job,
                      "worker": run.stream.worker, "source": run.stream.source,
                      "watermark": run.stream.watermark, "offline_rows": out.rows}
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
        "stream": stream,
    }


def _changed(written: str | None, current: str | None) -> bool:
    return bool(current and written and written != current)


@dataclass(frozen=True)
class RunSummary:
    """The figures of a run record that the status table and the report show."""

    rows_in: int
    published: int
    quarantined: int
    checks: int
    failed: int
    views: list[str]


def run_summary(run: RunRecord) -> RunSummary:
    """Rows in, rows published, rows quarantined (at any stage), checks, failed checks and the
    views written, of one run record."""
    quarantined = sum(i.quarantined for i in run.inputs)
    if run.kind == KIND_BACKFILL:  # feature rows quarantined after the transformation too
        quarantined += sum(o.quarantined for o in run.outputs)
    return RunSummary(
        rows_in=sum(i.rows for i in run.inputs),
        published=sum(o.rows for o in run.outputs),
        quarantined=quarantined,
        checks=len(run.checks),
        failed=sum(not c.passed for c in run.checks),
        views=[o.view for o in run.outputs if o.rows or o.partitions or o.written or o.skipped],
    )


def latest_runs(runs: list[RunRecord]) -> list[RunRecord]:
    """The latest backfill, then the latest materialisation of each view (by name)."""
    backfills = [r for r in runs if r.kind == KIND_BACKFILL]
    latest = {}
    for run in runs:
        if run.kind == KIND_MATERIALIZE and run.outputs:
            latest[run.outputs[0].view] = run
    return backfills[-1:] + [latest[v] for v in sorted(latest)]


@dataclass(frozen=True)
class OnlineFreshness:
    """The newest event time a view's last successful materialisation wrote to Redis."""

    view: str
    newest: datetime
    age: timedelta
    run_id: str


def online_freshness(runs: list[RunRecord], now: datetime | None = None) -> dict[str, OnlineFreshness]:
    """Per view, from its last successful materialisation that wrote something."""
    now = now or datetime.now(timezone.utc)
    out = {}
    for run in runs:
        if run.kind != KIND_MATERIALIZE or not run.ok:
            continue
        for o in run.outputs:
            if o.newest_event:
                newest = datetime.fromisoformat(o.newest_event)
                out[o.view] = OnlineFreshness(o.view, newest, now - newest, run.run_id)
    return out
