"""Kafka topics for streaming: check one exists, create one, publish events to one.

The consumer side is :class:`featurepipe.stream.kafka.KafkaSource` (which also re-exports
these functions).

    create_topic("127.0.0.1:9092", "transactions", partitions=4)
    publish_kafka("127.0.0.1:9092", "transactions", (encode_event(e) for e in events))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from featurepipe.core.errors import BackendUnavailable, InvalidInput

log = logging.getLogger("featurepipe.stream.kafka")  # the logger these functions used before they moved here

METADATA_TIMEOUT_SECONDS = 5.0


def check_topic(client: Any, bootstrap: str, topic: str,
                timeout_seconds: float = METADATA_TIMEOUT_SECONDS) -> Any:
    """The topic's metadata (``.partitions``); raise InvalidInput if ``topic`` does not
    exist, BackendUnavailable if no broker answers.

    Asks for the metadata of all topics: a request naming the topic would make brokers
    with automatic topic creation (Tansu always) create it.
    """
    from confluent_kafka import KafkaException

    try:
        metadata = client.list_topics(timeout=timeout_seconds)
    except KafkaException as exc:
        raise BackendUnavailable(
            f"cannot reach the Kafka broker at {bootstrap} (for topic {topic!r}) within "
            f"{timeout_seconds:g}s: {exc.args[0] if exc.args else exc}; check that it is "
            "running and that the bootstrap address is right"
        ) from exc
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        known = sorted(t for t in metadata.topics if not t.startswith("__"))
        raise InvalidInput(
            f"Kafka topic {topic!r} does not exist on {bootstrap} (topics there: "
            f"{', '.join(known) or 'none'}); check the topic name, or create it with "
            "featurepipe.stream.kafka.create_topic or publish events first"
        )
    return found


def publish_kafka(bootstrap: str, topic: str, events: Iterable[bytes],
                  key_of: Callable[[bytes], bytes | str | None] | None = None,
                  flush_timeout_seconds: float = 60.0) -> int:
    """Produce JSON events (from ``encode_event``) to ``topic``; returns how many.

    ``key_of(payload)`` gives a message key (events with one key go to one partition, in
    order: Kafka's default murmur2 partitioner, as Java clients place them); without it the
    producer spreads them. The producer is idempotent, so retries neither duplicate nor
    reorder messages. Raises if any delivery failed.
    """
    producer = KeyedProducer(bootstrap, [topic])
    n = 0
    for payload in events:
        producer.produce(topic, payload, key_of(payload) if key_of is not None else None)
        n += 1
    producer.flush(flush_timeout_seconds)
    return n


class KeyedProducer:
    """An idempotent producer that places keyed messages as Kafka's Java clients do
    (``partitioner=murmur2_random``: murmur2 of the key; a message without a key goes to a
    random partition). :meth:`flush` raises unless every message so far was delivered.
    Checks that ``topics`` exist first."""

    def __init__(self, bootstrap: str, topics: Iterable[str]) -> None:
        from confluent_kafka import Producer

        self.bootstrap = bootstrap
        self._producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
                                   "partitioner": "murmur2_random", "logger": log})
        for topic in topics:
            check_topic(self._producer, bootstrap, topic)
        self._failures: list[Any] = []
        self._sent = 0

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._failures.append(err)

    def produce(self, topic: str, value: bytes, key: bytes | str | None = None,
                headers: list[tuple[str, str | bytes | None]] | None = None) -> None:
        """Queue one message (waits for deliveries while the local queue is full)."""
        from confluent_kafka import KafkaException

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=self._delivered)
                break
            except BufferError:  # local queue full: wait for deliveries
                self._producer.poll(0.5)
            except KafkaException as exc:
                raise BackendUnavailable(f"producing to {topic!r} at {self.bootstrap}: {exc}") from exc
        self._producer.poll(0)
        self._sent += 1

    def flush(self, timeout_seconds: float = 60.0) -> None:
        """Wait until every queued message is delivered; raise BackendUnavailable if one was not."""
        undelivered = self._producer.flush(timeout_seconds)
        if undelivered:
            raise BackendUnavailable(
                f"{undelivered} of {self._sent} messages to Kafka at {self.bootstrap} were not "
                f"delivered within {timeout_seconds:g}s"
            )
        if self._failures:
            raise BackendUnavailable(
                f"{len(self._failures)} of {self._sent} messages to Kafka at {self.bootstrap} failed; "
                f"first error: {self._failures[0].str()}"
            )


def create_topic(bootstrap: str, topic: str, partitions: int = 1, replication_factor: int = 1,
                 exist_ok: bool = False, timeout_seconds: float = 10.0) -> None:
    """Create ``topic`` with ``partitions`` partitions (an existing one is fine with exist_ok)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": log}
    admin = AdminClient(config)
    new = NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)
    future = admin.create_topics([new], operation_timeout=timeout_seconds,
                                 request_timeout=timeout_seconds)[topic]
    try:
        future.result(timeout=timeout_seconds)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        code = err.code() if isinstance(err, KafkaError) else None
        if code == KafkaError.TOPIC_ALREADY_EXISTS:
            if exist_ok:
                return
            raise InvalidInput(
                f"Kafka topic {topic!r} already exists on {bootstrap}; pick another name "
                "or pass exist_ok=True"
            ) from exc
        if code in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN):
            raise BackendUnavailable(f"cannot reach the Kafka broker at {bootstrap}: {err}") from exc
        raise InvalidInput(f"cannot create Kafka topic {topic!r} on {bootstrap}: {err}") from exc
