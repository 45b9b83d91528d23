"""The standard ``grpc.health.v1.Health`` service of the feature server: :class:`HealthStatus`.

SERVING while Redis answers (the server PINGs it every ``health_interval`` seconds, and a
request that finds Redis down turns it NOT_SERVING at once), for the whole server ("") and
for ``feast.serving.ServingService``; load balancers and ``grpc_health_probe`` read it.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.metrics import ServerMetrics
from serving.protos import SERVING_SERVICE

logger = logging.getLogger(__name__)


class HealthStatus:
    """The health service, and the one place its status changes."""

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        self._metrics = metrics
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health")
        self._servicer = health.HealthServicer(
            experimental_non_blocking=True, experimental_thread_pool=self._pool
        )
        self._serving: bool | None = None

    def add_to(self, server: grpc.Server) -> None:
        """Register the health service with ``server``."""
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    def set(self, serving: bool) -> None:
        """SERVING or NOT_SERVING, logged (and in the ``redis_up`` metric) when it changes."""
        if serving == self._serving:
            return
        self._serving = serving
        if self._metrics is not None:
            self._metrics.redis_up.set(1 if serving else 0)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVING_SERVICE):
            self._servicer.set(name, status)
        if serving:
            logger.info("Redis answers: health SERVING")
        else:
            logger.warning("Redis does not answer: health NOT_SERVING")

    def shut_down(self) -> None:
        """NOT_SERVING for good (the server is stopping); health checks still answer."""
        self._servicer.enter_graceful_shutdown()

    def close(self) -> None:
        """Release the health service's thread."""
        self._pool.shutdown(wait=False)
