"""One contract for every event source: what the stream job's loop relies on.

Every test runs once per implementation in ``IMPLEMENTATIONS``, each against its real
server: :class:`~featurepipe.stream.source.RedisStreamSource` on the session's
redis-server (``redis_url``, tests/conftest.py) and
:class:`~featurepipe.stream.kafka.KafkaSource` on a real Kafka-protocol broker (Tansu,
``kafka_bootstrap``, tests/kafka_broker.py). The contract is the one documented on
:class:`~featurepipe.stream.source.EventSource`. What only one implementation promises
(Kafka's offsets, committed group offsets, topic creation) stays in its own test file.

Reads stop on a message count, never on "nothing came within a timeout": a Kafka consumer
sees nothing until its group has joined (about 3 s on Tansu), so an empty poll proves
nothing there. "Nothing more" is shown by publishing newer messages and checking that
exactly those come next.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import pytest
import redis
from confluent_kafka import Producer

from featurepipe.errors import InvalidInput
from featurepipe.stream.kafka import KafkaSource, create_topic, publish_kafka
from featurepipe.stream.source import (
    EventSource,
    RawBatch,
    RedisStreamSource,
    encode_event,
    publish_redis,
)
from tests.kafka_broker import kafka_bootstrap  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration  # every test starts a server (through the `backend` fixture)

IMPLEMENTATIONS = ("redis", "kafka")
N = 120
ENTITIES = 13  # events are keyed by entity: a Kafka topic spreads them over its partitions


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def event(seq: int) -> bytes:
    """Event ``seq`` as a source carries it (the job decodes these)."""
    return encode_event({"entity": seq % ENTITIES, "seq": seq, "amount": seq * 0.5})


class Backend(Protocol):
    """A server with one implementation of the source interface: make a source over a new
    stream/topic, publish to it. ``partitions``: how many partitions a new one has."""

    kind: str
    partitions: int

    def create(self) -> str:
        """A new, empty stream/topic; its name."""

    def publish(self, name: str, payloads: Sequence[bytes], keys: Sequence[str] | None = None) -> None:
        """Append ``payloads`` in order; ``keys`` (one each) choose the partition where there
        are several (default: the event's entity)."""

    def publish_without_payload(self, name: str, key: str) -> None:
        """A message that carries no event at all (a foreign producer's)."""

    def source(self, name: str, group: str, start: str = "earliest") -> EventSource:
        """A new, unopened source over ``name`` in consumer group ``group``."""

    def partition_names(self, name: str) -> set[str]:
        """The names the source gives the partitions of ``name``."""


@dataclass
class RedisBackend:
    url: str
    kind: str = "redis"
    partitions: int = 1

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(self.url)
        self.created: list[str] = []

    def create(self) -> str:
        name = unique("contract")
        self.client.xgroup_create(name, "contract-setup", id="$", mkstream=True)  # an empty stream
        self.client.xgroup_destroy(name, "contract-setup")
        self.created.append(name)
        return name

    def publish(self, name: str, payloads: Sequence[bytes], keys: Sequence[str] | None = None) -> None:
        assert publish_redis(self.client, name, payloads) == len(payloads)

    def publish_without_payload(self, name: str, key: str) -> None:
        self.client.xadd(name, {b"not-the-event-field": key.encode()})

    def source(self, name: str, group: str, start: str = "earliest") -> EventSource:
        return RedisStreamSource(redis.Redis.from_url(self.url), name, group, consumer="w0", start=start)

    def partition_names(self, name: str) -> set[str]:
        return {name}

    def close(self) -> None:
        if self.created:
            self.client.delete(*self.created)
        self.client.close()


@dataclass
class KafkaBackend:
    bootstrap: str
    kind: str = "kafka"
    partitions: int = 2

    def create(self) -> str:
        name = unique("contract")
        create_topic(self.bootstrap, name, partitions=self.partitions)
        return name

    def publish(self, name: str, payloads: Sequence[bytes], keys: Sequence[str] | None = None) -> None:
        given = iter(keys) if keys is not None else None

        def key_of(payload: bytes) -> str:  # called once per payload, in order
            return next(given) if given is not None else str(json.loads(payload)["entity"])

        assert publish_kafka(self.bootstrap, name, payloads, key_of=key_of) == len(payloads)

    def publish_without_payload(self, name: str, key: str) -> None:
        # Kafka's default (murmur2) partitioner, as publish_kafka's: the same key, the same partition
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True,
                             "partitioner": "murmur2_random"})
        producer.produce(name, value=None, key=key)
        assert producer.flush(30) == 0

    def source(self, name: str, group: str, start: str = "earliest") -> EventSource:
        return KafkaSource(self.bootstrap, name, group, start=start)

    def partition_names(self, name: str) -> set[str]:
        return {f"{name}:{p}" for p in range(self.partitions)}


@pytest.fixture(params=IMPLEMENTATIONS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each implementation on its real server (started once per session)."""
    if request.param == "redis":
        server = RedisBackend(request.getfixturevalue("redis_url"))
        try:
            yield server
        finally:
            server.close()
    else:
        yield KafkaBackend(request.getfixturevalue("kafka_bootstrap"))


@dataclass(frozen=True)
class Delivered:
    """One message as a source delivered it."""

    partition: str
    id: str
    payload: bytes

    @property
    def seq(self) -> int:
        return int(json.loads(self.payload)["seq"])


def read(source: EventSource, count: int, max_messages: int = 1000, timeout: float = 30.0) -> list[RawBatch]:
    """Poll until at least ``count`` messages came (fails after ``timeout`` seconds)."""
    batches: list[RawBatch] = []
    got = 0
    deadline = time.monotonic() + timeout
    while got < count:
        assert time.monotonic() < deadline, f"{source.name}: read {got} of {count} messages in {timeout}s"
        batch = source.poll(max_messages, 0.5)
        if len(batch):
            batches.append(batch)
            got += len(batch)
    return batches


def delivered(batches: Sequence[RawBatch]) -> list[Delivered]:
    """Every message of ``batches`` in delivery order, checking each batch's shape: one
    partition index and one id per payload, indexes into ``partition_names``."""
    out = []
    for batch in batches:
        assert batch.partitions.dtype.name == "int32"
        assert len(batch.payloads) == len(batch.partitions) == len(batch.ids) == len(batch)
        assert all(0 <= int(i) < len(batch.partition_names) for i in batch.partitions)
        out += [Delivered(batch.partition_names[int(i)], message_id, payload)
                for payload, i, message_id in zip(batch.payloads, batch.partitions, batch.ids)]
    return out


def by_partition(messages: Sequence[Delivered]) -> dict[str, list[Delivered]]:
    out: dict[str, list[Delivered]] = defaultdict(list)
    for m in messages:
        out[m.partition].append(m)
    return dict(out)


def merged_positions(batches: Sequence[RawBatch]) -> dict[str, str]:
    """The positions after ``batches``, as the job merges them into its checkpoint."""
    positions: dict[str, str] = {}
    for batch in batches:
        positions.update(batch.positions)
    return positions


def opened(backend: Backend, name: str, group: str, positions: dict[str, str] | None = None) -> EventSource:
    source = backend.source(name, group)
    source.open(positions)
    return source


def test_delivers_every_message_once_in_publish_order_per_partition(backend: Backend) -> None:
    name = backend.create()
    published_ms = time.time() * 1000
    backend.publish(name, [event(i) for i in range(N)])
    source = opened(backend, name, unique("g"))
    try:
        batches = read(source, N, max_messages=25)
    finally:
        source.close()
    got = delivered(batches)
    assert sorted(m.seq for m in got) == list(range(N))  # all, exactly once
    assert len({m.id for m in got}) == N  # an id each, across batches: the dead letters' message_id
    partitions = by_partition(got)
    assert set(partitions) == backend.partition_names(name)  # every partition delivered (Kafka: keys spread)
    for partition, messages in partitions.items():
        assert [m.seq for m in messages] == sorted(m.seq for m in messages), partition
    assert name in source.name
    for batch in batches:  # when the broker knows when each message came, the times are now's
        if batch.publish_ms is not None:
            assert len(batch.publish_ms) == len(batch)
            assert all(published_ms - 5_000 <= t <= time.time() * 1000 + 5_000 for t in batch.publish_ms)


def test_poll_never_returns_more_than_max_messages(backend: Backend) -> None:
    name = backend.create()
    backend.publish(name, [event(i) for i in range(50)])
    source = opened(backend, name, unique("g"))
    try:
        batches = read(source, 50, max_messages=7)
        backend.publish(name, [event(50), event(51)])
        one = read(source, 1, max_messages=1)
    finally:
        source.close()
    assert all(1 <= len(b) <= 7 for b in batches), [len(b) for b in batches]
    assert sorted(m.seq for m in delivered(batches)) == list(range(50))
    assert [len(b) for b in one] == [1] and delivered(one)[0].seq in (50, 51)


def test_positions_name_exactly_the_partitions_a_batch_delivered_from(backend: Backend) -> None:
    name = backend.create()
    backend.publish(name, [event(i) for i in range(N)])
    source = opened(backend, name, unique("g"))
    try:
        batches = read(source, N, max_messages=9)
    finally:
        source.close()
    for batch in batches:
        assert set(batch.positions) == {m.partition for m in delivered([batch])}
        assert all(isinstance(p, str) and p for p in batch.positions.values())
    assert set(merged_positions(batches)) == backend.partition_names(name)


def test_reopen_at_a_checkpoint_resumes_exactly_after_it(backend: Backend) -> None:
    """A worker restarted from its checkpoint (positions merged from the batches processed,
    committed as the job does) reads every later message once and none before it."""
    name = backend.create()
    backend.publish(name, [event(i) for i in range(N)])
    group = unique("g")
    first = opened(backend, name, group)
    try:
        before = read(first, N // 3, max_messages=11)
        n_before = sum(len(b) for b in before)
        lag = first.lag()
        checkpoint = merged_positions(before)
        first.commit(checkpoint)
    finally:
        first.close()
    assert 0 < n_before < N
    assert lag is None or 0 <= lag <= N - n_before

    second = opened(backend, name, group, checkpoint)  # the restarted worker
    try:
        backend.publish(name, [event(i) for i in range(N, N + 2 * ENTITIES)])  # after: no loss at the end
        after = read(second, N - n_before + 2 * ENTITIES)
    finally:
        second.close()
    seqs_before = [m.seq for m in delivered(before)]
    seqs_after = [m.seq for m in delivered(after)]
    assert not set(seqs_before) & set(seqs_after)  # nothing twice
    assert sorted(seqs_before + seqs_after) == list(range(N + 2 * ENTITIES))  # nothing lost


def test_reopen_at_the_end_delivers_only_later_messages(backend: Backend) -> None:
    name = backend.create()
    backend.publish(name, [event(i) for i in range(N)])
    group = unique("g")
    first = opened(backend, name, group)
    try:
        checkpoint = merged_positions(read(first, N))
        first.commit(checkpoint)
    finally:
        first.close()
    later = list(range(N, N + 2 * ENTITIES))  # every entity twice: every Kafka partition gets some
    second = opened(backend, name, group, checkpoint)
    try:
        backend.publish(name, [event(i) for i in later])
        after = read(second, len(later))
    finally:
        second.close()
    assert sorted(m.seq for m in delivered(after)) == later


def test_open_without_a_checkpoint_starts_from_the_start_whatever_was_committed(backend: Backend) -> None:
    """``commit`` is advisory: where reading starts is the checkpoint handed to ``open``.
    A group that read and committed everything reads it all again when opened without
    one, with the same ids (dead letters of a replay name the same messages)."""
    name = backend.create()
    backend.publish(name, [event(i) for i in range(N)])
    group = unique("g")
    first = opened(backend, name, group)
    try:
        batches = read(first, N)
        first.commit(merged_positions(batches))
        first.poll(10, 0.2)  # a Kafka consumer serves its commit
    finally:
        first.close()
    once = delivered(batches)
    again_source = opened(backend, name, group, None)
    try:
        again = delivered(read(again_source, N))
    finally:
        again_source.close()
    assert by_partition(again) == by_partition(once)


def test_messages_published_while_open_are_delivered(backend: Backend) -> None:
    name = backend.create()
    source = opened(backend, name, unique("g"))
    try:
        source.poll(100, 0.2)  # nothing there yet
        backend.publish(name, [event(i) for i in range(30)])
        first = read(source, 30)
        backend.publish(name, [event(i) for i in range(30, 60)])
        second = read(source, 30)
    finally:
        source.close()
    assert sorted(m.seq for m in delivered(first)) == list(range(30))
    assert sorted(m.seq for m in delivered(second)) == list(range(30, 60))


@pytest.mark.parametrize("drained", [False, True], ids=["empty", "drained"])
def test_poll_returns_an_empty_batch_within_its_timeout_when_nothing_is_there(backend: Backend,
                                                                             drained: bool) -> None:
    name = backend.create()
    source = opened(backend, name, unique("g"))
    try:
        if drained:
            backend.publish(name, [event(i) for i in range(20)])
            read(source, 20)
        timings = []
        for timeout in (0.0, 0.3, 0.3):
            t0 = time.monotonic()
            batch = source.poll(100, timeout)
            timings.append((timeout, time.monotonic() - t0))
            assert len(batch) == 0 and batch.payloads == [] and batch.ids == []
            assert len(batch.partitions) == 0 and batch.positions == {}
    finally:
        source.close()
    assert all(took <= timeout + 2.0 for timeout, took in timings), timings


def test_malformed_and_missing_payloads_are_delivered_as_they_are(backend: Backend) -> None:
    """The source judges nothing: a message that is not an event comes as its bytes (a
    message without any payload as ``b""``), in its place, with an id, so that the job
    dead-letters it with a reason instead of losing it or stopping."""
    name = backend.create()
    odd = [b"{not json", b"", b"null", b"[1, 2]", b"\xff\xfe not utf-8", b'{"seq": "x"}']
    backend.publish(name, [event(0), *odd], keys=["k"] * (1 + len(odd)))  # one partition: one order
    backend.publish_without_payload(name, "k")
    backend.publish(name, [event(1)], keys=["k"])
    source = opened(backend, name, unique("g"))
    try:
        got = delivered(read(source, len(odd) + 3))
    finally:
        source.close()
    assert [m.payload for m in got] == [event(0), *odd, b"", event(1)]
    assert len({m.partition for m in got}) == 1
    assert all(m.id for m in got) and len({m.id for m in got}) == len(got)


def test_lag_is_zero_once_everything_was_delivered(backend: Backend) -> None:
    name = backend.create()
    backend.publish(name, [event(i) for i in range(N)])
    source = opened(backend, name, unique("g"))
    try:
        read(source, N)
        source.poll(100, 0.3)  # nothing more; a Kafka consumer learns the partitions' ends in fetches
        lag = source.lag()
    finally:
        source.close()
    assert lag == 0


def test_assigned_names_every_partition_read(backend: Backend) -> None:
    """The watermark waits for every assigned partition: once messages came, ``assigned``
    names every partition of a one-worker group, in the names the batches use."""
    name = backend.create()
    backend.publish(name, [event(i) for i in range(N)])
    source = opened(backend, name, unique("g"))
    try:
        got = delivered(read(source, N))
        assigned = source.assigned()
    finally:
        source.close()
    assert assigned is not None
    assert set(assigned) == backend.partition_names(name) == {m.partition for m in got}


def test_positions_of_other_streams_are_ignored(backend: Backend) -> None:
    """A checkpoint may name partitions that are not this source's (another stream's, read
    to its end after this one was written): they move nothing."""
    name, other = backend.create(), backend.create()
    backend.publish(name, [event(i) for i in range(N)])
    backend.publish(other, [event(i) for i in range(N)])
    reader = opened(backend, other, unique("g"))
    try:
        foreign = merged_positions(read(reader, N))
    finally:
        reader.close()
    assert foreign and not set(foreign) & backend.partition_names(name)
    source = opened(backend, name, unique("g"), foreign)
    try:
        got = delivered(read(source, N))
    finally:
        source.close()
    assert sorted(m.seq for m in got) == list(range(N))


def test_a_missing_stream_is_invalid_input(backend: Backend) -> None:
    missing = unique("no-such-stream")
    source = backend.source(missing, unique("g"))
    try:
        with pytest.raises(InvalidInput, match=f"'{missing}' does not exist"):
            source.open(None)
    finally:
        source.close()


def test_an_unknown_start_is_invalid_input(backend: Backend) -> None:
    with pytest.raises(InvalidInput, match="start must be 'earliest' or 'latest', got 'middle'"):
        backend.source(backend.create(), unique("g"), start="middle")

