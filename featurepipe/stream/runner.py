"""Wiring for the CLI and tests: open the store, the source and Redis, run a stream job."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from featurepipe.stream.engine import StreamJob, StreamOptions, StreamResult


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


def open_source(options: StreamOptions, *, stream: str | None = None, stream_url: str | None = None,
                bootstrap: str | None = None, topic: str | None = None) -> Any:
    """The event source of a worker: its own consumer group, named after job and worker. The
    Redis stream (or Kafka topic) is named after the Feast source unless ``stream`` (``topic``)
    says otherwise."""
    stream, topic = stream or options.source, topic or options.source
    group = f"featurepipe-{options.job}-w{options.worker}"
    if bootstrap:
        from featurepipe.stream.kafka import KafkaSource

        return KafkaSource(bootstrap, topic, group)
    from featurepipe.stream.source import RedisStreamSource

    return RedisStreamSource(redis_client(stream_url), stream, group, consumer=f"w{options.worker}")


def run_job(repo: str | Path | None, options: StreamOptions, *, stream: str | None = None,
            stream_url: str | None = None, bootstrap: str | None = None, topic: str | None = None,
            metrics_port: int | None = None, handle_signals: bool = True) -> StreamResult:
    """Run one worker until it stops; SIGTERM/SIGINT stop it cleanly (checkpoint, then exit)."""
    from featurepipe.config import load_store

    store = load_store(repo)
    source = open_source(options, stream=stream, stream_url=stream_url or stream_url_of(store, stream or options.source),
                         bootstrap=bootstrap, topic=topic)
    job = StreamJob(store, source, redis_client(store=store, socket_timeout=60), options)
    if metrics_port is not None:
        port = job.metrics.serve(metrics_port)
        print(f"metrics: http://127.0.0.1:{port}/metrics", flush=True)
    previous = {}
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: job.stop())
    try:
        return job.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        job.close()


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
                    limit: int | None = None) -> int:
    """Publish Parquet events (default: the source's raw files) in event-time order, to the
    stream (topic) named after the source unless ``stream`` (``topic``) says otherwise."""
    from featurepipe.config import load_store, source_path
    from featurepipe.core import db
    from featurepipe.core.sql import literal

    if events is None:
        store = load_store(repo)
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
        from featurepipe.stream.kafka_topics import create_topic, publish_kafka

        create_topic(bootstrap, topic or source, exist_ok=True)
        return publish_kafka(bootstrap, topic or source, event_payloads(table))
    from featurepipe.stream.source import publish_redis

    return publish_redis(redis_client(stream_url), stream or source, event_payloads(table))
