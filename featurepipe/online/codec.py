"""Feast's bytes for whole Arrow columns: entity keys, ``Value`` and ``Timestamp`` protos.

Byte for byte what Feast's Redis writer stores (``serialize_entity_key`` version 3 +
project; ``Value.SerializeToString()``; ``Timestamp.FromDatetime(...).SerializeToString()``),
built with NumPy from the protobuf wire format instead of one protobuf object per value:

* a ``Value`` holds one field of its ``val`` oneof, so it is a tag byte then the payload:
  ``double_val`` 0x29 + 8 bytes LE, ``float_val`` 0x35 + 4 bytes, ``int64_val`` 0x20 +
  varint, ``int32_val`` 0x18 + varint of the sign-extended value, ``bool_val`` 0x38 + 0/1,
  ``unix_timestamp_val`` 0x40 + varint, ``string_val`` 0x12 / ``bytes_val`` 0x0a + varint
  length + bytes. A null (or NaN, as Feast treats it) is the empty ``Value``: no bytes.
* a ``Timestamp`` is ``seconds`` (0x08 + varint) then ``nanos`` (0x10 + varint), each
  left out when zero.

Numbers and timestamps are encoded by the compiled part (``_native.c``) when it was built
at install time, by NumPy otherwise. Types without a fast encoder (lists, maps, JSON, ...)
go through Feast's own converter, one value at a time. ``tests/test_materialize.py``
checks every encoder, both ways, against Feast's.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurepipe.core.native import NativeKernels, kernels
from featurepipe.online import rows
from featurepipe.online.layout import KEY_TYPE_IDS, entity_key_prefix, key_suffix
from featurepipe.online.rows import Piece

compiled: NativeKernels | None = kernels  # None: not compiled (no C compiler at install time), NumPy only

# Feast ValueType names with a vectorised encoder, and their Value proto tag byte.
SCALAR_TAGS = {
    "DOUBLE": 0x29,
    "FLOAT": 0x35,
    "INT64": 0x20,
    "INT32": 0x18,
    "BOOL": 0x38,
    "UNIX_TIMESTAMP": 0x40,
    "STRING": 0x12,
    "BYTES": 0x0A,
}
# What Feast stores for a null UNIX_TIMESTAMP feature: NaT cast to int64 seconds.
NULL_UNIX_TIMESTAMP = np.iinfo(np.int64).min


def _valid(array: pa.Array) -> np.ndarray:
    if array.null_count == 0:
        return np.ones(len(array), dtype=bool)
    return np.asarray(array.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _numbers(array: pa.Array, dtype: type) -> np.ndarray:
    if array.null_count:
        array = pc.fill_null(array, pa.scalar(0, array.type))
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=dtype)


def _tagged(tag: int, body: Piece, present: np.ndarray) -> Piece:
    """``tag + body`` where present, nothing elsewhere."""
    return rows.prepend(np.uint8(tag), body, present)


def _length_delimited(tag: int, array: pa.Array) -> Piece:
    body = rows.from_arrow_binary(array)
    return _tagged(tag, rows.pack([rows.varint(body.row_lengths()), body]), _valid(array))


def epoch_seconds(array: pa.Array) -> np.ndarray:
    """Whole seconds since the epoch of a timestamp column, rounded down (as NumPy does)."""
    micros = _numbers(array.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()), np.int64)
    seconds: np.ndarray = np.floor_divide(micros, 1_000_000)
    return seconds


# ValueType -> (kind of the compiled encoder, NumPy dtype it reads)
_COMPILED_KINDS = {"DOUBLE": (0, np.float64), "FLOAT": (1, np.float32), "INT64": (2, np.int64), "INT32": (2, np.int64)}


def _compiled_rows(result: tuple[bytes, bytes], n: int) -> Piece:
    data, lengths = result
    return Piece(np.frombuffer(data, dtype=np.uint8).reshape(n, len(data) // n if n else 0),
                 np.frombuffer(lengths, dtype=np.int64))


def encode_values(array: pa.Array, value_type: str, use_compiled: bool = True) -> Piece:
    """Serialized ``feast.types.Value`` of every element, for a Feast ValueType name."""
    n = len(array)
    if use_compiled and compiled is not None and value_type in _COMPILED_KINDS:
        kind, dtype = _COMPILED_KINDS[value_type]
        valid = _valid(array) if array.null_count else None
        values = np.ascontiguousarray(_numbers(array, dtype))
        return _compiled_rows(compiled.scalar_values(SCALAR_TAGS[value_type], kind, values, valid), n)
    if value_type == "DOUBLE":
        v = _numbers(array, np.float64)
        present = _valid(array) & ~np.isnan(v)
        body = rows.fixed(v.astype("<f8").view(np.uint8).reshape(n, 8))
        return _tagged(0x29, body, present)
    if value_type == "FLOAT":
        v = _numbers(array, np.float32)
        present = _valid(array) & ~np.isnan(v)
        return _tagged(0x35, rows.fixed(v.astype("<f4").view(np.uint8).reshape(n, 4)), present)
    if value_type in ("INT64", "INT32"):
        v = _numbers(array, np.int64)
        return _tagged(SCALAR_TAGS[value_type], rows.varint(v.view(np.uint64)), _valid(array))
    if value_type == "BOOL":
        v = _numbers(array.cast(pa.uint8()), np.uint8)
        return _tagged(0x38, rows.fixed(v.reshape(n, 1)), _valid(array))
    if value_type == "UNIX_TIMESTAMP":
        seconds = np.where(_valid(array), epoch_seconds(array), NULL_UNIX_TIMESTAMP)
        return _tagged(0x40, rows.varint(seconds.view(np.uint64)), np.ones(n, dtype=bool))
    if value_type in ("STRING", "BYTES"):
        return _length_delimited(SCALAR_TAGS[value_type], array)
    return _encode_with_feast(array, value_type)


def _encode_with_feast(array: pa.Array, value_type: str) -> Piece:
    """Feast's own (slow, per value) conversion, for types without a vectorised encoder."""
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    values = python_values_to_proto_values(array.to_numpy(zero_copy_only=False), ValueType[value_type])
    blobs = [v.SerializeToString() for v in values]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return rows.from_flat(np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets)


def encode_timestamps(micros: np.ndarray, use_compiled: bool = True) -> Piece:
    """Serialized ``google.protobuf.Timestamp`` of epoch microseconds."""
    micros = np.ascontiguousarray(micros, dtype=np.int64)
    n = len(micros)
    if use_compiled and compiled is not None:
        return _compiled_rows(compiled.timestamps(micros), n)
    seconds = np.floor_divide(micros, 1_000_000)
    nanos = (micros - seconds * 1_000_000) * 1000
    sec = _tagged(0x08, rows.varint(seconds.view(np.uint64)), seconds != 0)
    nan = _tagged(0x10, rows.varint(nanos.astype(np.uint64)), nanos != 0)
    return rows.append(sec, nan) if n else Piece(np.zeros((0, 0), np.uint8))


@dataclass(frozen=True)
class JoinKeySpec:
    """A join key: its column and the Feast ValueType name its values are keyed as."""

    name: str
    value_type: str


def _key_value(array: pa.Array, value_type: str) -> Piece:
    n = len(array)
    type_id = KEY_TYPE_IDS.get(value_type)
    if type_id is None:
        raise ValueError(f"join keys of type {value_type} cannot be serialized by Feast")
    if value_type in ("STRING", "BYTES"):
        body = rows.from_arrow_binary(array)
        length = body.row_lengths().astype("<u4").view(np.uint8).reshape(n, 4)
        return rows.pack([rows.constant(struct.pack("<I", type_id), n), rows.fixed(length), body])
    if value_type == "INT32":
        raw = _numbers(array, np.int32).astype("<i4").view(np.uint8).reshape(n, 4)
    elif value_type == "UNIX_TIMESTAMP":
        raw = epoch_seconds(array).astype("<i8").view(np.uint8).reshape(n, 8)
    else:
        raw = _numbers(array, np.int64).astype("<i8").view(np.uint8).reshape(n, 8)
    header = struct.pack("<II", type_id, raw.shape[1])
    return rows.pack([rows.constant(header, n), rows.fixed(raw)])


def encode_entity_keys(
    columns: Mapping[str, pa.Array], join_keys: Sequence[JoinKeySpec], project: str
) -> Piece:
    """The Redis key of every row: serialized entity key (v3) + project name."""
    n = len(next(iter(columns.values())))
    names = [k.name for k in join_keys]
    parts = [rows.constant(entity_key_prefix(names), n)]
    for key in sorted(join_keys, key=lambda k: k.name):
        parts.append(_key_value(columns[key.name], key.value_type))
    parts.append(rows.constant(key_suffix(project), n))
    return rows.pack(parts)
