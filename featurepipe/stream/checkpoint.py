"""Checkpoints of a stream worker: the files they write, in the order that makes them exact.

A checkpoint writes, in this order, the final offline rows, the dead letters and the
archived raw events (files named by the checkpoint's sequence number), a snapshot of the
state, and last a manifest with the source positions (atomic rename). Until the manifest
is renamed into place the checkpoint does not exist: on start the worker loads the newest
manifest and deletes the files of later sequence numbers (a checkpoint a crash
interrupted), then replays the source from the manifest's positions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from featurepipe.core.errors import InvalidInput
from featurepipe.core.parquet_io import atomic_parquet
from featurepipe.core.windows import KERNEL_METADATA_KEY, KERNEL_VERSION
from featurepipe.stream.state import WindowState
from featurepipe.stream.watermark import US, duration_us, from_us

log = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"


@dataclass
class Checkpoint:
    """A checkpoint being written: what to write and, once done, what was written."""

    seq: int
    lo: int  # offline rows with change point (event_timestamp) in [lo, hi) become final (microseconds)
    hi: int
    finalise: bool
    dead: list[pa.Table]
    raw: list[pa.Table]
    manifest: dict[str, Any]
    written: list[Path] = field(default_factory=list)
    offline: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def done(self) -> bool:
        """True unless its writer thread is still running."""
        return self.thread is None or not self.thread.is_alive()


def fingerprint(state: WindowState, workers: int, lateness: timedelta, types: dict[str, str],
                partitions: int | None = None) -> str:
    """A hash of what a checkpoint's state depends on: the views, the worker count (or, for a
    partition of a keyed topic, the topic's partition count: which keys the partition
    holds), the lateness, the source's types and the kernel version (what a row means, and
    so how far back the state reaches). A checkpoint is only resumed under the same one."""
    import hashlib

    spec: dict[str, Any] = {
        "kernel": KERNEL_VERSION,
        "views": [asdict(v.spec) | {"offline_path": str(v.spec.offline_path)} for v in state.views],
        "workers": workers,
        "lateness_us": duration_us(lateness),
        "types": types,
    }
    if partitions is not None:
        spec["partitions"] = partitions
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(state_dir: Path, want: str, job: str, unit: int | str) -> dict[str, Any] | None:
    """The manifest of the newest checkpoint in ``state_dir`` (None: none yet); raises
    :class:`InvalidInput` when it was written under another fingerprint than ``want``
    (``unit``: the worker's index, or the name of a keyed topic's partition state)."""
    manifest = state_dir / MANIFEST
    if not manifest.exists():
        return None
    m: dict[str, Any] = json.loads(manifest.read_text())
    if m["fingerprint"] != want:
        who = f"worker {unit}" if isinstance(unit, int) else f"partition {unit}"
        raise InvalidInput(
            f"stream job {job!r} {who}: the checkpoint in "
            f"{state_dir} was written for other definitions, worker or partition count or kernel version "
            f"({m['fingerprint']} vs {want}); start a new --job or delete that folder"
        )
    return m


class CheckpointWriter:
    """Writes the checkpoints of one share of stream job ``job``'s state: ``unit`` is
    ``w<worker>`` (a worker's whole state) or the name of a keyed topic's partition.

    Its files are named ``stream-<job>-<unit>-<seq>.parquet``: the offline rows under each
    view's offline folder and, when ``shared_outputs``, the dead letters in ``dead_dir`` and
    the raw archive under ``input_root``; snapshots and the manifest go to ``state_dir``.
    """

    def __init__(self, job: str, unit: str, state: WindowState, state_dir: Path, dead_dir: Path,
                 input_root: Path, timestamp: str, shared_outputs: bool = True) -> None:
        self.job, self.unit, self.state = job, unit, state
        self.state_dir, self.dead_dir, self.input_root, self.timestamp = state_dir, dead_dir, input_root, timestamp
        self.shared_outputs = shared_outputs

    def tag(self, seq: int) -> str:
        return f"stream-{self.job}-{self.unit}-{seq:08d}"

    def snapshot(self, seq: int) -> Path:
        return self.state_dir / f"seq-{seq:08d}"

    def own_files(self) -> list[Path]:
        """Every offline, dead-letter and raw-archive file this share's checkpoints wrote."""
        pattern = f"stream-{self.job}-{self.unit}-*.parquet"
        roots = [v.spec.offline_path for v in self.state.views]
        if self.shared_outputs:
            roots += [self.dead_dir, self.input_root]
        files: list[Path] = []
        for root in roots:
            files += list(Path(root).glob(f"date=*/{pattern}")) + list(Path(root).glob(pattern))
        return files

    def remove_after(self, seq: int) -> int:
        """Delete the files of checkpoints after ``seq`` (interrupted ones); returns how many."""
        removed = 0
        for f in self.own_files():
            if int(f.stem.rsplit("-", 1)[1]) > seq:
                f.unlink()
                removed += 1
        if removed:
            log.warning("stream %s %s: removed %d file(s) of an interrupted checkpoint", self.job, self.unit, removed)
        return removed

    def start(self, ck: Checkpoint, con: duckdb.DuckDBPyConnection) -> None:
        """Write ``ck`` on a thread of its own (join ``ck.thread``; an error is in ``ck.error``)."""
        start_round([(self, ck)], con)

    def write(self, ck: Checkpoint, con: duckdb.DuckDBPyConnection) -> None:
        """Write ``ck`` on a cursor of ``con``, from the state's frozen copies; the manifest
        last. An error is kept in ``ck.error`` (re-raised by the job's thread)."""
        t0 = time.perf_counter()
        try:
            cur = con.cursor()
            try:
                tag = self.tag(ck.seq)
                offline = 0
                if ck.finalise:
                    for i, v in enumerate(self.state.views):
                        table = kernel_tagged(cur.sql(self.state.final_rows_sql(i, ck.lo, ck.hi)).to_arrow_table())
                        offline += table.num_rows
                        ck.offline[v.spec.name] = table.num_rows
                        ck.written += write_by_day(table, "event_timestamp", v.spec.offline_path, tag)
                if ck.dead:
                    self.dead_dir.mkdir(parents=True, exist_ok=True)
                    ck.written.append(atomic_parquet(pa.concat_tables(ck.dead), self.dead_dir / f"{tag}.parquet"))
                if ck.raw:
                    ck.written += write_by_day(pa.concat_tables(ck.raw), self.timestamp, self.input_root, tag)
                snap = self.snapshot(ck.seq)
                snap.mkdir(parents=True, exist_ok=True)
                self.state.save(cur, snap)
            finally:
                cur.close()
            ck.manifest["counters"]["offline_rows"] += offline
            ck.manifest["written_at"] = datetime.now(timezone.utc).isoformat()
            tmp = self.state_dir / (MANIFEST + ".tmp")
            with open(tmp, "w") as fh:
                json.dump(ck.manifest, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_dir / MANIFEST)
            for old in self.state_dir.glob("seq-*"):
                if old != snap:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException as exc:  # re-raised by the main thread
            ck.error = exc
        ck.seconds = time.perf_counter() - t0


def start_round(round_: list[tuple[CheckpointWriter, Checkpoint]], con: duckdb.DuckDBPyConnection) -> None:
    """Write the checkpoints of several shares one after another on one thread of its own
    (each ``ck.thread`` is it), at a lower CPU priority than the micro-batches: where cores
    are few, the checkpoint's offline rows (the kernel's SQL over the frozen state, seconds
    of CPU) would otherwise hold back the events being written online (Linux: a thread's
    own nice value; elsewhere as it is)."""

    def background() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        for writer, ck in round_:
            writer.write(ck, con)

    thread = threading.Thread(target=background, name=f"checkpoint-{round_[0][1].seq}" if round_ else "checkpoint",
                              daemon=True)
    for _, ck in round_:
        ck.thread = thread
    thread.start()


def kernel_tagged(table: pa.Table) -> pa.Table:
    """``table`` with the kernel version in its schema metadata, which every Parquet file
    written from it carries, as the backfill's (:data:`KERNEL_METADATA_KEY`): the offline
    store refuses rows of another kernel."""
    tag = {KERNEL_METADATA_KEY.encode(): str(KERNEL_VERSION).encode()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **tag})


def write_by_day(table: pa.Table, ts_column: str, root: Path, tag: str) -> list[Path]:
    """Write ``table`` as ``root/date=YYYY-MM-DD/<tag>.parquet`` files, one per UTC day."""
    if table.num_rows == 0:
        return []
    day_us = 86_400 * US
    micros = table.column(ts_column).cast(pa.int64()).to_numpy()
    days = micros // day_us
    out = []
    for d in np.unique(days):
        part = table.filter(pa.array(days == d))
        folder = Path(root) / f"date={from_us(int(d) * day_us):%Y-%m-%d}"
        folder.mkdir(parents=True, exist_ok=True)
        out.append(atomic_parquet(part, folder / f"{tag}.parquet"))
    return out

