"""Anomaly detection: each day's statistics against the days before it.

A batch backfill usually covers many days at once, so the natural history of a day is the
days before it, whether this run computed them or an earlier one did (the latest stored
figures). For each judged statistic of each column, a day is flagged when its value is
further from the median of the ``history`` days before it than both ``threshold`` robust
standard deviations (1.4826 x the median absolute deviation: a robust z-score) and
``min_change`` of the statistic's typical size (see
:class:`~featurepipe.quality.contracts.AnomalyContract`). Days are judged once: a day
whose figures are unchanged since a stored run is not judged again, so an old warning is
not repeated on every run (a blocked run stores nothing, so it blocks again on a rerun).
"""

from __future__ import annotations

import statistics as st
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime

from featurepipe.quality.contracts import AnomalyContract
from featurepipe.quality.records import CheckResult
from featurepipe.quality.stats import TABLE, DayStats

MAD_TO_SIGMA = 1.4826
NULL_RATE_SIZE = 0.1
SHOWN = 5


@dataclass(frozen=True)
class Deviation:
    """One flagged statistic of one column on one day."""

    column: str
    statistic: str
    day: date
    value: float
    median: float
    low: float
    high: float
    z: float
    days: int

    def describe(self) -> str:
        z = "inf" if self.z == float("inf") else f"{self.z:.1f}"
        return (f"{self.statistic} = {_num(self.value)} on {self.day:%Y-%m-%d}, expected "
                f"{_num(self.low)} .. {_num(self.high)} (median {_num(self.median)} of the {self.days} "
                f"days before; robust z {z})")


def _num(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:,.4g}" if abs(x) < 1e3 else f"{x:,.0f}"
    return f"{x:.3e}"


def _size(statistic: str, median: float, typical_std: float | None) -> float:
    if statistic == "rows":
        return abs(median)
    if statistic == "null_rate":
        return max(median, NULL_RATE_SIZE)
    return max(abs(median), typical_std or 0.0)


def judge(stage: str, table: str, contract: AnomalyContract, current: list[DayStats],
          history: list[DayStats], now: datetime, warm_until: date | None = None) -> list[CheckResult]:
    """Check results (one per column, ``anomaly.rows`` for the table) of the days of
    ``current`` (this run's figures) that are new or changed against ``history`` (stored
    figures). ``warm_until``: days before it are neither judged nor history (a feature
    view's first ``max_window`` of data, while its windows fill up)."""
    merged: dict[str, dict[date, DayStats]] = defaultdict(dict)
    stored: dict[tuple[str, date], DayStats] = {}
    for s in history:
        merged[s.column][s.day] = s
        stored[(s.column, s.day)] = s
    for s in current:
        merged[s.column][s.day] = s
    to_judge: dict[str, list[date]] = defaultdict(list)
    for s in current:
        before = stored.get((s.column, s.day))
        if before is None or not before.same_data(s):
            to_judge[s.column].append(s.day)
    columns = sorted({s.column for s in current}, key=lambda c: (c != TABLE, c))
    results = []
    for column in columns:
        wanted = ["rows"] if column == TABLE else [s for s in contract.statistics if s != "rows"]
        if not wanted or (column == TABLE and "rows" not in contract.statistics):
            continue
        series = merged[column]
        days = sorted(series)
        judged, too_short, deviations = 0, 0, []
        for day in sorted(to_judge[column]):
            if warm_until is not None and day < warm_until:
                continue
            if column == TABLE and day >= now.date():
                continue  # today is not over: its volume is not comparable yet
            if column != TABLE and series[day].rows < contract.min_day_rows:
                continue
            prev_days = [d for d in days if d < day and (warm_until is None or d >= warm_until)
                         and _usable(series[d], column, contract, now)]
            prev_days = prev_days[-contract.history:]
            if len(prev_days) < contract.min_history:
                too_short += 1
                continue
            judged += 1
            typical_std = _median([series[d].std for d in prev_days])
            for statistic in wanted:
                value = series[day].value(statistic)
                prev = [v for v in (series[d].value(statistic) for d in prev_days) if v is not None]
                if value is None or len(prev) < contract.min_history:
                    continue
                median = st.median(prev)
                sigma = MAD_TO_SIGMA * st.median(abs(v - median) for v in prev)
                allowed = max(contract.threshold * sigma, contract.min_change * _size(statistic, median, typical_std))
                if abs(value - median) > allowed:
                    z = abs(value - median) / sigma if sigma else float("inf")
                    deviations.append(Deviation(column, statistic, day, value, median, median - allowed,
                                                median + allowed, z, len(prev)))
        results.append(_result(stage, table, column, contract, judged, too_short, deviations))
    return results


def _usable(s: DayStats, column: str, contract: AnomalyContract, now: datetime) -> bool:
    if column == TABLE:
        return s.day < now.date()
    return s.rows >= contract.min_day_rows


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and v == v]
    return st.median(present) if present else None


def _result(stage: str, table: str, column: str, contract: AnomalyContract, judged: int, too_short: int,
            deviations: list[Deviation]) -> CheckResult:
    check = "anomaly.rows" if column == TABLE else "anomaly"
    col = None if column == TABLE else column
    short = (f"{too_short} day(s) not judged (fewer than {contract.min_history} days of history)"
             if too_short else "")
    if not deviations:
        detail = f"{judged} day(s) judged" + (f"; {short}" if short else "")
        return CheckResult(stage, table, check, col, contract.severity, True, detail=detail)
    deviations.sort(key=lambda d: -d.z)
    shown = "; ".join(d.describe() for d in deviations[:SHOWN])
    more = f"; and {len(deviations) - SHOWN} more" if len(deviations) > SHOWN else ""
    days = len({d.day for d in deviations})
    detail = (f"{days} of {judged} day(s) deviate from the days before: {shown}{more} "
              f"(flagged past robust z {contract.threshold:g} and a change of {contract.min_change:.0%} of the "
              "statistic's typical size; thresholds: anomalies in contracts.yaml)")
    return CheckResult(stage, table, check, col, contract.severity, False, detail=detail,
                       sample=[{"day": d.day.isoformat(), "statistic": d.statistic, "value": d.value,
                                "median": d.median, "low": d.low, "high": d.high} for d in deviations[:SHOWN]])
