"""Feast's Redis key layout: the names, shared by the writer (materialise) and the reader (serve).

One Redis HASH per (entity key, project). Its key is Feast's entity-key serialization
(version 3) followed by the project name; it holds one field per feature,
``mmh3("<view>:<feature>")`` (4 bytes, little endian), whose value is a serialized
``feast.types.Value``, and one ``_ts:<view>`` field per view with a serialized
``google.protobuf.Timestamp``. Views keyed by the same join keys share the hash. See
``feast/infra/online_stores/redis.py`` and ``feast/infra/key_encoding_utils.py``.

Light on purpose (``struct`` and ``mmh3`` only): the serving process imports it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import mmh3

ENTITY_KEY_SERIALIZATION_VERSION = 3

# feast.value_type.ValueType numbers of the types a join key can have (Feast writes the
# number into the key, before each value).
KEY_TYPE_IDS = {"BYTES": 1, "STRING": 2, "INT32": 3, "INT64": 4, "UNIX_TIMESTAMP": 8}


def feature_field(view: str, feature: str) -> bytes:
    """The hash field holding ``view:feature``: MurmurHash3 x86_32, seed 0, 4 bytes LE."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def timestamp_field(view: str) -> bytes:
    """The hash field holding the event timestamp of ``view``'s row."""
    return f"_ts:{view}".encode()


def entity_key_prefix(join_keys: Sequence[str]) -> bytes:
    """The constant head of the serialized entity key: key count and sorted key names."""
    parts = [struct.pack("<I", len(join_keys))]
    for name in sorted(join_keys):
        encoded = name.encode("utf8")
        parts.append(struct.pack("<II", KEY_TYPE_IDS["STRING"], len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def key_suffix(project: str) -> bytes:
    """What follows the serialized entity key in the Redis key: the project name."""
    return project.encode("utf8")
