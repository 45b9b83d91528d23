"""Python values to and from ``feast.types.Value`` messages, for the client and the server.

Independent of the Feast SDK (works on any generated ``Value`` class, see
:mod:`serving.protos`). Ints become ``int64_val``, floats ``double_val``, strs
``string_val``, bytes ``bytes_val``, bools ``bool_val``, datetimes ``unix_timestamp_val``
(seconds), None an empty Value; lists become the matching ``*_list_val``.

The server reads values the way Feast's ``feast_value_type_to_python_type`` gives them
(:func:`to_python`, :func:`python_column`, :func:`python_value` for stored bytes) and
writes on-demand outputs the way ``python_values_to_proto_values`` does
(:func:`proto_values`).
"""

from __future__ import annotations

import json
import numbers
import struct
from datetime import datetime, timezone
from operator import attrgetter
from typing import Any

from featurepipe.errors import InvalidInput
from serving.protos import Value

_SCALAR_KINDS = frozenset((
    "int64_val", "int32_val", "double_val", "float_val", "string_val", "bool_val", "bytes_val",
    "uuid_val", "time_uuid_val", "decimal_val",
))
_LIST_FIELD = {
    bool: "bool_list_val",
    int: "int64_list_val",
    float: "double_list_val",
    str: "string_list_val",
    bytes: "bytes_list_val",
}


def _is_bool(obj: Any) -> bool:
    # numpy.bool_ is neither bool nor numbers.Integral
    return isinstance(obj, bool) or getattr(getattr(obj, "dtype", None), "kind", "") == "b"


def _scalar_kind(obj: Any) -> type:
    if _is_bool(obj):
        return bool
    if isinstance(obj, numbers.Integral):
        return int
    if isinstance(obj, numbers.Real):
        return float
    if isinstance(obj, str):
        return str
    if isinstance(obj, (bytes, bytearray)):
        return bytes
    if isinstance(obj, datetime):
        return datetime
    raise InvalidInput(
        f"cannot send {type(obj).__name__} value {obj!r}; use int, float, str, bytes, bool, "
        "datetime, None or a list of them"
    )


def _epoch_seconds(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp())


def to_value(obj: Any, value_cls: Any) -> Any:
    """A ``value_cls`` (a generated ``feast.types.Value``) holding ``obj``."""
    if obj is None:
        return value_cls()
    if isinstance(obj, (list, tuple)):
        if any(x is None for x in obj):
            raise InvalidInput(f"list {obj!r} holds None; Feast list values cannot hold nulls")
        kinds = {_scalar_kind(x) for x in obj}
        if kinds == {int, float}:
            kinds = {float}
        if len(kinds) > 1:
            raise InvalidInput(f"list {obj!r} mixes types {sorted(k.__name__ for k in kinds)}")
        kind = kinds.pop() if kinds else float
        if kind is datetime:
            value = value_cls()
            value.unix_timestamp_list_val.val.extend(_epoch_seconds(x) for x in obj)
            return value
        value = value_cls()
        getattr(value, _LIST_FIELD[kind]).val.extend(kind(x) for x in obj)
        return value
    kind = _scalar_kind(obj)
    if kind is bool:
        return value_cls(bool_val=bool(obj))
    if kind is int:
        return value_cls(int64_val=int(obj))
    if kind is float:
        return value_cls(double_val=float(obj))
    if kind is str:
        return value_cls(string_val=obj)
    if kind is bytes:
        return value_cls(bytes_val=bytes(obj))
    return value_cls(unix_timestamp_val=_epoch_seconds(obj))


def from_value(value: Any) -> Any:
    """The Python value of a ``feast.types.Value`` (None when it holds nothing)."""
    kind = value.WhichOneof("val")
    if kind in _SCALAR_KINDS:
        return getattr(value, kind)
    if kind is None or kind == "null_val":
        return None
    raw = getattr(value, kind)
    if kind == "unix_timestamp_val":
        return datetime.fromtimestamp(raw, tz=timezone.utc)
    if kind == "json_val":
        return json.loads(raw)
    if kind in ("list_val", "set_val"):
        return [from_value(v) for v in raw.val]
    if kind in ("map_val", "struct_val"):
        return {k: from_value(v) for k, v in raw.val.items()}
    if kind in ("map_list_val", "struct_list_val"):
        return [{k: from_value(v) for k, v in m.val.items()} for m in raw.val]
    if kind in ("unix_timestamp_list_val", "unix_timestamp_set_val"):
        return [datetime.fromtimestamp(v, tz=timezone.utc) for v in raw.val]
    if hasattr(raw, "val"):
        return list(raw.val)
    return raw


# ValueType number -> (Value field, accepted Python types, converter), for on-demand outputs.
_OUTPUT_KINDS: dict[int, tuple[str, tuple[type[Any], ...], Any]] = {
    1: ("bytes_val", (bytes,), bytes),
    2: ("string_val", (str,), str),
    3: ("int32_val", (int,), int),
    4: ("int64_val", (int,), int),
    5: ("double_val", (float, int), float),
    6: ("float_val", (float, int), float),
    7: ("bool_val", (bool,), bool),
    8: ("unix_timestamp_val", (int, datetime), None),
}


def proto_values(values: list[Any], value_type: int) -> list[Any]:
    """Python values as ``feast.types.Value`` messages of ``value_type``, the way Feast's
    ``python_values_to_proto_values`` converts them (None and NaN: an empty Value).

    Scalars of the common types convert here; anything else goes through Feast's own
    converter (imported on first use) and is re-read into :mod:`serving.protos` messages.
    """
    kind = _OUTPUT_KINDS.get(int(value_type))
    if kind is not None:
        field, accepted, convert = kind
        out = []
        for v in values:
            if v is None or (isinstance(v, float) and v != v):
                out.append(Value())
                continue
            if _is_bool(v) and field != "bool_val":
                break  # Feast rejects bools for numbers: let it say so
            numeric = field not in ("bytes_val", "string_val", "bool_val")
            if not isinstance(v, accepted) and not (numeric and isinstance(v, numbers.Real)):
                break
            if field == "unix_timestamp_val":
                out.append(Value(unix_timestamp_val=_epoch_seconds(v) if isinstance(v, datetime)
                                 else int(v)))
            else:
                out.append(Value(**{field: convert(v)}))
        else:
            return out
    from feast.type_map import python_values_to_proto_values  # rare types: Feast's converter
    from feast.value_type import ValueType

    return [Value.FromString(p.SerializeToString())
            for p in python_values_to_proto_values(values, ValueType(int(value_type)))]


# --- Values as Python sees them (server side) ----------------------------------------------

_PLAIN_KINDS = frozenset(
    ("int64_val", "int32_val", "double_val", "float_val", "string_val", "bool_val", "bytes_val")
)
_unpack_double = struct.Struct("<d").unpack


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


def python_value(raw: bytes | None) -> Any:
    """The Python value of a serialized Value as Redis stores it (None: missing); a double
    or a non-negative int64 is decoded without protobuf."""
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
