"""The run record: one typed shape for every kind of run (backfill, materialize, stream checkpoint).

Every producer builds a :class:`RunRecord` and every reader (``featurepipe status``,
``report``, ``lineage``, the metrics file, OpenLineage) reads one, so a producer that writes
the wrong shape fails where it writes, not in three readers later. The run log stores one
:meth:`RunRecord.to_json` line per run; :meth:`RunRecord.from_json` reads it back, and also
reads the free-form records that featurepipe 0.1 wrote (the stream checkpoint's ``inputs``
dict, its ``finished_at``, records without ``status``). A line it cannot read raises
:class:`BadRunRecord`, which the run log turns into a warning naming the file and line.

This module imports nothing heavy: the serving process and the CLI's status path stay light.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from featurepipe.errors import InvalidInput

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Part = TypeVar("_Part", bound="DataclassInstance")

KIND_BACKFILL = "backfill"
KIND_MATERIALIZE = "materialize"
KIND_STREAM = "stream_checkpoint"
STATUSES = ("ok", "blocked", "failed")


class BadRunRecord(InvalidInput):
    """A run-log line that is not a run record (the message says which field is wrong)."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one table at one stage."""

    stage: str
    table: str
    check: str
    column: str | None
    severity: str
    passed: bool
    failed_rows: int = 0
    rows: int = 0
    detail: str = ""
    sample: list[dict[str, Any]] = field(default_factory=list)

    @property
    def blocking(self) -> bool:
        return not self.passed and self.severity == "block"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckResult:
        return cls(
            stage=str(d["stage"]), table=str(d["table"]), check=str(d["check"]),
            column=d.get("column"), severity=str(d.get("severity", "block")), passed=bool(d["passed"]),
            failed_rows=int(d.get("failed_rows") or 0), rows=int(d.get("rows") or 0),
            detail=str(d.get("detail") or ""), sample=list(d.get("sample") or []),
        )


@dataclass(frozen=True)
class RunInput:
    """What a run read: a raw source (backfill), an offline table (materialize) or a stream
    (stream checkpoint), with its row counts.

    ``rows = passed + quarantined``. ``name`` is the source's name, or the view's for a
    materialisation. ``positions``: a stream's positions after the checkpoint.
    """

    name: str
    path: str = ""
    files: tuple[str, ...] = ()
    rows: int = 0
    passed: int = 0
    quarantined: int = 0
    quarantine_file: str | None = None
    check_seconds: float = 0.0
    views: tuple[str, ...] = ()
    schema: Mapping[str, str] = field(default_factory=dict)
    columns: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    window_rows: int = 0
    positions: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunInput:
        """From a dict of its fields (0.1's ``source`` / ``view`` name it); others are ignored."""
        return _build(cls, _input_names(d))


@dataclass(frozen=True)
class RunOutput:
    """What a run wrote for one feature view.

    ``rows``: rows published (backfill: feature rows; materialize: values written plus values
    not newer than Redis's; stream: offline rows). ``path``: the offline table, or the online
    store's address for a materialisation.
    """

    view: str
    path: str = ""
    input_path: str = ""
    rows: int = 0
    entities: int = 0
    partitions: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    quarantined: int = 0
    quarantine_files: tuple[str, ...] = ()
    check_seconds: float = 0.0
    definition_hash: str | None = None
    seconds: float | None = None
    start: str | None = None
    end: str | None = None
    newest_event: str | None = None
    written: int = 0
    skipped: int = 0
    schema: Mapping[str, str] = field(default_factory=dict)
    columns: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunOutput:
        """From a dict of its fields (0.1 named a materialisation's ``path`` ``online_store``, and
        a backfill's one ``quarantine_file``);
        others are ignored."""
        if "online_store" in d and "path" not in d:
            d = {**d, "path": d["online_store"]}
        if d.get("quarantine_file") and "quarantine_files" not in d:  # 0.1's backfill output
            d = {**d, "quarantine_files": [d["quarantine_file"]]}
        return _build(cls, d)


@dataclass(frozen=True)
class StreamInfo:
    """A stream checkpoint's job, worker, counters (totals since the job began), watermark and lag."""

    job: str
    worker: int
    source: str
    counters: Mapping[str, int] = field(default_factory=dict)
    watermark: str | None = None
    lag: int | None = None


@dataclass(frozen=True)
class RunRecord:
    """One run of a pipeline stage, as the run log stores it (see the module doc)."""

    run_id: str
    kind: str
    status: str
    started: str
    finished: str
    seconds: float = 0.0
    error: str | None = None
    code_version: Mapping[str, str | None] = field(default_factory=dict)
    definitions_hash: str | None = None
    contracts_hash: str | None = None
    inputs: tuple[RunInput, ...] = ()
    outputs: tuple[RunOutput, ...] = ()
    checks: tuple[CheckResult, ...] = ()
    window: tuple[str, str] | None = None
    stats_file: str | None = None
    stream: StreamInfo | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise BadRunRecord(f"run {self.run_id!r}: status {self.status!r} is not one of {STATUSES}")
        for name, kind in (("inputs", RunInput), ("outputs", RunOutput), ("checks", CheckResult)):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, kind) for v in value):
                raise BadRunRecord(f"run {self.run_id!r}: {name} must be a tuple of {kind.__name__}, "
                                   f"got {type(value).__name__}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def output(self, view: str) -> RunOutput | None:
        """The output of ``view``, if this run wrote it."""
        return next((o for o in self.outputs if o.view == view), None)

    # -- storage ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """One line of JSON (no newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, line: str) -> RunRecord:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadRunRecord(f"not JSON ({exc.msg} at column {exc.colno})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, d: Any) -> RunRecord:
        """A record from its dict, this version's or featurepipe 0.1's free-form one."""
        if not isinstance(d, Mapping):
            raise BadRunRecord(f"a run record is a JSON object, got {type(d).__name__}")
        try:
            return cls._from_mapping(d)
        except BadRunRecord:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"field {exc.args[0]!r} is missing" if isinstance(exc, KeyError) else str(exc)
            raise BadRunRecord(f"run {d.get('run_id', '?')!r} ({d.get('kind', '?')}): {what}") from None

    @classmethod
    def _from_mapping(cls, d: Mapping[str, Any]) -> RunRecord:
        kind = str(d["kind"])
        finished = d.get("finished") or d.get("finished_at")
        if not finished:
            raise KeyError("finished")
        stream = None
        raw_inputs: Any = d.get("inputs") or []
        raw_outputs: Any = d.get("outputs") or []
        if kind == KIND_STREAM and "stream" not in d:  # featurepipe 0.1's checkpoint record
            positions = raw_inputs.get("positions", {}) if isinstance(raw_inputs, Mapping) else {}
            source = str(d.get("source") or "stream")
            stream = StreamInfo(str(d.get("job", "")), int(d.get("worker") or 0), source,
                                dict(d.get("counters") or {}), d.get("watermark"), d.get("lag"))
            raw_inputs = [{"name": source, "positions": positions}]
            files = [str(p) for p in raw_outputs if isinstance(p, str)]
            raw_outputs = [{"view": v, "files": [f for f in files if f"/{v}/" in f]} for v in d.get("views") or []]
        elif d.get("stream"):
            stream = _build(StreamInfo, d["stream"])
        window = d.get("window")
        if isinstance(window, Mapping):  # 0.1: {"start": ..., "end": ...}
            window = (window["start"], window["end"])
        return cls(
            run_id=str(d["run_id"]), kind=kind, status=str(d.get("status") or "ok"),
            started=str(d.get("started") or finished), finished=str(finished),
            seconds=float(d.get("seconds") or 0.0), error=d.get("error"),
            code_version=dict(d.get("code_version") or {}), definitions_hash=d.get("definitions_hash"),
            contracts_hash=d.get("contracts_hash"),
            inputs=tuple(RunInput.from_dict(i) for i in _list(raw_inputs, "inputs")),
            outputs=tuple(RunOutput.from_dict(o) for o in _list(raw_outputs, "outputs")),
            checks=tuple(CheckResult.from_dict(c) for c in _list(d.get("checks") or [], "checks")),
            window=None if window is None else (str(window[0]), str(window[1])),
            stats_file=d.get("stats_file"), stream=stream,
        )


def _list(value: Any, name: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise BadRunRecord(f"{name} must be a list of objects, got {type(value).__name__}")
    return value


def _input_names(i: Mapping[str, Any]) -> Mapping[str, Any]:
    """0.1 named a batch input ``source`` and a materialisation's ``view``."""
    if "name" in i:
        return i
    return {**{k: v for k, v in i.items() if k not in ("source", "view")},
            "name": i.get("source") or i.get("view") or ""}


def _build(cls: type[_Part], d: Mapping[str, Any]) -> _Part:
    """A record part from a dict: known fields only (lists become tuples)."""
    known = {f.name for f in fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
    return cls(**kwargs)
