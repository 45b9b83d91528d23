"""Admission of a decoded micro-batch: which events update features, which become dead
letters, and why.

A message a route stage produced again after a crash (:func:`redelivered`) is no event
at all: it is dropped before these steps, without a dead letter. An event leaves at the
first step it fails, in this order:

1. **decode** (:mod:`featurepipe.stream.decode`): the message is not a JSON object of the
   source's schema;
2. **row checks** (:func:`check_rows`): the source contract's row checks, then a null event
   time or join key; a failed ``block`` check stops the job before anything is written;
   on a keyed topic read by a consumer group, then **partition** (:func:`misplaced`): the
   event's key belongs in another partition (the producer did not key by it with Kafka's
   default partitioner), so another worker may hold the key's state;
3. **lateness** (:func:`find_late`): older than its partition's watermark when it arrived,
   or than the rows the job has already made final;
4. **duplicates** (:func:`find_duplicates`): an earlier event of this batch, or one the
   job accepted before, has the same values of the contract's unique columns.

These are functions over Arrow tables and NumPy arrays: they are handed the batch and the
facts they need (partition watermarks, what is final, the keys seen before) and return new
values; they touch neither Redis nor the job's state, and never change their arguments.
Only the contract's row checks run SQL: they are DuckDB expressions (written by
:func:`featurepipe.quality.checks.row_checks`), evaluated on the connection passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurepipe.core.errors import InvalidInput
from featurepipe.core.sql import literal, quote
from featurepipe.stream.decode import MSG, Decoded
from featurepipe.stream.keys import KeySet, entity_keys, partition_of
from featurepipe.stream.source import RawBatch
from featurepipe.stream.watermark import POS_INF, arrival_watermarks, duration_us, from_us

DEAD_COLUMNS = ("message_id", "partition", "payload", "quality_check", "quality_reason", "worker", "received_at")
_CHECKED = "__admission"  # the name the batch is registered under while its row checks run


@dataclass(frozen=True)
class Condition:
    """A row check as SQL: ``fails`` is true on a failing row, ``reason`` (an SQL
    expression) says why; ``severity`` "warn" dead-letters the row, "block" stops the job."""

    fails: str
    name: str
    reason: str
    severity: str = "warn"


@dataclass(frozen=True)
class AdmissionRules:
    """What a stream job admits: its source's event time and join keys, the contract's
    row checks and unique columns, and the allowed lateness."""

    stream: str  # the event source's name, for messages
    timestamp: str
    key_columns: tuple[str, ...]
    lateness: timedelta
    checks: tuple[Condition, ...] = ()
    unique: tuple[str, ...] = ()

    def conditions(self) -> tuple[Condition, ...]:
        """The contract's checks, then the built-in ones: a null event time, a null join key."""
        ts = quote(self.timestamp)
        builtin = [Condition(f"{ts} IS NULL", "event_time.not_null", f"'{self.timestamp} is null'")]
        builtin += [Condition(f"{quote(k)} IS NULL", f"{k}.not_null", f"'{k} is null (a join key)'")
                    for k in self.key_columns]
        return (*self.checks, *builtin)


@dataclass(frozen=True)
class DeadLetters:
    """Messages of a micro-batch that go to the dead letters: index, check and reason each."""

    index: np.ndarray  # message indexes in the micro-batch (int64)
    checks: tuple[str, ...]
    reasons: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.index)

    @staticmethod
    def empty() -> DeadLetters:
        return DeadLetters(np.empty(0, np.int64), (), ())

    @staticmethod
    def concat(parts: Sequence[DeadLetters]) -> DeadLetters:
        """The parts one after another."""
        return DeadLetters(
            np.concatenate([np.asarray(p.index, dtype=np.int64) for p in parts]) if parts else np.empty(0, np.int64),
            tuple(c for p in parts for c in p.checks), tuple(r for p in parts for r in p.reasons))


@dataclass(frozen=True)
class Late:
    """The verdict of :func:`find_late` on a batch's events."""

    mask: np.ndarray  # bool per event: late
    reasons: tuple[str, ...]  # one per late event, in arrival order
    partition_max: dict[str, int]  # each partition's newest event time after the batch


@dataclass(frozen=True)
class Admission:
    """What admission made of a micro-batch."""

    events: pa.Table  # the accepted events, with their message index (:data:`MSG`)
    dead: DeadLetters
    late: int
    duplicate: int
    partition_max: dict[str, int]  # each partition's newest event time after the batch


def check_rows(con: duckdb.DuckDBPyConnection, events: pa.Table, conditions: Sequence[Condition]) -> DeadLetters:
    """The events failing any of ``conditions``, in arrival order: the first check each
    fails and the reasons of all it fails (``; ``-separated). ``con`` only evaluates the
    SQL over the Arrow table (registered for the query, then released)."""
    if not conditions or not events.num_rows:
        return DeadLetters.empty()
    first = "CASE " + " ".join(f"WHEN {c.fails} THEN {literal(c.name)}" for c in conditions) + " END"
    reasons = "concat_ws('; ', " + ", ".join(f"CASE WHEN {c.fails} THEN {c.reason} END" for c in conditions) + ")"
    con.register(_CHECKED, events)
    try:
        bad = con.execute(
            f"SELECT {MSG}, {first} AS c, {reasons} AS r FROM {_CHECKED} "
            f"WHERE {' OR '.join(f'({c.fails})' for c in conditions)}"
        ).fetchall()
    finally:
        con.unregister(_CHECKED)
    return DeadLetters(np.asarray([b[0] for b in bad], dtype=np.int64), tuple(b[1] for b in bad),
                       tuple(b[2] for b in bad))


def redelivered(raw: RawBatch, origin_max: Mapping[str, int]) -> tuple[np.ndarray, dict[str, int]]:
    """Which messages of ``raw`` (bool mask) a route stage produced again: a route that
    crashed before its checkpoint produces its input again from there, and a keyed
    partition receives, from each input partition, its messages in input order; so a
    message whose origin offset is not past the newest one seen from its input partition
    (``origin_max``: input partition -> offset, not changed) came before. Also returns
    ``origin_max`` after the batch."""
    newest = dict(origin_max)
    mask = np.zeros(len(raw), dtype=bool)
    if raw.origins is None:
        return mask, newest
    for i, origin in enumerate(raw.origins):
        if origin is None:
            continue
        name, _, offset = origin.rpartition(":")
        at = int(offset)
        if at <= newest.get(name, -1):
            mask[i] = True
        else:
            newest[name] = at
    return mask, newest


def misplaced(events: pa.Table, keys: KeySet, partition: int, partitions: int) -> DeadLetters:
    """The events (none with a null key: the row checks took those) whose key Kafka's
    default partitioner puts in another partition than ``partition`` of ``partitions``: a
    keyed topic holds each key in one partition, or the key's events would be split
    between workers."""
    if not events.num_rows:
        return DeadLetters.empty()
    home = partition_of(entity_keys(events, keys), partitions)
    wrong = np.flatnonzero(home != partition)
    if not len(wrong):
        return DeadLetters.empty()
    msg = events.column(MSG).to_numpy()[wrong]
    reasons = tuple(
        f"partition: the event's {', '.join(keys)} belongs in partition {int(home[i])} of {partitions} (murmur2 "
        f"of its key), it came in partition {partition}; the producer must key messages by {', '.join(keys)} "
        "with Kafka's default (murmur2) partitioner" for i in wrong)
    return DeadLetters(np.asarray(msg, dtype=np.int64), ("partition",) * len(wrong), reasons)


def blocking_error(failures: DeadLetters, rules: AdmissionRules, raw: RawBatch) -> InvalidInput | None:
    """The error that stops the job when an event's first failed check is a blocking one."""
    blocking = {c.name for c in rules.conditions() if c.severity == "block"}
    blocked = [i for i, check in enumerate(failures.checks) if check in blocking]
    if not blocked:
        return None
    first = blocked[0]
    sample = [raw.payloads[int(failures.index[i])].decode(errors="replace") for i in blocked[:3]]
    return InvalidInput(
        f"stream {rules.stream}: blocking check {failures.checks[first]} failed on {len(blocked)} of "
        f"{len(raw)} events in this micro-batch ({failures.reasons[first]}); sample: {sample}. Nothing of "
        "this batch was written; fix the producer or the contract and restart (the job resumes "
        "from its last checkpoint)"
    )


def find_late(events: pa.Table, raw: RawBatch, rules: AdmissionRules, partition_max: Mapping[str, int],
              finalised_to: int) -> Late:
    """The late events of ``events`` (in arrival order): older than their partition's
    watermark on arrival, or than ``finalised_to`` (rows before it are in the offline log
    already, so nothing may change them; only a partition the job had not heard of when
    it finalised can get there)."""
    msg = events.column(MSG).to_numpy()
    tsu = events.column(rules.timestamp).cast(pa.int64()).to_numpy()
    bound, newest = arrival_watermarks(tsu, raw.partitions[msg], raw.partition_names, partition_max,
                                       duration_us(rules.lateness))
    late = tsu < bound
    behind = (tsu < finalised_to) & ~late
    late |= behind
    reasons = []
    for i in np.nonzero(late)[0]:
        if behind[i] and finalised_to >= POS_INF:
            reasons.append("late: this job ended with --final (its input was complete); "
                           "run new events under a new --job")
        elif behind[i]:
            reasons.append(f"late: event time {from_us(int(tsu[i])):%Y-%m-%d %H:%M:%S.%f} is before rows the job "
                           f"has already made final ({from_us(finalised_to):%Y-%m-%d %H:%M:%S})")
        else:
            reasons.append(f"late: event time {from_us(int(tsu[i])):%Y-%m-%d %H:%M:%S.%f} is more than the allowed "
                           f"lateness {rules.lateness} behind its partition's newest event"
                           f" (its watermark was {from_us(int(bound[i])):%Y-%m-%d %H:%M:%S.%f})")
    return Late(late, tuple(reasons), newest)


def find_duplicates(events: pa.Table, unique: Sequence[str], seen: pa.Table | None) -> np.ndarray:
    """Message indexes (ascending) of the events whose ``unique`` columns equal those of an
    earlier event of the batch (nulls equal, as SQL's PARTITION BY groups them) or of a row
    of ``seen`` (nulls equal nothing, as in SQL's ``=``): an at-least-once producer resending."""
    if not unique or not events.num_rows:
        return np.empty(0, np.int64)
    cols = list(unique)
    keys = events.select([MSG, *cols])
    msg = keys.column(MSG).combine_chunks()
    first = keys.group_by(cols, use_threads=False).aggregate([(MSG, "min")]).column(f"{MSG}_min")
    dup = pc.invert(pc.is_in(msg, value_set=first.combine_chunks()))
    if seen is not None and seen.num_rows:
        known = seen.select(cols).cast(keys.select(cols).schema)
        again = keys.join(known, keys=cols, join_type="left semi", use_threads=False).column(MSG)
        dup = pc.or_(dup, pc.is_in(msg, value_set=again.combine_chunks()))
    return np.sort(msg.to_numpy()[dup.to_numpy(zero_copy_only=False)]).astype(np.int64)


def _without(events: pa.Table, index: np.ndarray) -> pa.Table:
    keep = np.ones(events.num_rows, dtype=bool)
    keep[np.isin(events.column(MSG).to_numpy(), index)] = False
    return events.filter(pa.array(keep))


def admit(raw: RawBatch, decoded: Decoded, failures: DeadLetters, rules: AdmissionRules,
          partition_max: Mapping[str, int], finalised_to: int, seen: pa.Table | None = None) -> Admission:
    """Admit a decoded micro-batch: ``failures`` are its row checks' (:func:`check_rows`),
    ``partition_max`` each partition's newest event time before it, ``finalised_to`` the
    time before which rows are final, ``seen`` the unique-column values of events accepted
    before (a superset of those in the batch will do). Raises :class:`InvalidInput` when a
    blocking check failed. Dead letters come in step order: decode, checks, late, duplicate."""
    error = blocking_error(failures, rules, raw)
    if error is not None:
        raise error
    events = decoded.events
    dead = [DeadLetters(np.asarray(decoded.dead_index, dtype=np.int64), ("decode",) * len(decoded.dead_reason),
                        tuple(decoded.dead_reason))]
    if len(failures):
        dead.append(failures)
        events = _without(events, failures.index)
    newest, late, duplicate = dict(partition_max), 0, 0
    if events.num_rows:
        verdict = find_late(events, raw, rules, partition_max, finalised_to)
        newest = verdict.partition_max
        if verdict.mask.any():
            late = int(verdict.mask.sum())
            dead.append(DeadLetters(events.column(MSG).to_numpy()[verdict.mask], ("late",) * late, verdict.reasons))
            events = events.filter(pa.array(~verdict.mask))
    dup = find_duplicates(events, rules.unique, seen)
    if len(dup):
        duplicate = len(dup)
        reason = f"duplicate of an earlier event with the same ({', '.join(rules.unique)})"
        dead.append(DeadLetters(dup, ("duplicate",) * duplicate, (reason,) * duplicate))
        events = events.filter(pc.invert(pc.is_in(events.column(MSG), pa.array(dup, pa.int64()))))
    return Admission(events, DeadLetters.concat(dead), late, duplicate, newest)


def dead_letter_table(raw: RawBatch, dead: DeadLetters, worker: int, received_at: datetime) -> pa.Table:
    """The dead letters as rows of :data:`DEAD_COLUMNS` (the batch gates' quarantine names
    for check and reason); ``message_id`` is the message's position in its partition."""
    index = dead.index
    return pa.table({
        "message_id": [raw.ids[int(i)] if raw.ids else str(int(i)) for i in index],
        "partition": [raw.partition_names[int(raw.partitions[int(i)])] for i in index],
        "payload": [raw.payloads[int(i)].decode("utf-8", errors="replace") for i in index],
        "quality_check": list(dead.checks),
        "quality_reason": list(dead.reasons),
        "worker": pa.array([worker] * len(index), pa.int32()),
        "received_at": pa.array([received_at] * len(index), pa.timestamp("us", tz="UTC")),
    })
