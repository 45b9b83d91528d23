"""The standard ``grpc.health.v1.Health`` service of the feature server: :class:`HealthStatus`.

SERVING while Redis answers (the server PINGs it every ``health_interval`` seconds, and a
request that finds Redis down turns it NOT_SERVING at once), for the whole server ("") and
for ``feast.serving.ServingService``; load balancers and ``grpc_health_probe`` read it.

On a Redis Cluster, SERVING while any primary answers: with one down, the server still
answers every request whose keys are all on the others (the rest get UNAVAILABLE naming the
node and its slots). NOT_SERVING then would make every load balancer drop every replica at
once, turning the loss of a third of the keys into the loss of all of them. The degraded
state is visible instead: which node is down is logged and in the
``featurepipe_serving_redis_node_up{node="host:port"}`` metric (alert on it, see
docs/redis-cluster.md); NOT_SERVING once no primary answers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
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
        self._down: frozenset[str] = frozenset()  # the nodes that did not answer
        self._logged_down: frozenset[str] = frozenset()
        self._nodes: set[str] = set()  # the nodes in the node_up metric
        self._lock = threading.Lock()  # request threads and the monitor both report

    def add_to(self, server: grpc.Server) -> None:
        """Register the health service with ``server``."""
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    def set(self, serving: bool, nodes: Mapping[str, bool] | None = None) -> None:
        """SERVING or NOT_SERVING, logged (and in the ``redis_up`` metric) when it changes;
        ``nodes``: each Redis node (``host:port``) and whether it answers, for the
        ``redis_node_up`` metric and the log."""
        with self._lock:
            self._set(serving, nodes)

    def _set(self, serving: bool, nodes: Mapping[str, bool] | None) -> None:
        if nodes is not None:
            self._set_nodes(nodes)
        down = self._down
        if serving == self._serving and (serving or nodes is None or down == self._logged_down):
            return
        changed = serving != self._serving
        self._serving = serving
        self._logged_down = down
        if changed:
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
        elif down:
            logger.warning("Redis node(s) %s do not answer: health NOT_SERVING",
                           ", ".join(sorted(down)), extra={"redis_nodes_down": sorted(down)})
        else:
            logger.warning("Redis does not answer: health NOT_SERVING")

    def _set_nodes(self, nodes: Mapping[str, bool]) -> None:
        self._down = frozenset(name for name, up in nodes.items() if not up)
        if self._metrics is None:
            return
        gauge = self._metrics.redis_node_up
        for name, up in nodes.items():
            gauge.labels(name).set(1 if up else 0)
        for gone in self._nodes - set(nodes):  # no longer a node (or a primary) of the store
            gauge.remove(gone)
        self._nodes = set(nodes)

    def shut_down(self) -> None:
        """NOT_SERVING for good (the server is stopping); health checks still answer."""
        self._servicer.enter_graceful_shutdown()

    def close(self) -> None:
        """Release the health service's thread."""
        self._pool.shutdown(wait=False)
