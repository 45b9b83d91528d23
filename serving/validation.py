"""Checks of a GetOnlineFeatures request against its plan, before anything is read.

Every check raises ``InvalidInput`` with what was sent, what the plan needs and what to
send instead: the message is the gRPC status detail a caller sees (INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from featurepipe.errors import InvalidInput
from serving import protos
from serving.plan import Plan
from serving.registry import ServedValueType
from serving.values import python_column

RepeatedValue = Any  # serving.protos.RepeatedValue messages

_NUMERIC = ("int64_val", "int32_val", "double_val", "float_val")
# Value fields accepted for a request-context field of each type (unlisted types: any).
REQUEST_KINDS: dict[Any, tuple[str, ...]] = {
    ServedValueType.DOUBLE: _NUMERIC,
    ServedValueType.FLOAT: _NUMERIC,
    ServedValueType.INT64: ("int64_val", "int32_val"),
    ServedValueType.INT32: ("int32_val", "int64_val"),
    ServedValueType.STRING: ("string_val",),
    ServedValueType.BYTES: ("bytes_val",),
    ServedValueType.BOOL: ("bool_val",),
    ServedValueType.UNIX_TIMESTAMP: ("unix_timestamp_val", "int64_val"),
}


def parse_request(raw: bytes) -> Any:
    """The ``GetOnlineFeaturesRequest`` in ``raw``, unknown fields dropped (the entity
    columns are copied into the response as sent). Undecodable bytes are InvalidInput
    (gRPC's own deserializer would answer INTERNAL)."""
    try:
        request = protos.GetOnlineFeaturesRequest.FromString(raw)
        request.DiscardUnknownFields()
        return request
    except Exception as exc:
        raise InvalidInput(
            f"the request is not a feast.serving.GetOnlineFeaturesRequest ({exc}); build it "
            "with Feast's generated protos or serving.FeatureClient"
        ) from exc


def row_count(
    plan: Plan,
    entities: Mapping[str, RepeatedValue],
    request_context: Mapping[str, RepeatedValue],
    max_rows: int,
) -> int:
    """The request's number of entity rows: every join key of ``plan`` sent, every
    column as long, at least one row and at most ``max_rows``."""
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
    if n > max_rows:
        raise InvalidInput(
            f"{n} entity rows exceed this server's limit of {max_rows}; split the "
            f"request into batches of at most {max_rows} rows"
        )
    return n


def request_values(
    plan: Plan,
    entities: Mapping[str, RepeatedValue],
    request_context: Mapping[str, RepeatedValue],
    n: int,
) -> dict[str, list[Any]]:
    """Python values of the request fields the plan's on-demand views need, each checked
    for presence, length ``n`` and type."""
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
