"""What every quality gate shares: one run's identity, its check results, the block
decision, the :class:`~featurepipe.errors.GateBlocked` it raises and the end of its run.

A gate runs a stage's contract checks (each a :class:`CheckResult`), keeps every result
for the run record and says each failed ``warn`` check in the log (never silent); when a
``block`` check failed it stops the run with ``GateBlocked`` naming stage, table, the
failing checks and where failing rows were kept; at the end it appends the run record to
the run log (with the metrics file and the lineage events). The gates:

- :class:`~featurepipe.quality.gate.BatchGate`: a backfill's raw ingest and feature tables;
- :class:`~featurepipe.quality.online_gate.MaterializeGate`: one view's offline table
  before it is written to Redis.

The stream admits events by the same contracts with rules of its own
(:mod:`featurepipe.stream.admission`): per event, dead letters instead of a quarantine
file, no gate object.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from featurepipe.errors import GateBlocked
from featurepipe.quality.contracts import Contracts
from featurepipe.quality.openlineage import LineageRun
from featurepipe.quality.publish import finish_run, start_run
from featurepipe.quality.records import CheckResult, RunRecord
from featurepipe.quality.runlog import record_head


class Gate:
    """The shared part of a quality gate; a stage's gate subclasses it.

    ``kind`` is the run's kind in the run log (``backfill``, ``materialize``, ...). A
    subclass runs its checks, hands their results to :meth:`keep`, raises
    :meth:`blocked` when :meth:`any_blocking` says so, and ends with :meth:`publish` of
    the record it builds on :meth:`record_head`.
    """

    log: ClassVar[logging.Logger] = logging.getLogger(__name__)  # a subclass says through its own

    def __init__(self, contracts: Contracts, data: Path, kind: str, now: datetime | None = None) -> None:
        self.contracts = contracts
        self.data = Path(data)
        self.kind = kind
        self.now = now or datetime.now(timezone.utc)
        self.run_id = f"{self.now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.results: list[CheckResult] = []
        self._lineage: LineageRun | None = None
        self._t0 = time.perf_counter()

    def start_lineage(self, view: str | None = None) -> None:
        """Emit the run's OpenLineage ``START`` event (``view``: the one view the run is of)."""
        self._lineage = start_run(self.data, self.kind, self.run_id, self.now, view)

    def keep(self, results: Iterable[CheckResult]) -> None:
        """Keep ``results`` for the run record; say every failed warning in the log."""
        for r in results:
            self.results.append(r)
            if not r.passed and r.severity == "warn":
                where = f" on column {r.column!r}" if r.column else ""
                self.log.warning("quality gate %s/%s (warn): check %r%s failed: %s", r.stage, r.table,
                                 r.check, where, r.detail)

    @staticmethod
    def any_blocking(results: Iterable[CheckResult]) -> bool:
        """Whether a ``block`` check among ``results`` failed (the run must stop)."""
        return any(r.blocking for r in results)

    def blocked(self, stage: str, table: str, results: Iterable[CheckResult], *, stopped: str, fix: str,
                quarantine: Path | None = None, consequence: str = "") -> GateBlocked:
        """The error that stops the run: every failed blocking check of ``results`` with its
        column, failing rows (or detail) and sample; where failing rows were kept
        (``quarantine``); ``consequence`` (a sentence: what was not done); and what to fix
        (``fix``: the data the user repairs, or the contract)."""
        failed = [r for r in results if r.blocking]
        lines = []
        for r in failed:
            where = f" on column {r.column!r}" if r.column else ""
            info = f": {r.failed_rows:,} of {r.rows:,} rows" if r.failed_rows else f" ({r.detail})"
            sample = f"; sample: {r.sample}" if r.sample else ""
            lines.append(f"check {r.check!r}{where} failed{info}{sample}")
        kept = f"; failing rows kept in {quarantine}" if quarantine else ""
        then = f". {consequence}" if consequence else ""
        return GateBlocked(
            f"quality gate {stage}/{table} blocked {stopped} (run {self.run_id}): " + "; ".join(lines) + kept
            + then + f". Fix {fix}, or the contract in {self.contracts.path or 'contracts.yaml'}, and rerun",
            stage=stage, table=table, failures={r.check: r.failed_rows for r in failed}, quarantine=quarantine,
        )

    def record_head(self, error: BaseException | None, view_hashes: dict[str, str]) -> dict[str, Any]:
        """The run record's first fields (identity, status, times, versions) as keywords."""
        return record_head(self.run_id, self.kind, error, self.now, self._t0, view_hashes, self.contracts.digest)

    def publish(self, record: RunRecord) -> None:
        """Append ``record`` to the run log, rewrite the metrics (with the contracts'
        freshness SLAs) and emit the lineage ``COMPLETE`` / ``FAIL`` event."""
        finish_run(self.data, record, self._lineage, freshness_slas(self.contracts))


def freshness_slas(contracts: Contracts) -> dict[str, float]:
    """Each feature view's freshness SLA in seconds, for views whose contract sets one."""
    return {name: c.freshness.max_age.total_seconds() for name, c in contracts.feature_views.items()
            if c.freshness is not None}
