"""Data quality: contracts, gates with quarantine, the run log, lineage and freshness.

``contracts.yaml`` beside ``features.py`` declares what the raw sources and the feature
views must look like; :class:`~featurepipe.quality.gate.BatchGate` checks it in DuckDB at
raw ingest and after the batch transformation, quarantines failing rows and blocks a batch
on a blocking failure; every backfill appends a record to ``<data>/runs/runs.jsonl``.
"""

from featurepipe.quality.contracts import Contracts, TableContract, load_contracts
from featurepipe.quality.gate import BatchGate, open_gate

__all__ = ["BatchGate", "Contracts", "TableContract", "load_contracts", "open_gate"]
