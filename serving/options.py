"""How a feature server runs: :class:`ServerOptions`, one frozen value.

:class:`~serving.server.FeatureServer` reads it, and the command that starts a server
(:mod:`serving.command`: ``featurepipe serve``, ``python -m serving``) builds it from its
flags, one per field, whose defaults are this class's defaults::

    FeatureServer(repo, ServerOptions(port=0, max_rows=100))
    FeatureServer(repo, port=0, max_rows=100)        # the same, field by field
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from featurepipe.errors import InvalidInput
from serving.auth import TokenPolicy

DEFAULT_PORT = 6566
DEFAULT_MAX_ROWS = 1000
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the server's certificate (chain) and private key."""

    cert: Path
    key: Path

    def key_and_cert(self) -> tuple[bytes, bytes]:
        """The private key and certificate chain, read now (InvalidInput when unreadable)."""
        try:
            return self.key.read_bytes(), self.cert.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read TLS files: {exc}; pass --tls-cert and --tls-key") from exc


@dataclass(frozen=True)
class ServerOptions:
    """Where a feature server listens, what it accepts, how it reaches Redis.

    Args:
        host, port: where to listen; port 0 picks a free port (see ``FeatureServer.port``).
        max_workers: request threads (``--threads``).
        max_rows: the most entity rows one request may ask for.
        max_message_bytes: the largest request and response message.
        max_concurrent_calls: calls accepted at once; more are refused RESOURCE_EXHAUSTED.
        registry_refresh_seconds: how often to check the registry for changes.
        redis_timeout: seconds to connect to Redis and to wait for a reply.
        health_interval: seconds between the Redis PINGs behind the health status.
        tls: certificate and key files; None serves plaintext.
        tokens: a :class:`~serving.auth.TokenPolicy` or its file; None: no authentication.
        metrics_port: port of the Prometheus ``/metrics`` endpoint (0: any free port, None: off).
        reuse_port: share the port with other server processes (SO_REUSEPORT).
        clock: test only: answer as if the clock read this ISO 8601 instant (windowed
            features are computed at the request's clock); None: ``$FEATUREPIPE_CLOCK`` if
            set, else the real clock (see :mod:`serving.clock`).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_workers: int = 8
    max_rows: int = DEFAULT_MAX_ROWS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_calls: int = 1000
    registry_refresh_seconds: float = 5.0
    redis_timeout: float = 1.0
    health_interval: float = 1.0
    tls: TlsFiles | None = None
    tokens: TokenPolicy | str | os.PathLike[str] | None = None
    metrics_port: int | None = None
    reuse_port: bool = False
    clock: str | None = None

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise InvalidInput(f"max_rows must be at least 1, got {self.max_rows}")
        if self.max_message_bytes < 1024:
            raise InvalidInput(
                f"max_message_bytes must be at least 1024, got {self.max_message_bytes}"
            )

    def token_policy(self) -> TokenPolicy | None:
        """The token policy, read from its file when ``tokens`` names one."""
        if self.tokens is None or isinstance(self.tokens, TokenPolicy):
            return self.tokens
        return TokenPolicy.from_file(self.tokens)
