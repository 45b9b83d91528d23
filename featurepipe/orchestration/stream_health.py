"""Is a stream job alive, and how far behind is it: read from the files its workers write.

Every checkpoint of a stream worker (``featurepipe stream run``, ``featurepipe stream
route``) renames a manifest into place, ``<data>/stream/<job>/<share>/checkpoint.json``
(:mod:`featurepipe.stream.checkpoint`), stamped with the time it was written, and appends a
run record with the source's lag and the watermark (:mod:`featurepipe.stream.record`).
A worker checkpoints every ``--checkpoint-interval`` (5 s by default), so a manifest much
older than that means the worker stopped or hangs. A partitioned job checkpoints a
partition only when it changed: the partitions of a quiet topic read as stale too.

Nothing here imports Dagster: the sensor of :mod:`featurepipe.orchestration.dagster`
reports these figures.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from featurepipe.quality.records import KIND_STREAM, BadRunRecord, RunRecord
from featurepipe.quality.runlog import runs_path
from featurepipe.stream.checkpoint import MANIFEST

TAIL_BYTES = 4 << 20  # the run log's last 4 MiB: the records of the newest checkpoints


@dataclass(frozen=True)
class ShareHealth:
    """The newest checkpoint of one share of a stream job's state (``w<worker>``: a
    worker's whole state; a keyed topic's partition; ``route``) and what it says."""

    job: str
    share: str
    worker: int
    seq: int
    written_at: datetime
    age: timedelta
    healthy: bool  # checkpointed within ``stale_after``
    messages: int  # totals over every run of the job
    dead: int
    lag: int | None  # messages in the source not yet read, when the checkpoint was written
    watermark: str | None

    @property
    def name(self) -> str:
        return f"{self.job}/{self.share}"

    def describe(self) -> str:
        """``stream/w0: last checkpoint 3m ago (seq 12), lag 0``."""
        lag = "unknown" if self.lag is None else f"{self.lag:,}"
        return (f"{self.name}: last checkpoint {self.age.total_seconds():,.0f} s ago (seq {self.seq}), "
                f"lag {lag}, {self.messages:,} messages")


def stream_health(data: Path, stale_after: timedelta, now: datetime | None = None) -> list[ShareHealth]:
    """Every share of every stream job under ``<data>/stream/`` (jobs whose ``--state-dir``
    is elsewhere are not seen), by job and share."""
    now = now or datetime.now(timezone.utc)
    manifests = sorted(Path(data, "stream").glob(f"*/*/{MANIFEST}"))
    if not manifests:
        return []
    records = _recent_stream_records(data)
    out = []
    for path in manifests:
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            written = datetime.fromisoformat(m["written_at"])
            job, share, seq = str(m["job"]), str(m.get("share") or path.parent.name), int(m["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced right now, or not a manifest: the next look sees it
        # the checkpoint's own record, else the share's newest (the record follows the manifest)
        record = records.get(f"{job}-{share}-{seq:08d}") or records.get(f"{job}-{share}")
        stream = record.stream if record is not None else None
        age = now - written
        counters = m.get("counters") or {}
        out.append(ShareHealth(
            job=job, share=share, worker=int(m.get("worker") or 0), seq=seq, written_at=written, age=age,
            healthy=age <= stale_after, messages=int(counters.get("messages", 0)),
            dead=int(counters.get("dead", 0)), lag=stream.lag if stream else None,
            watermark=stream.watermark if stream else None,
        ))
    return out


def _recent_stream_records(data: Path) -> dict[str, RunRecord]:
    """The stream checkpoint records in the last :data:`TAIL_BYTES` of the run log, by run id
    (``<job>-<share>-<seq>``) and, the newest of each share, by ``<job>-<share>`` (the log
    grows by a record per checkpoint: a sensor must not read all of it)."""
    path = runs_path(data)
    if not path.is_file():
        return {}
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - TAIL_BYTES))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    if size > TAIL_BYTES:
        lines = lines[1:]  # the first line is cut
    out = {}
    for line in lines:
        if f'"{KIND_STREAM}"' not in line:
            continue
        try:
            record = RunRecord.from_json(line)
        except BadRunRecord:
            continue
        out[record.run_id] = out[record.run_id.rsplit("-", 1)[0]] = record
    return out
