"""What a request needs, resolved once from the registry: :class:`Catalog` and :class:`Plan`.

A :class:`Catalog` is an immutable snapshot of the registry's feature views, on-demand
feature views and feature services. It turns a feature service name or a list of
``"view:feature"`` references into a :class:`Plan`: the join keys to read from the
request, the Redis hashes and fields to fetch, the columns to return in order, and the
on-demand transformations to run. Plans are cached per snapshot; a new snapshot (after
``feast apply``) starts with an empty cache.

Output order: join keys first (in order of first use), then features in the order they
were requested (a feature service's declared order, each view's features in its schema
order), with on-demand outputs at their position in that order.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from featurepipe.errors import InvalidInput, NotFound
from serving import wire
from serving.layout import ACCEPTED_KINDS, entity_key_prefix, feature_field, timestamp_field
from serving.registry import Definitions, OnDemandDef, ServiceDef, ValueType, ViewDef

MAX_CACHED_PLANS = 1024


@dataclass(frozen=True)
class JoinKey:
    """A join key as the request names it (``column``) and as Redis keys it (``key``)."""

    column: str
    key: str
    value_type: ValueType


@dataclass(frozen=True)
class ViewFields:
    """One view's fields inside a hash: where its timestamp and features sit."""

    view: str
    ttl_seconds: float  # 0: values never go stale
    ts_field: int
    feature_fields: tuple[int, ...]


@dataclass(frozen=True)
class HashRead:
    """One HMGET per distinct entity key: every view stored under the same join keys."""

    join_keys: tuple[JoinKey, ...]  # sorted by key, the order Feast serializes them in
    key_prefix: bytes  # key count and names; the values follow, then key_suffix
    key_suffix: bytes  # the project name
    fields: tuple[bytes, ...]
    views: tuple[ViewFields, ...]
    hmget_head: bytes = b""  # RESP of "HMGET" with its argument count: the key follows
    hmget_fields: bytes = b""  # RESP of the fields, after the key


@dataclass(frozen=True)
class FeatureColumn:
    """A stored feature: where to find it and what to call it."""

    input_name: str  # "<view>__<feature>": an on-demand UDF sees this name and the feature's
    feature: str
    hash_index: int
    field_index: int


@dataclass(frozen=True)
class OdfvOutput:
    name: str  # output name
    feature: str  # name the UDF returns
    value_type: ValueType


@dataclass(frozen=True)
class OnDemandStep:
    """A python-mode on-demand feature view to run on the fetched features."""

    name: str
    udf: Any  # the UDF: dict of lists in, dict of lists out (one row each when singleton)
    singleton: bool
    inputs: tuple[int, ...]  # indexes into Plan.features
    request_fields: tuple[str, ...]
    outputs: tuple[OdfvOutput, ...]


@dataclass(frozen=True)
class Plan:
    """Everything needed to answer one kind of request, in response order."""

    entity_columns: tuple[JoinKey, ...]
    hashes: tuple[HashRead, ...]
    features: tuple[FeatureColumn, ...]
    on_demand: tuple[OnDemandStep, ...]
    request_fields: dict[str, ValueType]
    # ("feature", i) -> features[i]; ("odfv", i, j) -> on_demand[i].outputs[j]
    output: tuple[tuple[int, ...], ...]
    output_names: tuple[str, ...]
    response_metadata: bytes  # serialized feature names (join keys, then output_names)


OUT_FEATURE, OUT_ODFV = 0, 1


@dataclass
class _PlanBuilder:
    """Accumulates a plan from requested (source, alias, feature, join_key_map) items."""

    catalog: Catalog
    full_feature_names: bool
    entity_columns: dict[str, JoinKey] = field(default_factory=dict)
    hash_keys: dict[tuple[tuple[str, str], ...], int] = field(default_factory=dict)
    hash_join_keys: list[tuple[JoinKey, ...]] = field(default_factory=list)
    hash_fields: list[dict[tuple[str, str], int]] = field(default_factory=list)
    hash_views: list[dict[str, tuple[float, list[int]]]] = field(default_factory=list)
    features: list[FeatureColumn] = field(default_factory=list)
    feature_index: dict[tuple[str, str, int], int] = field(default_factory=dict)
    steps: dict[str, tuple[OnDemandDef, list[int], list[str], list[OdfvOutput]]] = field(default_factory=dict)
    request_fields: dict[str, ValueType] = field(default_factory=dict)
    output: list[tuple[int, ...]] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def _output_name(self, prefix: str, feature: str) -> str:
        return f"{prefix}__{feature}" if self.full_feature_names else feature

    def _hash_for(self, view: ViewDef, join_key_map: dict[str, str]) -> int:
        join_keys = tuple(
            sorted(
                (
                    JoinKey(
                        column=join_key_map.get(col.name, col.name),
                        key=col.name,
                        value_type=col.value_type,
                    )
                    for col in view.entity_columns
                ),
                key=lambda jk: jk.key,
            )
        )
        if not join_keys:
            raise InvalidInput(
                f"feature view {view.name!r} has no entities; featurepipe serve reads "
                "entity-keyed views only"
            )
        for jk in join_keys:
            if jk.value_type not in ACCEPTED_KINDS:
                raise InvalidInput(
                    f"join key {jk.key!r} of feature view {view.name!r} has type "
                    f"{jk.value_type.name}, which Feast cannot use in an entity key"
                )
            known = self.entity_columns.get(jk.column)
            if known is None:
                self.entity_columns[jk.column] = jk
            elif known.value_type != jk.value_type:
                raise InvalidInput(
                    f"join key column {jk.column!r} is {known.value_type.name} in one view and "
                    f"{jk.value_type.name} in {view.name!r}; request them in separate calls"
                )
        signature = tuple((jk.key, jk.column) for jk in join_keys)
        index = self.hash_keys.get(signature)
        if index is None:
            index = len(self.hash_join_keys)
            self.hash_keys[signature] = index
            self.hash_join_keys.append(join_keys)
            self.hash_fields.append({})
            self.hash_views.append({})
        return index

    def _field(self, hash_index: int, view: str, feature: str | None) -> int:
        fields = self.hash_fields[hash_index]
        slot = (view, feature if feature is not None else "\0ts")
        if slot not in fields:
            fields[slot] = len(fields)
        return fields[slot]

    def stored_feature(
        self, view: ViewDef, prefix: str, feature: str, join_key_map: dict[str, str]
    ) -> int:
        """Index in ``features`` of a stored feature, reading it if not read yet."""
        if feature not in {f.name for f in view.features}:
            known = ", ".join(f.name for f in view.features)
            raise NotFound(
                f"feature view {view.name!r} has no feature {feature!r}; it has: {known}"
            )
        h = self._hash_for(view, join_key_map)
        key = (view.name, feature, h)
        if key in self.feature_index:
            return self.feature_index[key]
        ts = self._field(h, view.name, None)
        f = self._field(h, view.name, feature)
        ttl = view.ttl_seconds
        self.hash_views[h].setdefault(view.name, (ttl, [ts]))[1].append(f)
        self.features.append(
            FeatureColumn(
                input_name=f"{view.name}__{feature}",
                feature=feature,
                hash_index=h,
                field_index=f,
            )
        )
        self.feature_index[key] = len(self.features) - 1
        return len(self.features) - 1

    def add(self, source: str, prefix: str, feature: str, join_key_map: dict[str, str]) -> None:
        """Request one feature (of a stored view or an on-demand view) for the output."""
        view = self.catalog.views.get(source)
        if view is not None:
            index = self.stored_feature(view, prefix, feature, join_key_map)
            self.output.append((OUT_FEATURE, index))
            self.output_names.append(self._output_name(prefix, feature))
            return
        odfv = self.catalog.on_demand_views.get(source)
        if odfv is None:
            raise NotFound(
                f"no feature view or on-demand feature view named {source!r} in project "
                f"{self.catalog.project!r}; known: {self.catalog.describe_views()}. "
                "Run `featurepipe apply` after adding it to feature_repo/"
            )
        step_index = self._on_demand_step(odfv, prefix)
        _, _, _, outputs = self.steps[prefix]
        schema = {f.name: f.value_type for f in odfv.features}
        if feature not in schema:
            raise NotFound(
                f"on-demand feature view {odfv.name!r} has no feature {feature!r}; "
                f"it has: {', '.join(schema)}"
            )
        outputs.append(OdfvOutput(self._output_name(prefix, feature), feature, schema[feature]))
        self.output.append((OUT_ODFV, step_index, len(outputs) - 1))
        self.output_names.append(self._output_name(prefix, feature))

    def _on_demand_step(self, odfv: OnDemandDef, prefix: str) -> int:
        if prefix in self.steps:
            return list(self.steps).index(prefix)
        if odfv.mode != "python" or odfv.write_to_online_store or odfv.has_aggregations:
            raise InvalidInput(
                f"on-demand feature view {odfv.name!r} (mode={odfv.mode!r}, "
                f"write_to_online_store={odfv.write_to_online_store}) cannot be served: "
                "featurepipe serve computes python-mode, request-time on-demand views; "
                "declare it with mode='python'"
            )
        inputs: list[int] = []
        for projection in odfv.sources:
            view = self.catalog.views.get(projection.name)
            if view is None:
                raise NotFound(
                    f"on-demand feature view {odfv.name!r} reads feature view "
                    f"{projection.name!r}, which is not in the registry; run `featurepipe apply`"
                )
            for feature in projection.features:
                inputs.append(
                    self.stored_feature(
                        view, projection.name_to_use(), feature, dict(projection.join_key_map)
                    )
                )
        request = {f.name: f.value_type for f in odfv.request_schema}
        for name, value_type in request.items():
            self.request_fields.setdefault(name, value_type)
        self.steps[prefix] = (odfv, inputs, list(request), [])
        return len(self.steps) - 1

    def build(self) -> Plan:
        seen: dict[str, int] = {}
        for name in self.output_names:
            seen[name] = seen.get(name, 0) + 1
        clashes = sorted(n for n, c in seen.items() if c > 1)
        if clashes:
            hint = (
                "list each feature once"
                if self.full_feature_names
                else "set full_feature_names=true to name them <view>__<feature>, or list each once"
            )
            raise InvalidInput(f"feature names {clashes} are requested more than once; {hint}")
        hashes = []
        for join_keys, fields, views in zip(
            self.hash_join_keys, self.hash_fields, self.hash_views, strict=True
        ):
            names: list[bytes] = [b""] * len(fields)
            for (view, feature), i in fields.items():
                names[i] = timestamp_field(view) if feature == "\0ts" else feature_field(view, feature)
            hashes.append(
                HashRead(
                    join_keys=join_keys,
                    key_prefix=entity_key_prefix([jk.key for jk in join_keys]),
                    key_suffix=self.catalog.project.encode("utf8"),
                    fields=tuple(names),
                    hmget_head=b"*%d\r\n$5\r\nHMGET\r\n" % (2 + len(names)),
                    hmget_fields=b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in names),
                    views=tuple(
                        ViewFields(view, ttl, idx[0], tuple(idx[1:]))
                        for view, (ttl, idx) in views.items()
                    ),
                )
            )
        return Plan(
            entity_columns=tuple(self.entity_columns.values()),
            hashes=tuple(hashes),
            features=tuple(self.features),
            on_demand=tuple(
                OnDemandStep(
                    name=odfv.name,
                    udf=self.catalog.udf(odfv),
                    singleton=odfv.singleton,
                    inputs=tuple(inputs),
                    request_fields=tuple(request),
                    outputs=tuple(outputs),
                )
                for odfv, inputs, request, outputs in self.steps.values()
            ),
            request_fields=dict(self.request_fields),
            output=tuple(self.output),
            output_names=tuple(self.output_names),
            response_metadata=wire.metadata([*self.entity_columns, *self.output_names]),
        )


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
        self._udfs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def udf(self, odfv: OnDemandDef) -> Any:
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
        names = sorted([*self.views, *self.on_demand_views])
        return ", ".join(names) if names else "none (the registry is empty)"

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
        builder = _PlanBuilder(self, full_feature_names)
        for projection in service.projections:
            if projection.version_tag is not None:
                raise InvalidInput(
                    f"feature service {name!r} pins {projection.name}@v{projection.version_tag}; "
                    "featurepipe serve does not read versioned feature views"
                )
            for feature in projection.features:
                builder.add(
                    projection.name, projection.name_to_use(), feature,
                    dict(projection.join_key_map),
                )
        return self._remember(key, builder.build())

    def plan_for_refs(self, refs: Sequence[str], full_feature_names: bool) -> Plan:
        """The plan of a list of ``"view:feature"`` references."""
        key = ("refs", tuple(refs), full_feature_names)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if not refs:
            raise InvalidInput(
                "no features requested; set feature_service or list features as 'view:feature'"
            )
        builder = _PlanBuilder(self, full_feature_names)
        for ref in refs:
            view, sep, feature = ref.partition(":")
            if not sep or not view or not feature or ":" in feature:
                raise InvalidInput(
                    f"feature reference {ref!r} is malformed; write it as 'view:feature', "
                    "e.g. 'user_transaction_stats:amount_sum_24h'"
                )
            if "@" in view:
                raise InvalidInput(
                    f"feature reference {ref!r} names a version; featurepipe serve reads the "
                    "current version only: drop the '@v...' part"
                )
            builder.add(view, view, feature, {})
        return self._remember(key, builder.build())

    def _remember(self, key: tuple[Any, ...], plan: Plan) -> Plan:
        with self._lock:
            if len(self._plans) >= MAX_CACHED_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan
