"""Feast's Redis key layout, as the server reads it.

The names (hash keys, feature fields, ``_ts:<view>``) are shared with the materialisation
writer in :mod:`featurepipe.online.layout`; this module adds what only requests need:
turning a request's ``feast.types.Value`` join-key values into key bytes.
"""

from __future__ import annotations

import struct
from typing import Any

from featurepipe.errors import InvalidInput
from featurepipe.online.layout import entity_key_prefix, feature_field, timestamp_field
from serving.registry import ServedValueType

__all__ = ["ACCEPTED_KINDS", "encode_entity_column", "encode_entity_value", "entity_key_prefix", "feature_field", "timestamp_field"]

_PACK_HEADER = struct.Struct("<II").pack
_PACK_I32 = struct.Struct("<i").pack
_PACK_I64 = struct.Struct("<q").pack
_INT32_RANGE = (-(2**31), 2**31 - 1)

# The Value field a join key of each type must arrive in, and the ones accepted and
# converted (an int32 for an INT64 key serialises differently, so it is converted first).
ACCEPTED_KINDS: dict[Any, tuple[str, ...]] = {
    ServedValueType.INT64: ("int64_val", "int32_val"),
    ServedValueType.INT32: ("int32_val", "int64_val"),
    ServedValueType.STRING: ("string_val",),
    ServedValueType.BYTES: ("bytes_val",),
    ServedValueType.UNIX_TIMESTAMP: ("unix_timestamp_val", "int64_val"),
}


def encode_entity_value(value: Any, value_type: Any, column: str, row: int) -> bytes:
    """One join-key value as Feast serializes it (type, length, bytes).

    Raises InvalidInput when the value does not fit the join key's declared type.
    """
    kind = value.WhichOneof("val")
    accepted = ACCEPTED_KINDS.get(value_type)
    if accepted is None:
        raise InvalidInput(
            f"join key {column!r} has type {value_type.name}, which Feast cannot use as an "
            "entity key; declare the entity as INT64, INT32, STRING, BYTES or UNIX_TIMESTAMP"
        )
    if kind not in accepted:
        got = "no value (null)" if kind is None else kind
        raise InvalidInput(
            f"entities[{column!r}][{row}] is {got}, but join key {column!r} is "
            f"{value_type.name}: send it as {accepted[0]}"
        )
    raw = getattr(value, kind)
    data: bytes
    if value_type == ServedValueType.STRING:
        data = raw.encode("utf8")
    elif value_type == ServedValueType.BYTES:
        data = raw
    elif value_type == ServedValueType.INT32:
        if not _INT32_RANGE[0] <= raw <= _INT32_RANGE[1]:
            raise InvalidInput(f"entities[{column!r}][{row}] = {raw} does not fit join key type INT32")
        data = _PACK_I32(raw)
    else:
        data = _PACK_I64(raw)
    return _PACK_HEADER(value_type.value, len(data)) + data


_INT64_HEADER = _PACK_HEADER(ServedValueType.INT64.value, 8)


def encode_entity_column(values: Any, value_type: Any, column: str) -> list[bytes]:
    """:func:`encode_entity_value` of every value of a request column (fast for INT64)."""
    if value_type == ServedValueType.INT64 and all(v.WhichOneof("val") == "int64_val" for v in values):
        header = _INT64_HEADER
        return [header + _PACK_I64(v.int64_val) for v in values]
    return [encode_entity_value(v, value_type, column, i) for i, v in enumerate(values)]
