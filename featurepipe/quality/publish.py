"""What every run does at its start and end: lineage events, the run log, the metrics file."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from featurepipe.quality.openlineage import LineageRun
from featurepipe.quality.records import RunRecord
from featurepipe.quality.runlog import append_run

log = logging.getLogger(__name__)


def start_run(data: Path, kind: str, run_id: str, started: datetime, view: str | None = None) -> LineageRun:
    """Begin a run: emit its OpenLineage ``START`` event (in the background)."""
    return LineageRun(data, kind, run_id, started, view)


def finish_run(data: Path, record: RunRecord, lineage: LineageRun | None = None,
               sla: dict[str, float] | None = None) -> None:
    """End a run: append its record to the run log, rewrite the Prometheus metrics and emit
    its OpenLineage ``COMPLETE`` / ``FAIL`` event. Only the run log may raise."""
    from featurepipe.quality.metrics import publish

    append_run(data, record)
    publish(data, sla)
    if lineage is not None:
        lineage.finish(record)
