"""Prometheus metrics of a stream worker (its own registry, served on 127.0.0.1 on request)."""

from __future__ import annotations

from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SAMPLE = 64  # latencies observed per micro-batch (an even sample; 50k observe calls cost 50 ms)


class StreamMetrics:
    """Counters, gauges and histograms of one worker; :meth:`serve` exposes them over HTTP."""

    def __init__(self, job: str, worker: int) -> None:
        self.registry = CollectorRegistry()
        labels = {"job": job, "worker": str(worker)}
        self._labels = labels
        r = self.registry
        names = list(labels)
        self.messages = Counter("featurepipe_stream_messages", "Messages read from the source", names, registry=r)
        self.accepted = Counter("featurepipe_stream_events_accepted", "Events that updated features", names, registry=r)
        self.dead = Counter("featurepipe_stream_dead_letters",
                            "Messages sent to the dead letters (undecodable, failed checks, late, duplicate)",
                            names, registry=r)
        self.offline_rows = Counter("featurepipe_stream_offline_rows", "Final feature rows appended to the offline log",
                                    [*names, "view"], registry=r)
        self.batch_seconds = Histogram("featurepipe_stream_batch_seconds", "Processing time of a micro-batch",
                                       names, registry=r)
        self.checkpoint_seconds = Histogram("featurepipe_stream_checkpoint_seconds", "Time to write a checkpoint",
                                            names, registry=r)
        self.latency_seconds = Histogram(
            "featurepipe_stream_event_to_online_seconds",
            "From an event entering the broker to its features being written online (sampled)",
            names, buckets=_LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("featurepipe_stream_consumer_lag", "Messages in the source not yet read by this worker",
                         names, registry=r)
        self.watermark = Gauge("featurepipe_stream_watermark_seconds",
                               "Event-time watermark (epoch seconds): rows before it are final", names, registry=r)
        self.checkpoints = Gauge("featurepipe_stream_checkpoints", "Checkpoints written (over all runs)",
                                 names, registry=r)
        self.partitions = Gauge("featurepipe_stream_partitions",
                                "Partitions of keyed topics this worker holds (a consumer group's share)",
                                names, registry=r)
        self._server: Any = None

    def batch(self, messages: int, accepted: int, dead: int, seconds: float) -> None:
        self.messages.labels(**self._labels).inc(messages)
        self.accepted.labels(**self._labels).inc(accepted)
        if dead:
            self.dead.labels(**self._labels).inc(dead)
        self.batch_seconds.labels(**self._labels).observe(seconds)

    def latency(self, seconds: np.ndarray) -> None:
        if not len(seconds):
            return
        step = max(1, len(seconds) // _SAMPLE)
        h = self.latency_seconds.labels(**self._labels)
        for value in seconds[::step]:
            h.observe(float(value))

    def held(self, partitions: int) -> None:
        self.partitions.labels(**self._labels).set(partitions)

    def offline(self, view: str, rows: int) -> None:
        self.offline_rows.labels(**self._labels, view=view).inc(rows)

    def checkpoint(self, seconds: float, lag: int | None, watermark_us: int, counters: Any) -> None:
        self.checkpoint_seconds.labels(**self._labels).observe(seconds)
        if lag is not None:
            self.lag.labels(**self._labels).set(lag)
        if abs(watermark_us) < 2**61:
            self.watermark.labels(**self._labels).set(watermark_us / 1e6)
        self.checkpoints.labels(**self._labels).set(counters.checkpoints)

    def serve(self, port: int) -> int:
        """Serve /metrics on 127.0.0.1:port (0: any free port); returns the port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
