"""The feature server's command: ``featurepipe serve`` and ``python -m serving`` run this one.

Its server flags map one to one onto the fields of :class:`~serving.options.ServerOptions`
(:data:`SERVER_FLAGS`, plus ``--tls-cert``/``--tls-key`` for ``tls``) and take their defaults
from it; the command adds only what a process decides: the repo, how many processes, the
log format and how long to drain. The command lives here, beside the server, and not in
``featurepipe.cli``: ``python -m serving`` must not import the CLI (serving sits below it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from featurepipe.errors import FeaturepipeError, InvalidInput
from serving.logs import configure
from serving.options import ServerOptions, TlsFiles
from serving.supervisor import supervise

F = TypeVar("F", bound=Callable[..., Any])
_ARGV = "serving.argv"  # ctx.meta key: the command's own arguments, for the workers


@dataclass(frozen=True)
class ServerFlag:
    """A flag of the command that sets one :class:`ServerOptions` field (its default)."""

    flag: str
    field: str
    type: type[Any]
    help: str


SERVER_FLAGS: tuple[ServerFlag, ...] = (
    ServerFlag("--host", "host", str, "Address to listen on."),
    ServerFlag("--port", "port", int, "Port (0: any free port)."),
    ServerFlag("--threads", "max_workers", int, "Request threads per process."),
    ServerFlag("--max-rows", "max_rows", int, "Most entity rows per request."),
    ServerFlag("--max-concurrent-calls", "max_concurrent_calls", int,
               "Calls accepted at once per process; more get RESOURCE_EXHAUSTED."),
    ServerFlag("--max-message-bytes", "max_message_bytes", int, "Largest request or response message."),
    ServerFlag("--registry-refresh", "registry_refresh_seconds", float,
               "Seconds between checks of the registry for changes."),
    ServerFlag("--redis-timeout", "redis_timeout", float,
               "Seconds to wait for Redis before answering UNAVAILABLE."),
    ServerFlag("--health-interval", "health_interval", float,
               "Seconds between the Redis PINGs behind the health status."),
    ServerFlag("--tokens", "tokens", str, 'YAML/JSON file: bearer token -> allowed feature services or "*".'),
    ServerFlag("--metrics-port", "metrics_port", int,
               "Serve Prometheus /metrics on this port (0: any free port)."),
    ServerFlag("--reuse-port", "reuse_port", bool,
               "Share the port with other processes (set for each --workers process)."),
    ServerFlag("--clock", "clock", str,
               "Test only: answer as if the clock read this ISO 8601 instant (default: $FEATUREPIPE_CLOCK, "
               "else the real clock)."),
)


def _server_flags(command: F) -> F:
    """Add :data:`SERVER_FLAGS` to ``command`` as click options, in their order."""
    defaults = ServerOptions()
    for flag in reversed(SERVER_FLAGS):  # the last decorator applied is listed first
        default = getattr(defaults, flag.field)
        if flag.type is bool:
            command = click.option(flag.flag, flag.field, is_flag=True, default=default, help=flag.help)(command)
        else:
            command = click.option(flag.flag, flag.field, type=flag.type, default=default,
                                   show_default=default is not None, help=flag.help)(command)
    return command


def server_options(params: Mapping[str, Any]) -> ServerOptions:
    """The :class:`ServerOptions` the command's parameters ask for (InvalidInput when out of range,
    or given one of --tls-cert and --tls-key without the other)."""
    cert, key = params.get("tls_cert"), params.get("tls_key")
    if (cert is None) != (key is None):
        raise InvalidInput("pass both --tls-cert and --tls-key, or neither")
    return ServerOptions(**{flag.field: params[flag.field] for flag in SERVER_FLAGS},
                         tls=TlsFiles(Path(cert), Path(key)) if cert and key else None)


def parse_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The command's parameters for ``argv``, parsed as the command would, running nothing."""
    with serve.make_context("serve", list(argv)) as ctx:
        return dict(ctx.params)


class _ServeCommand(click.Command):
    """Keeps the arguments it was given: the supervisor starts each worker with them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)
        return super().parse_args(ctx, args)


@click.command("serve", cls=_ServeCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", default=None, metavar="DIRECTORY",
              help="Feature repo folder, the one holding feature_store.yaml (default: $FEATUREPIPE_REPO, "
                   "else ./feature_repo, else the current folder).")
@_server_flags
@click.option("--tls-cert", default=None, help="PEM certificate (chain): serve TLS.")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert.")
@click.option("--workers", type=int, default=1, show_default=True, help="Server processes sharing the port.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines on stderr as text or JSON.")
@click.option("--grace", type=float, default=5.0, show_default=True,
              help="Seconds calls in flight may take to finish on SIGTERM.")
@click.pass_context
def serve(ctx: click.Context, /, repo: str | None, workers: int, log_format: str, grace: float,
          **server: Any) -> None:
    """Serve feast.serving.ServingService (gRPC) from Redis, with health and reflection.

    With --workers N (N > 1) this process supervises N server processes that share the
    port (SO_REUSEPORT; the kernel spreads connections among them): each is a full server
    with its own Redis connections; worker i serves metrics on --metrics-port + i.
    SIGTERM / SIGINT drain every worker (--grace seconds) and exit. Redis comes from the
    repo's feature_store.yaml, overridden by REDIS_URL (one server; a Redis Cluster's nodes
    are those of connection_string). Exit status 2: bad options or repo.
    """
    configure(log_format)
    try:
        options = server_options(server)  # checked here, before any worker starts
        if workers > 1:
            ctx.exit(supervise(workers, options, ctx.meta[_ARGV], grace))
        _run_one(repo, options, grace)
    except FeaturepipeError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)


def _run_one(repo: str | None, options: ServerOptions, grace: float) -> None:
    """One server process, until SIGTERM / SIGINT."""
    from serving.server import serve as run_server

    run_server(repo, options, grace=grace, announce=lambda line: print(line, file=sys.stderr, flush=True))
