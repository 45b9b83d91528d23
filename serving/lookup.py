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

import struct
import time
from collections.abc import Callable, Mapping
from operator import attrgetter, itemgetter
from typing import Any

import redis
from google.protobuf.timestamp_pb2 import Timestamp

from featurepipe.errors import BackendUnavailable, FeaturepipeError, InvalidInput
from serving import wire
from serving.catalog import OUT_FEATURE, OnDemandStep, Plan
from serving.layout import encode_entity_column
from serving.protos import FIELD_STATUS, Value
from serving.registry import ValueType
from serving.values import from_value, proto_values

try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # another redis-py layout: read_response per reply (see _read_replies)
    _NOT_ENOUGH_DATA = object()

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

# One stored feature over the distinct entity keys of a request: framed values (field 1 of
# a FeatureVector), FieldStatus numbers, framed event times (field 3), raw Value bytes.
Column = tuple[list[bytes], list[int], list[bytes], list["bytes | None"]]

_PLAIN_KINDS = frozenset(
    ("int64_val", "int32_val", "double_val", "float_val", "string_val", "bool_val", "bytes_val")
)


_unpack_double = struct.Struct("<d").unpack
_pack_double = struct.Struct("<d").pack
_FRAMED_DOUBLE = b"\x0a\x09\x29"  # FeatureVector field 1, length 9, Value field 5 (double)


def _python_value(raw: bytes | None) -> Any:
    """The Python value of a serialized Value (a double is decoded without protobuf)."""
    if raw is None:
        return None
    if len(raw) == 9 and raw[0] == 0x29:  # field 5 (double_val), fixed64
        return _unpack_double(raw[1:])[0]
    if 1 < len(raw) < 10 and raw[0] == 0x20 and raw[-1] < 0x80:  # int64_val >= 0, varint
        value, shift = 0, 0
        for byte in raw[1:]:
            value |= (byte & 0x7F) << shift
            shift += 7
        return value
    return to_python(Value.FromString(raw))


def to_python(value: Any) -> Any:
    """The Python value of a Value, as Feast's ``feast_value_type_to_python_type`` gives it."""
    kind = value.WhichOneof("val")
    if kind in _PLAIN_KINDS:
        return getattr(value, kind)
    return from_value(value)


def python_column(values: Any, kinds: list[str | None] | None = None) -> list[Any]:
    """:func:`to_python` of each Value; a column of one plain kind (the usual) is read
    with one attribute getter. ``kinds``: each value's ``WhichOneof("val")``, if known."""
    if kinds is None:
        kinds = [v.WhichOneof("val") for v in values]
    distinct = set(kinds)
    if len(distinct) == 1:
        (kind,) = distinct
        if kind in _PLAIN_KINDS:
            return list(map(attrgetter(kind), values))
    return [to_python(v) for v in values]


def _decoder(column: Callable[[int], list[bytes | None]], index: int) -> Callable[[], list[Any]]:
    """Decodes one on-demand input column once, on first use."""
    decoded: list[list[Any]] = []

    def decode() -> list[Any]:
        if not decoded:
            decoded.append([_python_value(raw) for raw in column(index)])
        return decoded[0]

    return decode


class _LazyInputs(dict):  # type: ignore[type-arg]
    """The dict an on-demand UDF receives, whose feature columns are decoded on first
    access: a UDF that reads 2 of a view's 13 features pays for 2. Any whole-dict use
    (iteration, keys, items, len, copy, ``**``) decodes the rest first, so the UDF sees a
    plain dict of lists, as Feast gives it."""

    def __init__(self, eager: dict[str, list[Any]], lazy: dict[str, Callable[[], list[Any]]]):
        super().__init__(eager)
        self._lazy = {k: v for k, v in lazy.items() if k not in eager}

    def __missing__(self, key: str) -> list[Any]:
        make = self._lazy.pop(key, None)
        if make is None:
            raise KeyError(key)
        value = make()
        dict.__setitem__(self, key, value)
        return value

    def _everything(self) -> None:
        for key in list(self._lazy):
            self[key]  # noqa: B018  (decodes and stores it)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self._lazy

    def __iter__(self) -> Any:
        self._everything()
        return dict.__iter__(self)

    def __len__(self) -> int:
        return dict.__len__(self) + len(self._lazy)

    def keys(self) -> Any:
        self._everything()
        return dict.keys(self)

    def items(self) -> Any:
        self._everything()
        return dict.items(self)

    def values(self) -> Any:
        self._everything()
        return dict.values(self)

    def copy(self) -> dict[str, list[Any]]:
        self._everything()
        return dict(dict.items(self))

    def __eq__(self, other: object) -> bool:
        self._everything()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self._everything()
        return dict.__repr__(self)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self._lazy:
            self[key]  # noqa: B018
        return dict.pop(self, key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return dict.setdefault(self, key, default)

    def __reduce__(self) -> Any:
        self._everything()
        return (dict, (dict(dict.items(self)),))


def _read_replies(connection: Any, count: int) -> list[Any]:
    """``count`` replies from ``connection``. With hiredis (a pinned dependency) the
    replies are taken straight from its reader, one C call each: redis-py's per-reply
    ``read_response`` costs about 10 us of Python, 1.5 ms of a 100-entity request."""
    parser = getattr(connection, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if reader is None or not hasattr(parser, "read_from_socket") \
            or getattr(parser, "_next_response", _NOT_ENOUGH_DATA) is not _NOT_ENOUGH_DATA:
        return [connection.read_response() for _ in range(count)]
    gets, fill = reader.gets, parser.read_from_socket
    replies: list[Any] = []
    append = replies.append
    while len(replies) < count:
        reply = gets()
        if reply is _NOT_ENOUGH_DATA:
            try:
                fill()
            except TimeoutError as exc:  # socket.timeout; redis-py's own error types below
                raise redis.TimeoutError(f"Timeout reading from Redis: {exc}") from exc
            except OSError as exc:
                raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
        elif isinstance(reply, Exception):
            raise reply
        else:
            append(reply)
    return replies


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
            jk.column: encode_entity_column(entities[jk.column].val, jk.value_type, jk.column)
            for jk in plan.entity_columns
        }
        row_slots: list[list[int] | None] = []  # None: row i reads slot i
        keys = []
        for h in plan.hashes:
            columns = [encoded[jk.column] for jk in h.join_keys]
            prefix, suffix = h.key_prefix, h.key_suffix
            if len(columns) == 1:
                all_keys = [prefix + v + suffix for v in columns[0]]
            else:
                all_keys = [b"".join([prefix, *parts, suffix]) for parts in zip(*columns)]
            slots = dict.fromkeys(all_keys)
            if len(slots) == n:
                row_slots.append(None)
                keys.append(all_keys)
            else:
                index = {key: i for i, key in enumerate(slots)}
                row_slots.append([index[key] for key in all_keys])
                keys.append(list(slots))
        replies = self._fetch(plan, keys)
        cells = self._decode(plan, keys, replies)
        pickers = [None if rows is None else itemgetter(*rows) for rows in row_slots]

        def pick(values: list[Any], hash_index: int) -> Any:
            rows = row_slots[hash_index]
            if rows is None:
                return values
            picked = pickers[hash_index](values)
            return picked if len(rows) > 1 else [picked]

        def raw_column(index: int) -> list[bytes | None]:
            # an on-demand view sees a value older than its view's TTL as missing, as the
            # point-in-time join gives it to training (no train/serve skew)
            fc = plan.features[index]
            _, stats, _, raws = cells[fc.hash_index][fc.field_index]
            if OUTSIDE_MAX_AGE in stats:
                raws = [None if st == OUTSIDE_MAX_AGE else raw for raw, st in zip(raws, stats, strict=True)]
            return pick(raws, fc.hash_index)

        keys_in = {jk.column: python_column(entities[jk.column].val)
                   for jk in plan.entity_columns} if plan.on_demand else {}
        computed = [
            self._run_on_demand(plan, step, raw_column, keys_in, request, n)
            for step in plan.on_demand
        ]
        parts = [plan.response_metadata]
        present, no_times = [PRESENT] * n, [wire.EMPTY_TIMESTAMP] * n
        for jk in plan.entity_columns:
            # RepeatedValue.val and FeatureVector.values are both field 1 (repeated Value): the
            # request's column serialized is the response's values, framed (unknown fields
            # were discarded when the request was parsed)
            parts.append(wire.column([entities[jk.column].SerializeToString()], present, no_times))
        for out in plan.output:
            if out[0] == OUT_FEATURE:
                fc = plan.features[out[1]]
                vals, stats, times, _ = cells[fc.hash_index][fc.field_index]
                h = fc.hash_index
                parts.append(wire.column(pick(vals, h), pick(stats, h), pick(times, h)))
            else:
                vals, stats = computed[out[1]][out[2]]
                parts.append(wire.column(vals, stats, no_times))
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
            sent = [v.WhichOneof("val") for v in col.val]
            if kinds and not set(sent) <= {*kinds, None, "null_val"}:
                for i, kind in enumerate(sent):
                    if kind is not None and kind != "null_val" and kind not in kinds:
                        raise InvalidInput(
                            f"request_context[{name!r}][{i}] is {kind}, but {name!r} is "
                            f"{value_type.name}: send it as {kinds[0]}"
                        )
            values[name] = python_column(col.val, sent)
        return values

    def _fetch(self, plan: Plan, keys: list[list[bytes]]) -> list[list[bytes | None]]:
        """Every HMGET of the request in one write and one read (prepacked RESP commands
        on a pooled connection: half the time of a redis-py pipeline at 200 keys)."""
        packed = b"".join([
            b"".join([h.hmget_head, b"$%d\r\n" % len(key), key, b"\r\n", h.hmget_fields])
            for h, hash_keys in zip(plan.hashes, keys, strict=True)
            for key in hash_keys
        ])
        count = sum(len(k) for k in keys)
        started = time.perf_counter()
        pool = self.client.connection_pool
        for attempt in (0, 1):  # one retry on a broken (e.g. pre-restart) connection
            try:
                connection = pool.get_connection()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise self._unavailable(exc) from exc
            try:
                connection.send_packed_command([packed])
                replies = _read_replies(connection, count)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                connection.disconnect()
                if attempt == 0 and isinstance(exc, redis.ConnectionError) \
                        and not isinstance(exc, redis.TimeoutError):
                    continue
                raise self._unavailable(exc) from exc
            except redis.RedisError as exc:
                connection.disconnect()  # replies may be left unread on it
                raise FeaturepipeError(f"Redis refused the read: {exc}") from exc
            except BaseException:
                connection.disconnect()
                raise
            finally:
                pool.release(connection)
            if self.on_fetch is not None:
                self.on_fetch(time.perf_counter() - started)
            return replies
        raise AssertionError("unreachable")

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        kwargs = self.client.connection_pool.connection_kwargs
        where = f"{kwargs.get('host')}:{kwargs.get('port')}"
        return BackendUnavailable(
            f"Redis at {where} did not answer ({type(exc).__name__}: {exc}); retry shortly, "
            "and check that redis-server is up and REDIS_URL points at it"
        )

    @staticmethod
    def _decode(
        plan: Plan, keys: list[list[bytes]], replies: list[list[bytes | None]]
    ) -> list[list[Column]]:
        """Per hash, per field: the column over distinct entity keys, as framed values,
        statuses, framed event times and raw values (see :data:`Column`)."""
        now = time.time()
        framed_value, framed_ts = wire.framed_value, wire.framed_timestamp
        empty_value, empty_ts = wire.EMPTY_VALUE, wire.EMPTY_TIMESTAMP
        out: list[list[Column]] = []
        offset = 0
        for h, hash_keys in zip(plan.hashes, keys, strict=True):
            count = len(hash_keys)
            columns: list[Column] = [([], [], [], []) for _ in h.fields]
            block = replies[offset : offset + count]
            offset += count
            for vf in h.views:
                stale_before = now - vf.ttl_seconds if vf.ttl_seconds else None
                raw_times = list(map(itemgetter(vf.ts_field), block))
                if None not in raw_times and b"" not in raw_times:  # every key has the view
                    times = wire.framed_timestamps(raw_times)
                else:
                    times = [framed_ts(raw) if raw else empty_ts for raw in raw_times]
                if stale_before is None:
                    stale = [False] * count
                else:
                    stale = [bool(raw) and (t := Timestamp.FromString(raw)).seconds + t.nanos * 1e-9 < stale_before
                             for raw in raw_times]
                any_stale = any(stale)
                for fi in vf.feature_fields:
                    raws = list(map(itemgetter(fi), block))
                    if None not in raws:  # the usual
                        vals = wire.framed_values(raws)  # field 1
                        if any_stale:
                            stats = [OUTSIDE_MAX_AGE if old else PRESENT for old in stale]
                        else:
                            stats = [PRESENT] * count
                        if b"" in raws or _NULL_VAL in raws:
                            stats = [NULL_VALUE if raw in (b"", _NULL_VAL) else st
                                     for raw, st in zip(raws, stats, strict=True)]
                    else:
                        vals, stats = [], []
                        for raw, old in zip(raws, stale, strict=True):
                            if raw is None:
                                vals.append(empty_value)
                                stats.append(NOT_FOUND)
                            else:
                                vals.append(framed_value(raw))
                                if raw == b"" or raw == _NULL_VAL:
                                    stats.append(NULL_VALUE)
                                else:
                                    stats.append(OUTSIDE_MAX_AGE if old else PRESENT)
                    columns[fi] = (vals, stats, times, raws)
            out.append(columns)
        return out

    @staticmethod
    def _run_on_demand(
        plan: Plan,
        step: OnDemandStep,
        column: Any,
        keys_in: Mapping[str, list[Any]],
        request: dict[str, list[Any]],
        n: int,
    ) -> list[tuple[list[bytes], list[int]]]:
        """Run one python-mode on-demand view as Feast does (dict of lists in and out);
        per output, its framed values and statuses.

        Like ``OnDemandFeatureView.transform_dict``: the UDF sees the join keys, the request
        fields and each source feature under both ``feature`` and ``view__feature``.
        """
        inputs: dict[str, list[Any]] = {k: list(v) for k, v in keys_in.items()}  # a UDF may mutate
        for name in step.request_fields:
            inputs[name] = request[name]
        lazy: dict[str, Callable[[], list[Any]]] = {}
        for index in step.inputs:
            fc = plan.features[index]
            decode = _decoder(column, index)
            lazy[fc.input_name] = decode
            lazy.setdefault(fc.feature, decode)
        inputs = _LazyInputs(inputs, lazy)
        name = step.name
        try:
            if step.singleton:
                whole = dict(inputs)
                rows = [step.udf({k: v[i] for k, v in whole.items()}) for i in range(n)]
                result = {o.feature: [row.get(o.feature) for row in rows] for o in step.outputs}
            else:
                result = step.udf(inputs)
        except Exception as exc:
            raise FeaturepipeError(
                f"on-demand feature view {name!r} raised {type(exc).__name__}: {exc}; fix its "
                "transformation (feature_repo/) or the request_context values"
            ) from exc
        columns: list[tuple[list[bytes], list[int]]] = []
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
            if output.value_type == ValueType.DOUBLE and all(type(v) is float for v in values):
                # the common case, serialized without protobuf: field 5 (double), fixed64;
                # NaN is an empty Value, as Feast converts it
                columns.append((
                    [_FRAMED_DOUBLE + _pack_double(v) if v == v else wire.EMPTY_VALUE
                     for v in values],
                    [PRESENT if v == v else NULL_VALUE for v in values],
                ))
                continue
            try:
                protos = proto_values(values, output.value_type)
            except (TypeError, ValueError, AssertionError) as exc:
                raise FeaturepipeError(
                    f"on-demand feature view {name!r} returned {output.feature!r} values that "
                    f"are not {output.value_type.name}: {exc}"
                ) from exc
            columns.append((
                [wire.framed_value(p.SerializeToString()) for p in protos],
                [PRESENT if p.WhichOneof("val") else NULL_VALUE for p in protos],
            ))
        return columns
