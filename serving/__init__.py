"""featurepipe's gRPC feature serving: Feast's ServingService read straight from Redis.

* :class:`FeatureClient`, :class:`AsyncFeatureClient` / :class:`OnlineFeatures`: the
  clients a model service imports (light: they do not load the Feast SDK).
* :class:`FeatureServer` / :func:`serve`: the server, and :class:`ServerOptions`, how it
  runs (imported on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serving.client import AsyncFeatureClient, FeatureClient, OnlineFeatures

if TYPE_CHECKING:
    from serving.server import FeatureServer, ServerOptions, serve

__all__ = [
    "AsyncFeatureClient", "FeatureClient", "FeatureServer", "OnlineFeatures", "ServerOptions",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name in ("FeatureServer", "ServerOptions", "serve"):
        from serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
