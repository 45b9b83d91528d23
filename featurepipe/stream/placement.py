"""Which share of a job's state holds what, and how a share is made and started.

A worker that reads a whole stream has one share, ``w<worker>``, of every view. A worker of
a consumer group gets one share per partition of a keyed topic (:mod:`~featurepipe.stream.keys`):
the views keyed as that topic is, the keys murmur2 puts in that partition
(:class:`~featurepipe.stream.share.Placement`). :class:`ShareMaker` builds a share (its
DuckDB tables, checkpoint writer, run recorder and fingerprint) and starts a new one from
the source's Parquet history; :func:`match_topics` pairs a job's views with its keyed topics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import duckdb

from featurepipe.core.errors import InvalidInput
from featurepipe.quality.contracts import load_contracts
from featurepipe.stream.checkpoint import CheckpointWriter, fingerprint
from featurepipe.stream.history import unreadable_history
from featurepipe.stream.keys import KeySet
from featurepipe.stream.options import StreamOptions
from featurepipe.stream.record import CheckpointRecorder
from featurepipe.stream.share import Placement, StateShare
from featurepipe.stream.spec import JobSpec
from featurepipe.stream.state import WindowState
from featurepipe.stream.watermark import from_us

log = logging.getLogger(__name__)


def share_name(keys: KeySet, partition: int) -> str:
    """The name of the share holding partition ``partition`` of the topic keyed by ``keys``."""
    return f"by-{'.'.join(keys)}-p{partition}"


def match_topics(source: Any, spec: JobSpec, job: str) -> dict[str, list[int]]:
    """Each keyed topic of ``source`` (its ``key_sets``) with the indexes of the views keyed
    as it is; InvalidInput when a view's key has no topic or the source is not keyed."""
    key_sets: Mapping[str, KeySet] | None = getattr(source, "key_sets", None)
    if not key_sets or not hasattr(source, "listen"):
        raise InvalidInput(
            f"stream job {job!r}: a partitioned job reads keyed Kafka topics in a consumer group, and "
            f"{source.name} is not one; read Redis Streams (one worker) without --partitioned")
    views_of = {topic: [i for i, v in enumerate(spec.views) if tuple(v.spec.join_keys) == keys]
                for topic, keys in key_sets.items()}
    missing = [v.spec.name for i, v in enumerate(spec.views) if not any(i in ids for ids in views_of.values())]
    if missing:
        raise InvalidInput(f"stream job {job!r}: no keyed topic among {sorted(key_sets)} is keyed by the join "
                           f"keys of view(s) {missing}; produce one with featurepipe stream route")
    return {topic: ids for topic, ids in views_of.items() if ids}


class ShareMaker:
    """Makes the shares of worker ``options.worker``'s state on connection ``con``: their
    checkpoints go to ``root/<share>``, dead letters to ``dead_dir``, run records under
    ``data``. In a group, the partitions of the topic keyed by ``archive_keys`` archive the
    raw events (each event is in every keyed topic: one archives it); ``partitions_of`` tells
    how many partitions a routed message's raw topic has."""

    def __init__(self, options: StreamOptions, spec: JobSpec, con: duckdb.DuckDBPyConnection, root: Path,
                 data: Path, dead_dir: Path, repo: Path, archive_keys: KeySet | None = None,
                 partitions_of: Callable[[str], int] | None = None) -> None:
        self.options, self.spec, self.con, self.root = options, spec, con, root
        self.data, self.dead_dir, self.repo, self.archive_keys = data, dead_dir, repo, archive_keys
        self.partitions_of = partitions_of  # a topic's partition count, from the broker
        self._made = 0

    def make(self, name: str, partition: str | None, view_ids: list[int], placement: Placement | None) -> StateShare:
        """A share named ``name`` of views ``view_ids``, covering source ``partition`` (None: all)."""
        o, spec = self.options, self.spec
        self._made += 1
        views = [spec.views[i] for i in view_ids]
        state = WindowState(self.con, views, spec.types, spec.timestamp, spec.unique, o.worker, o.workers,
                            prefix=f"s{self._made}_")
        archive = o.archive_raw and (o.worker == 0 if placement is None else placement.keys == self.archive_keys)
        writer = CheckpointWriter(o.job, name, state, self.root / name, self.dead_dir, spec.input_root, spec.timestamp)
        recorder = CheckpointRecorder(self.data, o.job, o.worker, views, spec.input_root, self.dead_dir, unit=name)
        stamp = fingerprint(state, o.workers, o.allowed_lateness, spec.types,
                            None if placement is None else placement.partitions)
        return StateShare(name, partition, view_ids, state, writer, recorder, stamp, placement=placement,
                          dead_letters=placement is not None or o.worker == 0, archive=archive,
                          partitions_of=self.partitions_of if placement is not None else None)

    def start(self, share: StateShare) -> None:
        """Load the share's checkpoint, or (``bootstrap``) start a new one from history."""
        if not share.restore(self.options.job, self.options.worker) and self.options.bootstrap:
            self.bootstrap(share)

    def bootstrap(self, share: StateShare) -> None:
        """A new share starts from history: the source's Parquet events within each view's
        horizon before the newest of them (of the share's keys) become its state, and rows
        up to that newest event (change points ``v <= newest``) count as final (the batch
        engine wrote them). Rows that fail the source contract's checks are left out, as the
        batch gate leaves them out. A file that cannot be read (the contract's schema checks
        only warn) stops the job with InvalidInput naming the file."""
        spec, o = self.spec, self.options
        try:
            newest_us, loaded = share.state.bootstrap(spec.source_glob, spec.checks,
                                                      share.owned_keys if share.placement is not None else None)
        except duckdb.ConversionException as exc:  # a file that passed the schema check (warn severity)
            raise unreadable_history(self.con, spec.source_glob, o.source, load_contracts(self.repo),
                                     exc, who=f"stream job {o.job!r}", then="restart the job") from exc
        if newest_us is None:
            return
        share.finalised_to = newest_us + 1
        log.info("stream %s %s: bootstrapped %d state rows from %s (history up to %s)",
                 o.job, share.name, loaded, spec.source_glob, from_us(newest_us))
