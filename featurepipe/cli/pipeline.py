"""The pipeline's commands: generate, apply, feast, backfill, index, materialize, push, demo.

Each unpacks its options and calls the library function that does the work, imported when
the command runs so that ``--help`` and the other commands stay fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from featurepipe.cli.options import (
    REPO_OPTION,
    SOURCE_OPTION,
    VIEWS_OPTION,
    parse_date,
    parse_datetime,
)

if TYPE_CHECKING:
    from feast import FeatureStore


@click.command()
@click.option("--rows", type=click.IntRange(min=100), default=1_000_000, show_default=True,
              help="Number of transactions.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: <repo>/data/raw/transactions, where the repo reads).")
@click.option("--days", type=click.IntRange(min=1), default=30, show_default=True,
              help="Length of the period, ending at --end.")
@click.option("--end", callback=parse_date, default=None,
              help="Last day (exclusive), YYYY-MM-DD; default today (UTC), with --append the day after the "
                   "new days, which follow the data set's last day.")
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed; same seed, same data.")
@click.option("--append", is_flag=True, default=False,
              help="Add the days to the data set in the output folder instead of replacing it; refused "
                   "(nothing written) if it already has any of them.")
@REPO_OPTION
def generate(rows: int, out: Path | None, days: int, end: date | None, seed: int, append: bool,
             repo: Path | None) -> None:
    """Write synthetic card transactions as Parquet partitioned by day: one data set.

    The output folder holds one data set. By default it is replaced as a whole: the new
    data set is written to a hidden folder next to it and swapped in once complete, so no
    day of an earlier run is left behind (nor rows that push or a stream job archived
    there), and an interrupted run leaves the previous data set as it was. The folder may
    hold only day partitions (date=YYYY-MM-DD/); if it holds anything else, generate
    stops instead of deleting it.

    --append adds the days to the data set instead: without --end they are the --days
    days after its last day (they may reach past today); if it already has any of them,
    that is an error and nothing is written. Transaction ids continue after the data
    set's greatest; user and merchant ids are reused (the same --rows and --seed make the
    same users and merchants).

    The output line says what the folder held before and what it holds now.
    """
    import time

    from featurepipe.config import data_dir, find_repo
    from featurepipe.generate import generate_transactions

    target = out or data_dir(find_repo(repo)) / "raw" / "transactions"
    t0 = time.perf_counter()
    s = generate_transactions(rows, target, days=days, end=end, seed=seed, append=append)
    new = f"{s.days:,} day{'s' if s.days != 1 else ''}, {s.rows:,} rows"
    if s.appended:
        assert s.previous is not None
        total = s.previous.rows + s.rows
        what = (f"added {new} to {s.out} ({s.previous.describe()}): now {s.previous.days + s.days:,} days, "
                f"{total:,} rows")
    elif s.previous is not None:
        what = f"replaced {s.out} ({s.previous.describe()}) with {new}"
    else:
        what = f"wrote {new} to {s.out} (a new data set)"
    click.echo(
        f"{what}: {s.rows:,} transactions ({s.fraud_rows:,} fraud, {s.labelled_rows:,} labelled) "
        f"for {s.users:,} users and {s.merchants:,} merchants, {s.start:%Y-%m-%d} .. {s.end:%Y-%m-%d} "
        f"(exclusive), in {time.perf_counter() - t0:.1f}s"
    )


def _feast(args: list[str], repo: Path | None) -> int:
    from featurepipe.config import export_redis_env, find_repo

    export_redis_env(repo)
    feast_bin = Path(sys.executable).parent / "feast"
    cmd = [str(feast_bin) if feast_bin.exists() else "feast", "--chdir", str(find_repo(repo)), *args]
    return subprocess.call(cmd, env=os.environ.copy())


@click.command()
@REPO_OPTION
def apply(repo: Path | None) -> None:
    """Register the definitions in the feature repo (runs `feast apply` with Redis set)."""
    sys.exit(_feast(["apply"], repo))


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@REPO_OPTION
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def feast(repo: Path | None, args: tuple[str, ...]) -> None:
    """Run any feast CLI command on the repo, with Redis taken from REDIS_URL."""
    sys.exit(_feast(list(args), repo))


@click.command()
@click.option("--start", callback=parse_date, default=None, help="First day to (re)compute, YYYY-MM-DD (default: first day of data).")
@click.option("--end", callback=parse_date, default=None, help="Day after the last one, YYYY-MM-DD (default: after the last change point: "
              "the last event plus the longest window and its hop).")
@VIEWS_OPTION
@click.option("--index/--no-index", default=True, show_default=True,
              help="Then build the offline index of the backfilled views (see `featurepipe index`).")
@click.option("--engine", type=click.Choice(["duckdb", "spark"]), default=None,
              help="Batch engine (default: $FEATUREPIPE_ENGINE, else `engine:` in the repo's featurepipe.yaml, "
                   "else duckdb). spark needs `pip install 'featurepipe[spark]'` and Java 17+; where it runs: "
                   "`spark:` in featurepipe.yaml or $FEATUREPIPE_SPARK_MASTER (default local[*]).")
@click.option("--plan", "plan_only", is_flag=True,
              help="Only say what the backfill would do: per view the raw files it reads (count, bytes, rows from "
                   "the Parquet footers), the days it replaces, the rows it would write and an estimated time. "
                   "Reads metadata only and writes nothing.")
@REPO_OPTION
def backfill(start: date | None, end: date | None, views: tuple[str, ...], index: bool, engine: str | None,
             plan_only: bool, repo: Path | None) -> None:
    """Compute the offline feature tables (each view's change-point rows) over the raw Parquet,
    with DuckDB on this machine or with Spark (--engine spark): the same values either way.

    Only the day partitions in [start, end) are replaced, so reruns are idempotent. The
    offline index of each backfilled view is rebuilt afterwards (--no-index: leave it to
    the first retrieval).

    --plan prints the plan instead and changes nothing. Time estimates: DuckDB from the
    view's last backfills in the run log (else 15 CPU-seconds per million events), Spark
    from 150 CPU-seconds per million events per core (docs/benchmarks.md).
    """
    from featurepipe.config import load_store
    from featurepipe.jobs.backfill import backfill as run
    from featurepipe.report import table

    store = load_store(repo)
    if plan_only:
        _echo_plan(store, views, start, end, engine)
        return
    results = run(store, views or None, start, end, engine=engine)
    click.echo(table(
        ["view", "rows", "entities", "days", "seconds"],
        [[r.view, f"{r.rows:,}", f"{r.entities:,}", r.partitions, f"{r.seconds:.1f}"] for r in results],
    ))
    if index and results:
        _echo_indexes(store, [r.view for r in results])


def _echo_plan(store: FeatureStore, views: tuple[str, ...], start: date | None, end: date | None,
               engine: str | None) -> None:
    from featurepipe.jobs.plan import plan_backfill
    from featurepipe.report import table

    plan = plan_backfill(store, views or None, start, end, engine=engine)
    click.echo(f"backfill plan ({plan.engine}); nothing was run or written\n")
    click.echo(table(
        ["view", "files", "MB", "file rows", "events read", "days (UTC)", "days (new)", "est. rows out",
         "est. seconds"],
        [[v.view, f"{v.files:,}", f"{v.bytes / 1e6:,.1f}", f"{v.rows:,}", f"{v.events:,}",
          f"{v.start:%Y-%m-%d} .. {v.end - timedelta(days=1):%Y-%m-%d}",
          f"{v.days} ({v.days_new})", f"{v.output_rows:,}", f"{v.seconds:,.1f}"] for v in plan.views],
    ))
    for v in plan.views:
        since = (f"the events from {v.read_from:%Y-%m-%d %H:%M} UTC on (start - the windows' horizon)"
                 if v.read_from else "every event (an aggregate without a window)")
        click.echo(f"\n{v.view}: reads {since} in {v.input_path}\n  rows out: {v.output_basis}\n"
                   f"  time: {v.seconds_basis}")
    startup = f" + {plan.startup_seconds:.0f}s Spark session start-up" if plan.startup_seconds else ""
    click.echo(f"\ntotal: about {plan.seconds:,.0f}s{startup and ' (' + startup[3:] + ' included)'}, "
               "plus the offline index rebuild unless --no-index")


def _echo_indexes(store: FeatureStore, views: list[str] | None) -> None:
    from featurepipe.offline.prebuild import build_indexes
    from featurepipe.report import table

    summaries = build_indexes(store, views)
    click.echo(table(
        ["view", "offline index", "rows", "keys", "key", "MB", "seconds"],
        [[s.view, s.status, f"{s.rows:,}", f"{s.keys:,}", s.key_kind, f"{s.megabytes:,.0f}", f"{s.seconds:.1f}"]
         for s in summaries],
    ))


@click.command()
@VIEWS_OPTION
@REPO_OPTION
def index(views: tuple[str, ...], repo: Path | None) -> None:
    """Build the offline index of each feature view (point-in-time joins without a scan).

    The index is a sorted copy of a view's offline rows, kept under
    <repo>/.featurepipe/offline-index/ (or offline_store: index_directory). The first
    get_historical_features after a view's files change builds it anyway; this command
    does it now, so a training-set query does not wait for it, and shows what it holds.
    Views already indexed for their current files are only checked.
    """
    from featurepipe.config import load_store

    _echo_indexes(load_store(repo), list(views) or None)


@click.command()
@click.option("--start", callback=parse_datetime, default=None, help="Only values with event time >= START (default: all).")
@click.option("--end", callback=parse_datetime, default=None, help="Only values with event time <= END (default: now).")
@click.option("--incremental", is_flag=True,
              help="Each view from where its last materialisation ended (feast materialize-incremental).")
@VIEWS_OPTION
@click.option("--max-rows-per-second", type=click.FloatRange(min=0), default=None,
              help="Rate limit, to spare a Redis that also serves traffic (0: none, overriding "
                   "feature_store.yaml).")
@click.option("--batch-rows", type=click.IntRange(min=1), default=None,
              help="Rows encoded and sent together (default: the engine's, 5000).")
@click.option("--progress/--no-progress", default=None, help="Progress bar per view (default: on).")
@click.option("--engine", type=click.Choice(["duckdb", "spark"]), default=None,
              help="Where the latest values and window schedules are computed (default: the repo's engine, "
                   "see `featurepipe backfill --help`). spark: computed in Spark and written to Redis from its "
                   "executors, each partition on its own connection; the same bytes as duckdb.")
@REPO_OPTION
def materialize(start: datetime | None, end: datetime | None, incremental: bool, views: tuple[str, ...],
                max_rows_per_second: float | None, batch_rows: int | None, progress: bool | None,
                engine: str | None, repo: Path | None) -> None:
    """Load the latest feature values into Redis, in Feast's layout.

    Uses the batch engine of feature_store.yaml (featurepipe's: DuckDB over the offline
    Parquet, one atomic compare-and-set Lua call per batch). Idempotent and resumable:
    a value never overwrites a newer one, so rerunning a window (after a crash, say)
    completes it. Rows with a null join key or a value that does not fit its type are
    quarantined to Parquet files (listed at the end), never written.
    """
    from featurepipe.config import load_store, online_target
    from featurepipe.core.spark import default_engine
    from featurepipe.jobs.materialize import materialize as run
    from featurepipe.report import table

    if incremental and start is not None:
        raise click.UsageError("--incremental starts where the last run ended; drop --start")
    store = load_store(repo)
    if (engine or default_engine(store.repo_path)) == "spark":
        if batch_rows is not None:
            raise click.UsageError("--batch-rows sets the DuckDB engine's batches; Spark writes each partition "
                                   "in the encoder's batches: drop it with --engine spark")
        from featurepipe.jobs.spark_materialize import materialize_spark

        result = materialize_spark(store, start, end, list(views) or None, incremental=incremental,
                                   max_rows_per_second=max_rows_per_second, progress=progress)
    else:
        result = run(store, start, end, list(views) or None, incremental=incremental,
                     max_rows_per_second=max_rows_per_second, batch_rows=batch_rows, progress=progress)
    if result.per_view:
        click.echo(table(
            ["view", "rows", "entities", "written", "not newer", "quarantined", "seconds", "entities/s", "schedules"],
            [[r.view, f"{r.window_rows:,}", f"{r.entities:,}", f"{r.written:,}", f"{r.skipped:,}",
              f"{r.quarantined:,}", f"{r.seconds:.2f}", f"{r.rows_per_second:,.0f}",
              ("prepared" if r.prepared else "computed") if r.schedule_rows else "-"] for r in result.per_view],
        ))
        if any(r.schedule_rows and not r.prepared for r in result.per_view):
            click.echo("schedules 'computed': from the raw events now (run `featurepipe backfill` after new data to "
                       "have them prepared; a materialisation then only reads them)")
        for r in result.per_view:
            for path in r.quarantine_files:
                click.echo(f"quarantined rows of {r.view}: {path}")
    click.echo(
        f"materialized {', '.join(result.views)} into Redis {online_target(store.config).describe()} "
        f"in {result.seconds:.1f}s"
    )


@click.command()
@click.option("--events", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Parquet file of new transactions (default: generate --count random ones now).")
@click.option("--count", type=int, default=5, show_default=True, help="Events to generate without --events.")
@SOURCE_OPTION
@REPO_OPTION
def push(events: Path | None, count: int, source: str, repo: Path | None) -> None:
    """Push new transactions: append them to the raw data and update their features online."""
    import pyarrow.parquet as pq

    from featurepipe.config import load_store
    from featurepipe.demo import random_events
    from featurepipe.stream.push import push_events

    store = load_store(repo)
    table = pq.read_table(events) if events else random_events(store, count)
    result = push_events(store, table, source)
    click.echo(f"pushed {result.events} events; online rows updated: {result.rows_by_view}")


@click.command()
@click.option("--rows", type=click.IntRange(min=10_000), default=1_000_000, show_default=True)
@click.option("--score", type=int, default=500, show_default=True, help="Transactions to score over gRPC.")
@click.option("--keep-running", is_flag=True, help="Leave the gRPC server up at the end (Ctrl-C stops it).")
@REPO_OPTION
def demo(rows: int, score: int, keep_running: bool, repo: Path | None) -> None:
    """Run everything end to end: generate, apply, backfill, materialize, train, serve, score, push."""
    from featurepipe.demo import run_demo

    run_demo(repo, rows=rows, score=score, keep_running=keep_running)
