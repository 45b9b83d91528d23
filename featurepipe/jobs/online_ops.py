"""Disaster recovery of the online store: rebuild it from the offline store, verify it.

:func:`rebuild_online` is a materialisation over the whole range
(:func:`featurepipe.jobs.materialize.materialize`: the same engine, quality gate and run
records as ``featurepipe materialize``) into a Redis or Redis Cluster that lost its data,
followed by :func:`verify_online`. A store that still holds keys is no reason to stop: the
engine never overwrites a value with an older one, so what a rebuild finds is either
replaced by the same bytes, kept because it is newer, or left alone (keys of entities the
offline store no longer has: the verification reports them as extra).

:func:`verify_online` compares every online view with what that materialisation writes
(:func:`featurepipe.online.verify.verify_view`), reading each view with the plan the engine
runs: the view's contract row checks and its input source's exclusions, as the engine's
quality gate adds them (:meth:`~featurepipe.quality.online_gate.MaterializeGate.prepare`),
but without the gate's run record or lineage events: a verification writes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurepipe.config import online_target
from featurepipe.errors import NotFound
from featurepipe.feast.materialization_engine import (
    FeaturepipeMaterializationEngineConfig,
    unsupported_reason,
)
from featurepipe.jobs.materialize import EPOCH, MaterializeResult, materialize
from featurepipe.online.latest import DUCKDB_TYPES, RowCondition
from featurepipe.online.plan import view_plan
from featurepipe.online.verify import VerifyOptions, ViewVerification, project_keys, verify_view
from featurepipe.online.window import ViewPlan
from featurepipe.quality import checks
from featurepipe.quality.contracts import load_contracts
from featurepipe.quality.online_gate import input_exclusions

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView


@dataclass(frozen=True)
class OnlineVerification:
    """The verification of the online store: one result per view, the views not verified
    (with the reason) and the instant the offline state was taken at."""

    target: str  # the online store, as RedisTarget.describe() says it
    views: list[ViewVerification]
    skipped: dict[str, str]
    end: datetime
    seconds: float

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.views)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "ok": self.ok, "end": self.end.isoformat(), "seconds": round(self.seconds, 3),
                "views": [v.to_json() for v in self.views], "skipped": self.skipped}


@dataclass(frozen=True)
class RebuildResult:
    """A rebuild: the project's keys the store held before, the materialisation, its verification."""

    target: str
    keys_before: int
    materialized: MaterializeResult
    verification: OnlineVerification

    @property
    def entities(self) -> int:
        """Rows the materialisation sent (one per entity and view)."""
        return sum(r.entities for r in self.materialized.per_view)

    @property
    def rows_per_second(self) -> float:
        return self.entities / self.materialized.seconds if self.materialized.seconds else 0.0


def rebuild_online(store: FeatureStore, views: list[str] | None = None, *, batch_rows: int | None = None,
                   progress: bool | None = None) -> RebuildResult:
    """Repopulate the online store from the offline store (a full materialisation of
    ``views``, default every online view), then verify it. See the module documentation."""
    target = online_target(store.config)
    client = target.client(socket_timeout=300)
    try:
        before = project_keys(client, store.project)
    finally:
        client.close()
    result = materialize(store, EPOCH, datetime.now(timezone.utc), views, batch_rows=batch_rows, progress=progress)
    checked = verify_online(store, result.views, end=result.end,
                            progress=True if progress is None else progress)
    return RebuildResult(target.describe(), before, result, checked)


def verify_online(store: FeatureStore, views: list[str] | None = None, *, sample: int | None = None,
                  examples: int = 5, seed: int | None = None, end: datetime | None = None,
                  progress: bool = True) -> OnlineVerification:
    """Compare each online view (default: every one) with what a materialisation of the whole
    range up to ``end`` (default now) writes; views featurepipe's engine does not materialise
    are listed in ``skipped``. ``sample``: compare that many entities per view, at random."""
    t0 = time.perf_counter()
    end = end or datetime.now(timezone.utc)
    names = views or sorted(fv.name for fv in store.list_feature_views() if fv.online)
    settings = engine_settings(store)
    options = VerifyOptions(sample=sample, examples=examples, seed=seed, batch_rows=settings.batch_rows,
                            threads=settings.threads, progress=progress)
    target = online_target(store.config)
    registry = store.registry
    results: list[ViewVerification] = []
    skipped: dict[str, str] = {}
    client = target.client(socket_timeout=300)
    try:
        for name in names:
            view = _view(store, name)
            reason = unsupported_reason(view, store.config)
            if reason is not None:
                skipped[name] = f"not materialised by featurepipe's engine: {reason}"
                continue
            plan = engine_plan(store, view, registry, settings)
            results.append(verify_view(plan, client, EPOCH, end, options))
    finally:
        client.close()
    return OnlineVerification(target.describe(), results, skipped, end, time.perf_counter() - t0)


def engine_settings(store: FeatureStore) -> FeaturepipeMaterializationEngineConfig:
    """``batch_engine:`` of feature_store.yaml when it is featurepipe's engine, else its defaults."""
    engine = store.config.batch_engine
    return engine if isinstance(engine, FeaturepipeMaterializationEngineConfig) else \
        FeaturepipeMaterializationEngineConfig()


def engine_plan(store: FeatureStore, view: FeatureView, registry: Any,
                settings: FeaturepipeMaterializationEngineConfig) -> ViewPlan:
    """The plan featurepipe's engine materialises ``view`` with: with ``quality``, the input
    rows its source contract leaves out and the view contract's row conditions, as the
    engine's gate adds them (a rebuild and a verification then read the same rows, and the
    schedules the backfill prepared for them)."""
    plan = view_plan(view, store.config, store.project, registry)
    repo = store.config.repo_path
    if not settings.quality or repo is None:
        return plan
    if plan.kernel is not None:
        exclude = input_exclusions(store.config, view, store.project, registry, plan.kernel.path)
        plan = replace(plan, kernel=replace(plan.kernel, exclude=exclude))
    contracts = load_contracts(Path(repo))
    contract = contracts.feature_views.get(view.name)
    if contract is None:
        return plan
    features = {f.name: DUCKDB_TYPES.get(f.value_type, "") for f in plan.query.features}
    conditions = tuple(RowCondition(c.name, c.column, c.fails, c.reason, c.severity == "block")
                       for c in checks.row_checks(contract, features) if c.column in features)
    keys = [contract.column(k.name) for k in plan.query.join_keys]
    block_keys = any(spec is not None and not spec.nullable and spec.severity == "block" for spec in keys)
    return replace(plan, query=replace(plan.query, conditions=conditions), block_null_keys=block_keys)


def _view(store: FeatureStore, name: str) -> FeatureView:
    try:
        return store.get_feature_view(name)
    except Exception as exc:  # Feast's FeatureViewNotFoundException, or a registry that lost it
        known = sorted(fv.name for fv in store.list_feature_views() if fv.online)
        raise NotFound(f"no online feature view {name!r} in the registry; the online views are {known}") from exc
