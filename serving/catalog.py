"""An immutable snapshot of the registry, and the plans resolved from it: :class:`Catalog`.

A :class:`Catalog` holds the registry's feature views, on-demand feature views and
feature services as the server needs them. It turns a request's feature service name or
list of ``"view:feature"`` references into a :class:`~serving.plan.Plan` (built by
:mod:`serving.planner`) and caches the plan, so a request of a kind seen before costs one
dict lookup. A new snapshot (after ``feast apply``) starts with an empty cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from featurepipe.errors import InvalidInput, NotFound
from serving.plan import Plan
from serving.planner import plan_refs, plan_service
from serving.registry import Definitions, OnDemandDef, ServiceDef, ViewDef

MAX_CACHED_PLANS = 1024


class Catalog:
    """An immutable snapshot of the registry, and the plans resolved from it."""

    def __init__(self, definitions: Definitions) -> None:
        self.project = definitions.project
        self.views: dict[str, ViewDef] = {v.name: v for v in definitions.views}
        self.on_demand_views: dict[str, OnDemandDef] = {
            v.name: v for v in definitions.on_demand_views
        }
        self.services: dict[str, ServiceDef] = {s.name: s for s in definitions.services}
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._udfs: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def udf(self, odfv: OnDemandDef) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The on-demand view's transformation, restored once per snapshot."""
        udf = self._udfs.get(odfv.name)
        if udf is None:
            try:
                udf = self._udfs[odfv.name] = odfv.load_udf()
            except InvalidInput:
                raise
            except Exception as exc:
                raise InvalidInput(
                    f"on-demand feature view {odfv.name!r}: its transformation cannot be "
                    f"restored ({type(exc).__name__}: {exc}); re-run `featurepipe apply` with "
                    "the server's Python version"
                ) from exc
        return udf

    def describe_views(self) -> str:
        """The names of every view and on-demand view, for messages."""
        names = sorted([*self.views, *self.on_demand_views])
        return ", ".join(names) if names else "none (the registry is empty)"

    def plan_for_request(self, request: Any) -> Plan:
        """The plan of a ``GetOnlineFeaturesRequest``'s feature service or feature list."""
        kind = request.WhichOneof("kind")
        if kind == "feature_service" and request.feature_service:
            return self.plan_for_service(request.feature_service, request.full_feature_names)
        if kind == "features":
            return self.plan_for_refs(list(request.features.val), request.full_feature_names)
        raise InvalidInput(
            "the request names no features; set feature_service to a feature service name "
            "or features to a list of 'view:feature' references"
        )

    def plan_for_service(self, name: str, full_feature_names: bool) -> Plan:
        """The plan of a feature service (raises NotFound for an unknown name)."""
        key = ("service", name, full_feature_names)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        service = self.services.get(name)
        if service is None:
            known = ", ".join(sorted(self.services)) or "none (the registry has no feature services)"
            raise NotFound(
                f"feature service {name!r} not found in project {self.project!r}; known: "
                f"{known}. Run `featurepipe apply` after adding it to feature_repo/"
            )
        return self._remember(key, plan_service(self, service, full_feature_names))

    def plan_for_refs(self, refs: Sequence[str], full_feature_names: bool) -> Plan:
        """The plan of a list of ``"view:feature"`` references."""
        key = ("refs", tuple(refs), full_feature_names)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        return self._remember(key, plan_refs(self, refs, full_feature_names))

    def _remember(self, key: tuple[Any, ...], plan: Plan) -> Plan:
        with self._lock:
            if len(self._plans) >= MAX_CACHED_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan
