"""Data quality: contracts, gates with quarantine, anomalies, the run log, lineage and monitoring.

``contracts.yaml`` beside ``features.py`` declares what the raw sources and the feature
views must look like; :class:`~featurepipe.quality.gate.BatchGate` checks it in DuckDB at
raw ingest and after the batch transformation, and
:class:`~featurepipe.quality.online_gate.MaterializeGate` before materialisation; failing
rows are quarantined, a blocking failure stops the batch or view; per-day statistics are
judged against the days before (``anomaly``). Every backfill and materialisation appends a
record to ``<data>/runs/runs.jsonl``, rewrites the Prometheus textfile (``metrics``) and
emits OpenLineage events (``openlineage``); ``status``, ``lineage`` and ``report`` read it
back. Operating guide: ``docs/quality.md``.
"""

from featurepipe.quality.contracts import Contracts, TableContract, load_contracts
from featurepipe.quality.gate import BatchGate, open_gate

__all__ = ["BatchGate", "Contracts", "TableContract", "load_contracts", "open_gate"]
