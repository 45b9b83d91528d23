"""A share of a stream job's state, checkpointed on its own: the unit that moves between workers.

A worker reading a Redis stream (or a Kafka topic on its own) has one share, ``w<worker>``:
everything it reads. A worker of a consumer group on keyed topics has one share per
partition the group gave it (``by-<keys>-p<n>``): that partition's window state for the
views keyed as the topic is, its positions, watermark, final-row bound, counters and the
route positions it has seen, in a folder of its own (``<state>/<job>/<share>/``). The
group moves a share by its checkpoint: the worker that gives a partition up checkpoints
it before the revoke returns, the one that gets it loads that checkpoint and seeks to its
position; a worker that dies leaves its last checkpoint, and the next owner replays from
there. Everything that decides a row depends on the share's own messages in their order
(per-partition watermark and lateness, its seen set, its final-row bound), so a share
computes the same whichever worker holds it and however its messages were cut into
micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurepipe.core.sql import quote
from featurepipe.stream.admission import (
    AdmissionRules,
    DeadLetters,
    admit,
    check_rows,
    dead_letter_table,
    misplaced,
    redelivered,
)
from featurepipe.stream.checkpoint import Checkpoint, CheckpointWriter, read_manifest
from featurepipe.stream.decode import MSG, Decoder
from featurepipe.stream.keys import KeySet, entity_keys, partition_of
from featurepipe.stream.options import Counters
from featurepipe.stream.record import CheckpointRecorder
from featurepipe.stream.source import RawBatch
from featurepipe.stream.spec import StreamView
from featurepipe.stream.state import WindowState
from featurepipe.stream.watermark import NEG_INF, POS_INF, job_watermark


@dataclass(frozen=True)
class Placement:
    """Where a share sits in a keyed topic: its partition among ``partitions``, keyed by ``keys``."""

    keys: KeySet
    partition: int
    partitions: int


class StateShare:
    """One share of a job's state: its window state, checkpoint writer and progress.

    ``partition`` is the source partition it covers (None: every partition the source
    gives this worker); ``placement`` says, for a keyed topic's partition, which keys it
    holds (their events are checked to belong there). ``view_ids`` are the indexes of its
    views among the job's. Its dead letters and raw archive are written when
    ``dead_letters`` / ``archive`` say so.
    """

    def __init__(self, name: str, partition: str | None, view_ids: list[int], state: WindowState,
                 writer: CheckpointWriter, recorder: CheckpointRecorder, fingerprint: str, *,
                 placement: Placement | None = None, dead_letters: bool = True, archive: bool = True,
                 partitions_of: Callable[[str], int] | None = None) -> None:
        self.name, self.partition, self.view_ids = name, partition, view_ids
        self.state, self.writer, self.recorder, self.fingerprint = state, writer, recorder, fingerprint
        self.placement, self.dead_letters, self.archive = placement, dead_letters, archive
        self.partitions_of = partitions_of  # a topic's partition count (a routed message's origin topic)
        self.origin_topics: dict[str, int] = {}  # origin topic -> its partitions (routed messages seen)
        self.seq = 0
        self.positions: dict[str, str] = {}
        self.partition_max: dict[str, int] = {}
        self.finalised_to = NEG_INF  # rows with event time < this are in the offline log
        self.counters = Counters()
        self.origins: dict[str, int] = {}  # input partition -> newest route origin offset seen
        self.dead: list[pa.Table] = []
        self.raw: list[pa.Table] = []
        self.dirty = False  # messages since the last checkpoint

    @property
    def views(self) -> list[StreamView]:
        return self.state.views

    def restore(self, job: str, worker: int | str) -> bool:
        """Load the newest checkpoint (deleting files of an interrupted later one); False: none yet."""
        m = read_manifest(self.writer.state_dir, self.fingerprint, job, worker if self.partition is None else self.name)
        if m is not None:
            self.seq = int(m["seq"])
            self.positions = dict(m["positions"])
            self.partition_max = {k: int(v) for k, v in m["partition_max"].items()}
            self.finalised_to = int(m["finalised_to"])
            self.counters = Counters(**m["counters"])
            self.origins = {k: int(v) for k, v in m.get("origins", {}).items()}
            self.origin_topics = {k: int(v) for k, v in m.get("origin_topics", {}).items()}
            self.state.load(self.writer.snapshot(self.seq))
        self.writer.remove_after(self.seq)
        self.recorder.since(asdict(self.counters))
        return m is not None

    def owned_keys(self, i: int, relation: str) -> str:
        """SQL of the keys of view ``i`` among those of ``relation`` that this share holds
        (all of them, but for a keyed topic's partition: those hashed to it)."""
        keys = ", ".join(quote(k) for k in self.views[i].spec.join_keys)
        if self.placement is None:
            return f"SELECT DISTINCT {keys} FROM {relation}"
        con, p = self.state.con, self.placement
        distinct = con.sql(f"SELECT DISTINCT {keys} FROM {relation}").to_arrow_table()
        home = partition_of(entity_keys(distinct, p.keys), p.partitions)
        table = f"__owned_{self.state.tables[i]}"
        con.register("__owned_keys", distinct.filter(pa.array(home == p.partition)))
        try:
            con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM __owned_keys")
        finally:
            con.unregister("__owned_keys")
        return f"SELECT * FROM {table}"

    # ------------------------------------------------------------ a micro-batch

    def admit(self, raw: RawBatch, decoder: Decoder, rules: AdmissionRules, received_at: datetime,
              worker: int) -> pa.Table:
        """Admit this share's messages of a micro-batch: returns the accepted events (with
        their message index); counts, dead letters and the seen set are updated here."""
        con = self.state.con
        self.dirty = True
        self.counters.messages += len(raw)
        again, self.origins = redelivered(raw, self.origins)
        if again.any():
            self.counters.redelivered += int(again.sum())
            kept = raw.take(np.flatnonzero(~again))
            kept.positions = raw.positions
            raw = kept
        decoded = decoder.decode(raw.payloads)
        failures = check_rows(con, decoded.events, rules.conditions())
        if self.placement is not None:
            placed = decoded.events
            if len(failures):
                keep = pc.invert(pc.is_in(placed.column(MSG), pa.array(failures.index, pa.int64())))
                placed = placed.filter(keep)
            p = self.placement
            failures = DeadLetters.concat([failures, misplaced(placed, p.keys, p.partition, p.partitions)])
        seen = self.state.seen_among(decoded.events) if rules.unique else None
        timed = self._by_origin(raw) if raw.origins is not None and self.partitions_of is not None else raw
        result = admit(timed, decoded, failures, rules, self.partition_max, self.finalised_to, seen)
        self.partition_max = result.partition_max
        events = result.events
        if events.num_rows:
            self.state.remember(events)  # the seen set of the contract's unique columns
        c = self.counters
        c.late += result.late
        c.duplicate += result.duplicate
        c.dead += len(result.dead)
        c.accepted += events.num_rows
        if len(result.dead) and self.dead_letters:
            self.dead.append(dead_letter_table(raw, result.dead, worker, received_at))
        if events.num_rows and self.archive:
            self.raw.append(events.drop_columns([MSG]))
        self.positions.update(raw.positions)
        return events

    def _by_origin(self, raw: RawBatch) -> RawBatch:
        """``raw`` with each routed message in the partition the route read it from (its
        own otherwise), for event time: a route merges the raw topic's partitions into each
        keyed partition in whatever order it read them, and each raw partition alone is in
        the order its producer wrote, so its watermark is what lateness means (as for a
        single worker reading the raw topic)."""
        assert raw.origins is not None and self.partitions_of is not None
        names: dict[str, int] = {}
        index = np.empty(len(raw), dtype=np.int32)
        for i, origin in enumerate(raw.origins):
            part = origin.rpartition(":")[0] if origin is not None else raw.partition_names[int(raw.partitions[i])]
            k = names.get(part)
            if k is None:
                k = names[part] = len(names)
                topic = part.rpartition(":")[0]
                if origin is not None and topic not in self.origin_topics:
                    self.origin_topics[topic] = self.partitions_of(topic)
            index[i] = k
        return RawBatch(raw.payloads, index, list(names), ids=raw.ids)

    # ------------------------------------------------------------ checkpoints

    def watermark(self, assigned: list[str] | None, lateness_us: int) -> int:
        """The least watermark of the share's partitions: those ``assigned`` (a whole
        source's), or its one partition, or (routed messages) every partition of the raw
        topic the route read; one that delivered nothing yet holds it back."""
        if self.partition is None:
            expected = assigned
        elif self.origin_topics:
            expected = [f"{t}:{p}" for t, n in self.origin_topics.items() for p in range(n)]
        else:
            expected = [self.partition]
        return job_watermark(self.partition_max, expected, lateness_us)

    def begin_checkpoint(self, final: bool, watermark: int, job: str, worker: int) -> Checkpoint:
        """Freeze the state, advance the final-row bound to ``watermark`` (or everything when
        ``final``) and return the checkpoint to write (its manifest last)."""
        seq = self.seq + 1
        wm = POS_INF if final else watermark
        self.state.freeze()
        lo, finalise = self.finalised_to, wm > self.finalised_to
        if finalise:
            self.finalised_to = wm
            if wm < POS_INF:
                self.state.prune(wm)
        self.counters.checkpoints += 1
        manifest = {
            "seq": seq, "job": job, "worker": worker, "share": self.name, "fingerprint": self.fingerprint,
            "positions": dict(self.positions), "partition_max": dict(self.partition_max),
            "finalised_to": self.finalised_to, "counters": asdict(self.counters), "origins": dict(self.origins),
            "origin_topics": dict(self.origin_topics),
        }
        ck = Checkpoint(seq=seq, lo=lo, hi=wm, finalise=finalise, dead=self.dead, raw=self.raw, manifest=manifest)
        self.dead, self.raw = [], []
        self.seq = seq
        self.dirty = False
        return ck

    def finish_checkpoint(self, ck: Checkpoint) -> None:
        """Count a written checkpoint's offline rows."""
        for rows in ck.offline.values():
            self.counters.offline_rows += rows

    def drop(self) -> None:
        """Forget the state: the share moved to another worker (or this one stops)."""
        self.state.drop()


