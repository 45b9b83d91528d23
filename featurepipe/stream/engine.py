"""The streaming engine: the batch engine's feature definitions, computed from live events.

This module is the engine's entry point and design note; the parts live beside it:
:mod:`~featurepipe.stream.job` (the loop, :class:`StreamJob`), :mod:`~featurepipe.stream.options`
(options, counters, result), :mod:`~featurepipe.stream.spec` (what a job reads and computes),
:mod:`~featurepipe.stream.admission` (which events are admitted, as pure functions),
:mod:`~featurepipe.stream.watermark` (event time), :mod:`~featurepipe.stream.state` (keyed window
state in DuckDB), :mod:`~featurepipe.stream.online_rows` (what a micro-batch writes online),
:mod:`~featurepipe.stream.checkpoint` (checkpoint files and their writer),
:mod:`~featurepipe.stream.record` (a checkpoint's run record), :mod:`~featurepipe.stream.prefetch`
(polling ahead), :mod:`~featurepipe.stream.progress` (progress line, latencies),
:mod:`~featurepipe.stream.share` (a share of the state checkpointed on its own: everything,
or one partition of a keyed topic), :mod:`~featurepipe.stream.group` (a consumer group's
progress), :mod:`~featurepipe.stream.keys` (keyed topics, murmur2) and
:mod:`~featurepipe.stream.route` (a raw topic into keyed ones).

``StreamJob`` reads JSON events from an :class:`~featurepipe.stream.source.EventSource`
in micro-batches and keeps every windowed-aggregate view fed by that source up to date,
online (Redis, Feast's layout plus the view's window schedule) within one micro-batch and
offline (Parquet in the view's feature table) once the rows are final.

**Same definitions, same kernel.** The aggregates are the views' ``Aggregation``
declarations read back from the registry, computed with the very SQL the batch backfill
runs (:func:`featurepipe.core.windows.change_point_sql`: one row per change point ``v``,
valid for ``v <= t`` until the key's next row; see that module for what a window means)
over the job's state: the events of each key back to the watermark minus the view's
horizon (its longest window plus that window's hop). Sums run over exact decimals, so a
value does not depend on the order events arrived in, and stream and batch agree to the bit.

**Online.** For each key a micro-batch touches, the kernel's rows from the key's newest
event + 1 us on: the first, the row in force right after that event, goes into Feast's
own fields (its ``v`` as Feast's event timestamp, so Feast's SDK reads the value as of the
key's last event), and all of them, the drops still to come included, into the
``_fp_sched:<view>`` field, in the same atomic write (:mod:`~featurepipe.stream.online_rows`).
The server picks the row in force at its clock. Keyed on the events alone, so a replay
writes the same bytes, and newest timestamp wins, so an older write never overwrites a
newer one.

**Event time.** Each partition's watermark is its greatest event time so far minus the
allowed lateness; an event older than the watermark of its partition *when it arrives*
is late: it goes to the dead letters with the reason and changes nothing (decided per
event in arrival order, so it does not depend on how messages were cut into batches).
An event within the lateness updates every row it falls into: the key's rows are
recomputed from the state and written online (the same timestamp, replaced); rows with
``v`` before the watermark of the state's share (the least over its partitions: all a
single worker reads, or one partition of a keyed topic) can no longer change: each
checkpoint writes the share's rows with ``v`` in ``[previous watermark, watermark)`` to
the offline log, exactly the rows a backfill of that range writes for the share's keys.

**Exactly-once effect.** Every ``checkpoint_seconds`` the job writes, for each share of
its state, in this order, the final offline rows, the dead letters and the archived raw
events (files named by the share and the checkpoint's sequence number), a snapshot of its
state, and last a manifest with the source positions (atomic rename). On start it loads the newest manifest, deletes files
of later sequence numbers (a checkpoint the crash interrupted) and replays the source
from the manifest's positions. Redis writes are idempotent (newest timestamp wins;
an equal one replaces with the rows computed from the same events), so replayed
micro-batches leave Redis as an uninterrupted run does.

**Several workers: a Kafka consumer group** (:mod:`~featurepipe.stream.share`). The
events go to *keyed topics*, one per join key of the views (``transactions.by-user_id``,
``transactions.by-merchant_id``: an event updates a user's and a merchant's aggregates, so
no one partitioning serves both), each event in the partition of its key as Kafka's Java
clients place it (murmur2, :mod:`~featurepipe.stream.keys`). ``featurepipe stream publish``
writes them; producers that do not key write a raw topic and ``featurepipe stream route``
(:mod:`~featurepipe.stream.route`) checks its events once and keys them. The workers of a
job (``--partitioned``) form one consumer group on the keyed topics (cooperative-sticky),
and the state is split by partition: each partition has its own window state, positions,
watermark, final-row bound, seen set and checkpoint folder, which is what moves when the
group moves the partition (checkpointed before the revoke returns, loaded before the first
message is read; a killed worker's partitions replay from their last checkpoint). Each
worker reads only its partitions. Lateness, duplicates and what is final are decided per
partition from its own messages in order, so results do not depend on which worker held
a partition when (tests: a group with a SIGKILLed and a joining worker equals one worker).
Redis Streams stays the single-worker transport; its ``--workers n`` split (each worker
reads the whole stream and owns ``hash(key) % n``, DuckDB's hash) is kept for it only.
"""

from __future__ import annotations

from featurepipe.stream.admission import DEAD_COLUMNS
from featurepipe.stream.checkpoint import MANIFEST
from featurepipe.stream.job import StreamJob
from featurepipe.stream.options import Counters, StreamOptions, StreamResult
from featurepipe.stream.watermark import NEG_INF, POS_INF, US

__all__ = [
    "DEAD_COLUMNS",
    "MANIFEST",
    "NEG_INF",
    "POS_INF",
    "US",
    "Counters",
    "StreamJob",
    "StreamOptions",
    "StreamResult",
]
