"""The error hierarchy: see :mod:`featurepipe.core.errors` (this module re-exports it)."""

from featurepipe.core.errors import (
    BackendFailure,
    BackendUnavailable,
    FeaturepipeError,
    GateBlocked,
    InvalidInput,
    NotFound,
)

__all__ = ["BackendFailure", "BackendUnavailable", "FeaturepipeError", "GateBlocked", "InvalidInput", "NotFound"]
