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
                timeout_seconds: float = METADATA_TIMEOUT_SECONDS) -> None:
    """Raise InvalidInput if ``topic`` does not exist, BackendUnavailable if no broker answers.

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


def publish_kafka(bootstrap: str, topic: str, events: Iterable[bytes],
                  key_of: Callable[[bytes], bytes | str | None] | None = None,
                  flush_timeout_seconds: float = 60.0) -> int:
    """Produce JSON events (from ``encode_event``) to ``topic``; returns how many.

    ``key_of(payload)`` gives a message key (events with one key go to one partition, in
    order); without it the producer spreads them. The producer is idempotent, so retries
    neither duplicate nor reorder messages. Raises if any delivery failed.
    """
    from confluent_kafka import KafkaError, KafkaException, Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 5, "logger": log})
    check_topic(producer, bootstrap, topic)
    failures: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(err)

    n = 0
    for payload in events:
        key = key_of(payload) if key_of is not None else None
        while True:
            try:
                producer.produce(topic, value=payload, key=key, on_delivery=delivered)
                break
            except BufferError:  # local queue full: wait for deliveries
                producer.poll(0.5)
            except KafkaException as exc:
                raise BackendUnavailable(f"producing to {topic!r} at {bootstrap}: {exc}") from exc
        producer.poll(0)
        n += 1
    undelivered = producer.flush(flush_timeout_seconds)
    if undelivered:
        raise BackendUnavailable(
            f"{undelivered} of {n} events to Kafka topic {topic!r} at {bootstrap} were not "
            f"delivered within {flush_timeout_seconds:g}s"
        )
    if failures:
        raise BackendUnavailable(
            f"{len(failures)} of {n} events to Kafka topic {topic!r} at {bootstrap} failed; "
            f"first error: {failures[0].str()}"
        )
    return n


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
