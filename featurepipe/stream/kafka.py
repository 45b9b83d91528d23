"""The Kafka event source, through confluent-kafka (librdkafka).

A worker reads one topic in a consumer group, so the partitions are shared between the
workers of a group. Partitions are named ``"<topic>:<partition>"`` and a position is the
next offset to read, as a decimal string. Where a worker starts is decided by the
engine's checkpoint, not by the group's committed offsets: every partition the group
assigns is sought to its checkpointed position (else to ``start``), so messages read but
not checkpointed before a crash are read again. :meth:`KafkaSource.commit` stores offsets
in the group only for lag monitoring.

    create_topic("127.0.0.1:9092", "transactions", partitions=4)
    publish_kafka("127.0.0.1:9092", "transactions", (encode_event(e) for e in events))
    source = KafkaSource("127.0.0.1:9092", "transactions", group="features")
    source.open(checkpoint_positions)   # None on a first start
    batch = source.poll(10_000, timeout_seconds=1.0)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from featurepipe.core.errors import BackendUnavailable, FeaturepipeError, InvalidInput
from featurepipe.stream.kafka_topics import (
    METADATA_TIMEOUT_SECONDS,
    check_topic,
    create_topic,
    publish_kafka,
)
from featurepipe.stream.source import RawBatch

log = logging.getLogger(__name__)

OFFSET_BEGINNING, OFFSET_END, OFFSET_INVALID = -2, -1, -1001  # librdkafka's logical offsets

__all__ = ["METADATA_TIMEOUT_SECONDS", "KafkaSource", "check_topic", "consumer_error", "create_topic", "publish_kafka"]


class KafkaSource:
    """Reads one Kafka topic as a member of consumer group ``group``.

    ``start`` ("earliest" or "latest") is where a partition without a checkpointed
    position begins. ``extra_config`` is passed to the librdkafka consumer as it is
    (dotted names: ``KafkaSource(..., **{"fetch.min.bytes": 1})``) and overrides the
    defaults set here.
    """

    metadata_timeout_seconds: float = METADATA_TIMEOUT_SECONDS  # how long open() waits for a broker

    def __init__(self, bootstrap: str, topic: str, group: str, start: str = "earliest",
                 session_timeout_ms: int = 6000, **extra_config: Any) -> None:
        if start not in ("earliest", "latest"):
            raise InvalidInput(f"start must be 'earliest' or 'latest', got {start!r}")
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.start = start
        self.name = f"kafka:{topic}"
        self.config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "allow.auto.create.topics": False,
            "auto.offset.reset": start,
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(100, session_timeout_ms // 3),
            "logger": log,
            **extra_config,
        }
        self._consumer: Any = None
        self._checkpoint: dict[int, int] = {}
        self._next: dict[int, int] = {}  # partition -> next offset, as far as this worker knows
        self._assigned: list[int] = []
        self._names: list[str] = []
        self._index: dict[int, int] = {}  # partition -> index into _names

    def open(self, positions: Mapping[str, str] | None) -> None:
        """Join the group; each partition assigned later starts at its checkpointed position."""
        from confluent_kafka import Consumer

        self._checkpoint = self._parse_positions(positions or {})
        self._next = dict(self._checkpoint)
        consumer = Consumer(self.config)
        try:
            check_topic(consumer, self.bootstrap, self.topic, self.metadata_timeout_seconds)
            consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                               on_lost=self._on_revoke)
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer

    def _parse_positions(self, positions: Mapping[str, str]) -> dict[int, int]:
        parsed: dict[int, int] = {}
        prefix = f"{self.topic}:"
        for name, position in positions.items():
            if not name.startswith(prefix):
                continue  # another source's partition
            try:
                parsed[int(name[len(prefix):])] = int(position)
            except ValueError:
                raise InvalidInput(
                    f"checkpoint position {name!r}: {position!r} is not a Kafka position; "
                    f"expected '{self.topic}:<partition>': '<next offset>'"
                ) from None
        return parsed

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        default = OFFSET_BEGINNING if self.start == "earliest" else OFFSET_END
        for tp in partitions:
            tp.offset = self._checkpoint.get(tp.partition, default)
        log.info("%s: assigned %s", self.name, {tp.partition: tp.offset for tp in partitions})
        self._assigned = sorted({*self._assigned, *(tp.partition for tp in partitions)})
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # Keep what was read: if the partition comes back, continue from there.
        for tp in partitions:
            if tp.partition in self._next:
                self._checkpoint[tp.partition] = self._next[tp.partition]
        log.info("%s: revoked partitions %s", self.name, [tp.partition for tp in partitions])
        revoked = {tp.partition for tp in partitions}
        self._assigned = [p for p in self._assigned if p not in revoked]

    def assigned(self) -> list[str] | None:
        """The partitions this worker reads (None until the group assigned them)."""
        return [f"{self.topic}:{p}" for p in self._assigned] if self._assigned else None

    def poll(self, max_messages: int, timeout_seconds: float) -> RawBatch:
        """Up to ``max_messages`` messages; waits at most ``timeout_seconds`` for the first."""
        from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError

        consumer = self._require_open()
        messages = consumer.consume(num_messages=max_messages, timeout=max(0.0, timeout_seconds))
        payloads: list[bytes] = []
        partitions: list[int] = []
        ids: list[str] = []
        published: list[int] = []
        last: dict[int, int] = {}
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if not err.fatal() and err.retriable():
                    log.warning("%s: %s (librdkafka retries)", self.name, err)
                    continue
                raise consumer_error(err, self.bootstrap, self.topic)
            p, offset = msg.partition(), msg.offset()
            index = self._index.get(p)
            if index is None:
                index = self._index[p] = len(self._names)
                self._names.append(f"{self.topic}:{p}")
            value = msg.value()
            payloads.append(value if value is not None else b"")
            partitions.append(index)
            ids.append(f"{self.topic}:{p}:{offset}")
            kind, stamp = msg.timestamp()
            published.append(stamp if kind != TIMESTAMP_NOT_AVAILABLE else -1)
            last[p] = offset
        positions = {f"{self.topic}:{p}": str(offset + 1) for p, offset in last.items()}
        self._next.update({p: offset + 1 for p, offset in last.items()})
        return RawBatch(
            payloads=payloads,
            partitions=np.asarray(partitions, dtype=np.int32),
            partition_names=list(self._names),
            positions=positions,
            ids=ids,
            publish_ms=None if -1 in published else np.asarray(published, dtype=np.int64),
        )

    def commit(self, positions: Mapping[str, str]) -> None:
        """Store these positions as the group's offsets, asynchronously (lag monitoring only)."""
        from confluent_kafka import KafkaException, TopicPartition

        parsed = self._parse_positions(positions)
        if not parsed:
            return
        offsets = [TopicPartition(self.topic, p, offset) for p, offset in sorted(parsed.items())]
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
            positions = {tp.partition: tp.offset for tp in consumer.position(assigned)}
            total = 0
            for tp in assigned:
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    low, high = consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
                position = positions.get(tp.partition, OFFSET_INVALID)
                if position < 0:
                    position = self._next.get(tp.partition, OFFSET_INVALID)
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
        """Leave the group and release the connections."""
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            consumer.close()

    def _require_open(self) -> Any:
        if self._consumer is None:
            raise InvalidInput(f"{self.name}: call open() before reading")
        return self._consumer


def consumer_error(err: Any, bootstrap: str, topic: str) -> FeaturepipeError:
    """The featurepipe error for a librdkafka error delivered while consuming."""
    from confluent_kafka import KafkaError

    if err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
        return InvalidInput(f"Kafka topic {topic!r} is gone from {bootstrap}: {err.str()}")
    if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT):
        return BackendUnavailable(f"Kafka broker {bootstrap} (topic {topic!r}): {err.str()}")
    return FeaturepipeError(f"Kafka consumer error on topic {topic!r} at {bootstrap}: {err.str()}")
