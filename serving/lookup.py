"""Answer one GetOnlineFeatures request from Redis, in Feast's layout and response shape.

The steps, each in its own module: check the request against its plan
(:mod:`serving.validation`), turn the join-key values into Redis keys
(:mod:`serving.layout`), send one pipelined round trip of HMGETs (:mod:`serving.fetch`,
on a Redis Cluster one per node at once: :mod:`serving.cluster_fetch`; one HMGET per
distinct entity key of each hash the plan reads: views with the same join keys share one
hash), decode the replies into columns (:mod:`serving.columns`), run the
on-demand views (:mod:`serving.on_demand`), and frame the response (:mod:`serving.wire`).
The stored Value and Timestamp bytes are copied into the serialized response; only the
inputs of on-demand views are parsed. Nothing goes through pandas.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import Any

import redis
from redis.cluster import RedisCluster

from serving import wire
from serving.clock import request_clock
from serving.cluster_fetch import ClusterFetcher
from serving.columns import OUTSIDE_MAX_AGE, PRESENT, decode_replies, stored_values
from serving.fetch import Fetcher, RedisFetcher
from serving.layout import encode_entity_column
from serving.on_demand import run_on_demand
from serving.plan import FeatureOut, Plan
from serving.validation import RepeatedValue, request_values, row_count
from serving.values import python_column


class OnlineReader:
    """Reads the features of a :class:`~serving.plan.Plan` for a batch of entity rows."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        max_rows: int = 1000,
        on_fetch: Callable[[float], None] | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.client = client  # the Redis (or Redis Cluster) client the reader fetches through
        # on_fetch: seconds of each request's round trips
        self.fetcher: Fetcher = (
            ClusterFetcher(client, on_fetch) if isinstance(client, RedisCluster)
            else RedisFetcher(client, on_fetch)
        )
        self.max_rows = max_rows
        self.clock = clock or request_clock()  # microseconds since the epoch, now

    def ping(self) -> bool:
        """True when Redis answers a PING (on a cluster: every primary)."""
        return self.fetcher.ping()

    @property
    def node_health(self) -> Mapping[str, bool]:
        """``host:port`` of each Redis node (each primary of a cluster), and whether it
        answered the last PING, or was found down by a request since."""
        return self.fetcher.node_health

    def close(self) -> None:
        """Close the Redis connections."""
        self.fetcher.close()

    def read(
        self,
        plan: Plan,
        entities: Mapping[str, RepeatedValue],
        request_context: Mapping[str, RepeatedValue],
    ) -> tuple[bytes, int]:
        """The serialized GetOnlineFeaturesResponse for ``entities`` under ``plan``, and
        its number of entity rows."""
        now_us = self.clock()  # the request's instant: windowed features are asked at it
        n = row_count(plan, entities, request_context, self.max_rows)
        request = request_values(plan, entities, request_context, n)
        keys, row_slots = _entity_keys(plan, entities, n)
        cells = decode_replies(plan, keys, self.fetcher.fetch(plan, keys), now_us)
        pickers = [None if rows is None else itemgetter(*rows) for rows in row_slots]

        def pick(values: list[Any], hash_index: int) -> Any:
            # a column over a hash's distinct keys, spread back over the request's rows
            rows = row_slots[hash_index]
            if rows is None:
                return values
            picked = pickers[hash_index](values)  # type: ignore[misc]
            return picked if len(rows) > 1 else [picked]

        def raw_column(index: int) -> list[bytes | None]:
            # an on-demand view sees a value older than its view's TTL as missing, as the
            # point-in-time join gives it to training (no train/serve skew)
            feature = plan.features[index]
            fetched = cells[feature.hash_index][feature.field_index]
            raws, stats = stored_values(fetched), fetched.statuses
            if OUTSIDE_MAX_AGE in stats:
                raws = [None if st == OUTSIDE_MAX_AGE else raw for raw, st in zip(raws, stats, strict=True)]
            return pick(raws, feature.hash_index)  # type: ignore[no-any-return]

        keys_in = {jk.column: python_column(entities[jk.column].val)
                   for jk in plan.entity_columns} if plan.on_demand else {}
        computed = [run_on_demand(plan, step, raw_column, keys_in, request, n)
                    for step in plan.on_demand]
        parts = [plan.response_metadata]
        present, no_times = [PRESENT] * n, [wire.EMPTY_TIMESTAMP] * n
        for jk in plan.entity_columns:
            # RepeatedValue.val and FeatureVector.values are both field 1 (repeated Value): the
            # request's column serialized is the response's values, framed (unknown fields
            # were discarded when the request was parsed)
            parts.append(wire.column([entities[jk.column].SerializeToString()], present, no_times))
        for out in plan.output:
            if isinstance(out, FeatureOut):
                feature = plan.features[out.feature]
                h = feature.hash_index
                fetched = cells[h][feature.field_index]
                parts.append(wire.column(pick(fetched.values, h), pick(fetched.statuses, h),
                                         pick(fetched.timestamps, h)))
            else:
                column = computed[out.step][out.output]
                parts.append(wire.column(column.values, column.statuses, no_times))
        return b"".join(parts), n


def _entity_keys(
    plan: Plan, entities: Mapping[str, RepeatedValue], n: int
) -> tuple[list[list[bytes]], list[list[int] | None]]:
    """Per hash of ``plan``: its distinct Redis keys for the request's ``n`` rows, and
    which of them each row reads (None: row i reads key i, no key repeats)."""
    encoded = {
        jk.column: encode_entity_column(entities[jk.column].val, jk.value_type, jk.column)
        for jk in plan.entity_columns
    }
    keys: list[list[bytes]] = []
    row_slots: list[list[int] | None] = []
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
    return keys, row_slots
