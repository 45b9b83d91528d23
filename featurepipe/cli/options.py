"""The click options and value parsers that several ``featurepipe`` commands share.

Each is defined once here, so every command spells, defaults and documents it the same way.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from pathlib import Path

import click

# The names in the feature repo featurepipe ships (feature_repo/): the defaults of the commands
# that work on its raw transactions and its feature service. The library has no such defaults:
# every library call names its source and feature service.
EVENTS_SOURCE = "transactions"
FEATURE_SERVICE = "fraud_detection_v1"

REPO_OPTION = click.option(
    "--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Feature repo folder, the one holding feature_store.yaml (default: $FEATUREPIPE_REPO, "
         "else ./feature_repo, else the current folder).",
)
VIEWS_OPTION = click.option("--view", "views", multiple=True, help="Only this feature view (repeatable).")
FEATURE_SERVICE_OPTION = click.option(
    "--feature-service", default=FEATURE_SERVICE, show_default=True,
    help="Feature service whose features are used.",
)
LABELLED_LIMIT_OPTION = click.option(
    "--limit", type=int, default=None, help="Use only the first N labelled transactions.",
)

SOURCE_OPTION = click.option(
    "--source", default=EVENTS_SOURCE, show_default=True,
    help="The Feast data source whose events the stream carries; every windowed-aggregate view reading "
         "it is computed.",
)

# where `featurepipe stream run` reads events and `featurepipe stream publish` sends them
STREAM_OPTION = click.option(
    "--stream", "stream_name", default=None,
    help="Redis stream (default: the source's name; ignored with --kafka).",
)
STREAM_URL_OPTION = click.option(
    "--stream-url", default=None,
    help="Redis holding the stream (default: $REDIS_URL, the online store's Redis).",
)
KAFKA_OPTION = click.option(
    "--kafka", "bootstrap", default=None, metavar="HOST:PORT",
    help="Use a Kafka topic on this bootstrap server instead of a Redis stream.",
)
TOPIC_OPTION = click.option("--topic", default=None,
                            help="Kafka topic (with --kafka; default: the source's name).")


def parse_date(_ctx: click.Context, _param: click.Parameter, value: str | None) -> date | None:
    """A ``YYYY-MM-DD`` option's value as a date (click callback)."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a date; use YYYY-MM-DD") from exc


def parse_datetime(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    """A ``YYYY-MM-DD[THH:MM:SS]`` option's value as a datetime (click callback)."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a time; use YYYY-MM-DD[THH:MM:SS]") from exc


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(_ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    """A duration option's value (``500ms``, ``30s``, ``5m``, ``1h``, ``2d``) as a timedelta."""
    if value is None:
        return None
    match = _DURATION.match(value.strip())
    if not match:
        raise click.BadParameter(f"{value!r} is not a duration; write e.g. 500ms, 30s, 5m, 1h, 2d", param=param)
    return timedelta(seconds=float(match.group(1)) * _SECONDS[match.group(2)])
