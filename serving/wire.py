"""Serialize a GetOnlineFeaturesResponse straight from the bytes Redis returns.

Feast stores each feature value as a serialized ``feast.types.Value`` and each event time
as a serialized ``google.protobuf.Timestamp``, which is exactly how they appear inside
the response message. Copying those bytes into the response (instead of parsing them
into messages and serializing again) is most of what makes the server fast. The field
numbers come from ``feast/serving/ServingService.proto``::

    GetOnlineFeaturesResponse { GetOnlineFeaturesResponseMetadata metadata = 1;
                                repeated FeatureVector results = 2; }
    GetOnlineFeaturesResponseMetadata { FeatureList feature_names = 1; }
    FeatureList { repeated string val = 1; }
    FeatureVector { repeated Value values = 1; repeated FieldStatus statuses = 2;  // packed
                    repeated Timestamp event_timestamps = 3; }

A test parses the output with the generated classes and compares it to Feast's answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Tag bytes: (field number << 3) | wire type 2 (length-delimited).
_FIELD_1 = b"\x0a"
_FIELD_2 = b"\x12"
_FIELD_3 = b"\x1a"


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [varint(i) for i in range(1 << 14)]
SMALL = _SMALL  # varint of every n < 16384


def _len(data: bytes) -> bytes:
    n = len(data)
    return _SMALL[n] if n < 16384 else varint(n)


def metadata(names: Iterable[str]) -> bytes:
    """Field 1 of the response: the feature names, ready to prepend to the results."""
    feature_list = b"".join(_FIELD_1 + _len(e) + e for e in (n.encode("utf8") for n in names))
    feature_names = _FIELD_1 + _len(feature_list) + feature_list
    return _FIELD_1 + _len(feature_names) + feature_names


def feature_vector(
    values: Sequence[bytes], statuses: Sequence[int], timestamps: Sequence[bytes]
) -> bytes:
    """One result column (field 2 of the response, tag included)."""
    parts: list[bytes] = []
    for v in values:
        parts += (_FIELD_1, _len(v), v)
    packed = b"".join([_SMALL[s] for s in statuses])
    parts += (_FIELD_2, _len(packed), packed)
    for t in timestamps:
        parts += (_FIELD_3, _len(t), t)
    body = b"".join(parts)
    return _FIELD_2 + _len(body) + body


def column(values: Sequence[bytes], statuses: Sequence[int], timestamps: Sequence[bytes]) -> bytes:
    """One result column from values and timestamps already framed as fields 1 and 3
    (tag and length included, see :func:`framed_value`); statuses are FieldStatus numbers."""
    packed = bytes(statuses)  # FieldStatus numbers are < 128: one varint byte each
    body = b"".join(values) + _FIELD_2 + _len(packed) + packed + b"".join(timestamps)
    return _FIELD_2 + _len(body) + body


def framed_value(data: bytes) -> bytes:
    """A serialized Value as field 1 of a FeatureVector."""
    return _FIELD_1 + _len(data) + data


def framed_timestamp(data: bytes) -> bytes:
    """A serialized Timestamp as field 3 of a FeatureVector."""
    return _FIELD_3 + _len(data) + data


def _framed_all(tag: bytes, items: list[bytes]) -> list[bytes]:
    """Every item framed as field ``tag``; when all have one length (doubles, timestamps of
    one era: the usual), with one shared prefix."""
    lengths = set(map(len, items))
    if len(lengths) == 1:
        return list(map((tag + _len(items[0])).__add__, items))
    return [tag + _len(item) + item for item in items]


def framed_values(values: list[bytes]) -> list[bytes]:
    """:func:`framed_value` of every serialized Value."""
    return _framed_all(_FIELD_1, values)


def framed_timestamps(timestamps: list[bytes]) -> list[bytes]:
    """:func:`framed_timestamp` of every serialized Timestamp."""
    return _framed_all(_FIELD_3, timestamps)


EMPTY_VALUE = framed_value(b"")
EMPTY_TIMESTAMP = framed_timestamp(b"")
