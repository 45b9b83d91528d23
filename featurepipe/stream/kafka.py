"""The Kafka event source, through confluent-kafka (librdkafka).

A worker reads one topic (or several) in a consumer group, so the partitions are shared
between the workers of a group, with the cooperative-sticky assignor: a rebalance moves
only the partitions that must move, and a worker keeps reading the others meanwhile.
Partitions are named ``"<topic>:<partition>"`` and a position is the next offset to read,
as a decimal string. Where a worker starts is decided by the engine's checkpoint, not by
the group's committed offsets: every partition the group assigns is sought to its
checkpointed position (else to ``start``), so messages read but not checkpointed before a
crash are read again. :meth:`KafkaSource.commit` stores offsets in the group only for lag
monitoring.

A job whose state is split by partition (keyed topics, :mod:`featurepipe.stream.share`)
hands the source a :class:`Rebalance` listener (:meth:`KafkaSource.listen`): the group's
assignments and revocations call it inside :meth:`KafkaSource.poll`, on the caller's
thread, so a partition's checkpoint is written before its revocation returns and its
state is loaded before its first message is delivered.

    create_topic("127.0.0.1:9092", "transactions", partitions=4)
    publish_kafka("127.0.0.1:9092", "transactions", (encode_event(e) for e in events))
    source = KafkaSource("127.0.0.1:9092", "transactions", group="features")
    source.open(checkpoint_positions)   # None on a first start
    batch = source.poll(10_000, timeout_seconds=1.0)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from featurepipe.core.errors import BackendUnavailable, FeaturepipeError, InvalidInput
from featurepipe.stream.kafka_topics import (
    METADATA_TIMEOUT_SECONDS,
    check_topic,
    create_topic,
    publish_kafka,
)
from featurepipe.stream.keys import KeySet
from featurepipe.stream.source import RawBatch

log = logging.getLogger(__name__)

OFFSET_BEGINNING, OFFSET_END, OFFSET_INVALID = -2, -1, -1001  # librdkafka's logical offsets

ORIGIN_HEADER = "featurepipe-origin"  # a routed message's raw message, "<topic>:<partition>:<offset>"

__all__ = ["METADATA_TIMEOUT_SECONDS", "ORIGIN_HEADER", "KafkaSource", "Rebalance", "check_topic", "consumer_error",
           "create_topic", "publish_kafka"]


class Rebalance(Protocol):
    """What a worker whose state is split by partition does when the group moves partitions."""

    def assigned(self, partitions: list[str]) -> Mapping[str, str]:
        """Load the state of these partitions; return the position each starts at (none: ``start``)."""

    def revoked(self, partitions: list[str]) -> None:
        """Checkpoint these partitions and forget them, before returning."""

    def lost(self, partitions: list[str]) -> None:
        """Forget these partitions without a checkpoint: another worker may own them already."""


class KafkaSource:
    """Reads Kafka topic ``topic`` (or several) as a member of consumer group ``group``.

    ``start`` ("earliest" or "latest") is where a partition without a checkpointed
    position begins. ``key_sets`` says, of keyed topics, which entity key each is keyed by
    (the engine matches views to topics with it). ``instance_id`` makes the member static
    (``group.instance.id``: a restart within the session timeout gets its partitions back
    without a rebalance). ``extra_config`` is passed to the librdkafka consumer as it is
    (dotted names: ``KafkaSource(..., **{"fetch.min.bytes": 1})``) and overrides the
    defaults set here.
    """

    metadata_timeout_seconds: float = METADATA_TIMEOUT_SECONDS  # how long open() waits for a broker

    def __init__(self, bootstrap: str, topic: str | Sequence[str], group: str, start: str = "earliest",
                 session_timeout_ms: int = 6000, key_sets: Mapping[str, KeySet] | None = None,
                 instance_id: str | None = None, **extra_config: Any) -> None:
        if start not in ("earliest", "latest"):
            raise InvalidInput(f"start must be 'earliest' or 'latest', got {start!r}")
        self.bootstrap = bootstrap
        self.topics = (topic,) if isinstance(topic, str) else tuple(topic)
        if not self.topics:
            raise InvalidInput("KafkaSource needs a topic")
        self.topic = self.topics[0]
        self.group = group
        self.start = start
        self.name = f"kafka:{','.join(self.topics)}"
        self.key_sets: dict[str, KeySet] = dict(key_sets or {})
        self.config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "allow.auto.create.topics": False,
            "auto.offset.reset": start,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(100, min(500, session_timeout_ms // 3)),
            "logger": log,
            **({"group.instance.id": instance_id} if instance_id else {}),
            **extra_config,
        }
        self._consumer: Any = None
        self._listener: Rebalance | None = None
        self._checkpoint: dict[str, int] = {}
        self._next: dict[str, int] = {}  # partition -> next offset, as far as this worker knows
        self._assigned: list[str] = []
        self._names: list[str] = []
        self._index: dict[tuple[str, int], int] = {}  # (topic, partition) -> index into _names
        self._counts: dict[str, int] = {}  # topic -> partitions

    def listen(self, listener: Rebalance) -> None:
        """Hand partition moves to ``listener`` (call before :meth:`open`): positions then come
        from it, not from :meth:`open`."""
        self._listener = listener

    def partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has (once open; any topic, e.g. a routed message's
        origin: asked of the broker once)."""
        if topic not in self._counts:
            found = check_topic(self._require_open(), self.bootstrap, topic, self.metadata_timeout_seconds)
            self._counts[topic] = len(found.partitions)
        return self._counts[topic]

    def open(self, positions: Mapping[str, str] | None) -> None:
        """Join the group; each partition assigned later starts at its checkpointed position."""
        from confluent_kafka import Consumer

        self._checkpoint = self._parse_positions(positions or {})
        self._next = dict(self._checkpoint)
        consumer = Consumer(self.config)
        try:
            for topic in self.topics:
                found = check_topic(consumer, self.bootstrap, topic, self.metadata_timeout_seconds)
                self._counts[topic] = len(found.partitions)
            consumer.subscribe(list(self.topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                               on_lost=self._on_lost)
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer

    def _parse_positions(self, positions: Mapping[str, str]) -> dict[str, int]:
        parsed: dict[str, int] = {}
        for name, position in positions.items():
            topic, _, partition = name.rpartition(":")
            if topic not in self.topics:
                continue  # another source's partition
            try:
                parsed[f"{topic}:{int(partition)}"] = int(position)
            except ValueError:
                raise InvalidInput(
                    f"checkpoint position {name!r}: {position!r} is not a Kafka position; "
                    f"expected '{topic}:<partition>': '<next offset>'"
                ) from None
        return parsed

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        names = [f"{tp.topic}:{tp.partition}" for tp in partitions]
        start = self._checkpoint
        if self._listener is not None and names:
            start = self._parse_positions(self._listener.assigned(names))
        default = OFFSET_BEGINNING if self.start == "earliest" else OFFSET_END
        for tp, name in zip(partitions, names):
            tp.offset = start.get(name, default)
        log.info("%s: assigned %s", self.name, {n: tp.offset for n, tp in zip(names, partitions)})
        self._assigned = sorted({*self._assigned, *names})
        consumer.incremental_assign(partitions)

    def _on_revoke(self, consumer: Any, partitions: list[Any], lost: bool = False) -> None:
        names = [f"{tp.topic}:{tp.partition}" for tp in partitions]
        if self._listener is not None and names:
            (self._listener.lost if lost else self._listener.revoked)(names)
        else:  # keep what was read: if the partition comes back, continue from there
            for name in names:
                if name in self._next:
                    self._checkpoint[name] = self._next[name]
        log.info("%s: %s partitions %s", self.name, "lost" if lost else "revoked", names)
        self._assigned = [p for p in self._assigned if p not in set(names)]
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        self._on_revoke(consumer, partitions, lost=True)

    def assigned(self) -> list[str] | None:
        """The partitions this worker reads (None until the group assigned them)."""
        return list(self._assigned) if self._assigned else None

    def poll(self, max_messages: int, timeout_seconds: float) -> RawBatch:
        """Up to ``max_messages`` messages; waits at most ``timeout_seconds`` for the first."""
        from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError

        consumer = self._require_open()
        messages = consumer.consume(num_messages=max_messages, timeout=max(0.0, timeout_seconds))
        payloads: list[bytes] = []
        partitions: list[int] = []
        ids: list[str] = []
        published: list[int] = []
        origins: list[str | None] = []
        last: dict[str, int] = {}
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if not err.fatal() and err.retriable():
                    log.warning("%s: %s (librdkafka retries)", self.name, err)
                    continue
                raise consumer_error(err, self.bootstrap, msg.topic() or self.topic)
            topic, p, offset = msg.topic(), msg.partition(), msg.offset()
            index = self._index.get((topic, p))
            if index is None:
                index = self._index[(topic, p)] = len(self._names)
                self._names.append(f"{topic}:{p}")
            name = self._names[index]
            value = msg.value()
            payloads.append(value if value is not None else b"")
            partitions.append(index)
            ids.append(f"{name}:{offset}")
            kind, stamp = msg.timestamp()
            published.append(stamp if kind != TIMESTAMP_NOT_AVAILABLE else -1)
            headers = msg.headers()
            origins.append(_origin(headers) if headers else None)
            last[name] = offset
        positions = {name: str(offset + 1) for name, offset in last.items()}
        self._next.update({name: offset + 1 for name, offset in last.items()})
        return RawBatch(
            payloads=payloads,
            partitions=np.asarray(partitions, dtype=np.int32),
            partition_names=list(self._names),
            positions=positions,
            ids=ids,
            publish_ms=None if -1 in published else np.asarray(published, dtype=np.int64),
            origins=origins if any(o is not None for o in origins) else None,
        )

    def commit(self, positions: Mapping[str, str]) -> None:
        """Store these positions as the group's offsets, asynchronously (lag monitoring only)."""
        from confluent_kafka import KafkaException, TopicPartition

        parsed = self._parse_positions(positions)
        if not parsed:
            return
        offsets = [TopicPartition(name.rpartition(":")[0], int(name.rpartition(":")[2]), offset)
                   for name, offset in sorted(parsed.items())]
        try:
            self._require_open().commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # e.g. during a rebalance: advisory, so never fatal
            log.warning("%s: commit of %s failed: %s", self.name, positions, exc)

    def lag(self) -> int | None:
        """Messages in the assigned partitions after this worker's position, or None if unknown.

        The high watermark comes from the last fetch response (``cached=True``): it needs no
        round trip, and some Kafka-compatible brokers (Tansu) answer ListOffsets wrongly.
        """
        from confluent_kafka import KafkaException

        consumer = self._require_open()
        try:
            assigned = consumer.assignment()
            if not assigned:
                return None
            positions = {(tp.topic, tp.partition): tp.offset for tp in consumer.position(assigned)}
            total = 0
            for tp in assigned:
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    low, high = consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
                position = positions.get((tp.topic, tp.partition), OFFSET_INVALID)
                if position < 0:
                    position = self._next.get(f"{tp.topic}:{tp.partition}", OFFSET_INVALID)
                if position < 0:
                    position = low if self.start == "earliest" else high
                if high < 0 or position < 0:
                    return None
                total += max(0, high - position)
            return total
        except KafkaException as exc:
            log.warning("%s: lag unknown: %s", self.name, exc)
            return None

    def close(self) -> None:
        """Leave the group and release the connections (a listener checkpoints what it holds first)."""
        if self._consumer is not None:
            consumer = self._consumer
            try:
                consumer.close()
            finally:
                self._consumer = None

    def _require_open(self) -> Any:
        if self._consumer is None:
            raise InvalidInput(f"{self.name}: call open() before reading")
        return self._consumer


def _origin(headers: list[tuple[str, bytes]]) -> str | None:
    """The route origin among a message's headers, if any."""
    for key, value in headers:
        if key == ORIGIN_HEADER and value is not None:
            return value.decode()
    return None


def consumer_error(err: Any, bootstrap: str, topic: str) -> FeaturepipeError:
    """The featurepipe error for a librdkafka error delivered while consuming."""
    from confluent_kafka import KafkaError

    if err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
        return InvalidInput(f"Kafka topic {topic!r} is gone from {bootstrap}: {err.str()}")
    if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT):
        return BackendUnavailable(f"Kafka broker {bootstrap} (topic {topic!r}): {err.str()}")
    return FeaturepipeError(f"Kafka consumer error on topic {topic!r} at {bootstrap}: {err.str()}")
