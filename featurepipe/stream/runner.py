"""Wiring for the CLI and tests: open the store, the source and Redis, run a stream job."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from featurepipe.core.errors import InvalidInput
from featurepipe.stream.engine import StreamJob, StreamOptions, StreamResult

if TYPE_CHECKING:
    from featurepipe.stream.keys import KeySet


def redis_client(url: str | None = None, store: Any = None, **kwargs: Any) -> Any:
    """A redis-py client for ``url`` (default: the online store of ``store``, one server or a
    cluster, or the Redis of the repo found as :func:`featurepipe.config.find_repo` does)."""
    import redis

    from featurepipe.config import (
        online_target,
        redis_connection_kwargs,
        redis_connection_string,
        redis_url_to_feast,
    )

    if url:
        return redis.Redis(**redis_connection_kwargs(redis_url_to_feast(url)), **kwargs)
    if store is not None:
        return online_target(store.config).client(**kwargs)
    return redis.Redis(**redis_connection_kwargs(redis_connection_string()), **kwargs)


def job_topics(store: Any, source: str, views: Sequence[str] | None, topic: str | None = None) -> dict[str, KeySet]:
    """The keyed topics a partitioned job on ``source`` reads (or ``stream route`` writes):
    ``<topic>.by-<keys>`` for each key set of the source's views (``topic`` defaults to the
    source's name), each with its key set."""
    from featurepipe.config import find_repo
    from featurepipe.stream.keys import key_sets, keyed_topic
    from featurepipe.stream.spec import source_views

    _, specs = source_views(store, source, views, find_repo(store.repo_path))
    return {keyed_topic(topic or source, keys): keys for keys in key_sets([v.join_keys for v in specs])}


def open_source(options: StreamOptions, *, stream: str | None = None, stream_url: str | None = None,
                bootstrap: str | None = None, topic: str | None = None, store: Any = None,
                static_membership: bool = False) -> Any:
    """The event source of a worker. A partitioned job (Kafka) joins the job's consumer group,
    ``featurepipe-<job>``, on the keyed topics of its views (:func:`job_topics`; ``store``
    needed), as a static member ``<job>-w<worker>`` when asked. Otherwise the worker reads
    through a consumer group of its own, named after job and worker: the Redis stream (or
    Kafka topic) named after the Feast source unless ``stream`` (``topic``) says otherwise."""
    if options.partitioned:
        from featurepipe.stream.kafka import KafkaSource

        if not bootstrap or store is None:
            raise InvalidInput("a partitioned stream job reads keyed Kafka topics: give the bootstrap server "
                               "(--kafka) and the feature store; Redis Streams is read by one worker")
        topics = job_topics(store, options.source, options.views, topic)
        instance = f"{options.job}-w{options.worker}" if static_membership else None
        return KafkaSource(bootstrap, list(topics), f"featurepipe-{options.job}", key_sets=topics,
                           instance_id=instance)
    stream, topic = stream or options.source, topic or options.source
    group = f"featurepipe-{options.job}-w{options.worker}"
    if bootstrap:
        from featurepipe.stream.kafka import KafkaSource

        return KafkaSource(bootstrap, topic, group)
    from featurepipe.stream.source import RedisStreamSource

    return RedisStreamSource(redis_client(stream_url), stream, group, consumer=f"w{options.worker}")


def run_job(repo: str | Path | None, options: StreamOptions, *, stream: str | None = None,
            stream_url: str | None = None, bootstrap: str | None = None, topic: str | None = None,
            metrics_port: int | None = None, handle_signals: bool = True,
            static_membership: bool = False) -> StreamResult:
    """Run one worker until it stops; SIGTERM/SIGINT stop it cleanly (checkpoint, then exit)."""
    from featurepipe.config import load_store

    store = load_store(repo)
    if bootstrap:
        source = open_source(options, bootstrap=bootstrap, topic=topic, store=store,
                             static_membership=static_membership)
    else:
        source = open_source(options, stream=stream, stream_url=stream_url or stream_url_of(store, stream or options.source))
    job = StreamJob(store, source, redis_client(store=store, socket_timeout=60), options)
    if metrics_port is not None:
        port = job.metrics.serve(metrics_port)
        print(f"metrics: http://127.0.0.1:{port}/metrics", flush=True)
    with _stopped_by_signals(job.stop, handle_signals):
        try:
            return job.run()
        finally:
            job.close()


def run_route(repo: str | Path | None, options: StreamOptions, *, bootstrap: str, topic: str | None = None,
              partitions: int = 4, handle_signals: bool = True) -> StreamResult:
    """Route the raw topic (default: the source's name) into the keyed topics of the source's
    views (created with ``partitions`` partitions if missing) until it stops
    (:class:`~featurepipe.stream.route.RouteJob`); SIGTERM/SIGINT stop it cleanly."""
    from featurepipe.config import load_store
    from featurepipe.stream.kafka import KafkaSource
    from featurepipe.stream.kafka_topics import KeyedProducer, create_topic
    from featurepipe.stream.route import RouteJob

    store = load_store(repo)
    raw = topic or options.source
    topics = job_topics(store, options.source, options.views, raw)
    for keyed in topics:
        create_topic(bootstrap, keyed, partitions=partitions, exist_ok=True)
    source = KafkaSource(bootstrap, raw, f"featurepipe-{options.job}-route")
    route = RouteJob(store, source, KeyedProducer(bootstrap, topics), topics, options)
    with _stopped_by_signals(route.stop, handle_signals):
        try:
            return route.run()
        finally:
            route.close()


@contextmanager
def _stopped_by_signals(stop: Any, handle: bool) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT call ``stop`` (a clean stop: checkpoint, then exit)."""
    previous = {}
    if handle:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stream_url_of(store: Any, stream: str) -> str:
    """Where the Redis stream ``stream`` lives by default: the online store's Redis; on a
    Redis Cluster, the primary that owns the stream's key (a stream is one key: Redis Streams
    is the single-worker transport; several workers read Kafka)."""
    from featurepipe.config import online_target

    target = online_target(store.config)
    if target.cluster:
        client = target.client()
        try:
            node = client.get_node_from_key(stream)
            return f"redis://{node.host}:{node.port}/0"
        finally:
            client.close()
    host, port = target.nodes[0]
    return f"redis://{host}:{port}/{target.kwargs.get('db', 0)}"


def event_payloads(table: pa.Table) -> Iterator[bytes]:
    """JSON messages of the rows of ``table`` (timestamps as ISO 8601)."""
    from featurepipe.stream.source import encode_event

    for batch in table.to_batches(max_chunksize=10_000):
        for row in batch.to_pylist():
            yield encode_event({k: v for k, v in row.items() if v is not None and k != "date"})


def publish_parquet(repo: str | Path | None, events: Path | None, *, source: str, stream: str | None = None,
                    stream_url: str | None = None, bootstrap: str | None = None, topic: str | None = None,
                    limit: int | None = None, partitions: int = 4, keyed: bool = True,
                    views: Sequence[str] | None = None) -> int:
    """Publish Parquet events (default: the source's raw files) in event-time order, to the
    stream (topic) named after the source unless ``stream`` (``topic``) says otherwise.

    To Kafka, ``keyed`` (the default) publishes each event to the keyed topic of every key
    set of the source's views (``<topic>.by-<keys>``, :func:`job_topics`), keyed by its
    entity key, which a partitioned job reads; otherwise to the raw topic without keys, for
    ``featurepipe stream route``. Missing topics are created with ``partitions`` partitions."""
    from featurepipe.config import load_store, source_path
    from featurepipe.core import db
    from featurepipe.core.sql import literal

    store = None
    if events is None or (bootstrap and keyed):
        store = load_store(repo)
    if events is None:
        assert store is not None
        path = source_path(store, source)
        if stream_url is None and not bootstrap:
            stream_url = stream_url_of(store, stream or source)
    else:
        path = str(events / "**" / "*.parquet") if events.is_dir() else str(events)
    con = db.connect()
    table = con.execute(
        f"SELECT * FROM read_parquet({literal(path)}, hive_partitioning = true, union_by_name = true) "
        f"ORDER BY event_timestamp {f'LIMIT {int(limit)}' if limit else ''}"
    ).to_arrow_table()
    if bootstrap:
        from featurepipe.stream.kafka_topics import KeyedProducer, create_topic, publish_kafka

        if not keyed:
            create_topic(bootstrap, topic or source, partitions=partitions, exist_ok=True)
            return publish_kafka(bootstrap, topic or source, event_payloads(table))
        from featurepipe.stream.keys import entity_keys

        topics = job_topics(store, source, views, topic)
        for name in topics:
            create_topic(bootstrap, name, partitions=partitions, exist_ok=True)
        producer = KeyedProducer(bootstrap, topics)
        payloads = list(event_payloads(table))
        for name, keys in topics.items():
            for payload, key in zip(payloads, entity_keys(table, keys).to_pylist()):
                producer.produce(name, payload, key)
        producer.flush()
        return len(payloads)
    from featurepipe.stream.source import publish_redis

    return publish_redis(redis_client(stream_url), stream or source, event_payloads(table))
