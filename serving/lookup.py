"""Answer one GetOnlineFeatures request from Redis, in Feast's layout and response shape.

One pipelined round trip per request: an HMGET per distinct entity key of each hash the
plan reads (views with the same join keys share one hash). The stored Value and Timestamp
bytes are copied into the serialized response (see :mod:`serving.wire`); only the inputs
of on-demand views are parsed. Nothing goes through pandas.

Field statuses: NOT_FOUND when the hash or the field is missing (the value is empty),
NULL_VALUE when the stored value is null, OUTSIDE_MAX_AGE when the view has a TTL and the
row's event time is older than now - ttl (the value is still returned), else PRESENT.
On-demand outputs are PRESENT, or NULL_VALUE when the transformation returned None; like
Feast, they carry an empty event timestamp.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
from google.protobuf.timestamp_pb2 import Timestamp

from featurepipe.errors import BackendUnavailable, FeaturepipeError, InvalidInput
from serving import wire
from serving.catalog import OUT_FEATURE, OnDemandStep, Plan
from serving.layout import encode_entity_value
from serving.protos import FIELD_STATUS, Value
from serving.registry import ValueType
from serving.values import from_value, proto_values

RepeatedValue = Any  # serving.protos.RepeatedValue messages
PRESENT = FIELD_STATUS["PRESENT"]
NULL_VALUE = FIELD_STATUS["NULL_VALUE"]
NOT_FOUND = FIELD_STATUS["NOT_FOUND"]
OUTSIDE_MAX_AGE = FIELD_STATUS["OUTSIDE_MAX_AGE"]
_NULL_VAL = Value(null_val=0).SerializeToString()  # an explicit null, as Feast may store it

_NUMERIC = ("int64_val", "int32_val", "double_val", "float_val")
# Value fields accepted for a request-context field of each type (unlisted types: any).
REQUEST_KINDS: dict[Any, tuple[str, ...]] = {
    ValueType.DOUBLE: _NUMERIC,
    ValueType.FLOAT: _NUMERIC,
    ValueType.INT64: ("int64_val", "int32_val"),
    ValueType.INT32: ("int32_val", "int64_val"),
    ValueType.STRING: ("string_val",),
    ValueType.BYTES: ("bytes_val",),
    ValueType.BOOL: ("bool_val",),
    ValueType.UNIX_TIMESTAMP: ("unix_timestamp_val", "int64_val"),
}

Cell = tuple[bytes, int, bytes]  # serialized Value, FieldStatus, serialized Timestamp
_MISSING: Cell = (b"", NOT_FOUND, b"")

_PLAIN_KINDS = frozenset(
    ("int64_val", "int32_val", "double_val", "float_val", "string_val", "bool_val", "bytes_val")
)


def to_python(value: Any) -> Any:
    """The Python value of a Value, as Feast's ``feast_value_type_to_python_type`` gives it."""
    kind = value.WhichOneof("val")
    if kind in _PLAIN_KINDS:
        return getattr(value, kind)
    return from_value(value)


class OnlineReader:
    """Reads the features of a :class:`~serving.catalog.Plan` for a batch of entity rows."""

    def __init__(
        self,
        client: redis.Redis,
        max_rows: int = 1000,
        on_fetch: Callable[[float], None] | None = None,
    ) -> None:
        self.client = client
        self.max_rows = max_rows
        self.on_fetch = on_fetch  # receives the seconds of each Redis round trip

    def ping(self) -> bool:
        """True when Redis answers a PING."""
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def read(
        self,
        plan: Plan,
        entities: Mapping[str, RepeatedValue],
        request_context: Mapping[str, RepeatedValue],
    ) -> tuple[bytes, int]:
        """The serialized GetOnlineFeaturesResponse for ``entities`` under ``plan``, and
        its number of entity rows."""
        n = self._row_count(plan, entities, request_context)
        request = self._request_values(plan, entities, request_context, n)
        encoded = {
            jk.column: [
                encode_entity_value(v, jk.value_type, jk.column, i)
                for i, v in enumerate(entities[jk.column].val)
            ]
            for jk in plan.entity_columns
        }
        row_slots, keys = [], []
        for h in plan.hashes:
            slots: dict[bytes, int] = {}
            rows = []
            columns = [encoded[jk.column] for jk in h.join_keys]
            for i in range(n):
                key = b"".join([h.key_prefix, *(col[i] for col in columns), h.key_suffix])
                rows.append(slots.setdefault(key, len(slots)))
            row_slots.append(rows)
            keys.append(list(slots))
        replies = self._fetch(plan, keys)
        cells = self._decode(plan, keys, replies)

        def column(index: int) -> list[Cell]:
            fc = plan.features[index]
            slot_cells = cells[fc.hash_index]
            return [slot_cells[s][fc.field_index] for s in row_slots[fc.hash_index]]

        computed = [
            self._run_on_demand(plan, step, column, entities, request, n) for step in plan.on_demand
        ]
        parts = [plan.response_metadata]
        present, no_times = [PRESENT] * n, [b""] * n
        for jk in plan.entity_columns:
            values = [v.SerializeToString() for v in entities[jk.column].val]
            parts.append(wire.feature_vector(values, present, no_times))
        for out in plan.output:
            col = column(out[1]) if out[0] == OUT_FEATURE else computed[out[1]][out[2]]
            parts.append(
                wire.feature_vector([c[0] for c in col], [c[1] for c in col], [c[2] for c in col])
            )
        return b"".join(parts), n

    def _row_count(
        self,
        plan: Plan,
        entities: Mapping[str, RepeatedValue],
        request_context: Mapping[str, RepeatedValue],
    ) -> int:
        lengths = {name: len(col.val) for name, col in entities.items()}
        if len(set(lengths.values())) > 1:
            raise InvalidInput(
                f"entity columns have different lengths {lengths}; send one value per row in "
                "every column"
            )
        expected = [jk.column for jk in plan.entity_columns]
        missing = [c for c in expected if c not in entities]
        if missing:
            raise InvalidInput(
                f"entities lack join key(s) {missing}; this request needs {expected} "
                f"(got {sorted(entities) or 'none'})"
            )
        if lengths:
            n = next(iter(lengths.values()))
        else:
            n = max((len(col.val) for col in request_context.values()), default=0)
        if n == 0:
            what = f"join keys {expected}" if expected else "request_context fields"
            raise InvalidInput(f"the request has no rows; send at least one value for {what}")
        if n > self.max_rows:
            raise InvalidInput(
                f"{n} entity rows exceed this server's limit of {self.max_rows}; split the "
                f"request into batches of at most {self.max_rows} rows"
            )
        return n

    def _request_values(
        self,
        plan: Plan,
        entities: Mapping[str, RepeatedValue],
        request_context: Mapping[str, RepeatedValue],
        n: int,
    ) -> dict[str, list[Any]]:
        """Python values of the request fields the on-demand views need."""
        values: dict[str, list[Any]] = {}
        for name, value_type in plan.request_fields.items():
            col = request_context.get(name)
            if col is None:
                col = entities.get(name)  # Feast's SDK passes request data with the entities
            if col is None:
                needers = [s.name for s in plan.on_demand if name in s.request_fields]
                raise InvalidInput(
                    f"request_context lacks {name!r}, needed by on-demand feature view(s) "
                    f"{needers}; pass request_context={{{name!r}: [...]}} with one value per row"
                )
            if len(col.val) != n:
                raise InvalidInput(
                    f"request_context[{name!r}] has {len(col.val)} values for {n} entity rows; "
                    "send one value per row"
                )
            kinds = REQUEST_KINDS.get(value_type)
            for i, v in enumerate(col.val):
                kind = v.WhichOneof("val")
                if kinds and kind is not None and kind != "null_val" and kind not in kinds:
                    raise InvalidInput(
                        f"request_context[{name!r}][{i}] is {kind}, but {name!r} is "
                        f"{value_type.name}: send it as {kinds[0]}"
                    )
            values[name] = [to_python(v) for v in col.val]
        return values

    def _fetch(self, plan: Plan, keys: list[list[bytes]]) -> list[list[bytes | None]]:
        started = time.perf_counter()
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for h, hash_keys in zip(plan.hashes, keys, strict=True):
                    for key in hash_keys:
                        pipe.hmget(key, h.fields)  # type: ignore[arg-type]  # bytes are fine
                replies = pipe.execute()
            if self.on_fetch is not None:
                self.on_fetch(time.perf_counter() - started)
            return replies  # type: ignore[no-any-return]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            kwargs = self.client.connection_pool.connection_kwargs
            where = f"{kwargs.get('host')}:{kwargs.get('port')}"
            raise BackendUnavailable(
                f"Redis at {where} did not answer ({type(exc).__name__}: {exc}); retry shortly, "
                "and check that redis-server is up and REDIS_URL points at it"
            ) from exc
        except redis.RedisError as exc:
            raise FeaturepipeError(f"Redis refused the read: {exc}") from exc

    @staticmethod
    def _decode(
        plan: Plan, keys: list[list[bytes]], replies: list[list[bytes | None]]
    ) -> list[list[list[Cell]]]:
        """Per hash, per distinct entity key, per field: (value, status, event time) bytes."""
        now = time.time()
        out: list[list[list[Cell]]] = []
        offset = 0
        for h, hash_keys in zip(plan.hashes, keys, strict=True):
            per_key: list[list[Cell]] = []
            for reply in replies[offset : offset + len(hash_keys)]:
                cell: list[Cell] = [_MISSING] * len(h.fields)
                for vf in h.views:
                    raw_ts = reply[vf.ts_field] or b""
                    stale = False
                    if vf.ttl_seconds and raw_ts:
                        ts = Timestamp.FromString(raw_ts)
                        stale = ts.seconds + ts.nanos * 1e-9 < now - vf.ttl_seconds
                    for fi in vf.feature_fields:
                        raw = reply[fi]
                        if raw is None:
                            cell[fi] = (b"", NOT_FOUND, raw_ts)
                        elif raw == b"" or raw == _NULL_VAL:
                            cell[fi] = (raw, NULL_VALUE, raw_ts)
                        else:
                            cell[fi] = (raw, OUTSIDE_MAX_AGE if stale else PRESENT, raw_ts)
                per_key.append(cell)
            offset += len(hash_keys)
            out.append(per_key)
        return out

    @staticmethod
    def _run_on_demand(
        plan: Plan,
        step: OnDemandStep,
        column: Any,
        entities: Mapping[str, RepeatedValue],
        request: dict[str, list[Any]],
        n: int,
    ) -> list[list[Cell]]:
        """Run one python-mode on-demand view as Feast does (dict of lists in and out).

        Like ``OnDemandFeatureView.transform_dict``: the UDF sees the join keys, the request
        fields and each source feature under both ``feature`` and ``view__feature``.
        """
        inputs: dict[str, list[Any]] = {
            jk.column: [to_python(v) for v in entities[jk.column].val]
            for jk in plan.entity_columns
        }
        for name in step.request_fields:
            inputs[name] = request[name]
        for index in step.inputs:
            fc = plan.features[index]
            inputs[fc.input_name] = [to_python(Value.FromString(c[0])) for c in column(index)]
        for index in step.inputs:
            fc = plan.features[index]
            inputs[fc.feature] = inputs[fc.input_name]
        name = step.name
        try:
            if step.singleton:
                rows = [step.udf({k: v[i] for k, v in inputs.items()}) for i in range(n)]
                result = {o.feature: [row.get(o.feature) for row in rows] for o in step.outputs}
            else:
                result = step.udf(dict(inputs))
        except Exception as exc:
            raise FeaturepipeError(
                f"on-demand feature view {name!r} raised {type(exc).__name__}: {exc}; fix its "
                "transformation (feature_repo/) or the request_context values"
            ) from exc
        columns: list[list[Cell]] = []
        for output in step.outputs:
            values = result.get(output.feature)
            if values is None:
                raise FeaturepipeError(
                    f"on-demand feature view {name!r} returned no {output.feature!r}; make its "
                    "transformation return every feature of its schema"
                )
            if not isinstance(values, list):
                values = [values]
            if len(values) != n:
                raise FeaturepipeError(
                    f"on-demand feature view {name!r} returned {len(values)} values of "
                    f"{output.feature!r} for {n} rows; it must return one per row"
                )
            try:
                protos = proto_values(values, output.value_type)
            except (TypeError, ValueError, AssertionError) as exc:
                raise FeaturepipeError(
                    f"on-demand feature view {name!r} returned {output.feature!r} values that "
                    f"are not {output.value_type.name}: {exc}"
                ) from exc
            columns.append(
                [
                    (p.SerializeToString(), PRESENT if p.WhichOneof("val") else NULL_VALUE, b"")
                    for p in protos
                ]
            )
        return columns
