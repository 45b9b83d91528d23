"""Data contracts, read from ``contracts.yaml`` beside the feature definitions.

One file next to ``features.py`` (not Feast tags: a contract is reviewed and changed by
data owners without touching the feature code, and it must describe raw sources whose
columns Feast never sees). Layout::

    sources:                       # keyed by Feast data source name
      transactions:
        unique: [transaction_id]   # no two rows share these values
        columns:
          user_id: {type: BIGINT, nullable: false}
          amount:  {type: DOUBLE, nullable: false, min: 0, max: 100000, severity: block}
          channel: {type: VARCHAR, allowed: [pos, online, contactless, atm]}
        volume: {min_rows: 1, min_day_ratio: 0.2, severity: warn}
        freshness: {max_age: 48h, severity: warn}
    feature_views:                 # keyed by feature view name, same keys
      user_transaction_stats: ...

``type`` is DuckDB's type name as ``DESCRIBE`` prints it. Every check is ``warn`` or
``block``: schema checks block by default, everything else warns by default. Row-level
failures (nulls, ranges, allowed values, duplicates) are quarantined either way; ``block``
also stops the batch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from featurepipe.errors import InvalidInput

SEVERITIES = ("warn", "block")
CONTRACTS_FILE = "contracts.yaml"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True)
class ColumnContract:
    """What one column must satisfy."""

    name: str
    type: str | None = None
    nullable: bool = True
    min: float | None = None
    max: float | None = None
    allowed: tuple[Any, ...] | None = None
    severity: str = "warn"


@dataclass(frozen=True)
class VolumeContract:
    """Expected volume: at least ``min_rows`` rows, and no day below ``min_day_ratio`` of the
    median day (a collapse), when set."""

    min_rows: int = 1
    min_day_ratio: float | None = None
    severity: str = "warn"


@dataclass(frozen=True)
class FreshnessContract:
    """The newest event time must be at most ``max_age`` old."""

    max_age: timedelta
    severity: str = "warn"


@dataclass(frozen=True)
class TableContract:
    """The contract of one raw source or feature view."""

    name: str
    columns: tuple[ColumnContract, ...] = ()
    unique: tuple[str, ...] = ()
    unique_severity: str = "warn"
    volume: VolumeContract | None = None
    freshness: FreshnessContract | None = None
    schema_severity: str = "block"

    def column(self, name: str) -> ColumnContract | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass(frozen=True)
class Contracts:
    """Every contract of a feature repo, and the hash of the file they came from."""

    sources: dict[str, TableContract] = field(default_factory=dict)
    feature_views: dict[str, TableContract] = field(default_factory=dict)
    path: Path | None = None
    digest: str = ""


def parse_duration(value: Any, where: str) -> timedelta:
    """``"48h"``, ``"30m"``, ``"2d"``, ``"90s"`` or a number of seconds."""
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value).strip())
    if not match:
        raise InvalidInput(f"{where}: {value!r} is not a duration; write e.g. 48h, 30m, 2d or 90s")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


def _severity(value: Any, default: str, where: str) -> str:
    severity = default if value is None else str(value)
    if severity not in SEVERITIES:
        raise InvalidInput(f"{where}: severity {severity!r} must be one of {', '.join(SEVERITIES)}")
    return severity


def _table(name: str, spec: dict[str, Any] | None, where: str) -> TableContract:
    spec = spec or {}
    known = {"columns", "unique", "unique_severity", "volume", "freshness", "schema_severity"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    columns = []
    for col, cspec in (spec.get("columns") or {}).items():
        cspec = cspec or {}
        allowed = cspec.get("allowed")
        columns.append(ColumnContract(
            name=col,
            type=str(cspec["type"]).upper() if cspec.get("type") else None,
            nullable=bool(cspec.get("nullable", True)),
            min=cspec.get("min"),
            max=cspec.get("max"),
            allowed=tuple(allowed) if allowed is not None else None,
            severity=_severity(cspec.get("severity"), "warn", f"{where}.columns.{col}"),
        ))
    volume = spec.get("volume")
    fresh = spec.get("freshness")
    return TableContract(
        name=name,
        columns=tuple(columns),
        unique=tuple(spec.get("unique") or ()),
        unique_severity=_severity(spec.get("unique_severity"), "warn", f"{where}.unique_severity"),
        volume=VolumeContract(
            min_rows=int(volume.get("min_rows", 1)),
            min_day_ratio=volume.get("min_day_ratio"),
            severity=_severity(volume.get("severity"), "warn", f"{where}.volume"),
        ) if volume else None,
        freshness=FreshnessContract(
            max_age=parse_duration(fresh.get("max_age"), f"{where}.freshness.max_age"),
            severity=_severity(fresh.get("severity"), "warn", f"{where}.freshness"),
        ) if fresh else None,
        schema_severity=_severity(spec.get("schema_severity"), "block", f"{where}.schema_severity"),
    )


def load_contracts(repo: Path) -> Contracts:
    """Read ``<repo>/contracts.yaml`` (no file: no contracts, every gate passes)."""
    import yaml

    path = Path(repo) / CONTRACTS_FILE
    if not path.is_file():
        return Contracts()
    raw = path.read_bytes()
    try:
        spec = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{path} is not valid YAML: {exc}") from exc
    unknown = sorted(set(spec) - {"sources", "feature_views"})
    if unknown:
        raise InvalidInput(f"{path}: unknown top-level key(s) {unknown}; use sources: and feature_views:")
    return Contracts(
        sources={n: _table(n, s, f"{path.name}: sources.{n}") for n, s in (spec.get("sources") or {}).items()},
        feature_views={
            n: _table(n, s, f"{path.name}: feature_views.{n}") for n, s in (spec.get("feature_views") or {}).items()
        },
        path=path,
        digest=hashlib.sha256(raw).hexdigest(),
    )
