"""Keyed topics without a broker: Kafka's murmur2 against the Java client's own test vectors,
the message keys of entity keys, and the admission steps that keyed topics add (a message a
route produced twice, an event in the wrong partition)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from featurepipe.stream.admission import misplaced, redelivered
from featurepipe.stream.decode import MSG
from featurepipe.stream.keys import entity_keys, key_sets, keyed_topic, murmur2, partition_of
from featurepipe.stream.source import RawBatch

# org.apache.kafka.common.utils.UtilsTest#testMurmur2
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def _murmur2_reference(data: bytes) -> int:
    """Kafka's Java murmur2, line by line, on Python ints (the oracle for random keys)."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    h = (0x9747B28C ^ len(data)) & mask
    for i in range(len(data) // 4):
        k = int.from_bytes(data[4 * i:4 * i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    rest = len(data) % 4
    base = len(data) & ~3
    if rest >= 3:
        h ^= data[base + 2] << 16
    if rest >= 2:
        h ^= data[base + 1] << 8
    if rest >= 1:
        h ^= data[base]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


def test_murmur2_is_the_java_clients() -> None:
    got = murmur2(pa.array(list(JAVA_MURMUR2), pa.binary())).astype(np.int32)
    assert got.tolist() == list(JAVA_MURMUR2.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=30))
def test_murmur2_of_a_batch_equals_each_key_on_its_own(keys: list[bytes]) -> None:
    got = murmur2(pa.array(keys, pa.binary()))
    assert got.tolist() == [_murmur2_reference(k) for k in keys]
    assert partition_of(pa.array(keys, pa.binary()), 7).tolist() == \
        [(_murmur2_reference(k) & 0x7FFFFFFF) % 7 for k in keys]


def test_entity_keys_are_stable_text() -> None:
    table = pa.table({"user_id": pa.array([7, -3, None], pa.int64()), "country": ["DE", "a\"b", "FR"]})
    assert entity_keys(table, ("user_id",)).to_pylist() == [b"7", b"-3", None]
    assert entity_keys(table, ("user_id", "country")).to_pylist() == [b'[7,"DE"]', b'[-3,"a\\"b"]', None]
    assert keyed_topic("transactions", ("user_id",)) == "transactions.by-user_id"
    assert key_sets([("user_id",), ("merchant_id",), ("user_id",)]) == [("merchant_id",), ("user_id",)]


def _raw(origins: list[str | None]) -> RawBatch:
    n = len(origins)
    return RawBatch([b"{}"] * n, np.zeros(n, np.int32), ["t.by-k:0"], origins=origins)


def test_a_message_routed_again_is_dropped_until_the_route_passes_its_last() -> None:
    mask, seen = redelivered(_raw(["raw:0:5", "raw:1:2", "raw:0:6", None]), {})
    assert mask.tolist() == [False, False, False, False]
    assert seen == {"raw:0": 6, "raw:1": 2}
    # the route crashed and produced raw:0 from offset 4 again, then went on
    mask, seen = redelivered(_raw(["raw:0:4", "raw:0:5", "raw:0:6", "raw:1:3", "raw:0:7"]), seen)
    assert mask.tolist() == [True, True, True, False, False]
    assert seen == {"raw:0": 7, "raw:1": 3}
    assert redelivered(RawBatch([b"{}"], np.zeros(1, np.int32), ["p"]), seen)[0].tolist() == [False]


def test_an_event_keyed_into_another_partition_is_a_dead_letter() -> None:
    users = pa.array(np.arange(200), pa.int64())
    home = partition_of(entity_keys(pa.table({"user_id": users}), ("user_id",)), 4)
    events = pa.table({"user_id": users, MSG: pa.array(np.arange(200) * 2, pa.int64())})
    dead = misplaced(events, ("user_id",), 1, 4)
    assert sorted(dead.index.tolist()) == (np.flatnonzero(home != 1) * 2).tolist()
    assert set(dead.checks) == {"partition"}
    first = int(np.flatnonzero(home != 1)[0])
    assert dead.reasons[0].startswith(f"partition: the event's user_id belongs in partition {home[first]} of 4")
    assert len(misplaced(events.filter(pa.array(home == 1)), ("user_id",), 1, 4)) == 0
