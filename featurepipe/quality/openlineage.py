"""OpenLineage run events for backfills and materialisations (the ``openlineage-python`` client).

Each run emits ``START`` when it begins and ``COMPLETE`` (status ok) or ``FAIL`` (blocked or
failed, with the error) when it ends. The end event names the input datasets (raw Parquet
folders; for a materialisation, the offline feature table) and the outputs (offline feature
tables; a materialisation's Redis view), with the facets the run log holds: ``schema``
(columns and DuckDB types), ``dataQualityMetrics`` (rows, null counts and sums of the
checked columns), ``dataQualityAssertions`` (every contract check, passed or not) and
``outputStatistics`` (rows published).

Where events go (first match):

* ``FEATUREPIPE_OPENLINEAGE=off`` (or ``OPENLINEAGE_DISABLED=true``): nowhere;
* ``OPENLINEAGE_URL``, ``OPENLINEAGE_CONFIG`` or ``OPENLINEAGE__TRANSPORT__TYPE`` set: the
  client's own configuration (HTTP endpoint, Kafka, ...), as every OpenLineage integration;
* else one JSON event per line appended to ``$FEATUREPIPE_OPENLINEAGE_FILE``, by default
  ``<data>/lineage/openlineage.jsonl``.

Events are emitted in order by one background thread per process, which imports the
client (about 0.2-0.5 s, once: :func:`preload` does it up front) and keeps one client per
destination; :meth:`LineageRun.finish` waits until the run's events are out, unless a batch
of runs (a materialisation of several views) waits once at its end (:func:`flush`). An
emission failure is logged, never raised: lineage must not stop a pipeline.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import featurepipe
from featurepipe.quality.records import KIND_MATERIALIZE, RunRecord

log = logging.getLogger(__name__)

LINEAGE_FILE = Path("lineage") / "openlineage.jsonl"
NAMESPACE_ENV = "FEATUREPIPE_OPENLINEAGE_NAMESPACE"
_RUN_NAMESPACE = uuid.UUID("5f7d1a52-8a7e-4c59-9a43-0c1b6f4e2d10")


def destination(data: Path) -> str | None:
    """``"client"`` (the OpenLineage client's own configuration), a file path, or None (off)."""
    if os.environ.get("FEATUREPIPE_OPENLINEAGE", "").strip().lower() in ("off", "0", "false", "no"):
        return None
    if os.environ.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return None
    if os.environ.get("OPENLINEAGE_URL") or os.environ.get("OPENLINEAGE_CONFIG") or os.environ.get(
        "OPENLINEAGE__TRANSPORT__TYPE"
    ):
        return "client"
    return os.environ.get("FEATUREPIPE_OPENLINEAGE_FILE") or str(Path(data) / LINEAGE_FILE)


def run_uuid(run_id: str) -> str:
    """The OpenLineage run id (a UUID) of a featurepipe run id, the same every time."""
    return str(uuid.uuid5(_RUN_NAMESPACE, run_id))


def job_name(kind: str, view: str | None) -> str:
    return f"featurepipe.{kind}" + (f".{view}" if view else "")


class _Emitter:
    """The process's lineage thread: it runs the submitted emissions in order, with one
    OpenLineage client per destination (the client's own configuration is read from the
    environment, so a change of ``OPENLINEAGE_*`` gives a new client)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._clients: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._thread = threading.Thread(target=self._work, name="openlineage", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if isinstance(job, threading.Event):  # a flush marker: everything before it is out
                job.set()
                continue
            try:
                job(self)
            except Exception as exc:  # the jobs log their own failures; never let the thread die
                log.warning("OpenLineage emission failed: %s", exc)

    def submit(self, job: Any) -> None:
        self._jobs.put(job)

    def flush(self, timeout: float) -> bool:
        done = threading.Event()
        self._jobs.put(done)
        return done.wait(timeout)

    def client(self, target: str) -> Any:
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("OPENLINEAGE"))) \
            if target == "client" else ()
        key = (target, env)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _client(target)
        elif target != "client":
            Path(target).parent.mkdir(parents=True, exist_ok=True)  # the folder may have gone since
        return client


_emitter_lock = threading.Lock()
_emitter_instance: _Emitter | None = None


def _emitter() -> _Emitter:
    global _emitter_instance
    with _emitter_lock:
        if _emitter_instance is None or _emitter_instance.pid != os.getpid():  # a forked child starts its own
            _emitter_instance = _Emitter()
        return _emitter_instance


def flush(timeout: float = 60.0) -> None:
    """Wait until every event submitted so far is emitted (at most ``timeout`` seconds)."""
    with _emitter_lock:
        emitter = _emitter_instance if _emitter_instance is not None and _emitter_instance.pid == os.getpid() else None
    if emitter is not None and not emitter.flush(timeout):
        log.warning("OpenLineage events not emitted within %.0f s; they are still being sent", timeout)


atexit.register(flush)


def enabled() -> bool:
    """False when lineage is switched off for every run (``FEATUREPIPE_OPENLINEAGE=off``, ...)."""
    return destination(Path(".")) is not None


def preload() -> None:
    """Import the OpenLineage client now (a long-lived engine does it when it is built, so
    the import is not paid, nor its CPU taken, in the middle of its first run)."""
    if enabled():
        import openlineage.client  # noqa: F401
        import openlineage.client.event_v2  # noqa: F401
        import openlineage.client.facet_v2  # noqa: F401


class LineageRun:
    """The events of one run: ``START`` submitted at once, ``COMPLETE``/``FAIL`` by
    :meth:`finish`; both emitted by the process's lineage thread."""

    def __init__(self, data: Path, kind: str, run_id: str, started: datetime, view: str | None = None) -> None:
        self.target = destination(data)
        self.kind, self.run_id, self.started, self.view = kind, run_id, started, view
        self._client: Any = None
        if self.target is not None:
            _emitter().submit(self._start)

    def _start(self, emitter: _Emitter) -> None:
        try:
            self._client = emitter.client(str(self.target))
            self._emit("START", self.started, [], [], None)
        except Exception as exc:  # lineage never stops a pipeline
            log.warning("OpenLineage START event of run %s not emitted: %s", self.run_id, exc)

    def finish(self, record: RunRecord, wait: bool = True) -> None:
        """Emit ``COMPLETE`` or ``FAIL`` for the finished run's record; with ``wait``, return
        once it is out (else a later :func:`flush` waits for it)."""
        if self.target is None:
            return
        _emitter().submit(lambda emitter: self._finish(record))
        if wait:
            flush()

    def _finish(self, record: RunRecord) -> None:
        if self._client is None:  # START could not make a client: said so already
            return
        try:
            inputs, outputs = _datasets(record)
            state = "COMPLETE" if record.ok else "FAIL"
            self._emit(state, datetime.fromisoformat(record.finished), inputs, outputs, record)
        except Exception as exc:
            log.warning("OpenLineage %s event of run %s not emitted: %s", record.status, self.run_id, exc)

    def _emit(self, state: str, when: datetime, inputs: list[Any], outputs: list[Any], record: RunRecord | None) -> None:
        from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
        from openlineage.client.facet_v2 import (
            error_message_run,
            job_type_job,
            processing_engine_run,
            tags_run,
        )


        run_facets: dict[str, Any] = {
            "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
                version=featurepipe.__version__, name="featurepipe"),
            "tags": tags_run.TagsRunFacet(tags=[
                tags_run.TagsRunFacetFields(key="featurepipe.run_id", value=self.run_id, source="featurepipe"),
                *([tags_run.TagsRunFacetFields(key="featurepipe.definitions_hash", value=record.definitions_hash,
                                               source="featurepipe")] if record and record.definitions_hash else []),
            ]),
        }
        if record and record.error:
            run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=record.error, programmingLanguage="python")
        job_facets: dict[str, Any] = {"jobType": job_type_job.JobTypeJobFacet(
            processingType="BATCH", integration="FEATUREPIPE", jobType=self.kind.upper())}
        self._client.emit(RunEvent(
            eventType=getattr(RunState, state),
            eventTime=when.isoformat(),
            run=Run(runId=run_uuid(self.run_id), facets=run_facets),
            job=Job(namespace=namespace(), name=job_name(self.kind, self.view), facets=job_facets),
            producer=producer(),
            inputs=inputs,
            outputs=outputs,
        ))


def namespace() -> str:
    return os.environ.get(NAMESPACE_ENV, "featurepipe")


def producer() -> str:

    return f"urn:featurepipe:{featurepipe.__version__}"


def _client(target: str | None) -> Any:
    from openlineage.client import OpenLineageClient

    if target == "client":
        before = set(os.environ)
        client = OpenLineageClient()
        for alias in set(os.environ) - before:  # it copies OPENLINEAGE_URL into os.environ: leave it as it was
            if alias.startswith("OPENLINEAGE__TRANSPORT__TRANSPORTS__"):
                os.environ.pop(alias, None)
        return client
    from openlineage.client.transport.file import FileConfig, FileTransport

    Path(str(target)).parent.mkdir(parents=True, exist_ok=True)
    return OpenLineageClient(transport=FileTransport(FileConfig(log_file_path=str(target), append=True)))


def dataset_name(path: str) -> str:
    """The folder a Parquet glob reads (``/data/raw/transactions/**/*.parquet`` → its folder)."""
    parts = []
    for part in Path(path).parts:
        if any(ch in part for ch in "*?["):
            break
        parts.append(part)
    return str(Path(*parts)) if parts else path


def _schema(types: Mapping[str, str] | None) -> Any:
    from openlineage.client.facet_v2 import schema_dataset

    return schema_dataset.SchemaDatasetFacet(fields=[
        schema_dataset.SchemaDatasetFacetFields(name=n, type=t) for n, t in (types or {}).items()])


def _assertions(record: RunRecord, stage: str, table: str) -> Any:
    from openlineage.client.facet_v2 import data_quality_assertions_dataset as dq

    return dq.DataQualityAssertionsDatasetFacet(assertions=[
        dq.Assertion(assertion=c.check, success=c.passed, column=c.column, severity=c.severity,
                     actual=str(c.failed_rows) if c.failed_rows else None, description=c.detail or None)
        for c in record.checks if c.stage == stage and c.table == table])


def _metrics(rows: int | None, columns: Mapping[str, Mapping[str, Any]] | None, files: int | None) -> Any:
    from openlineage.client.facet_v2 import data_quality_metrics_input_dataset as dm

    return dm.DataQualityMetricsInputDatasetFacet(
        rowCount=rows, fileCount=files,
        columnMetrics={name: dm.ColumnMetrics(nullCount=m.get("nulls"), count=m.get("count"), sum=m.get("sum"))
                       for name, m in (columns or {}).items()})


def _datasets(record: RunRecord) -> tuple[list[Any], list[Any]]:
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import output_statistics_output_dataset as out_stats

    inputs, outputs = [], []
    if record.kind == KIND_MATERIALIZE:
        for i in record.inputs:
            inputs.append(InputDataset(
                namespace="file", name=dataset_name(i.path),
                facets={"schema": _schema(i.schema)},
                inputFacets={"dataQualityMetrics": _metrics(i.rows, None, len(i.files)),
                             "dataQualityAssertions": _assertions(record, "materialize", i.name)},
            ))
        for o in record.outputs:
            outputs.append(OutputDataset(
                namespace=o.path, name=o.view,
                outputFacets={"outputStatistics": out_stats.OutputStatisticsOutputDatasetFacet(rowCount=o.rows)},
            ))
        return inputs, outputs
    for i in record.inputs:
        if not i.path:
            continue
        inputs.append(InputDataset(
            namespace="file", name=dataset_name(i.path),
            facets={"schema": _schema(i.schema)},
            inputFacets={"dataQualityMetrics": _metrics(i.rows, i.columns, len(i.files)),
                         "dataQualityAssertions": _assertions(record, "raw", i.name)},
        ))
    for o in record.outputs:
        if not o.path:
            continue
        outputs.append(OutputDataset(
            namespace="file", name=o.path,
            facets={"schema": _schema(o.schema)},
            outputFacets={"outputStatistics": out_stats.OutputStatisticsOutputDatasetFacet(
                rowCount=o.rows, fileCount=len(o.partitions))},
        ))
    return inputs, outputs
