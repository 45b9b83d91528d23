"""One small error hierarchy, grouped by what the caller does about it.

::

    FeaturepipeError
    ├── InvalidInput (ValueError)          the input or a definition is wrong: fix it, run again
    │   └── GateBlocked                    a quality gate stopped the run (stage, table, failures)
    ├── NotFound (LookupError)             a named thing (feature service, feature, file) is missing
    ├── BackendUnavailable (ConnectionError)  a backend is not reachable now: retry later
    └── BackendFailure (RuntimeError)      a backend answered, but with something unusable
                                           (a registry that does not parse): retrying will not help

The gRPC status of each class is mapped in one table in ``serving/errors.py``; the classes
know nothing of gRPC. A client retries ``BackendUnavailable`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class FeaturepipeError(Exception):
    """Root of every error featurepipe raises on purpose."""


class InvalidInput(ValueError, FeaturepipeError):
    """The input or a definition is wrong: fix it and try again."""


class GateBlocked(InvalidInput):
    """A quality gate stopped a run: a blocking check failed on ``stage``/``table``.

    ``failures``: failing rows per failed blocking check (0 where the check is not about rows,
    e.g. a schema check); ``quarantine``: where the failing rows were kept, when they were.
    """

    def __init__(self, message: str, *, stage: str, table: str, failures: Mapping[str, int] | None = None,
                 quarantine: Path | str | None = None) -> None:
        super().__init__(message)
        self.stage, self.table = stage, table
        self.failures = dict(failures or {})
        self.quarantine = None if quarantine is None else Path(quarantine)


class NotFound(LookupError, FeaturepipeError):
    """A named thing (feature service, feature, file, data) does not exist."""


class BackendUnavailable(ConnectionError, FeaturepipeError):
    """A backend (Redis, the registry) is not reachable: retry later."""


class BackendFailure(RuntimeError, FeaturepipeError):
    """A backend answered with something unusable (a registry that does not parse, a server
    that refuses a command): terminal, a retry gives the same answer."""
