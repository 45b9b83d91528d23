"""Dagster definitions of a feature repo, built from its registry and ``contracts.yaml``:
nothing is declared twice.

::

    raw/<source> ──► <view> (one asset per windowed view, daily partitions) ──► online_store
    stream (observed by the stream_health sensor)

* one asset per windowed-aggregate view, partitioned by day from the first raw event's day;
  materialising partitions runs :func:`featurepipe.jobs.backfill.backfill` over their days
  (a range of partitions is one run: ``BackfillPolicy.single_run``);
* ``online_store`` downstream of every view: :func:`featurepipe.jobs.materialize.materialize`;
* asset checks per view from ``contracts.yaml`` (:mod:`~featurepipe.orchestration.contract_checks`),
  filled from the run record of the backfill; when the quality gate blocks, the run fails
  with the gate's message, and is not retried;
* Dagster's freshness policy per view from its SLA (``freshness: max_age``);
* the daily job and its schedule (yesterday's partition, then ``online_store``);
* the ``stream_health`` sensor: each stream job's lag and whether it is alive, from its
  checkpoint manifests (:mod:`~featurepipe.orchestration.dagster_stream`);
* retries with exponential backoff when a backend is unreachable
  (:func:`~featurepipe.orchestration.failures.is_transient`); nothing else is retried.

``dagster dev -h 127.0.0.1 -m featurepipe.orchestration.dagster_defs`` loads them for the
repo that ``FEATUREPIPE_REPO`` names (see ``docs/orchestration.md``).

No ``from __future__ import annotations`` here: Dagster checks the type of a compute
function's ``context`` hint, which must then be the class, not its name.
"""

import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import duckdb
from feast import FileSource

from featurepipe.batch.backfill import input_time_range
from featurepipe.config import data_dir, find_repo, load_store, resolve_source_path
from featurepipe.core.db import connect
from featurepipe.definitions import TAG_INPUT, AggregateView, aggregate_views
from featurepipe.errors import GateBlocked, NotFound
from featurepipe.jobs.backfill import backfill
from featurepipe.jobs.materialize import materialize
from featurepipe.orchestration.contract_checks import (
    KINDS,
    CheckGroup,
    GroupOutcome,
    backfill_record,
    check_groups,
    outcomes,
    run_log_size,
    runs_since,
)
from featurepipe.orchestration.dagster_stream import GROUP, STREAM_STALE_AFTER, stream_definitions
from featurepipe.orchestration.failures import is_transient
from featurepipe.quality.contracts import Contracts, load_contracts
from featurepipe.quality.gate import STAGE_FEATURES, STAGE_RAW
from featurepipe.quality.records import RunRecord

log = logging.getLogger(__name__)

ONLINE_STORE = "online_store"
DAILY_JOB = "featurepipe_daily"
# 10 s, 20 s, 40 s: a Redis restart or failover is over by then
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL)

_T = TypeVar("_T")


def definitions(repo_path: str | Path | None = None, *, retry_policy: dg.RetryPolicy = TRANSIENT_RETRY,
                stream_stale_after: timedelta = STREAM_STALE_AFTER) -> dg.Definitions:
    """The Dagster definitions of the feature repo at ``repo_path`` (default: as every
    command finds it: ``$FEATUREPIPE_REPO``, else ``./feature_repo``).

    ``retry_policy``: how a step is retried when a backend is unreachable (other failures are
    final); ``stream_stale_after``: a stream job whose newest checkpoint is older is reported
    unhealthy (``featurepipe stream run --checkpoint-interval`` times a few).
    """
    repo = find_repo(repo_path)
    store = load_store(repo)
    views = aggregate_views(store)
    contracts = load_contracts(repo)
    inputs = _raw_inputs(store, views, contracts)
    partitions = dg.DailyPartitionsDefinition(start_date=_first_event_day(views).isoformat())
    groups = {v.name: _view_groups(v.name, inputs[v.name], contracts) for v in views}
    raw = [dg.AssetSpec(["raw", name], group_name=GROUP, kinds={"parquet"},
                        description=f"raw events of the Feast source {name!r} (read by the backfill)")
           for name in sorted(set(inputs.values()))]
    views_asset = _views_asset(repo, views, inputs, groups, contracts, partitions, retry_policy)
    online = _online_store_asset(repo, views, retry_policy)
    stream, stream_check, sensor = stream_definitions(repo, stream_stale_after)
    daily = dg.define_asset_job(DAILY_JOB, selection=dg.AssetSelection.assets(views_asset, online),
                                description="backfill one day of every view, then materialise the online store")
    schedule = dg.build_schedule_from_partitioned_job(
        daily, name=f"{DAILY_JOB}_schedule", hour_of_day=1, minute_of_hour=0,
        description="at 01:00 UTC: yesterday's partition of every view, then the online store")
    return dg.Definitions(assets=[*raw, views_asset, online, stream], asset_checks=[stream_check],
                          jobs=[daily], schedules=[schedule], sensors=[sensor])


# -- failures ----------------------------------------------------------------------------------

def _final_unless_transient(call: Callable[[], _T]) -> _T:
    """``call()``; a transient failure is raised as it is (the step's retry policy retries
    it), any other as a :class:`dagster.Failure` that is not retried."""
    try:
        return call()
    except GateBlocked:
        raise  # the caller reports the checks, then fails with the gate's own message
    except Exception as exc:
        if is_transient(exc):
            raise
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc


# -- the views ---------------------------------------------------------------------------------

def _raw_inputs(store: Any, views: Sequence[AggregateView], contracts: Contracts) -> dict[str, str]:
    """Per view, the source its raw input is checked as: the one whose contract the gate
    applies to those files (the first by name with the same path), else its own input."""
    repo = Path(store.repo_path)
    by_path: dict[str, list[str]] = {}
    for source in store.list_data_sources():
        if isinstance(source, FileSource):
            by_path.setdefault(resolve_source_path(repo, source.path), []).append(source.name)
    out = {}
    for view in views:
        checked = [n for n in sorted(by_path.get(view.input_path, [])) if n in contracts.sources]
        out[view.name] = checked[0] if checked else str(store.get_feature_view(view.name).tags[TAG_INPUT])
    return out


def _view_groups(view: str, source: str, contracts: Contracts) -> list[CheckGroup]:
    groups = []
    if source in contracts.sources:
        groups += check_groups(STAGE_RAW, contracts.sources[source])
    if view in contracts.feature_views:
        groups += check_groups(STAGE_FEATURES, contracts.feature_views[view])
    return groups


def _first_event_day(views: Sequence[AggregateView]) -> date:
    """The day of the first raw event any view reads (today when there is none yet)."""
    days = []
    read: set[tuple[str, str]] = set()
    con = connect()
    try:
        for view in views:
            if (view.input_path, view.timestamp_field) in read:
                continue  # views of one source by the same event time: read once
            read.add((view.input_path, view.timestamp_field))
            try:
                days.append(input_time_range(con, view)[0].date())
            except (NotFound, duckdb.Error) as exc:
                log.warning("no raw events for %s yet (%s); its partitions start today", view.name, exc)
    finally:
        con.close()
    return min(days, default=datetime.now(timezone.utc).date())


def _freshness(view: str, contracts: Contracts) -> dg.FreshnessPolicy | None:
    contract = contracts.feature_views.get(view)
    if contract is None or contract.freshness is None or contract.freshness.max_age < timedelta(minutes=1):
        return None
    return dg.FreshnessPolicy.time_window(fail_window=contract.freshness.max_age)


def _check_result(view: str, outcome: GroupOutcome, record: RunRecord) -> dg.AssetCheckResult:
    failed_block = any(not r.passed and r.severity == "block" for r in outcome.results)
    severe = failed_block if not outcome.passed else outcome.group.blocking
    return dg.AssetCheckResult(
        asset_key=view, check_name=outcome.group.name, passed=outcome.passed,
        severity=dg.AssetCheckSeverity.ERROR if severe else dg.AssetCheckSeverity.WARN,
        description=outcome.summary()[:2000],
        metadata={
            "featurepipe_run": record.run_id,
            "failed_rows": outcome.failed_rows,
            "checks": dg.MetadataValue.json([
                {"check": r.check, "column": r.column, "severity": r.severity, "passed": r.passed,
                 "failed_rows": r.failed_rows, "rows": r.rows, "detail": r.detail} for r in outcome.results]),
        },
    )


def _check_results(names: Sequence[str], groups: dict[str, list[CheckGroup]],
                   record: RunRecord | None) -> Iterator[dg.AssetCheckResult]:
    if record is None:
        return
    for name in names:
        for outcome in outcomes(groups[name], record.checks):
            yield _check_result(name, outcome, record)


def _views_asset(repo: Path, views: Sequence[AggregateView], inputs: dict[str, str],
                 groups: dict[str, list[CheckGroup]], contracts: Contracts,
                 partitions: dg.DailyPartitionsDefinition, retry_policy: dg.RetryPolicy) -> dg.AssetsDefinition:
    specs = [
        dg.AssetSpec(
            view.name, deps=[dg.AssetKey(["raw", inputs[view.name]])], partitions_def=partitions,
            group_name=GROUP, kinds={"duckdb", "parquet"}, freshness_policy=_freshness(view.name, contracts),
            description=f"windowed features of {', '.join(view.join_keys)} ({', '.join(view.feature_names)}), "
                        "day partitions of the offline store",
            metadata={"offline_path": dg.MetadataValue.path(str(view.offline_path))},
        ) for view in views
    ]
    check_specs = [dg.AssetCheckSpec(g.name, asset=name, description=g.description, blocking=g.blocking)
                   for name, gs in groups.items() for g in gs]

    @dg.multi_asset(name="backfill", specs=specs, check_specs=check_specs, can_subset=True,
                    backfill_policy=dg.BackfillPolicy.single_run(), retry_policy=retry_policy)
    def backfill_views(
        context: dg.AssetExecutionContext,
    ) -> Iterator[dg.MaterializeResult[None] | dg.AssetCheckResult]:
        """The selected views' day partitions, through the repo's quality gates."""
        names = sorted(key.path[-1] for key in context.selected_asset_keys)
        window = context.partition_time_window
        context.log.info(f"backfill {names} for [{window.start:%Y-%m-%d}, {window.end:%Y-%m-%d})")
        data = data_dir(repo)
        offset = run_log_size(data)
        try:
            results = _final_unless_transient(lambda: backfill(
                load_store(repo), views=names, start=window.start, end=window.end, progress=False))
        except GateBlocked as blocked:
            yield from _check_results(names, groups, backfill_record(runs_since(data, offset), names, blocked))
            raise dg.Failure(description=str(blocked), allow_retries=False, metadata={
                "stage": blocked.stage, "table": blocked.table, "failed_rows": sum(blocked.failures.values()),
                "quarantine": str(blocked.quarantine or ""),
            }) from blocked
        record = backfill_record(runs_since(data, offset), names, None)
        for result in results:
            yield dg.MaterializeResult(asset_key=result.view, metadata={
                "dagster/row_count": result.rows, "entities": result.entities,
                "partitions_published": list(result.published), "seconds": round(result.seconds, 3),
                "featurepipe_run": record.run_id if record else "",
            })
        yield from _check_results(names, groups, record)

    return backfill_views


def _online_store_asset(repo: Path, views: Sequence[AggregateView], retry_policy: dg.RetryPolicy) -> dg.AssetsDefinition:
    @dg.asset(name=ONLINE_STORE, deps=[v.name for v in views], group_name=GROUP, kinds={"redis"},
              retry_policy=retry_policy,
              description="the online store (Redis, Feast's layout): every online view's values, "
                          "materialised from the offline store and the raw events")
    def online_store(context: dg.AssetExecutionContext) -> dg.MaterializeResult[None]:
        try:
            result = _final_unless_transient(lambda: materialize(load_store(repo), progress=False))
        except GateBlocked as blocked:
            raise dg.Failure(description=str(blocked), allow_retries=False) from blocked
        per_view = [{"view": m.view, "entities": m.entities, "written": m.written, "not_newer": m.skipped,
                     "quarantined": m.quarantined, "seconds": round(m.seconds, 3)} for m in result.per_view]
        context.log.info(f"materialised {result.views} in {result.seconds:.1f} s")
        return dg.MaterializeResult(metadata={
            "views": dg.MetadataValue.json(per_view),
            "written": sum(m.written for m in result.per_view),
            "quarantined": sum(m.quarantined for m in result.per_view),
            "seconds": round(result.seconds, 3),
        })

    return online_store


# -- the graph as text ---------------------------------------------------------------------------

def asset_graph_text(defs: dg.Definitions) -> str:
    """The asset graph as text, upstream first: each asset with the assets it reads, its
    partitions, retry and freshness policies and its checks (``!``: blocking), then the
    jobs, schedules and sensors. ``docs/orchestration.md`` shows the demo repo's."""
    graph = defs.resolve_asset_graph()
    lines = []
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        parents = sorted(p.to_user_string() for p in node.parent_keys)
        lines.append(key.to_user_string() + (f"  <- {', '.join(parents)}" if parents else ""))
        notes = [] if node.is_materializable else ["external: not materialised here"]
        if node.partitions_def is not None:
            notes.append(str(node.partitions_def).rstrip(".")
                         + ("; a range of partitions is one run" if node.backfill_policy is not None else ""))
        retry = node.assets_def.op.retry_policy if node.is_materializable else None
        if retry is not None:
            backoff = retry.backoff.value.lower() if retry.backoff else "fixed"
            notes.append(f"retry: {retry.max_retries}x, {backoff} backoff from {retry.delay} s, "
                         "when a backend is unreachable")
        window = getattr(node.freshness_policy_or_from_metadata, "fail_window", None)  # a time-window policy's
        if window is not None:
            notes.append(f"freshness: materialised within {window.to_timedelta() / timedelta(hours=1):g} h")
        checks: dict[str, list[str]] = {}
        for check in node.check_keys:
            stage, _, kind = check.name.rpartition("_")
            checks.setdefault(stage, []).append(kind + ("!" if graph.get_check_spec(check).blocking else ""))
        if checks:
            order = {k: i for i, k in enumerate(KINDS)}
            notes.append("checks: " + " | ".join(
                (f"{stage}: " if stage else "") + ", ".join(sorted(kinds, key=lambda k: (order.get(k.rstrip("!"), 9), k)))
                for stage, kinds in sorted(checks.items(), key=lambda sk: (sk[0] != STAGE_RAW, sk[0]))))
        lines += [f"    {note}" for note in notes]
    for job in defs.jobs or ():
        lines.append(f"job {job.name}: {job.description or ''}")
    for schedule in defs.schedules or ():
        resolved = defs.resolve_schedule_def(schedule.name)
        lines.append(f"schedule {schedule.name}: {resolved.cron_schedule} ({resolved.execution_timezone or 'UTC'}), "
                     f"{resolved.description or ''}")
    for sensor in defs.sensors or ():
        lines.append(f"sensor {sensor.name}: {sensor.description or ''}")
    return "\n".join(lines)
