"""Resolve a feature service or a list of ``"view:feature"`` references into a :class:`Plan`.

Output order: join keys first (in order of first use), then features in the order they
were requested (a feature service's declared order, each view's features in its schema
order), with on-demand outputs at their position in that order. Views stored under the
same join keys share one Redis hash, so one HMGET per entity key reads them all.

Errors say what was asked, what exists and what to do: ``NotFound`` for names the
registry does not hold, ``InvalidInput`` for what the server cannot serve.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from featurepipe.errors import InvalidInput, NotFound
from featurepipe.online.schedule import empty_value, names_crc, schedule_field
from serving import wire
from serving.layout import ACCEPTED_KINDS, entity_key_prefix, feature_field, timestamp_field
from serving.plan import (
    FeatureOut,
    HashRead,
    JoinKey,
    OnDemandOut,
    OnDemandOutput,
    OnDemandStep,
    Output,
    Plan,
    StoredFeature,
    ViewFields,
)
from serving.registry import OnDemandDef, ServedValueType, ServiceDef, ViewDef

_TIMESTAMP = "\0ts"  # the slot of a view's event time among its feature names
_SCHEDULE = "\0sched"  # the slot of a windowed-aggregate view's schedule


class DefinitionLookup(Protocol):
    """What the planner reads of a registry snapshot (a :class:`~serving.catalog.Catalog`)."""

    @property
    def project(self) -> str:
        """The project's name."""
        ...

    @property
    def views(self) -> Mapping[str, ViewDef]:
        """Feature views (batch and stream) by name."""
        ...

    @property
    def on_demand_views(self) -> Mapping[str, OnDemandDef]:
        """On-demand feature views by name."""
        ...

    def udf(self, odfv: OnDemandDef) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The on-demand view's restored transformation."""
        ...

    def describe_views(self) -> str:
        """The known view names, for messages."""
        ...


def plan_service(lookup: DefinitionLookup, service: ServiceDef, full_feature_names: bool) -> Plan:
    """The plan of a feature service, its features in the service's declared order."""
    builder = _PlanBuilder(lookup, full_feature_names)
    for projection in service.projections:
        if projection.version_tag is not None:
            raise InvalidInput(
                f"feature service {service.name!r} pins {projection.name}@v{projection.version_tag}; "
                "featurepipe serve does not read versioned feature views"
            )
        for feature in projection.features:
            builder.add(
                projection.name, projection.name_to_use(), feature, dict(projection.join_key_map)
            )
    return builder.build()


def plan_refs(lookup: DefinitionLookup, refs: Sequence[str], full_feature_names: bool) -> Plan:
    """The plan of a list of ``"view:feature"`` references, in their order."""
    if not refs:
        raise InvalidInput(
            "no features requested; set feature_service or list features as 'view:feature'"
        )
    builder = _PlanBuilder(lookup, full_feature_names)
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
    return builder.build()


@dataclass
class _StepDraft:
    """An on-demand step while the plan grows: its view, inputs and outputs so far."""

    odfv: OnDemandDef
    inputs: list[int]
    request_fields: list[str]
    outputs: list[OnDemandOutput] = field(default_factory=list)


@dataclass
class _HashDraft:
    """A hash while the plan grows: its join keys, fields and the views it holds."""

    join_keys: tuple[JoinKey, ...]
    fields: dict[tuple[str, str], int] = field(default_factory=dict)  # (view, feature) -> slot
    views: dict[str, tuple[ViewDef, list[int]]] = field(default_factory=dict)  # [ts, features]

    def slot(self, view: str, feature: str) -> int:
        """The field index of ``view``'s ``feature`` (or its timestamp), added if new."""
        return self.fields.setdefault((view, feature), len(self.fields))


@dataclass
class _PlanBuilder:
    """Accumulates a plan from requested (source, alias, feature, join_key_map) items."""

    lookup: DefinitionLookup
    full_feature_names: bool
    entity_columns: dict[str, JoinKey] = field(default_factory=dict)
    hash_index: dict[tuple[tuple[str, str], ...], int] = field(default_factory=dict)
    hashes: list[_HashDraft] = field(default_factory=list)
    features: list[StoredFeature] = field(default_factory=list)
    feature_index: dict[tuple[str, str, int], int] = field(default_factory=dict)
    steps: dict[str, _StepDraft] = field(default_factory=dict)  # by the name used in the request
    request_fields: dict[str, ServedValueType] = field(default_factory=dict)
    output: list[Output] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def _output_name(self, prefix: str, feature: str) -> str:
        return f"{prefix}__{feature}" if self.full_feature_names else feature

    def _hash_for(self, view: ViewDef, join_key_map: dict[str, str]) -> int:
        join_keys = tuple(sorted(
            (JoinKey(column=join_key_map.get(col.name, col.name), key=col.name,
                     value_type=col.value_type)
             for col in view.entity_columns),
            key=lambda jk: jk.key,
        ))
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
        index = self.hash_index.get(signature)
        if index is None:
            index = self.hash_index[signature] = len(self.hashes)
            self.hashes.append(_HashDraft(join_keys))
        return index

    def _stored_feature(self, view: ViewDef, feature: str, join_key_map: dict[str, str]) -> int:
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
        draft = self.hashes[h]
        ts = draft.slot(view.name, _TIMESTAMP)
        if view.windowed:
            draft.slot(view.name, _SCHEDULE)
        f = draft.slot(view.name, feature)
        draft.views.setdefault(view.name, (view, [ts]))[1].append(f)
        self.features.append(StoredFeature(
            input_name=f"{view.name}__{feature}", feature=feature, hash_index=h, field_index=f,
        ))
        self.feature_index[key] = len(self.features) - 1
        return len(self.features) - 1

    def add(self, source: str, prefix: str, feature: str, join_key_map: dict[str, str]) -> None:
        """Request one feature (of a stored view or an on-demand view) for the output."""
        view = self.lookup.views.get(source)
        if view is not None:
            index = self._stored_feature(view, feature, join_key_map)
            self.output.append(FeatureOut(index))
            self.output_names.append(self._output_name(prefix, feature))
            return
        odfv = self.lookup.on_demand_views.get(source)
        if odfv is None:
            raise NotFound(
                f"no feature view or on-demand feature view named {source!r} in project "
                f"{self.lookup.project!r}; known: {self.lookup.describe_views()}. "
                "Run `featurepipe apply` after adding it to feature_repo/"
            )
        step_index = self._on_demand_step(odfv, prefix)
        outputs = self.steps[prefix].outputs
        schema = {f.name: f.value_type for f in odfv.features}
        if feature not in schema:
            raise NotFound(
                f"on-demand feature view {odfv.name!r} has no feature {feature!r}; "
                f"it has: {', '.join(schema)}"
            )
        outputs.append(OnDemandOutput(self._output_name(prefix, feature), feature, schema[feature]))
        self.output.append(OnDemandOut(step_index, len(outputs) - 1))
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
            view = self.lookup.views.get(projection.name)
            if view is None:
                raise NotFound(
                    f"on-demand feature view {odfv.name!r} reads feature view "
                    f"{projection.name!r}, which is not in the registry; run `featurepipe apply`"
                )
            for feature in projection.features:
                inputs.append(self._stored_feature(view, feature, dict(projection.join_key_map)))
        request = {f.name: f.value_type for f in odfv.request_schema}
        for name, value_type in request.items():
            self.request_fields.setdefault(name, value_type)
        self.steps[prefix] = _StepDraft(odfv, inputs, list(request))
        return len(self.steps) - 1

    def build(self) -> Plan:
        """The finished plan; raises InvalidInput when two columns would share a name."""
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
        return Plan(
            entity_columns=tuple(self.entity_columns.values()),
            hashes=tuple(self._hash_read(draft) for draft in self.hashes),
            features=tuple(self.features),
            on_demand=tuple(
                OnDemandStep(
                    name=step.odfv.name,
                    udf=self.lookup.udf(step.odfv),
                    singleton=step.odfv.singleton,
                    inputs=tuple(step.inputs),
                    request_fields=tuple(step.request_fields),
                    outputs=tuple(step.outputs),
                )
                for step in self.steps.values()
            ),
            request_fields=dict(self.request_fields),
            output=tuple(self.output),
            output_names=tuple(self.output_names),
            response_metadata=wire.metadata([*self.entity_columns, *self.output_names]),
        )

    def _hash_read(self, draft: _HashDraft) -> HashRead:
        names: list[bytes] = [b""] * len(draft.fields)
        for (view, feature), i in draft.fields.items():
            names[i] = (timestamp_field(view) if feature == _TIMESTAMP else schedule_field(view)
                        if feature == _SCHEDULE else feature_field(view, feature))
        return HashRead(
            join_keys=draft.join_keys,
            key_prefix=entity_key_prefix([jk.key for jk in draft.join_keys]),
            key_suffix=self.lookup.project.encode("utf8"),
            fields=tuple(names),
            hmget_head=b"*%d\r\n$5\r\nHMGET\r\n" % (2 + len(names)),
            hmget_fields=b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in names),
            views=tuple(_view_fields(draft, view, slots) for view, slots in draft.views.values()),
        )


def _view_fields(draft: _HashDraft, view: ViewDef, slots: list[int]) -> ViewFields:
    """Where one view's timestamp, features (and schedule) sit among a hash's fields."""
    if not view.windowed:
        return ViewFields(view.name, view.ttl_seconds, slots[0], tuple(slots[1:]))
    names = [f.name for f in view.features]
    slot_of = {i: feature for (v, feature), i in draft.fields.items() if v == view.name}
    columns = tuple(names.index(slot_of[i]) for i in slots[1:])
    return ViewFields(
        view.name, view.ttl_seconds, slots[0], tuple(slots[1:]),
        schedule_field=draft.fields[(view.name, _SCHEDULE)],
        names_crc=names_crc(names),
        columns=columns,
        empty=tuple(_empty_value_bytes(view.functions[c]) for c in columns),
    )


def _empty_value_bytes(function: str) -> bytes:
    """The serialized Value of an aggregate over an empty window (:func:`empty_value`):
    int64_val 0 for a count, double_val 0.0 for a sum, the empty (null) Value otherwise."""
    value = empty_value(function)
    if value is None:
        return b""
    return b"\x20\x00" if isinstance(value, int) else b"\x29" + struct.pack("<d", value)
