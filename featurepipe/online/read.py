"""Online feature values in-process, for Python users (batch scoring, notebooks): no server.

:func:`online_features` reads the same Redis hashes as the gRPC feature server, in one
round trip, and picks a windowed-aggregate view's values from each entity's window schedule
at the instant asked (by default now) with the server's own reader
(:func:`featurepipe.online.schedule.row_in_force`): the same values, value for value, as the
server and as the offline join at that instant. Other views' values are Feast's stored
ones, as Feast's SDK reads them.

    from featurepipe.online.read import online_features

    frame = online_features(store, [{"user_id": 7}], ["user_transaction_stats:txn_count_1h"])
    frame = online_features(store, entity_df, "fraud_detection_v1", at=datetime(2026, 12, 7, 9, tzinfo=UTC))

Unlike Feast's SDK, an entity idle for a week gets a 1h count of 0, not the count of its
last busy hour; and online data written before request-time windows raises
:class:`~featurepipe.online.schedule.StaleSchedule` ("run `featurepipe materialize`")
rather than return values whose windows never slide.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from featurepipe.config import online_target
from featurepipe.errors import InvalidInput, NotFound
from featurepipe.online import codec
from featurepipe.online.layout import feature_field, timestamp_field
from featurepipe.online.plan import aggregations, is_windowed
from featurepipe.online.schedule import (
    StaleSchedule,
    empty_value,
    names_crc,
    row_in_force,
    schedule_field,
)

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureService, FeatureStore, FeatureView

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class _Requested:
    """One view's requested features, and what reading them needs."""

    view: FeatureView
    features: tuple[str, ...]
    join_keys: tuple[codec.JoinKeySpec, ...]
    windowed: bool
    functions: Mapping[str, str]  # windowed: feature -> aggregation function
    crc: int  # windowed: names_crc of the view's features

    @property
    def fields(self) -> list[bytes]:
        """The hash fields read: the timestamp, the features, the schedule (windowed)."""
        name = self.view.name
        extra = [schedule_field(name)] if self.windowed else []
        return [timestamp_field(name), *(feature_field(name, f) for f in self.features), *extra]


def online_features(
    store: FeatureStore,
    entity_rows: Sequence[Mapping[str, Any]] | pd.DataFrame,
    features: Sequence[str] | str | FeatureService,
    at: datetime | None = None,
    full_feature_names: bool = False,
) -> pd.DataFrame:
    """The online values of ``features`` for ``entity_rows`` as of ``at`` (default: now), as a
    DataFrame: the join keys, then one column per feature in the order asked.

    ``features``: ``"view:feature"`` references, or a feature service (or its name) whose
    views are stored views (on-demand views: ask the feature server or Feast's SDK).
    ``entity_rows``: dicts or a DataFrame with each view's join keys. A missing entity gives
    None; an entity with no event before ``at`` gives the values of empty windows (count
    and sum 0, the rest None).
    """
    import pandas as pd

    requested = _resolve(store, features)
    frame = entity_rows if isinstance(entity_rows, pd.DataFrame) else pd.DataFrame(list(entity_rows))
    at_us = _micros(at) if at is not None else time.time_ns() // 1000
    client = online_target(store.config).client()  # one server, or a cluster (its pipeline splits per node)
    try:
        keys = {id(r): _keys(frame, r, store.project) for r in requested}
        pipe = client.pipeline(transaction=False)
        for r in requested:
            for key in keys[id(r)]:
                pipe.hmget(key, r.fields)
        replies = pipe.execute()
    finally:
        client.close()
    out: dict[str, list[Any]] = {}
    for r in requested:
        for jk in r.join_keys:
            out.setdefault(jk.name, frame[jk.name].tolist())
    offset = 0
    for r in requested:
        block = replies[offset:offset + len(frame)]
        offset += len(frame)
        values = [_values(r, reply, at_us) for reply in block]
        for i, feature in enumerate(r.features):
            out[f"{r.view.name}__{feature}" if full_feature_names else feature] = [row[i] for row in values]
    return pd.DataFrame(out)


def _values(r: _Requested, reply: list[bytes | None], at_us: int) -> list[Any]:
    """One entity's values of ``r``'s features from its HMGET reply."""
    if not r.windowed:
        return [_stored_value(raw) for raw in reply[1:]]
    schedule = reply[-1]
    if not schedule:
        if reply[0]:
            raise StaleSchedule(
                f"the online store holds {r.view.name!r} values written before request-time windows (no window "
                "schedule next to them); run `featurepipe materialize` to rebuild it"
            )
        return [None] * len(r.features)
    found = row_in_force(schedule, r.crc, at_us)
    if found.row < 0:
        return [empty_value(r.functions[f]) for f in r.features]
    names = [f.name for f in r.view.features]
    return [found.value(names.index(f)) for f in r.features]


def _stored_value(raw: bytes | None) -> Any:
    """A stored Feast Value as Feast's SDK gives it (None when missing or null)."""
    if not raw:
        return None
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    return feast_value_type_to_python_type(Value.FromString(raw))


def _keys(frame: pd.DataFrame, r: _Requested, project: str) -> list[bytes]:
    """The Redis key of every entity row for ``r``'s view (Feast's serialisation)."""
    missing = [jk.name for jk in r.join_keys if jk.name not in frame.columns]
    if missing:
        raise InvalidInput(
            f"entity rows have no column(s) {missing}, the join keys of feature view {r.view.name!r}; "
            f"they have {list(frame.columns)}"
        )
    columns = {jk.name: pa.array(frame[jk.name].tolist()) for jk in r.join_keys}
    piece = codec.encode_entity_keys(columns, list(r.join_keys), project)
    lengths = piece.row_lengths()
    return [bytes(piece.data[i, :lengths[i]]) for i in range(piece.rows)]


def _resolve(store: FeatureStore, features: Sequence[str] | str | FeatureService) -> list[_Requested]:
    """The requested features grouped by view, in the order asked."""
    from feast import FeatureService

    pairs: list[tuple[str, str]] = []
    if isinstance(features, str | FeatureService):
        service = store.get_feature_service(features) if isinstance(features, str) else features
        on_demand = {v.name for v in store.list_on_demand_feature_views()}
        odfvs = sorted(p.name for p in service.feature_view_projections if p.name in on_demand)
        if odfvs:
            raise InvalidInput(
                f"feature service {service.name!r} has on-demand views {odfvs}, which online_features does not "
                "compute; list the stored features as 'view:feature', or ask the feature server"
            )
        pairs = [(p.name, f.name) for p in service.feature_view_projections for f in p.features]
    else:
        for ref in features:
            view, sep, feature = ref.partition(":")
            if not sep or not view or not feature:
                raise InvalidInput(f"feature reference {ref!r} is malformed; write it as 'view:feature'")
            pairs.append((view, feature))
    by_view: dict[str, list[str]] = {}
    for view, feature in pairs:
        by_view.setdefault(view, []).append(feature)
    out = []
    for name, names in by_view.items():
        try:
            fv = store.get_feature_view(name)
        except Exception as exc:
            raise NotFound(f"no feature view {name!r} in the registry; run `featurepipe apply`") from exc
        known = [f.name for f in fv.features]
        unknown = [f for f in names if f not in known]
        if unknown:
            raise NotFound(f"feature view {name!r} has no feature(s) {unknown}; it has {known}")
        windowed = is_windowed(fv)
        out.append(_Requested(
            view=fv, features=tuple(names),
            join_keys=tuple(codec.JoinKeySpec(c.name, c.dtype.to_value_type().name) for c in fv.entity_columns),
            windowed=windowed,
            functions={a.name: a.function for a in aggregations(fv)} if windowed else {},
            crc=names_crc(known) if windowed else 0,
        ))
    return out


def _micros(value: datetime) -> int:
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
