"""The run record of a stream checkpoint, appended to the run log like every run's.

Each checkpoint is a run: the messages it admitted since the previous checkpoint, its dead
letters, the offline rows per view, the source positions (see
:class:`featurepipe.quality.records.RunRecord`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from featurepipe.quality.records import KIND_STREAM, RunInput, RunOutput, RunRecord, StreamInfo
from featurepipe.quality.runlog import append_run, code_version
from featurepipe.stream.checkpoint import Checkpoint
from featurepipe.stream.spec import StreamView


class CheckpointRecorder:
    """Appends a :class:`RunRecord` per checkpoint of worker ``worker`` of job ``job`` to the
    run log under ``data``, counting the messages since the previous record (or :meth:`since`).
    ``unit`` names the share of the state checkpointed (default ``w<worker>``: all of it; a
    keyed topic's partition otherwise), and so the record (``<job>-<unit>-<seq>``)."""

    def __init__(self, data: Path, job: str, worker: int, views: Sequence[StreamView], input_root: Path,
                 dead_dir: Path, unit: str | None = None) -> None:
        self.data, self.job, self.worker, self.views = data, job, worker, list(views)
        self.unit = unit or f"w{worker}"
        self.input_root, self.dead_dir = input_root, dead_dir
        self._counters: dict[str, int] = {}

    def since(self, counters: dict[str, int]) -> None:
        """Count the next record's messages from ``counters`` (the job's, as a run begins)."""
        self._counters = dict(counters)

    def record(self, ck: Checkpoint, source: str, lag: int | None, watermark: datetime | None) -> None:
        """Append ``ck``'s record (``source``: the event source's name; ``lag``, ``watermark``: now)."""
        manifest, counters = ck.manifest, ck.manifest["counters"]
        before = self._counters
        delta = {k: int(v) - int(before.get(k, 0)) for k, v in counters.items()}
        self._counters = dict(counters)
        dead_files = [str(p) for p in ck.written if Path(p).is_relative_to(self.dead_dir)]
        raw_files = [str(p) for p in ck.written if Path(p).is_relative_to(self.input_root)]
        finished = manifest["written_at"]
        started = (datetime.fromisoformat(finished) - timedelta(seconds=ck.seconds)).isoformat()
        append_run(self.data, RunRecord(
            run_id=f"{self.job}-{self.unit}-{manifest['seq']:08d}",
            kind=KIND_STREAM, status="ok", started=started, finished=finished, seconds=round(ck.seconds, 4),
            code_version=code_version(), definitions_hash=manifest["fingerprint"],
            inputs=(RunInput(
                name=source, path=str(self.input_root), files=tuple(raw_files),
                rows=delta.get("messages", 0), passed=delta.get("accepted", 0), quarantined=delta.get("dead", 0),
                quarantine_file=dead_files[0] if dead_files else None,
                views=tuple(v.spec.name for v in self.views), positions=dict(manifest["positions"]),
            ),),
            outputs=tuple(RunOutput(
                view=v.spec.name, path=str(v.spec.offline_path), input_path=v.spec.input_path,
                rows=ck.offline.get(v.spec.name, 0),
                files=tuple(str(p) for p in ck.written if Path(p).is_relative_to(v.spec.offline_path)),
                partitions=tuple(sorted({Path(p).parent.name for p in ck.written
                                         if Path(p).is_relative_to(v.spec.offline_path)})),
            ) for v in self.views),
            stream=StreamInfo(
                job=self.job, worker=self.worker, source=source,
                counters=dict(counters), lag=lag,
                watermark=None if watermark is None else watermark.isoformat(),
            ),
        ))
