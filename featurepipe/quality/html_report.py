"""``featurepipe report``: one self-contained HTML data-quality report.

Sections: summary, freshness (offline and online), the last runs (rows in, published,
quarantined, checks), the checks of the latest runs, quarantined rows per run and table,
and per checked column a figure (PNG embedded as base64): its distribution now (a sample of
the published rows), its daily median, mean and 5-95% band over the stored days with the
days flagged by the anomaly detector, and its mean per run. Everything comes from the run
log, the per-day statistics and the tables themselves; nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from featurepipe.core.db import connect
from featurepipe.definitions import AggregateView
from featurepipe.quality.contracts import Contracts
from featurepipe.quality.records import KIND_BACKFILL, KIND_MATERIALIZE, KIND_STREAM, RunRecord
from featurepipe.quality.runlog import read_runs
from featurepipe.quality.stats import TABLE, DayStats, stats_dir
from featurepipe.quality.status import (
    format_age,
    freshness,
    latest_runs,
    online_freshness,
    run_summary,
)

SAMPLE_ROWS = 20_000
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.fail td{background:#fde8e8} .ok{color:#176f2c} .bad{color:#b3261e;font-weight:600}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em} img{max-width:100%}
"""


@dataclass(frozen=True)
class ReportInfo:
    """What a report was written from (for the command's summary line and tests)."""

    path: Path
    runs: int
    figures: int


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: Sequence[Sequence[object]], numeric: set[int] | None = None,
           failing: list[bool] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="fail"' if failing and failing[i] else ""
        cells = "".join(f'<td class="n">{_e(c)}</td>' if j in numeric else f"<td>{_e(c)}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode()


def _all_stats(data: Path) -> list[dict[str, Any]]:
    """Every stored figure of every run (not only the latest per day)."""

    if not any(stats_dir(data).glob("*.parquet")):
        return []
    with connect() as con:
        cur = con.execute(f"SELECT * FROM read_parquet('{stats_dir(data) / '*.parquet'}', union_by_name = true) "
                          'ORDER BY run_id, stage, "table", "column", day')
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def _flagged_days(runs: list[RunRecord]) -> dict[tuple[str, str, str], set[date]]:
    """Days the anomaly detector flagged, per (stage, table, column)."""
    out: dict[tuple[str, str, str], set[date]] = defaultdict(set)
    for run in runs:
        for c in run.checks:
            if c.check.startswith("anomaly") and not c.passed:
                for s in c.sample:
                    out[(c.stage, c.table, c.column or TABLE)].add(date.fromisoformat(s["day"]))
    return out


def _sample(relation: str, column: str) -> list[float]:

    with connect() as con:
        rows = con.execute(
            f'SELECT CAST("{column}" AS DOUBLE) FROM {relation} WHERE "{column}" IS NOT NULL '
            f"USING SAMPLE reservoir({SAMPLE_ROWS} ROWS) REPEATABLE (7)"
        ).fetchall()
    return [r[0] for r in rows if r[0] is not None and r[0] == r[0]]


def _figure(title: str, values: list[float], days: list[DayStats], per_run: list[tuple[str, float]],
            flagged: set[date]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 2.8), gridspec_kw={"width_ratios": [1, 1.6, 1]})
    if values:
        ordered = sorted(values)
        lo, hi = ordered[int(0.005 * (len(ordered) - 1))], ordered[int(0.995 * (len(ordered) - 1))]
        outside = sum(v < lo or v > hi for v in ordered)
        a.hist(ordered, bins=50, range=(lo, hi) if hi > lo else None, color="#4c78a8")
        a.set_title(f"distribution now ({len(values):,} sampled" + (f", {outside:,} outside the range shown)"
                                                                  if outside and hi > lo else ")"), fontsize=9)
    else:
        a.text(0.5, 0.5, "no published rows", ha="center", va="center")
    days = [d for d in days if None not in (d.p05, d.p50, d.p95, d.mean)]
    if days:
        x = [d.day for d in days]
        b.fill_between(x, [d.p05 for d in days], [d.p95 for d in days], alpha=0.25, color="#4c78a8", label="p05-p95")
        b.plot(x, [d.p50 for d in days], color="#4c78a8", label="median")
        b.plot(x, [d.mean for d in days], color="#f58518", label="mean")
        bad = [d for d in days if d.day in flagged]
        if bad:
            b.scatter([d.day for d in bad], [d.mean for d in bad], color="#b3261e", zorder=3, label="flagged")
        b.legend(fontsize=7)
        b.tick_params(axis="x", labelrotation=30, labelsize=7)
    b.set_title("per day (latest figures)", fontsize=9)
    if per_run:
        c.plot(range(1, len(per_run) + 1), [m for _, m in per_run], marker="o", color="#54a24b")
        c.set_xticks(range(1, len(per_run) + 1))
    c.set_title("mean per run", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def _rows_figure(title: str, days: list[DayStats], flagged: set[date]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 2.2))
    # (matplotlib plots dates through its unit converters; its stubs name only numbers)
    ax.bar([d.day for d in days], [d.rows for d in days], color=["#b3261e" if d.day in flagged else "#4c78a8"  # type: ignore[arg-type]
                                                                  for d in days])
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def write_report(data: Path, out: Path, views: list[AggregateView], contracts: Contracts,
                 last: int = 20) -> ReportInfo:
    """Write the report of the data folder ``data`` to ``out`` (see the module doc)."""
    runs = read_runs(data)
    now = datetime.now(timezone.utc)
    parts = [f"<h1>featurepipe data quality</h1><p>generated {now:%Y-%m-%d %H:%M:%S} UTC from "
             f"<code>{_e(data)}</code>: {len(runs)} runs logged</p>"]
    # summary
    latest = latest_runs(runs)
    parts.append('<h2 id="summary">Summary</h2>')
    if latest:
        parts.append(_table(["run", "kind", "status", "finished (UTC)", "checks passed", "error"], [
            [r.run_id, r.kind + (f" {r.outputs[0].view}" if r.kind == KIND_MATERIALIZE and r.outputs else ""),
             r.status, r.finished[:19].replace("T", " "),
             f"{run_summary(r).checks - run_summary(r).failed}/{run_summary(r).checks}", r.error or ""]
            for r in latest], failing=[not r.ok for r in latest]))
    else:
        parts.append("<p>No runs recorded yet: run <code>featurepipe backfill</code>.</p>")
    # freshness
    online = online_freshness(runs, now)
    fresh = freshness(views, contracts, now)
    parts.append('<h2 id="freshness">Freshness</h2>')
    parts.append(_table(["view", "newest event (UTC)", "age", "SLA", "state", "online newest (UTC)", "online age"], [
        [f.view, f"{f.newest:%Y-%m-%d %H:%M:%S}" if f.newest else "-", format_age(f.age), format_age(f.sla), f.state,
         f"{online[f.view].newest:%Y-%m-%d %H:%M:%S}" if f.view in online else "-",
         format_age(online[f.view].age) if f.view in online else "-"] for f in fresh],
        failing=[f.state == "STALE" for f in fresh]))
    # runs
    shown = runs[-last:][::-1]
    parts.append(f'<h2 id="runs">Last runs</h2><p>The {len(shown)} most recent of {len(runs)}.</p>')
    summaries = [run_summary(r) for r in shown]
    parts.append(_table(
        ["run", "kind", "status", "finished (UTC)", "seconds", "rows in", "published", "quarantined", "checks passed",
         "views"],
        [[r.run_id, r.kind, r.status, r.finished[:19].replace("T", " "), f"{r.seconds:.1f}",
          f"{s.rows_in:,}", f"{s.published:,}", f"{s.quarantined:,}", f"{s.checks - s.failed}/{s.checks}",
          ", ".join(s.views)] for r, s in zip(shown, summaries)],
        numeric={4, 5, 6, 7}, failing=[not r.ok or s.failed > 0 for r, s in zip(shown, summaries)]))
    # checks
    parts.append('<h2 id="checks">Check results</h2>')
    for r in latest:
        checks = r.checks
        parts.append(f"<h3>run {_e(r.run_id)} ({_e(r.kind)})</h3>")
        parts.append(_table(["stage", "table", "check", "column", "severity", "result", "failed rows", "detail"], [
            [c.stage, c.table, c.check, c.column or "-", c.severity, "passed" if c.passed else "FAILED",
             f"{c.failed_rows:,}", c.detail] for c in checks], numeric={6},
            failing=[not c.passed for c in checks]))
    failed_before = [(r, c) for r in shown if r not in latest for c in r.checks if not c.passed]
    if failed_before:
        parts.append("<h3>failed checks of the earlier runs listed</h3>")
        parts.append(_table(["run", "stage", "table", "check", "column", "severity", "detail"], [
            [r.run_id, c.stage, c.table, c.check, c.column or "-", c.severity, c.detail]
            for r, c in failed_before], failing=[True] * len(failed_before)))
    # quarantine
    parts.append('<h2 id="quarantine">Quarantine</h2>')
    q_rows = []
    for r in shown:
        for i in r.inputs:
            if i.quarantined:
                stage = {KIND_MATERIALIZE: "materialize", KIND_STREAM: "stream"}.get(r.kind, "raw")
                files = i.quarantine_file or ", ".join(f for o in r.outputs for f in o.quarantine_files)
                q_rows.append([r.run_id, stage, i.name, f"{i.quarantined:,}", f"{i.rows:,}", files])
        if r.kind == KIND_BACKFILL:
            for o in r.outputs:
                if o.quarantined:
                    q_rows.append([r.run_id, "features", o.view, f"{o.quarantined:,}", f"{o.rows + o.quarantined:,}",
                                   ", ".join(o.quarantine_files)])
    parts.append(_table(["run", "stage", "table", "rows quarantined", "rows in", "file"], q_rows, numeric={3, 4})
                 if q_rows else "<p>No rows quarantined in the runs listed.</p>")
    # distributions and drift
    figures = 0
    parts.append('<h2 id="distributions">Distributions and drift</h2>')
    stored = _all_stats(data)
    if not stored:
        parts.append("<p>No statistics stored yet (they come with the first successful backfill).</p>")
    latest_day: dict[tuple[str, str, str], dict[date, DayStats]] = defaultdict(dict)
    per_run: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for s in stored:
        key = (s["stage"], s["table"], s["column"])
        fields = {k: s[k] for k in DayStats.__dataclass_fields__}
        latest_day[key][s["day"]] = DayStats(**fields)
        if s["count"] and s["mean"] is not None:
            acc = per_run[key][s["run_id"]]
            acc[0] += s["mean"] * s["count"]
            acc[1] += s["count"]
    flagged = _flagged_days(runs)
    sources = {i.name: i.path for r in runs if r.kind == KIND_BACKFILL for i in r.inputs}
    offline = {v.name: str(Path(v.offline_path) / "*" / "*.parquet") for v in views}
    for key in sorted(latest_day, key=lambda k: (k[0] != "raw", k[1], k[2] != TABLE, k[2])):
        stage, table, column = key
        days = [latest_day[key][d] for d in sorted(latest_day[key])]
        anchor = f"{stage}-{table}-{column}".replace("*", "rows")
        if column == TABLE:
            parts.append(f'<h3 id="{_e(anchor)}">{_e(stage)} / {_e(table)}: rows per day</h3>')
            parts.append(f'<img alt="rows per day of {_e(table)}" src="data:image/png;base64,'
                         f'{_rows_figure(f"{table}: rows per day", days, flagged.get(key, set()))}">')
            figures += 1
            continue
        where = sources.get(table) if stage == "raw" else offline.get(table)
        relation = f"read_parquet('{where}', hive_partitioning = true, union_by_name = true)" if where else None
        try:
            values = _sample(relation, column) if relation else []
        except Exception:  # a table gone or renamed since: the figure shows the history only
            values = []
        runs_means = [(run_id, acc[0] / acc[1]) for run_id, acc in sorted(per_run[key].items()) if acc[1]]
        png = _figure(f"{stage} / {table} / {column}", values, days, runs_means, flagged.get(key, set()))
        parts.append(f'<h3 id="{_e(anchor)}">{_e(stage)} / {_e(table)} / {_e(column)}</h3>'
                     f'<img alt="{_e(column)}" src="data:image/png;base64,{png}">')
        figures += 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>featurepipe data quality"
                f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    partial = out.with_name(out.name + ".partial")
    partial.write_text(document, encoding="utf-8")
    partial.replace(out)
    return ReportInfo(out, len(runs), figures)
