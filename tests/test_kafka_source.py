"""KafkaSource against a real Kafka-protocol broker (Tansu, see tests/kafka_broker.py).

Reads stop on a message count, never on "reached the end offset" (Tansu reports it short).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from featurepipe.errors import BackendUnavailable, InvalidInput
from featurepipe.stream.kafka import KafkaSource, create_topic, publish_kafka
from featurepipe.stream.source import RawBatch, encode_event
from tests.kafka_broker import free_port, kafka_bootstrap  # noqa: F401

N = 300


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def events_topic(bootstrap: str, n: int = N) -> str:
    """A new 2-partition topic holding ``n`` events keyed by entity (``seq`` 0..n-1)."""
    topic = unique("events")
    create_topic(bootstrap, topic, partitions=2)
    payloads = (encode_event({"entity": i % 13, "seq": i, "amount": i * 0.5}) for i in range(n))
    assert publish_kafka(bootstrap, topic, payloads,
                         key_of=lambda p: str(json.loads(p)["entity"])) == n
    return topic


def read(source: KafkaSource, count: int, max_messages: int = 1000,
         timeout: float = 30.0) -> list[RawBatch]:
    """Poll until at least ``count`` messages arrived (or fail after ``timeout`` seconds)."""
    batches: list[RawBatch] = []
    got = 0
    deadline = time.monotonic() + timeout
    while got < count:
        assert time.monotonic() < deadline, f"read {got} of {count} messages in {timeout}s"
        batch = source.poll(max_messages, timeout_seconds=0.5)
        if len(batch):
            batches.append(batch)
            got += len(batch)
    return batches


def records(batches: list[RawBatch]) -> list[tuple[str, int, dict]]:
    """(partition name, offset, event) for every message, in delivery order."""
    out = []
    for batch in batches:
        for payload, index, message_id in zip(batch.payloads, batch.partitions, batch.ids):
            name = batch.partition_names[index]
            assert message_id.rsplit(":", 1)[0] == name
            out.append((name, int(message_id.rsplit(":", 1)[1]), json.loads(payload)))
    return out


def merged_positions(batches: list[RawBatch]) -> dict[str, str]:
    positions: dict[str, str] = {}
    for batch in batches:
        positions.update(batch.positions)
    return positions


def test_reads_every_event_once_in_partition_order(kafka_bootstrap: str) -> None:  # noqa: F811
    topic = events_topic(kafka_bootstrap)
    source = KafkaSource(kafka_bootstrap, topic, group=unique("g"))
    assert source.name == f"kafka:{topic}"
    source.open(None)
    try:
        batches = read(source, N)
        assert len(source.poll(1000, timeout_seconds=0.5)) == 0  # nothing beyond the N
        lag = source.lag()
        source.commit(merged_positions(batches))
    finally:
        source.close()

    got = records(batches)
    assert sorted(e["seq"] for _, _, e in got) == list(range(N))  # all, exactly once
    by_partition: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for name, offset, event in got:
        by_partition[name].append((offset, event))
    assert set(by_partition) == {f"{topic}:0", f"{topic}:1"}
    for name, rows in by_partition.items():
        offsets = [o for o, _ in rows]
        assert offsets == list(range(len(rows))), name  # consecutive from 0, in order
        seqs = [event["seq"] for _, event in rows]
        assert seqs == sorted(seqs), name  # in produce order within the partition
    assert merged_positions(batches) == {n: str(len(r)) for n, r in by_partition.items()}
    for batch in batches:
        assert batch.partitions.dtype.name == "int32"
        assert len(batch.partitions) == len(batch.payloads) == len(batch.ids)
    assert lag == 0


def test_restart_from_checkpoint_continues_exactly_after_it(kafka_bootstrap: str) -> None:  # noqa: F811
    topic = events_topic(kafka_bootstrap)
    group = unique("g")
    first = KafkaSource(kafka_bootstrap, topic, group=group)
    first.open(None)
    try:
        before = read(first, N // 3, max_messages=37)
        lag = first.lag()
    finally:
        first.close()
    checkpoint = merged_positions(before)
    n_before = sum(len(b) for b in before)
    assert 0 < n_before < N
    assert lag is not None and 0 <= lag <= N - n_before

    second = KafkaSource(kafka_bootstrap, topic, group=group)  # a new worker, same group
    second.open(checkpoint)
    try:
        after = read(second, N - n_before)
        assert len(second.poll(1000, timeout_seconds=0.5)) == 0
    finally:
        second.close()

    seqs_before = [e["seq"] for _, _, e in records(before)]
    seqs_after = [e["seq"] for _, _, e in records(after)]
    assert not set(seqs_before) & set(seqs_after)  # nothing repeated
    assert sorted(seqs_before + seqs_after) == list(range(N))  # nothing lost
    first_offset_after: dict[str, int] = {}
    for name, offset, _ in records(after):
        first_offset_after.setdefault(name, offset)
    for name, offset in first_offset_after.items():
        assert offset == int(checkpoint.get(name, "0")), name


def test_commit_stores_offsets_in_the_group(kafka_bootstrap: str) -> None:  # noqa: F811
    topic = events_topic(kafka_bootstrap, n=40)
    group = unique("g")
    source = KafkaSource(kafka_bootstrap, topic, group=group)
    source.open(None)
    try:
        positions = merged_positions(read(source, 40))
        source.commit(positions)
        source.poll(10, timeout_seconds=0.2)  # serves the commit callback
    finally:
        source.close()
    reader = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    try:
        committed = reader.committed([TopicPartition(topic, p) for p in (0, 1)], timeout=10)
    finally:
        reader.close()
    assert {f"{tp.topic}:{tp.partition}": str(tp.offset) for tp in committed} == positions


def test_missing_topic_is_invalid_input_and_is_not_created(kafka_bootstrap: str) -> None:  # noqa: F811
    topic = unique("no-such-topic")
    source = KafkaSource(kafka_bootstrap, topic, group=unique("g"))
    with pytest.raises(InvalidInput, match=f"topic '{topic}' does not exist on {kafka_bootstrap}"
                       ".*create it"):
        source.open(None)
    with pytest.raises(InvalidInput, match="does not exist"):
        publish_kafka(kafka_bootstrap, topic, [b"{}"])
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=5).topics
    assert topic not in topics


def test_unreachable_broker_is_backend_unavailable() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    source = KafkaSource(bootstrap, "events", group="g")
    source.metadata_timeout_seconds = 1.0
    with pytest.raises(BackendUnavailable, match=f"cannot reach the Kafka broker at {bootstrap}"):
        source.open(None)


def test_bad_arguments_are_invalid_input(kafka_bootstrap: str) -> None:  # noqa: F811
    with pytest.raises(InvalidInput, match="start must be"):
        KafkaSource(kafka_bootstrap, "t", group="g", start="middle")
    source = KafkaSource(kafka_bootstrap, "t", group="g")
    with pytest.raises(InvalidInput, match="not a Kafka position"):
        source.open({"t:0": "0-1"})
    with pytest.raises(InvalidInput, match="call open"):
        source.poll(1, 0.1)
    topic = unique("dup")
    create_topic(kafka_bootstrap, topic, partitions=1)
    create_topic(kafka_bootstrap, topic, partitions=1, exist_ok=True)
    with pytest.raises(InvalidInput, match="already exists"):
        create_topic(kafka_bootstrap, topic, partitions=1)
