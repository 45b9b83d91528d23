"""The stream jobs in Dagster: the external ``stream`` asset, its ``healthy`` check and the
``stream_health`` sensor that reports each job's lag and health on it, read from the files
the workers write (:mod:`featurepipe.orchestration.stream_health`).

No ``from __future__ import annotations``: Dagster checks a sensor's ``context`` hint by type.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg

from featurepipe.config import data_dir
from featurepipe.orchestration.stream_health import ShareHealth, stream_health

GROUP = "featurepipe"  # the Dagster asset group of every featurepipe asset
STREAM = "stream"
STREAM_STALE_AFTER = timedelta(seconds=30)  # 6 checkpoints of `featurepipe stream run` (every 5 s)


@dataclass(frozen=True)
class StreamReport:
    """What the stream's health check says (one Dagster result or evaluation is built from it)."""

    passed: bool
    description: str
    metadata: dict[str, Any]


def stream_report(shares: Sequence[ShareHealth], stale_after: timedelta) -> StreamReport:
    """Healthy when every share of every stream job checkpointed within ``stale_after``."""
    stale = [s for s in shares if not s.healthy]
    lags = [s.lag for s in shares if s.lag is not None]
    what = stale if stale else shares
    head = (f"{len(stale)} of {len(shares)} stream share(s) stopped or stuck (no checkpoint for "
            f"{stale_after.total_seconds():,.0f} s): " if stale else f"{len(shares)} stream share(s) alive: ")
    return StreamReport(
        passed=not stale,
        description=(head + "; ".join(s.describe() for s in what))[:2000],
        metadata={
            "shares": dg.MetadataValue.json([
                {"job": s.job, "share": s.share, "worker": s.worker, "healthy": s.healthy, "seq": s.seq,
                 "checkpoint_age_seconds": round(s.age.total_seconds(), 1), "lag": s.lag,
                 "watermark": s.watermark, "messages": s.messages, "dead_letters": s.dead} for s in shares]),
            "unhealthy": len(stale),
            **({"max_lag": max(lags)} if lags else {}),  # absent: no share reported its lag
        },
    )


def stream_definitions(
    repo: Path, stale_after: timedelta = STREAM_STALE_AFTER,
) -> tuple[dg.AssetSpec, dg.AssetChecksDefinition, dg.SensorDefinition]:
    """The ``stream`` asset, its ``healthy`` check and the ``stream_health`` sensor for the
    stream jobs of ``repo``'s data folder; a share whose newest checkpoint is older than
    ``stale_after`` is unhealthy."""
    stream = dg.AssetSpec(STREAM, group_name=GROUP, kinds={"redis"},
                          description="the stream jobs (`featurepipe stream run`): they keep the online store "
                                      "and the offline log fresh between backfills")

    def report() -> StreamReport | None:
        shares = stream_health(data_dir(repo), stale_after)
        return stream_report(shares, stale_after) if shares else None

    @dg.asset_check(asset=STREAM, name="healthy", description=(
        f"every stream job checkpointed within {stale_after.total_seconds():,.0f} s (its manifests "
        "under <data>/stream/); lag and watermark from its checkpoint records"))
    def healthy() -> dg.AssetCheckResult:
        found = report()
        if found is None:
            return dg.AssetCheckResult(passed=True, description="no stream job has checkpointed yet",
                                       severity=dg.AssetCheckSeverity.WARN)
        return dg.AssetCheckResult(passed=found.passed, description=found.description, metadata=found.metadata)

    @dg.sensor(name="stream_health", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
               description="reports each stream job's lag and health (checkpoint age) on the `stream` asset")
    def stream_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        found = report()
        if found is None:
            return dg.SkipReason(f"no stream job has checkpointed under {data_dir(repo) / 'stream'}")
        key = dg.AssetKey(STREAM)
        return dg.SensorResult(asset_events=[
            dg.AssetObservation(asset_key=key, description=found.description, metadata=found.metadata),
            dg.AssetCheckEvaluation(asset_key=key, check_name="healthy", passed=found.passed,
                                    severity=dg.AssetCheckSeverity.ERROR, description=found.description,
                                    metadata=found.metadata),
        ])

    return stream, healthy, stream_sensor
