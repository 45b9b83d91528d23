"""Python-mode on-demand feature views, run on the fetched features as Feast runs them.

Like ``OnDemandFeatureView.transform_dict``: the UDF gets a dict of lists (one value per
entity row) holding the join keys, the request fields and each source feature under both
``feature`` and ``view__feature``, and returns a dict of lists. Source features are decoded
from their stored bytes only when the UDF reads them (:class:`LazyInputs`); a value older
than its view's TTL reaches the UDF as missing, as the point-in-time join gives it to
training. Outputs are PRESENT, or NULL_VALUE when the transformation returned None or NaN;
like Feast, they carry an empty event timestamp.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from featurepipe.errors import FeaturepipeError
from serving import wire
from serving.columns import NULL_VALUE, PRESENT
from serving.plan import OnDemandOutput, OnDemandStep, Plan
from serving.registry import ServedValueType
from serving.values import proto_values, python_value

_pack_double = struct.Struct("<d").pack
_FRAMED_DOUBLE = b"\x0a\x09\x29"  # FeatureVector field 1, length 9, Value field 5 (double)

RawColumn = Callable[[int], "list[bytes | None]"]  # Plan.features index -> stored Value bytes per row


class ComputedColumn(NamedTuple):
    """One on-demand output over the request's rows: framed values and their statuses
    (a NamedTuple, built per request, as :class:`~serving.columns.FetchedColumn`)."""

    values: list[bytes]  # framed as field 1 of a FeatureVector
    statuses: list[int]  # FieldStatus numbers


def _decoder(column: RawColumn, index: int) -> Callable[[], list[Any]]:
    """Decodes one on-demand input column once, on first use."""
    decoded: list[list[Any]] = []

    def decode() -> list[Any]:
        if not decoded:
            decoded.append([python_value(raw) for raw in column(index)])
        return decoded[0]

    return decode


class LazyInputs(dict):  # type: ignore[type-arg]
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

    __hash__ = None

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


def run_on_demand(
    plan: Plan,
    step: OnDemandStep,
    column: RawColumn,
    keys_in: Mapping[str, list[Any]],
    request: Mapping[str, list[Any]],
    n: int,
) -> list[ComputedColumn]:
    """Run one on-demand view over ``n`` rows; per output of ``step``, its column.

    ``column(i)`` gives the stored bytes of ``plan.features[i]`` per row, ``keys_in`` the
    Python values of the join keys, ``request`` those of the request fields.
    """
    inputs: dict[str, list[Any]] = {k: list(v) for k, v in keys_in.items()}  # a UDF may mutate
    for name in step.request_fields:
        inputs[name] = request[name]
    lazy: dict[str, Callable[[], list[Any]]] = {}
    for index in step.inputs:
        feature = plan.features[index]
        decode = _decoder(column, index)
        lazy[feature.input_name] = decode
        lazy.setdefault(feature.feature, decode)
    result = _call_udf(step, LazyInputs(inputs, lazy), n)
    return [_output_column(step.name, output, result.get(output.feature), n)
            for output in step.outputs]


def _call_udf(step: OnDemandStep, inputs: LazyInputs, n: int) -> Mapping[str, Any]:
    """The UDF's result: called once on the columns, or once per row when singleton."""
    try:
        if step.singleton:
            whole = dict(inputs)
            rows = [step.udf({k: v[i] for k, v in whole.items()}) for i in range(n)]
            return {o.feature: [row.get(o.feature) for row in rows] for o in step.outputs}
        return step.udf(inputs)
    except Exception as exc:
        raise FeaturepipeError(
            f"on-demand feature view {step.name!r} raised {type(exc).__name__}: {exc}; fix its "
            "transformation (feature_repo/) or the request_context values"
        ) from exc


def _output_column(view: str, output: OnDemandOutput, values: Any, n: int) -> ComputedColumn:
    """One returned output, checked (present, one value per row, of its type) and framed."""
    if values is None:
        raise FeaturepipeError(
            f"on-demand feature view {view!r} returned no {output.feature!r}; make its "
            "transformation return every feature of its schema"
        )
    if not isinstance(values, list):
        values = [values]
    if len(values) != n:
        raise FeaturepipeError(
            f"on-demand feature view {view!r} returned {len(values)} values of "
            f"{output.feature!r} for {n} rows; it must return one per row"
        )
    if output.value_type == ServedValueType.DOUBLE and all(type(v) is float for v in values):
        # the common case, serialized without protobuf: field 5 (double), fixed64;
        # NaN is an empty Value, as Feast converts it
        return ComputedColumn(
            [_FRAMED_DOUBLE + _pack_double(v) if v == v else wire.EMPTY_VALUE for v in values],
            [PRESENT if v == v else NULL_VALUE for v in values],
        )
    try:
        protos = proto_values(values, output.value_type)
    except (TypeError, ValueError, AssertionError) as exc:
        raise FeaturepipeError(
            f"on-demand feature view {view!r} returned {output.feature!r} values that "
            f"are not {output.value_type.name}: {exc}"
        ) from exc
    return ComputedColumn(
        [wire.framed_value(p.SerializeToString()) for p in protos],
        [PRESENT if p.WhichOneof("val") else NULL_VALUE for p in protos],
    )
