"""The streaming engine's commands: ``featurepipe stream run`` and ``featurepipe stream publish``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from featurepipe.cli.options import (
    KAFKA_OPTION,
    REPO_OPTION,
    SOURCE_OPTION,
    STREAM_OPTION,
    STREAM_URL_OPTION,
    TOPIC_OPTION,
    VIEWS_OPTION,
    parse_duration,
)


@click.group()
def stream() -> None:
    """Streaming features: compute the batch engine's definitions from live events.

    \b
    featurepipe stream run       consume events, update Redis and the offline log
    featurepipe stream publish   send events (Parquet or generated) to a Redis stream or Kafka topic
    featurepipe stream route     check a raw Kafka topic's events once and key them by entity

    Events are JSON objects, one per message, with the columns of the Feast source the
    stream carries (default: transactions): e.g. {"transaction_id": 1, "user_id": 7,
    "merchant_id": 3, "amount": 12.5, "event_timestamp": "2026-11-25T10:00:00+00:00"}.
    """


@stream.command()
@STREAM_OPTION
@STREAM_URL_OPTION
@KAFKA_OPTION
@TOPIC_OPTION
@SOURCE_OPTION
@VIEWS_OPTION
@click.option("--job", default="stream", show_default=True,
              help="Job name: names its checkpoint, consumer groups and output files. A restarted job "
                   "with the same name resumes from its last checkpoint.")
@click.option("--worker", type=click.IntRange(min=0), default=0, show_default=True,
              help="This worker's index: 0 .. --workers - 1 on a Redis stream (each owns a share of the keys); "
                   "with --partitioned any number that names the worker.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Redis Streams only: this many workers each read the whole stream and keep a share of the "
                   "keys. With Kafka use --partitioned.")
@click.option("--partitioned", is_flag=True,
              help="With --kafka: join the job's consumer group on the keyed topics <topic>.by-<key> (one per "
                   "join key of the views; `stream publish` or `stream route` writes them). Each worker holds the "
                   "partitions the group gives it, with state and checkpoint per partition: start or stop "
                   "workers at any time, a killed worker's partitions move to the others.")
@click.option("--static-membership", is_flag=True,
              help="With --partitioned: a static group member (group.instance.id <job>-w<worker>), so a restart "
                   "within the session timeout keeps its partitions. The test broker (Tansu) mishandles static "
                   "members: partitions of a dead one never moved.")
@click.option("--lateness", callback=parse_duration, default="5m", show_default=True,
              help="Allowed lateness: events older than the newest event minus this go to the dead letters.")
@click.option("--checkpoint-interval", callback=parse_duration, default="5s", show_default=True,
              help="How often state, offsets and outputs are checkpointed together.")
@click.option("--max-batch", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Most messages per micro-batch.")
@click.option("--max-events", type=click.IntRange(min=1), default=None,
              help="Stop once this many messages are processed (counting earlier runs of the job).")
@click.option("--idle-timeout", callback=parse_duration, default=None,
              help="Stop after this long without a message (default: run until SIGTERM / Ctrl-C).")
@click.option("--final", is_flag=True,
              help="At the stop the input is complete: write every remaining row to the offline log.")
@click.option("--bootstrap/--no-bootstrap", "from_history", default=True, show_default=True,
              help="A job without a checkpoint starts from history: the source's Parquet events inside "
                   "the longest window become its state, and events older than that history's newest "
                   "are late. --no-bootstrap: the stream carries everything (a replay from the start).")
@click.option("--archive-raw/--no-archive-raw", default=True, show_default=True,
              help="Append accepted events to the source's Parquet files, so backfills and training see them.")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              help="Serve Prometheus metrics on 127.0.0.1:PORT (0: any free port).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="DuckDB threads.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A throughput line on stderr.")
@REPO_OPTION
def run(stream_name: str | None, stream_url: str | None, bootstrap: str | None, topic: str | None, source: str,
        views: tuple[str, ...], job: str, worker: int, workers: int, partitioned: bool, static_membership: bool,
        lateness: timedelta,
        checkpoint_interval: timedelta, max_batch: int, max_events: int | None,
        idle_timeout: timedelta | None, final: bool, from_history: bool, archive_raw: bool, metrics_port: int | None,
        threads: int, progress: bool, repo: Path | None) -> None:
    """Consume events and keep the windowed-aggregate features fresh, online and offline.

    Exactly-once effect: state, source positions and outputs are checkpointed together;
    a worker killed at any point and restarted with the same --job neither loses nor
    double-counts an event. SIGTERM (or Ctrl-C) finishes the micro-batch, checkpoints
    and exits. With --partitioned, the same holds for a partition moving between workers.
    """
    if partitioned and not bootstrap:
        raise click.UsageError("--partitioned reads keyed Kafka topics: give --kafka HOST:PORT")
    from featurepipe.stream.engine import StreamOptions
    from featurepipe.stream.runner import run_job

    options = StreamOptions(
        job=job, source=source, views=list(views) or None, allowed_lateness=lateness,
        max_batch=max_batch, checkpoint_seconds=checkpoint_interval.total_seconds(), worker=worker,
        workers=workers, threads=threads, archive_raw=archive_raw, bootstrap=from_history, max_events=max_events,
        idle_seconds=idle_timeout.total_seconds() if idle_timeout else None, final=final, progress=progress,
        partitioned=partitioned,
    )
    result = run_job(repo, options, stream=stream_name, stream_url=stream_url, bootstrap=bootstrap,
                     topic=topic, metrics_port=metrics_port, static_membership=static_membership)
    c = result.counters
    click.echo(
        f"stream {job} worker {worker}: {result.run_messages:,} messages this run in {result.seconds:.1f} s "
        f"({result.events_per_second:,.0f}/s); totals: accepted {c.accepted:,}, dead letters {c.dead:,} "
        f"(late {c.late:,}, duplicate {c.duplicate:,}), online rows {c.online_rows:,}, "
        f"offline rows {c.offline_rows:,}, checkpoints {c.checkpoints}"
    )


PARTITIONS_OPTION = click.option("--partitions", type=click.IntRange(min=1), default=4, show_default=True,
                                 help="Partitions of a Kafka topic this command creates (an existing one keeps its own).")


@stream.command()
@click.option("--events", type=click.Path(exists=True, path_type=Path), default=None,
              help="Parquet file or folder of events (default: the source's raw Parquet files).")
@STREAM_OPTION
@STREAM_URL_OPTION
@KAFKA_OPTION
@TOPIC_OPTION
@SOURCE_OPTION
@VIEWS_OPTION
@PARTITIONS_OPTION
@click.option("--keyed/--raw", default=True, show_default=True,
              help="With --kafka: each event to the keyed topic <topic>.by-<key> of every join key of the "
                   "source's views, keyed by it (what `stream run --partitioned` reads); --raw: to <topic> "
                   "without keys (what `stream route` reads).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Publish only the first N events.")
@REPO_OPTION
def publish(events: Path | None, stream_name: str | None, stream_url: str | None, bootstrap: str | None,
            topic: str | None, source: str, views: tuple[str, ...], partitions: int, keyed: bool,
            limit: int | None, repo: Path | None) -> None:
    """Publish events, in event-time order, as JSON messages."""
    from featurepipe.stream.runner import publish_parquet

    n = publish_parquet(repo, events, source=source, stream=stream_name, stream_url=stream_url,
                        bootstrap=bootstrap, topic=topic, limit=limit, partitions=partitions, keyed=keyed,
                        views=list(views) or None)
    if not bootstrap:
        where = f"Redis stream {stream_name or source!r}"
    elif keyed:
        where = f"the keyed Kafka topics {topic or source}.by-<key>"
    else:
        where = f"Kafka topic {topic or source!r}"
    click.echo(f"published {n:,} events to {where}")


@stream.command()
@KAFKA_OPTION
@TOPIC_OPTION
@SOURCE_OPTION
@VIEWS_OPTION
@PARTITIONS_OPTION
@click.option("--job", default="stream", show_default=True,
              help="The stream job whose keyed topics this feeds: names the route's checkpoint and dead letters.")
@click.option("--checkpoint-interval", callback=parse_duration, default="5s", show_default=True,
              help="How often positions and dead letters are checkpointed (after every message so far is delivered).")
@click.option("--max-batch", type=click.IntRange(min=1), default=50_000, show_default=True)
@click.option("--max-events", type=click.IntRange(min=1), default=None,
              help="Stop once this many raw messages are routed (counting earlier runs).")
@click.option("--idle-timeout", callback=parse_duration, default=None,
              help="Stop after this long without a message (default: run until SIGTERM / Ctrl-C).")
@REPO_OPTION
def route(bootstrap: str | None, topic: str | None, source: str, views: tuple[str, ...], partitions: int, job: str,
          checkpoint_interval: timedelta, max_batch: int, max_events: int | None,
          idle_timeout: timedelta | None, repo: Path | None) -> None:
    """Check a raw topic's events once and produce them keyed by entity.

    Reads <topic> (default: the source's name; messages keyed by anything or nothing),
    dead-letters what does not decode or fails the source contract's row checks (once), and
    produces every other message to <topic>.by-<key> for each join key of the source's
    views, keyed by it (Kafka's murmur2 partitioner), for `stream run --partitioned`. A
    restart resumes from its checkpoint; what it produces again is dropped by the workers.
    """
    from featurepipe.stream.engine import StreamOptions
    from featurepipe.stream.runner import run_route

    if not bootstrap:
        raise click.UsageError("stream route reads and writes Kafka: give --kafka HOST:PORT")
    options = StreamOptions(
        job=job, source=source, views=list(views) or None, max_batch=max_batch,
        checkpoint_seconds=checkpoint_interval.total_seconds(), max_events=max_events,
        idle_seconds=idle_timeout.total_seconds() if idle_timeout else None, progress=False,
    )
    result = run_route(repo, options, bootstrap=bootstrap, topic=topic, partitions=partitions)
    c = result.counters
    click.echo(f"route {job}: {result.run_messages:,} messages this run in {result.seconds:.1f} s; totals: "
               f"routed {c.accepted:,}, dead letters {c.dead:,}, checkpoints {c.checkpoints}")
