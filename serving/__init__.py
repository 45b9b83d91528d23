"""featurepipe's gRPC feature serving: Feast's ServingService read straight from Redis.

* :class:`FeatureClient`, :class:`AsyncFeatureClient` / :class:`OnlineFeatures`: the
  clients a model service imports (light: they do not load the Feast SDK).
* :class:`FeatureServer` / :func:`serve`: the server (imported on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serving.client import AsyncFeatureClient, FeatureClient, OnlineFeatures

if TYPE_CHECKING:
    from serving.server import FeatureServer, serve

__all__ = ["AsyncFeatureClient", "FeatureClient", "FeatureServer", "OnlineFeatures", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("FeatureServer", "serve"):
        from serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
