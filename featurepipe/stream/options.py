"""What a stream job is told (:class:`StreamOptions`) and what it reports (:class:`Counters`,
:class:`StreamResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from featurepipe.core.errors import InvalidInput


@dataclass(kw_only=True)
class StreamOptions:
    """How a stream job runs. See ``featurepipe stream run --help``."""

    source: str  # the Feast data source whose events the stream carries
    job: str = "stream"
    views: Sequence[str] | None = None
    allowed_lateness: timedelta = timedelta(minutes=5)
    max_batch: int = 50_000
    poll_timeout: float = 0.05
    checkpoint_seconds: float = 5.0
    worker: int = 0
    workers: int = 1
    threads: int = 1
    archive_raw: bool = True
    max_events: int | None = None  # stop once this many messages are done (over all runs)
    idle_seconds: float | None = None  # stop after this long without a message
    final: bool = False  # at the stop, the input is complete: finalise every row
    progress: bool = True
    state_dir: Path | None = None
    dead_letter_dir: Path | None = None
    latency_samples: int = 0  # keep up to this many event-to-online latencies (benchmarks)
    prefetch: bool = True  # poll the next micro-batch on a thread while this one is processed
    bootstrap: bool = False  # a new job loads its state from the source's Parquet history
    # keyed Kafka topics read by a consumer group: state and checkpoint per partition, which
    # moves between the workers of the group (featurepipe.stream.share); else one state
    partitioned: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1 or self.worker < 0 or (self.worker >= self.workers and not self.partitioned):
            raise InvalidInput(f"worker must be in [0, workers); got worker {self.worker} of {self.workers}")
        if self.partitioned and self.workers != 1:
            raise InvalidInput(
                f"a partitioned job's workers share the partitions of a Kafka consumer group: start as many as "
                f"you like, each with its own --worker index, and leave --workers at 1 (got {self.workers}); "
                "--workers splits the keys of a Redis stream")
        if self.allowed_lateness < timedelta(0):
            raise InvalidInput("allowed lateness must be >= 0")
        if self.max_batch < 1:
            raise InvalidInput("max_batch must be >= 1")


@dataclass
class Counters:
    """Messages by outcome, over every run of the job (restored from the checkpoint)."""

    messages: int = 0
    accepted: int = 0
    dead: int = 0  # could not be decoded or failed a contract check
    late: int = 0
    duplicate: int = 0
    redelivered: int = 0  # a route stage's second copy of a message, dropped (no event, no dead letter)
    online_rows: int = 0
    offline_rows: int = 0
    checkpoints: int = 0


@dataclass
class StreamResult:
    """What a run did (counters are totals over all runs of the job)."""

    counters: Counters
    seconds: float
    run_messages: int
    watermark: datetime | None
    latencies: np.ndarray = field(default_factory=lambda: np.empty(0))
    loop_seconds: float = 0.0  # until the last message was processed (online), before the last checkpoint

    @property
    def events_per_second(self) -> float:
        return self.run_messages / self.seconds if self.seconds else 0.0

    @property
    def sustained_events_per_second(self) -> float:
        """Messages per second until the last one was online (checkpoints ran meanwhile)."""
        return self.run_messages / self.loop_seconds if self.loop_seconds else 0.0
