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
        anomalies: {columns: [amount]}   # per-day statistics vs the days before (on by default)
    feature_views:                 # keyed by feature view name, same keys
      user_transaction_stats: ...

``type`` is DuckDB's type name as ``DESCRIBE`` prints it. Every check is ``warn`` or
``block``: schema checks block by default, everything else warns by default. Row-level
failures (nulls, ranges, allowed values, duplicates) are quarantined either way; ``block``
also stops the batch.

``anomalies`` (see :class:`AnomalyContract`) judges each day's statistics of a table
against the days before it; ``anomalies: false`` turns it off for a table.
"""

from __future__ import annotations

import hashlib
import re
import threading
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


STATISTICS = ("rows", "null_rate", "mean", "std", "p05", "p50", "p95")


@dataclass(frozen=True)
class AnomalyContract:
    """Anomaly detection on per-day statistics: a day's ``statistics`` of ``columns`` are
    compared with the same statistics of the ``history`` days before it (from this run and
    earlier ones). A day is flagged when its value is further from the median of those days
    than both ``threshold`` robust standard deviations (1.4826 x the median absolute
    deviation) and ``min_change`` of the statistic's typical size (its median, or the
    column's typical standard deviation when larger; for ``null_rate`` at least 0.1), so
    steady series do not flag tiny moves. Days are judged once they have ``min_history``
    days before them and (for value statistics) ``min_day_rows`` rows; ``rows`` is judged on
    complete days only. ``columns`` defaults to every numeric column except the unique key
    columns and the event time.
    """

    columns: tuple[str, ...] | None = None
    statistics: tuple[str, ...] = ("rows", "null_rate", "mean", "p50")
    history: int = 14
    min_history: int = 7
    threshold: float = 6.0
    min_change: float = 0.3
    min_day_rows: int = 100
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
    anomalies: AnomalyContract | None = AnomalyContract()

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
    known = {"columns", "unique", "unique_severity", "volume", "freshness", "schema_severity", "anomalies"}
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
        anomalies=_anomalies(spec.get("anomalies", True), f"{where}.anomalies"),
    )


def _anomalies(spec: Any, where: str) -> AnomalyContract | None:
    if spec is False or spec is None:
        return None
    if spec is True:
        return AnomalyContract()
    if not isinstance(spec, dict):
        raise InvalidInput(f"{where}: write false, or a mapping of {sorted(AnomalyContract.__dataclass_fields__)}")
    default = AnomalyContract()
    unknown = sorted(set(spec) - set(AnomalyContract.__dataclass_fields__))
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) {unknown}; allowed: {sorted(AnomalyContract.__dataclass_fields__)}")
    statistics = tuple(spec.get("statistics") or default.statistics)
    bad = sorted(set(statistics) - set(STATISTICS))
    if bad:
        raise InvalidInput(f"{where}.statistics: unknown statistic(s) {bad}; choose from {', '.join(STATISTICS)}")
    try:
        contract = AnomalyContract(
            columns=tuple(spec["columns"]) if spec.get("columns") is not None else None,
            statistics=statistics,
            history=int(spec.get("history", default.history)),
            min_history=int(spec.get("min_history", default.min_history)),
            threshold=float(spec.get("threshold", default.threshold)),
            min_change=float(spec.get("min_change", default.min_change)),
            min_day_rows=int(spec.get("min_day_rows", default.min_day_rows)),
            severity=_severity(spec.get("severity"), "warn", where),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: {exc}; history, min_history and min_day_rows are whole numbers, "
                           "threshold and min_change numbers") from exc
    if not 1 <= contract.min_history <= contract.history:
        raise InvalidInput(f"{where}: need 1 <= min_history ({contract.min_history}) <= history ({contract.history})")
    return contract


_parsed: dict[Path, Contracts] = {}  # per file, the contracts of its last content read
_parsed_lock = threading.Lock()


def load_contracts(repo: Path) -> Contracts:
    """Read ``<repo>/contracts.yaml`` (no file: no contracts, every gate passes).

    The file is read every time but parsed once per content and process (parsing took
    20-40 ms, and a materialisation asks once per view): the same bytes give the same,
    shared :class:`Contracts`, which callers must not change."""
    path = Path(repo) / CONTRACTS_FILE
    if not path.is_file():
        return Contracts()
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    with _parsed_lock:
        cached = _parsed.get(path)
    if cached is not None and cached.digest == digest:
        return cached
    contracts = _parse(path, raw, digest)
    with _parsed_lock:
        _parsed[path] = contracts
    return contracts


def _parse(path: Path, raw: bytes, digest: str) -> Contracts:
    import yaml

    try:
        spec = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}  # libyaml: 10x faster
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
        digest=digest,
    )
