"""Feast's ``feast.serving.ServingService`` over gRPC: :class:`ServingServicer`.

Both methods run their work through one layer, :meth:`ServingServicer._answer`: a
featurepipe error becomes the status code its class maps to in :mod:`serving.errors`
(logged at INFO, or at ERROR when it is INTERNAL), any other exception becomes INTERNAL
with its traceback logged, and GetOnlineFeatures calls are counted in the metrics by
feature service, status code, time and entity rows. The work itself only raises
featurepipe errors and knows nothing of status codes.

GetOnlineFeatures receives the request bytes and returns the response already serialized
(see :mod:`serving.wire`); :meth:`ServingServicer.add_to` registers it with pass-through
(de)serializers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, TypeVar

import grpc

from featurepipe.errors import FeaturepipeError
from serving import protos
from serving.auth import TokenPolicy
from serving.errors import DeadlineExceeded, status_for
from serving.metrics import ServerMetrics
from serving.validation import parse_request

logger = logging.getLogger(__name__)

SERVICE_NAME = protos.SERVING_SERVICE
T = TypeVar("T")


@dataclass(slots=True)
class CallRecord:
    """What one call is about, for its log line and metrics; the work fills it in."""

    feature_service: str  # the metrics label: a known service, "unknown" or "features"
    rows: int = 0


class ServingServicer:
    """The ServingService methods, answering through ``answer(request) -> (body, rows)``.

    Args:
        answer: the serialized response to a parsed request and its entity row count.
        known_services: the registry's feature service names, now (for the metrics label).
        tokens: the token policy; None: no authentication.
        metrics: where calls are counted; None: nowhere.
    """

    def __init__(
        self,
        answer: Callable[[Any], tuple[bytes, int]],
        known_services: Callable[[], Container[str]],
        tokens: TokenPolicy | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._answer_request = answer
        self._known_services = known_services
        self._tokens = tokens
        self._metrics = metrics
        self._info = protos.GetFeastServingInfoResponse(version=version("feast"))

    def GetFeastServingInfo(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """The Feast version the server speaks; any known token may ask."""
        return self._answer("GetFeastServingInfo", context, None,
                            lambda: self._serving_info(context))

    def GetOnlineFeatures(self, raw: bytes, context: grpc.ServicerContext) -> bytes:  # noqa: N802
        """The serialized response to the serialized request ``raw``."""
        record = CallRecord("features")
        return self._answer("GetOnlineFeatures", context, record,
                            lambda: self._online_features(raw, context, record))

    def _serving_info(self, context: grpc.ServicerContext) -> Any:
        if self._tokens is not None:
            self._tokens.authenticate(_authorization(context))
        return self._info

    def _online_features(self, raw: bytes, context: grpc.ServicerContext,
                         record: CallRecord) -> bytes:
        request = parse_request(raw)
        remaining = context.time_remaining()
        # types-grpcio says float; grpc returns None for a call without a deadline
        if remaining is not None and remaining <= 0:  # type: ignore[redundant-expr]
            raise DeadlineExceeded("the call's deadline passed before the server could start it")
        service = request.feature_service if request.WhichOneof("kind") == "feature_service" \
            else None
        if service is not None:
            record.feature_service = service if service in self._known_services() else "unknown"
        if self._tokens is not None:
            self._tokens.check(_authorization(context), service)
        body, record.rows = self._answer_request(request)
        return body

    def _answer(self, method: str, context: grpc.ServicerContext, record: CallRecord | None,
                work: Callable[[], T]) -> T:
        """``work()``'s result, or the call aborted with the status of what it raised."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            try:
                return work()
            except FeaturepipeError as exc:
                error: FeaturepipeError = exc
                code = status_for(exc)
                extra = {"code": code.name} if record is None else \
                    {"feature_service": record.feature_service, "code": code.name}
                if code == grpc.StatusCode.INTERNAL:
                    logger.error("%s failed: %s", method, exc, extra=extra)
                else:
                    logger.info("%s: %s: %s", method, code.name, exc, extra=extra)
            except Exception as exc:
                code = grpc.StatusCode.INTERNAL
                logger.exception("%s failed unexpectedly", method)
                error = FeaturepipeError(
                    f"internal error ({type(exc).__name__}: {exc}); see the feature server's log"
                )
            context.abort(code, str(error))  # raises
            raise AssertionError("unreachable: context.abort raises")
        finally:
            if record is not None and self._metrics is not None:
                self._metrics.observe(record.feature_service, code.name,
                                      time.perf_counter() - started, record.rows)

    def add_to(self, server: grpc.Server) -> None:
        """Register both methods, as the generated ``add_ServingServiceServicer_to_server``."""
        handlers = {
            "GetFeastServingInfo": grpc.unary_unary_rpc_method_handler(
                self.GetFeastServingInfo,
                request_deserializer=protos.GetFeastServingInfoRequest.FromString,
                response_serializer=protos.GetFeastServingInfoResponse.SerializeToString,
            ),
            "GetOnlineFeatures": grpc.unary_unary_rpc_method_handler(
                self.GetOnlineFeatures,  # parses the request itself: see parse_request
                request_deserializer=None,
                response_serializer=None,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _authorization(context: grpc.ServicerContext) -> str | None:
    """The call's ``authorization`` metadata, if any."""
    header = next((v for k, v in context.invocation_metadata() if k == "authorization"), None)
    return header if isinstance(header, str) else None
