"""The route stage: a raw topic's events, checked once, into one keyed topic per entity key.

Producers may write a source's events to a topic without keys (or keyed by anything). A
partitioned stream job needs each key's events in one partition: the route reads the raw
topic, admits each message as the stream job would before it looks at time (decode, the
source contract's row checks, a null event time or join key; a ``block`` check stops it),
dead-letters the failures once (``<quarantine>/stream/<job>/stream-<job>-route-<seq>.parquet``),
and produces every admitted message, its bytes unchanged, to the keyed topic of each key
set of the source's views (:func:`featurepipe.stream.keys.keyed_topic`), keyed by its
entity key with Kafka's default partitioner. Lateness and duplicates depend on a key's
partition and are judged by the workers that read the keyed topics; a routed message's
event time counts in its raw partition (the route merges the raw partitions in the order
it reads them, not in event time), see :meth:`featurepipe.stream.share.StateShare.watermark`.

**Exactly-once effect.** Every ``checkpoint_seconds`` the route waits until every message
produced so far is delivered, then writes its dead letters (named by the checkpoint's
sequence number) and last a manifest with the raw topic's positions. A route that crashes
replays from its last manifest (deleting dead letters of a later, interrupted checkpoint)
and so produces some messages a second time; each carries its raw message's position in
the ``featurepipe-origin`` header, and a worker drops a message whose origin it has passed
already (:func:`featurepipe.stream.admission.redelivered`). One route process runs per raw
topic (a lock file in its state folder says so).
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featurepipe.config import data_dir, find_repo
from featurepipe.core.db import connect
from featurepipe.core.errors import InvalidInput
from featurepipe.stream.admission import (
    AdmissionRules,
    DeadLetters,
    blocking_error,
    check_rows,
    dead_letter_table,
)
from featurepipe.stream.checkpoint import Checkpoint, CheckpointWriter, fingerprint, read_manifest
from featurepipe.stream.decode import MSG, Decoder, arrow_schema
from featurepipe.stream.kafka import ORIGIN_HEADER
from featurepipe.stream.keys import KeySet, entity_keys
from featurepipe.stream.options import Counters, StreamOptions, StreamResult
from featurepipe.stream.source import EventSource
from featurepipe.stream.spec import resolve_spec
from featurepipe.stream.state import WindowState
from featurepipe.stream.watermark import NEG_INF

if TYPE_CHECKING:
    from feast import FeatureStore

    from featurepipe.stream.kafka_topics import KeyedProducer

log = logging.getLogger(__name__)

SHARE = "route"


class RouteJob:
    """Routes the raw topic ``source`` reads into ``topics`` (keyed topic -> its key set)
    through ``producer``. Use :meth:`run`; :meth:`stop` (thread-safe) ends it."""

    def __init__(self, store: FeatureStore, source: EventSource, producer: KeyedProducer,
                 topics: Mapping[str, KeySet], options: StreamOptions) -> None:
        self.source, self.producer, self.topics, self.options = source, producer, dict(topics), options
        o = options
        self._stop = threading.Event()
        repo = find_repo(store.repo_path)
        data = data_dir(repo)
        self.state_dir = Path(o.state_dir or data / "stream" / o.job) / SHARE
        dead_dir = Path(o.dead_letter_dir or data / "quarantine" / "stream" / o.job)
        self.con = connect("default", threads=o.threads)
        spec = resolve_spec(store, o, self.con, repo)
        self.decoder = Decoder(arrow_schema(spec.types))
        self.rules = AdmissionRules(source.name, spec.timestamp, spec.key_columns, timedelta(0), spec.checks)
        state = WindowState(self.con, [], spec.types, spec.timestamp, ())  # the route keeps no window state
        self.writer = CheckpointWriter(o.job, SHARE, state, self.state_dir, dead_dir, spec.input_root, spec.timestamp)
        self.fingerprint = fingerprint(state, 1, timedelta(0), spec.types) + "-" + ",".join(sorted(self.topics))
        self.seq = 0
        self.positions: dict[str, str] = {}
        self.counters = Counters()
        self._dead: list[Any] = []
        self._lock: Any = None

    def stop(self) -> None:
        """Ask the route to finish its micro-batch, checkpoint and return."""
        self._stop.set()

    def _take_lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.state_dir / "lock", "w")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise InvalidInput(f"another route process runs for stream job {self.options.job!r} "
                               f"({self.state_dir / 'lock'} is held); one route reads a raw topic") from None

    def _restore(self) -> None:
        m = read_manifest(self.state_dir, self.fingerprint, self.options.job, SHARE)
        if m is not None:
            self.seq = int(m["seq"])
            self.positions = dict(m["positions"])
            self.counters = Counters(**m["counters"])
        self.writer.remove_after(self.seq)

    def run(self) -> StreamResult:
        """Route until stopped (``stop``, ``max_events``, ``idle_seconds``); checkpoint on the way out."""
        o = self.options
        self._take_lock()
        self._restore()
        self.source.open(self.positions or None)
        started = last_message = last_checkpoint = time.monotonic()
        run_messages = 0
        while not self._stop.is_set():
            if o.max_events is not None and self.counters.messages >= o.max_events:
                break
            want = o.max_batch if o.max_events is None else min(o.max_batch, o.max_events - self.counters.messages)
            raw = self.source.poll(want, o.poll_timeout)
            now = time.monotonic()
            if len(raw):
                self._route(raw)
                run_messages += len(raw)
                last_message = now
            elif o.idle_seconds is not None and now - last_message >= o.idle_seconds:
                break
            if now - last_checkpoint >= o.checkpoint_seconds:
                self.checkpoint()
                last_checkpoint = time.monotonic()
        self.checkpoint()
        return StreamResult(self.counters, time.monotonic() - started, run_messages, None)

    def _route(self, raw: Any) -> None:
        """Admit a micro-batch and produce its events to every keyed topic."""
        self.counters.messages += len(raw)
        decoded = self.decoder.decode(raw.payloads)
        failures = check_rows(self.con, decoded.events, self.rules.conditions())
        error = blocking_error(failures, self.rules, raw)
        if error is not None:
            raise error
        dead = DeadLetters.concat([
            DeadLetters(np.asarray(decoded.dead_index, dtype=np.int64), ("decode",) * len(decoded.dead_reason),
                        tuple(decoded.dead_reason)), failures])
        events = decoded.events
        if len(failures):
            keep = np.isin(events.column(MSG).to_numpy(), failures.index, invert=True)
            events = events.filter(keep)
        if len(dead):
            self.counters.dead += len(dead)
            self._dead.append(dead_letter_table(raw, dead, self.options.worker, datetime.now(timezone.utc)))
        self.counters.accepted += events.num_rows
        messages = events.column(MSG).to_pylist()
        for topic, keys in self.topics.items():
            for i, key in zip(messages, entity_keys(events, keys).to_pylist()):
                self.producer.produce(topic, raw.payloads[i], key, [(ORIGIN_HEADER, raw.ids[i].encode())])
        self.positions.update(raw.positions)

    def checkpoint(self) -> None:
        """Wait for every message produced so far, then write the dead letters and the manifest."""
        self.producer.flush()
        seq = self.seq + 1
        self.counters.checkpoints += 1
        ck = Checkpoint(seq=seq, lo=NEG_INF, hi=NEG_INF, finalise=False, dead=self._dead, raw=[], manifest={
            "seq": seq, "job": self.options.job, "worker": self.options.worker, "share": SHARE,
            "fingerprint": self.fingerprint, "positions": dict(self.positions), "partition_max": {},
            "finalised_to": NEG_INF, "counters": asdict(self.counters),
        })
        self.writer.write(ck, self.con)
        if ck.error is not None:
            raise ck.error
        self._dead = []
        self.seq = seq
        self.source.commit(self.positions)

    def close(self) -> None:
        """Release the source, the connection and the lock."""
        self.source.close()
        self.con.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
