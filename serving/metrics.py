"""Prometheus metrics of the feature server, served over HTTP on ``--metrics-port``.

Names start with ``featurepipe_serving_``. ``feature_service`` is the requested feature
service, ``features`` for a list of feature references, and ``unknown`` for a name that
is not in the registry (so a caller cannot grow the label set at will). ``node`` is a
Redis node's ``host:port`` (the one server, or each primary of a Redis Cluster).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5,
)


class ServerMetrics:
    """The server's counters and histograms, in their own registry (one per server)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "featurepipe_serving_requests", "GetOnlineFeatures calls by feature service and code",
            ["feature_service", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            "featurepipe_serving_request_seconds", "GetOnlineFeatures time in the server",
            ["feature_service"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.redis_latency = Histogram(
            "featurepipe_serving_redis_seconds", "Time of the pipelined Redis round trip",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.entity_rows = Counter(
            "featurepipe_serving_entity_rows", "Entity rows served", ["feature_service"],
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "featurepipe_serving_redis_up", "1 while Redis answers PING (a cluster: while any primary does; one primary: featurepipe_serving_redis_node_up)",
            registry=self.registry,
        )
        self.redis_node_up = Gauge(
            "featurepipe_serving_redis_node_up",
            "1 while the Redis node (each primary of a cluster) answers PING", ["node"],
            registry=self.registry,
        )
        self.registry_reloads = Counter(
            "featurepipe_serving_registry_reloads", "Registry reloads after `feast apply`",
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], tuple[Counter, Histogram, Counter]] = {}

    def observe(self, feature_service: str, code: str, seconds: float, rows: int) -> None:
        """Record one call."""
        key = (feature_service, code)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(feature_service, code),
                self.latency.labels(feature_service),
                self.entity_rows.labels(feature_service),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if rows:
            children[2].inc(rows)

    def serve_http(self, host: str, port: int) -> int:
        """Expose ``/metrics`` on ``host:port`` (port 0: any free port); the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
