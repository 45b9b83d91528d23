"""One small error hierarchy, grouped by what the caller does about it."""

from __future__ import annotations


class FeaturepipeError(Exception):
    """Root of every error featurepipe raises on purpose."""


class InvalidInput(ValueError, FeaturepipeError):
    """The input or a definition is wrong: fix it and try again."""


class NotFound(LookupError, FeaturepipeError):
    """A named thing (feature service, feature, file, data) does not exist."""


class BackendUnavailable(ConnectionError, FeaturepipeError):
    """A backend (Redis, the registry) is not reachable: retry later."""
