"""Prometheus metrics of the pipelines, built from the run log.

Batch jobs are short-lived, so nothing is scraped from them: after every run the metrics are
rebuilt from ``<data>/runs/runs.jsonl`` (counters are totals over the logged runs, so they
only grow while the log does) and written atomically, in the text format, to
``<data>/metrics/featurepipe.prom`` for node_exporter's textfile collector
(``--collector.textfile.directory``; ``$FEATUREPIPE_METRICS_FILE`` moves it). With
``$PROMETHEUS_PUSHGATEWAY`` set (``host:port`` or a URL) they are also pushed there, under
job ``featurepipe``. ``featurepipe status --prometheus`` prints the same text.

Freshness: ``featurepipe_feature_view_newest_event_timestamp_seconds`` (offline: the newest
event time in the view's offline table after the last backfill; online: the newest event
written by the last materialisation) is the one to alert on (``time() - ...``), as the file
is only rewritten when a run ends; ``featurepipe_feature_view_freshness_seconds`` is the
same age at the moment the file was written.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from featurepipe.quality.records import KIND_MATERIALIZE, KIND_STREAM, RunRecord
from featurepipe.quality.runlog import read_runs

log = logging.getLogger(__name__)

METRICS_FILE = Path("metrics") / "featurepipe.prom"
PUSHGATEWAY_ENV = "PROMETHEUS_PUSHGATEWAY"


def metrics_path(data: Path) -> Path:
    """Where the textfile-collector file of a data folder goes."""
    env = os.environ.get("FEATUREPIPE_METRICS_FILE")
    return Path(env) if env else Path(data) / METRICS_FILE


def _stage_rows(run: RunRecord) -> list[tuple[str, str, int, int, int]]:
    """(stage, table, rows in, rows published, rows quarantined) of a run record."""
    if run.kind == KIND_MATERIALIZE:
        return [("materialize", o.view, i.rows, o.rows, o.quarantined) for i, o in zip(run.inputs, run.outputs)]
    if run.kind == KIND_STREAM:
        return [("stream", o.view, o.rows, o.rows, 0) for o in run.outputs]
    out = [("raw", i.name, i.rows, i.passed, i.quarantined) for i in run.inputs]
    out += [("features", o.view, o.rows + o.quarantined, o.rows, o.quarantined) for o in run.outputs]
    return out


def families(data: Path, now: datetime | None = None, sla: dict[str, float] | None = None) -> list[Any]:
    """Every metric family, computed from the run log (no ``_created`` series: these are
    totals over the log, not counters of this process)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    now = now or datetime.now(timezone.utc)
    totals: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
    last: dict[tuple[str, tuple[str, ...]], float] = {}
    newest_seen: dict[tuple[str, str], datetime] = {}
    for run in read_runs(data):
        job, status = run.kind, run.status
        totals[("runs", (job, status))] += 1
        totals[("seconds", (job,))] += run.seconds
        last[("seconds", (job,))] = run.seconds
        last[("time", (job, status))] = datetime.fromisoformat(run.finished).timestamp()
        for stage, table, n_in, n_out, n_q in _stage_rows(run):
            totals[("in", (job, stage, table))] += n_in
            totals[("out", (job, stage, table))] += n_out if status == "ok" else 0
            totals[("q", (job, stage, table))] += n_q
        for c in run.checks:
            if not c.passed:
                totals[("fail", (job, c.stage, c.table, c.check, c.severity))] += 1
        if run.ok:
            for o in run.outputs:
                if o.newest_event:
                    store = "online" if job == KIND_MATERIALIZE else "offline"
                    newest_seen[(o.view, store)] = datetime.fromisoformat(o.newest_event)
    stage_labels = ["job", "stage", "table"]
    specs: list[tuple[str, str, Any, str, list[str], dict[tuple[str, tuple[str, ...]], float]]] = [
        ("runs", "featurepipe_runs", CounterMetricFamily, "Pipeline runs by outcome", ["job", "status"], totals),
        ("seconds", "featurepipe_run_duration_seconds", CounterMetricFamily, "Total run time of the logged runs",
         ["job"], totals),
        ("in", "featurepipe_rows_processed", CounterMetricFamily, "Rows read by a stage", stage_labels, totals),
        ("out", "featurepipe_rows_published", CounterMetricFamily,
         "Rows a stage passed on (raw rows that passed, feature rows written, values stored online)",
         stage_labels, totals),
        ("q", "featurepipe_rows_quarantined", CounterMetricFamily, "Rows a stage quarantined", stage_labels, totals),
        ("fail", "featurepipe_check_failures", CounterMetricFamily, "Failed data quality checks",
         [*stage_labels, "check", "severity"], totals),
        ("seconds", "featurepipe_last_run_duration_seconds", GaugeMetricFamily, "Duration of the last run", ["job"],
         last),
        ("time", "featurepipe_last_run_timestamp_seconds", GaugeMetricFamily,
         "When the last run of each outcome ended", ["job", "status"], last),
    ]
    out = []
    for key, name, kind, doc, labels, values in specs:
        family = kind(name, doc, labels=labels)
        for (k, label_values), value in sorted(values.items()):
            if k == key:
                family.add_metric(list(label_values), value)
        out.append(family)
    newest = GaugeMetricFamily("featurepipe_feature_view_newest_event_timestamp_seconds",
                               "Newest event time of a feature view's values", labels=["feature_view", "store"])
    age = GaugeMetricFamily("featurepipe_feature_view_freshness_seconds",
                            "Age of a feature view's newest event when this file was written",
                            labels=["feature_view", "store"])
    for (view, store), when in sorted(newest_seen.items()):
        newest.add_metric([view, store], when.timestamp())
        age.add_metric([view, store], max(0.0, (now - when).total_seconds()))
    limit = GaugeMetricFamily("featurepipe_feature_view_freshness_sla_seconds", "Freshness SLA from contracts.yaml",
                              labels=["feature_view"])
    for view, seconds in sorted((sla or {}).items()):
        limit.add_metric([view], seconds)
    return [*out, newest, age, limit]


class _RunLogCollector:
    def __init__(self, data: Path, now: datetime | None, sla: dict[str, float] | None) -> None:
        self.args = (data, now, sla)

    def collect(self) -> list[Any]:
        return families(*self.args)


def build_registry(data: Path, now: datetime | None = None, sla: dict[str, float] | None = None) -> Any:
    """A prometheus_client registry serving :func:`families`."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RunLogCollector(data, now, sla))
    return registry


def exposition(data: Path, now: datetime | None = None, sla: dict[str, float] | None = None) -> str:
    """The metrics in the Prometheus text format."""
    from prometheus_client import generate_latest

    return generate_latest(build_registry(data, now, sla)).decode()


def publish(data: Path, sla: dict[str, float] | None = None) -> Path | None:
    """Rewrite the textfile-collector file (atomically) and push to a Pushgateway when
    ``$PROMETHEUS_PUSHGATEWAY`` is set. Failures are logged, never raised."""
    from prometheus_client import push_to_gateway, write_to_textfile

    target = metrics_path(data)
    try:
        registry = build_registry(data, sla=sla)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(target), registry)  # a temporary file renamed over the old one
    except Exception as exc:  # metrics never stop a pipeline
        log.warning("metrics file %s not written: %s", target, exc)
        return None
    gateway = os.environ.get(PUSHGATEWAY_ENV)
    if gateway:
        try:
            push_to_gateway(gateway, job="featurepipe", registry=registry, timeout=10)
        except Exception as exc:
            log.warning("metrics not pushed to the Pushgateway at %s=%s: %s", PUSHGATEWAY_ENV, gateway, exc)
    return target
