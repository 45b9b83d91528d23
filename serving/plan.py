"""What one kind of request needs, resolved once: the :class:`Plan` and its parts.

A plan names the join keys to read from the request, the Redis hashes and fields to
fetch (one HMGET per distinct entity key of each hash), the on-demand transformations to
run, and the response columns in order. Every part is an immutable value; the planner
(:mod:`serving.planner`) builds plans, the catalog (:mod:`serving.catalog`) caches them,
the reader (:mod:`serving.lookup`) follows them on every request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.registry import ServedValueType


@dataclass(frozen=True)
class JoinKey:
    """A join key as the request names it (``column``) and as Redis keys it (``key``)."""

    column: str
    key: str
    value_type: ServedValueType


@dataclass(frozen=True)
class ViewFields:
    """One view's fields inside a hash: where its timestamp and features sit.

    A windowed-aggregate view also reads its schedule (``schedule_field`` >= 0): its
    features' values are the schedule's row in force at the request's clock, ``columns``
    the schedule column of each of ``feature_fields``, ``empty`` each one's Value bytes
    when no row is in force yet (an empty window: a count or sum of 0, else null, ``b""``),
    ``names_crc`` the checksum the schedule must carry (the view's features, in order).
    """

    view: str
    ttl_seconds: float  # 0: values never go stale
    ts_field: int
    feature_fields: tuple[int, ...]
    schedule_field: int = -1
    names_crc: int = 0
    columns: tuple[int, ...] = ()
    empty: tuple[bytes, ...] = ()


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
class StoredFeature:
    """A stored feature the plan reads: where it sits and what an on-demand view calls it."""

    input_name: str  # "<view>__<feature>": an on-demand UDF sees this name and the feature's
    feature: str
    hash_index: int  # into Plan.hashes
    field_index: int  # into that hash's fields


@dataclass(frozen=True)
class OnDemandOutput:
    """One output of an on-demand view, as the response names it and the UDF returns it."""

    name: str  # the response column's name
    feature: str  # the name the UDF returns it under
    value_type: ServedValueType


@dataclass(frozen=True)
class OnDemandStep:
    """A python-mode on-demand feature view to run on the fetched features."""

    name: str
    udf: Callable[[dict[str, Any]], dict[str, Any]]  # dict of lists in and out (rows if singleton)
    singleton: bool
    inputs: tuple[int, ...]  # indexes into Plan.features
    request_fields: tuple[str, ...]
    outputs: tuple[OnDemandOutput, ...]


@dataclass(frozen=True)
class FeatureOut:
    """A response column that is a stored feature: ``Plan.features[feature]``."""

    feature: int


@dataclass(frozen=True)
class OnDemandOut:
    """A response column an on-demand view computes: ``Plan.on_demand[step].outputs[output]``."""

    step: int
    output: int


Output = FeatureOut | OnDemandOut


@dataclass(frozen=True)
class Plan:
    """Everything needed to answer one kind of request, in response order."""

    entity_columns: tuple[JoinKey, ...]
    hashes: tuple[HashRead, ...]
    features: tuple[StoredFeature, ...]
    on_demand: tuple[OnDemandStep, ...]
    request_fields: dict[str, ServedValueType]
    output: tuple[Output, ...]  # after the join keys, in order
    output_names: tuple[str, ...]
    response_metadata: bytes  # serialized feature names (join keys, then output_names)
