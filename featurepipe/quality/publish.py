"""What every run does at its start and end: lineage events, the run log, the metrics file."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from featurepipe.quality import metrics, openlineage
from featurepipe.quality.openlineage import LineageRun
from featurepipe.quality.records import RunRecord
from featurepipe.quality.runlog import append_run

log = logging.getLogger(__name__)

_batches = threading.local()


def start_run(data: Path, kind: str, run_id: str, started: datetime, view: str | None = None) -> LineageRun:
    """Begin a run: emit its OpenLineage ``START`` event (in the background)."""
    return LineageRun(data, kind, run_id, started, view)


def finish_run(data: Path, record: RunRecord, lineage: LineageRun | None = None,
               sla: dict[str, float] | None = None) -> None:
    """End a run: append its record to the run log, rewrite the Prometheus metrics and emit
    its OpenLineage ``COMPLETE`` / ``FAIL`` event. Only the run log may raise.

    Inside :func:`batch`, the metrics are rewritten and the events waited for once, when
    the batch ends, instead of after every run."""

    append_run(data, record)
    pending: dict[Path, dict[str, float] | None] | None = getattr(_batches, "pending", None)
    if pending is None:
        metrics.publish(data, sla)
    else:
        pending[Path(data)] = sla
    if lineage is not None:
        lineage.finish(record, wait=pending is None)


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """Runs that finish inside the block (in this thread) are each appended to the run log
    and have their lineage events sent as usual, but the metrics file, which is rebuilt
    from the whole run log, is rewritten once per data folder when the block ends, and the
    lineage events are waited for once, then: a materialisation of many views costs one
    rebuild, not one per view. Nested blocks join the outermost one."""

    if getattr(_batches, "pending", None) is not None:
        yield
        return
    pending: dict[Path, dict[str, float] | None] = {}
    _batches.pending = pending
    try:
        yield
    finally:
        _batches.pending = None
        for data, sla in pending.items():
            metrics.publish(data, sla)
        if pending:
            openlineage.flush()
