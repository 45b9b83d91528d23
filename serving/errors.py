"""The one table between featurepipe's errors and gRPC status codes, both ways.

The server turns a raised :class:`~featurepipe.errors.FeaturepipeError` into the status
code of its class (the most specific match wins; see :mod:`serving.servicer`); the client
turns a status code back into the matching error class, so callers handle one hierarchy
whichever side failed. The exceptions themselves know nothing of gRPC.
"""

from __future__ import annotations

import grpc

from featurepipe.errors import BackendUnavailable, FeaturepipeError, InvalidInput, NotFound
from featurepipe.online.schedule import StaleSchedule
from serving.auth import PermissionDenied, Unauthenticated


class DeadlineExceeded(BackendUnavailable):
    """The call's deadline passed before the server could answer: retry with a longer one."""


# Most specific first: the first class the error is an instance of decides.
STATUS_BY_ERROR: tuple[tuple[type[FeaturepipeError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (StaleSchedule, grpc.StatusCode.FAILED_PRECONDITION),  # online data to rebuild: `featurepipe materialize`
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (FeaturepipeError, grpc.StatusCode.INTERNAL),
)

ERROR_BY_STATUS: dict[grpc.StatusCode, type[FeaturepipeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: BackendUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: StaleSchedule,
    grpc.StatusCode.RESOURCE_EXHAUSTED: InvalidInput,
}


def status_for(error: FeaturepipeError) -> grpc.StatusCode:
    """The gRPC status code a featurepipe error is reported with."""
    for cls, code in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_for(code: grpc.StatusCode, message: str) -> FeaturepipeError:
    """The featurepipe error a gRPC status code stands for (FeaturepipeError if none)."""
    return ERROR_BY_STATUS.get(code, FeaturepipeError)(message)
