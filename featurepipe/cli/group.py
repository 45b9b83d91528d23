"""The ``featurepipe`` group: its help, its version, one way to report errors, its commands.

Every command works with no arguments on what the previous one produced: data lives
under ``feature_repo/data`` (see ``featurepipe.config``), Redis comes from ``REDIS_URL``.
"""

from __future__ import annotations

import sys
import warnings

import click

from featurepipe.cli.local import notebooks, redis
from featurepipe.cli.online import online
from featurepipe.cli.pipeline import (
    apply,
    backfill,
    demo,
    feast,
    generate,
    index,
    materialize,
    push,
)
from featurepipe.cli.quality import catalog, lineage, report, status
from featurepipe.cli.registry import registry
from featurepipe.cli.stream import stream
from featurepipe.cli.training import evaluate, leakage, skew, train
from featurepipe.errors import FeaturepipeError

# third-party deprecation chatter (ibis inside Feast) is nothing a user can act on
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ibis\.")


class _Group(click.Group):
    """Turns featurepipe's own errors into one clear line and exit code 2, and loads
    ``serve`` when it is asked for (the server's own command: importing it loads gRPC)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "serve"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "serve" and cmd_name not in self.commands:
            from serving.command import serve

            self.add_command(serve)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except FeaturepipeError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featurepipe")
def main() -> None:
    """featurepipe: batch and streaming features on Feast, served over gRPC.

    \b
    Typical flow (each step reads what the previous one wrote):
      featurepipe generate      synthetic card transactions -> feature_repo/data/raw
      featurepipe apply         feast apply: register the definitions in feature_repo/
      featurepipe backfill      DuckDB feature tables -> feature_repo/data/offline (+ index)
      featurepipe materialize   latest feature values -> Redis (Feast layout, resumable)
      featurepipe train         point-in-time training set -> model in feature_repo/data/models
      featurepipe serve         gRPC feast.serving.ServingService on 127.0.0.1
      featurepipe push          new events -> updated features online
      featurepipe stream run    live events -> windowed features online and offline
      featurepipe demo          all of the above, end to end
      featurepipe online        Redis lost: rebuild it from the offline store, verify it

    Redis: REDIS_URL=redis://host:port/db (default 127.0.0.1:6379).
    """


for _command in (
    generate, apply, feast, backfill, index, materialize, push, demo,  # the pipeline (serve: above)
    train, evaluate, leakage, skew,  # training
    status, lineage, report, catalog,  # data quality and the data dictionary
    stream, redis, notebooks,
    registry,  # the Feast registry: backup, restore
    online,  # the online store as a whole: rebuild, verify
):
    main.add_command(_command)
