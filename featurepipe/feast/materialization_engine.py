"""featurepipe's Feast batch materialisation engine: offline Parquet → Redis in Feast's layout.

Configured in ``feature_store.yaml``::

    batch_engine:
      type: featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine
      batch_rows: 5000          # rows encoded and sent together
      max_rows_per_second: 0    # optional rate limit, to spare a busy Redis (0: none)
      restore: true             # new keys created whole with RESTORE (checked first)
      quality: true             # contract checks (contracts.yaml) and a run record per view

Feast then calls it for ``feast materialize``, ``feast materialize-incremental`` and
``FeatureStore.materialize(...)``; Feast itself records the materialised intervals in
the registry (that is what ``materialize-incremental`` starts from). A view whose data or
online store this engine does not handle (a non-Parquet source, a Redis Cluster, a view
with a transformation or aggregation) is handed to Feast's own ``local`` engine.

Run options (rate limit, progress bar) can also be set for one call with
:func:`run_options`, and per-view outcomes gathered with :func:`collect_results`; the
``featurepipe materialize`` command does both.

Feast hands the engine all views of one ``materialize`` call at once (``supports_batch``):
what does not depend on the view is done once per call, not once per view (the Redis
client, registry lookups, the metrics file and the wait for lineage events; the contracts
and the DuckDB database are kept per process). As in Feast's view-by-view path, the first
view that fails stops the call; the registry records the intervals of the views that were
materialised.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from feast import BatchFeatureView, Entity, FeatureView, OnDemandFeatureView, StreamFeatureView
from feast.infra.common.materialization_job import (
    MaterializationJob,
    MaterializationJobStatus,
    MaterializationTask,
)
from feast.infra.compute_engines.base import ComputeEngine
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import FeastConfigBaseModel
from pydantic import StrictBool, StrictInt

from featurepipe.config import data_dir, online_target
from featurepipe.online.layout import ENTITY_KEY_SERIALIZATION_VERSION, KEY_TYPE_IDS
from featurepipe.online.plan import view_plan
from featurepipe.online.window import (
    ViewMaterialization,
    ViewPlan,
    WindowOptions,
    materialize_window,
)
from featurepipe.quality.online_gate import MaterializeGate, open_materialize_gate
from featurepipe.quality.openlineage import preload
from featurepipe.quality.publish import batch

logger = logging.getLogger(__name__)

ENGINE_TYPE: Final = "featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine"

_collectors: list[list[ViewMaterialization]] = []
_overrides: dict[str, Any] = {}


class FeaturepipeMaterializationEngineConfig(FeastConfigBaseModel):
    """``batch_engine`` options in ``feature_store.yaml``."""

    type: Literal[
        "featurepipe.feast.materialization_engine.FeaturepipeMaterializationEngine",
        "featurepipe.online.engine.FeaturepipeMaterializationEngine",
    ] = ENGINE_TYPE
    batch_rows: StrictInt = 5_000
    """Rows encoded and sent together (one RESTORE per new key, one script call for the rest)."""
    max_rows_per_second: float | None = None
    """Rate limit (rows per second) to spare a Redis that also serves traffic; none by default."""
    threads: StrictInt | None = None
    """DuckDB threads (default: all cores)."""
    quarantine_dir: str | None = None
    """Where rows that cannot be written go (default: ``<data dir>/quarantine/materialize``)."""
    progress: StrictBool = True
    """Show a progress bar (rows/s) per view."""
    restore: StrictBool = True
    """Create new keys with RESTORE of a ready-made hash (checked against HSET on the server
    first); false: every row through the compare-and-set script."""
    quality: StrictBool = True
    """Check the rows about to be written against the view's contract in ``contracts.yaml``
    (see :mod:`featurepipe.quality.online_gate`) and append a run record to the run log."""


@contextmanager
def collect_results() -> Iterator[list[ViewMaterialization]]:
    """Gather the outcome of every view this engine materialises inside the block."""
    results: list[ViewMaterialization] = []
    _collectors.append(results)
    try:
        yield results
    finally:
        _collectors.remove(results)


@contextmanager
def run_options(**options: Any) -> Iterator[None]:
    """Override engine options (``max_rows_per_second``, ``progress``, ...) inside the block."""
    unknown = set(options) - set(FeaturepipeMaterializationEngineConfig.model_fields)
    if unknown:
        raise TypeError(f"unknown materialisation option(s): {sorted(unknown)}")
    saved = dict(_overrides)
    _overrides.update({k: v for k, v in options.items() if v is not None})
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


class FeaturepipeMaterializationJob(MaterializationJob):
    """A finished materialisation of one view (this engine runs synchronously)."""

    def __init__(self, job_id: str, error: BaseException | None = None,
                 result: ViewMaterialization | None = None) -> None:
        super().__init__()
        self._job_id, self._error, self.result = job_id, error, result

    def status(self) -> MaterializationJobStatus:
        return MaterializationJobStatus.ERROR if self._error else MaterializationJobStatus.SUCCEEDED

    def error(self) -> BaseException | None:
        return self._error

    def should_be_retried(self) -> bool:
        return False

    def job_id(self) -> str:
        return self._job_id

    def url(self) -> str | None:
        return None


class NotMaterialized(RuntimeError):
    """A view left out because a view before it in the same call failed."""


@dataclass
class _CallState:
    """What the views of one ``materialize`` call share."""

    client: Any = None  # the Redis client (created by the first view that needs it)
    sources: dict[str, Any] = field(default_factory=dict)  # registry data sources by name


def window_options(settings: FeaturepipeMaterializationEngineConfig, repo_path: Path | str | None) -> WindowOptions:
    """The options of a materialisation run with ``settings`` (feature_store.yaml's engine
    section, with the run's overrides): quarantine under the repo's data folder by default."""
    quarantine = Path(settings.quarantine_dir) if settings.quarantine_dir else (
        data_dir(Path(repo_path)) / "quarantine" / "materialize" if repo_path else None)
    return WindowOptions(
        batch_rows=settings.batch_rows,
        max_rows_per_second=settings.max_rows_per_second or None,
        threads=settings.threads,
        quarantine_dir=quarantine,
        progress=settings.progress,
        restore=settings.restore,
    )


def gated(gate: MaterializeGate | None, plan: ViewPlan,
          run: Callable[[ViewPlan], ViewMaterialization]) -> ViewMaterialization:
    """``run`` of a view's plan behind its ``gate`` (None: ungated), whichever engine runs it:
    the plan prepared by the gate (a blocking schema check raises before anything is written),
    the gate finished with the result, or with the error, which is raised again."""
    try:
        if gate is not None:
            plan = gate.prepare(plan)
        result = run(plan)
    except BaseException as exc:
        if gate is not None:
            gate.finish(None, exc)
        raise
    if gate is not None:
        gate.finish(result)
    return result


def unsupported_reason(view: FeatureView, repo_config: Any) -> str | None:
    """Why this engine cannot materialise ``view`` (None: it can)."""
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig, RedisType

    online = repo_config.online_store
    if not isinstance(online, RedisOnlineStoreConfig):
        return f"online store is {type(online).__name__}, not Redis"
    if online.redis_type not in (RedisType.redis, RedisType.redis_cluster):
        return f"redis_type {online.redis_type.value} (one Redis server or a Redis Cluster are supported)"
    if repo_config.entity_key_serialization_version != ENTITY_KEY_SERIALIZATION_VERSION:
        return f"entity_key_serialization_version {repo_config.entity_key_serialization_version}"
    source = view.batch_source
    if not isinstance(source, FileSource):
        return f"batch source {type(source).__name__} is not a FileSource"
    if type(source.file_format).__name__ != "ParquetFormat" and source.file_format is not None:
        return f"file format {type(source.file_format).__name__}"
    if getattr(view, "feature_transformation", None) is not None or getattr(view, "aggregations", None):
        return "the view has a transformation or aggregations"
    keys = [c for c in view.entity_columns]
    if not keys:
        return "the view has no entity (Feast keys it by a dummy entity)"
    for key in keys:
        if key.dtype.to_value_type().name not in KEY_TYPE_IDS:
            return f"join key {key.name} has type {key.dtype}"
    return None


class FeaturepipeMaterializationEngine(ComputeEngine):
    """Materialises feature views from Parquet into Redis (Feast's layout): DuckDB for the
    latest rows (a windowed-aggregate view: each entity's window schedule, with the kernel
    from the raw events), NumPy for Feast's bytes, ``RESTORE`` for new keys, a Lua
    compare-and-set for existing ones.

    See the module documentation for the configuration.
    """

    def __init__(self, *, repo_config: Any, offline_store: Any, online_store: Any, **config: Any) -> None:
        super().__init__(repo_config=repo_config, offline_store=offline_store, online_store=online_store)
        self.config = FeaturepipeMaterializationEngineConfig(**config)
        self._fallback: ComputeEngine | None = None
        self._call = threading.local()  # the _CallState of the call under way in each thread
        if self.config.quality:
            preload()  # the OpenLineage client: 0.2 s of imports that would compete with the run

    @property
    def supports_batch(self) -> bool:
        """Feast calls :meth:`materialize` once with every view of a ``materialize`` call."""
        return True

    def materialize(self, registry: BaseRegistry, tasks: MaterializationTask | list[MaterializationTask],
                    **kwargs: Any) -> list[MaterializationJob]:
        """Materialise the views in order, sharing what does not depend on the view (see
        the module documentation). After a view fails, the rest are not run: their jobs
        carry :class:`NotMaterialized` (Feast raises the first job's error)."""
        if isinstance(tasks, MaterializationTask):
            tasks = [tasks]
        jobs: list[MaterializationJob] = []
        with self._shared_call():
            for task in tasks:
                failed = next((j for j in jobs if j.status() == MaterializationJobStatus.ERROR), None)
                if failed is not None:
                    view = task.feature_view.name
                    jobs.append(FeaturepipeMaterializationJob(
                        f"{view}-{task.start_time}-{task.end_time}",
                        error=NotMaterialized(f"{view} was not materialised: {failed.job_id()} failed first")))
                    continue
                jobs.append(self._materialize_one(registry, task, **kwargs))
        return jobs

    @contextmanager
    def _shared_call(self) -> Iterator[_CallState]:
        """The state shared by the views of one call (a call inside a call joins it); with
        ``quality``, the run records' metrics and lineage are published once, at the end."""
        state: _CallState | None = getattr(self._call, "state", None)
        if state is not None:
            yield state
            return
        state = self._call.state = _CallState()
        try:
            if self.config.model_copy(update=_overrides).quality and self.repo_config.repo_path:

                with batch():
                    yield state
            else:
                yield state
        finally:
            self._call.state = None
            if state.client is not None:
                state.client.close()

    def update(
        self,
        project: str,
        views_to_delete: Sequence[BatchFeatureView | StreamFeatureView | FeatureView],
        views_to_keep: Sequence[BatchFeatureView | StreamFeatureView | FeatureView | OnDemandFeatureView],
        entities_to_delete: Sequence[Entity],
        entities_to_keep: Sequence[Entity],
    ) -> None:
        """Nothing to prepare: the engine needs no infrastructure of its own."""

    def teardown_infra(
        self,
        project: str,
        fvs: Sequence[BatchFeatureView | StreamFeatureView | FeatureView],
        entities: Sequence[Entity],
    ) -> None:
        """Nothing to tear down."""

    def options(self) -> WindowOptions:
        """The run options: feature_store.yaml's, then :func:`run_options` overrides."""
        return window_options(self.config.model_copy(update=_overrides), self.repo_config.repo_path)

    def _local_engine(self) -> ComputeEngine:
        if self._fallback is None:
            from feast.infra.compute_engines.local.compute import LocalComputeEngine

            self._fallback = LocalComputeEngine(
                repo_config=self.repo_config, offline_store=self.offline_store, online_store=self.online_store
            )
        return self._fallback

    def _materialize_one(self, registry: BaseRegistry, task: MaterializationTask, **kwargs: Any) -> MaterializationJob:
        view = task.feature_view
        job_id = f"{view.name}-{task.start_time}-{task.end_time}"
        reason = unsupported_reason(view, self.repo_config)
        if reason is not None:
            logger.warning("featurepipe engine: %s: %s; using Feast's local engine", view.name, reason)
            return self._local_engine().materialize(registry, task, **kwargs)[0]
        try:
            result = self.materialize_view(view, task.project, task.start_time, task.end_time, registry)
        except Exception as exc:  # Feast raises the job's error in the caller
            return FeaturepipeMaterializationJob(job_id, error=exc)
        return FeaturepipeMaterializationJob(job_id, result=result)

    def materialize_view(self, view: FeatureView, project: str, start: Any, end: Any,
                         registry: BaseRegistry | None = None) -> ViewMaterialization:
        """Materialise one view's window now and return what it did (with ``quality``, behind
        the view's contract checks, recorded in the run log)."""


        plan = view_plan(view, self.repo_config, project, registry)
        options = self.options()
        with self._shared_call() as state:
            gate = None
            if self.config.model_copy(update=_overrides).quality and self.repo_config.repo_path:

                gate = open_materialize_gate(self.repo_config, view, project, registry, start, end,
                                             sources=state.sources)
            if state.client is None:
                state.client = online_target(self.repo_config).client(socket_timeout=300)
            client = state.client
            result = gated(gate, plan, lambda prepared: materialize_window(prepared, start, end, client, options))
        for results in _collectors:
            results.append(replace(result))
        return result

