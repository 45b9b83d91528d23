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
              help="This worker's index (0 .. --workers - 1); each worker owns a share of the keys.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
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
        views: tuple[str, ...], job: str, worker: int, workers: int, lateness: timedelta,
        checkpoint_interval: timedelta, max_batch: int, max_events: int | None,
        idle_timeout: timedelta | None, final: bool, from_history: bool, archive_raw: bool, metrics_port: int | None,
        threads: int, progress: bool, repo: Path | None) -> None:
    """Consume events and keep the windowed-aggregate features fresh, online and offline.

    Exactly-once effect: state, source positions and outputs are checkpointed together;
    a worker killed at any point and restarted with the same --job neither loses nor
    double-counts an event. SIGTERM (or Ctrl-C) finishes the micro-batch, checkpoints
    and exits.
    """
    from featurepipe.stream.engine import StreamOptions
    from featurepipe.stream.runner import run_job

    options = StreamOptions(
        job=job, source=source, views=list(views) or None, allowed_lateness=lateness,
        max_batch=max_batch, checkpoint_seconds=checkpoint_interval.total_seconds(), worker=worker,
        workers=workers, threads=threads, archive_raw=archive_raw, bootstrap=from_history, max_events=max_events,
        idle_seconds=idle_timeout.total_seconds() if idle_timeout else None, final=final, progress=progress,
    )
    result = run_job(repo, options, stream=stream_name, stream_url=stream_url, bootstrap=bootstrap,
                     topic=topic, metrics_port=metrics_port)
    c = result.counters
    click.echo(
        f"stream {job} worker {worker}: {result.run_messages:,} messages this run in {result.seconds:.1f} s "
        f"({result.events_per_second:,.0f}/s); totals: accepted {c.accepted:,}, dead letters {c.dead:,} "
        f"(late {c.late:,}, duplicate {c.duplicate:,}), online rows {c.online_rows:,}, "
        f"offline rows {c.offline_rows:,}, checkpoints {c.checkpoints}"
    )


@stream.command()
@click.option("--events", type=click.Path(exists=True, path_type=Path), default=None,
              help="Parquet file or folder of events (default: the source's raw Parquet files).")
@STREAM_OPTION
@STREAM_URL_OPTION
@KAFKA_OPTION
@TOPIC_OPTION
@SOURCE_OPTION
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Publish only the first N events.")
@REPO_OPTION
def publish(events: Path | None, stream_name: str | None, stream_url: str | None, bootstrap: str | None,
            topic: str | None, source: str, limit: int | None, repo: Path | None) -> None:
    """Publish events, in event-time order, as JSON messages."""
    from featurepipe.stream.runner import publish_parquet

    n = publish_parquet(repo, events, source=source, stream=stream_name, stream_url=stream_url,
                        bootstrap=bootstrap, topic=topic, limit=limit)
    where = f"Kafka topic {topic or source!r}" if bootstrap else f"Redis stream {stream_name or source!r}"
    click.echo(f"published {n:,} events to {where}")
