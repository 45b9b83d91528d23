"""Event sources of the streaming engine, behind one small interface.

A source delivers raw messages (one JSON event each) from one or more *partitions*, in
order within a partition, and says where it is: ``positions`` maps a partition name to
the position after the last message delivered (Redis Streams: the last entry ID read;
Kafka: the next offset). The engine stores positions in its checkpoint together with its
state and sink outputs and hands them back to :meth:`EventSource.open` after a restart,
so replay starts exactly after the last checkpointed message; :meth:`EventSource.commit`
is advisory (consumer-group bookkeeping and lag), never what correctness rests on.

Sources here:

- :class:`RedisStreamSource` (default): one Redis stream, read through a consumer group
  per worker (``XREADGROUP``; ``XGROUP SETID`` rewinds the group to the checkpoint on
  start, ``XINFO GROUPS`` gives the lag).
- ``featurepipe.stream.kafka.KafkaSource``: a Kafka topic through confluent-kafka.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from featurepipe.core.errors import BackendUnavailable, InvalidInput

EVENT_FIELD = b"e"  # the stream entry field holding the JSON event


@dataclass
class RawBatch:
    """Messages polled together: payloads, the partition index of each, positions after them."""

    payloads: list[bytes]
    partitions: np.ndarray  # int32, index into ``partition_names``
    partition_names: list[str]
    positions: dict[str, str] = field(default_factory=dict)  # partition -> position after this batch
    ids: list[str] = field(default_factory=list)  # a message id each (its position), for dead letters
    publish_ms: np.ndarray | None = None  # when each message entered the broker (epoch ms), if known
    # per message, the raw message a route stage produced it from ("<topic>:<partition>:<offset>"),
    # None for a message that says nothing (see featurepipe.stream.route); None: no message says
    origins: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.payloads)

    def take(self, index: np.ndarray) -> RawBatch:
        """The messages at ``index`` (ascending), with positions only of the partitions they
        come from (each the position after its last message in the whole batch: a message
        left out lies in another share of the batch, never between two taken ones)."""
        index = np.asarray(index, dtype=np.int64)
        parts = self.partitions[index]
        names = {self.partition_names[int(p)] for p in np.unique(parts)}
        return RawBatch(
            payloads=[self.payloads[int(i)] for i in index],
            partitions=parts,
            partition_names=self.partition_names,
            positions={k: v for k, v in self.positions.items() if k in names},
            ids=[self.ids[int(i)] for i in index] if self.ids else [],
            publish_ms=None if self.publish_ms is None else self.publish_ms[index],
            origins=None if self.origins is None else [self.origins[int(i)] for i in index],
        )


class EventSource(Protocol):
    """What the streaming engine needs from a source: the contract every implementation
    keeps (``tests/test_source_contract.py`` runs it against each, on its real server).

    - **Every message once, in order per partition.** A group reading from the start gets
      every message published, each once, in publish order within its partition (across
      partitions, no order). Messages published while the source is open come too.
    - **The source judges nothing.** A message that is not an event (not JSON, not an
      object, not UTF-8) comes as its bytes, in its place; a message without any payload
      comes as ``b""``. The job dead-letters them with a reason (decode, admission).
    - **A batch's shape.** :meth:`poll` returns at most ``max_messages`` messages, one
      partition index (into ``partition_names``) and one id each; ids name the message's
      position, are unique and stay the same when it is delivered again (dead letters of a
      replay name the same messages); ``positions`` names exactly the partitions the batch
      delivered from, each with the position after its last message there. Nothing there:
      an empty batch with no positions, within about ``timeout_seconds``.
    - **Where reading starts is the checkpoint.** :meth:`open` with the positions merged
      from the batches processed delivers every later message and none before it, whatever
      the group committed; ``open(None)`` starts at ``start`` ("earliest": every message
      again, even after a commit). Positions of partitions that are not this source's are
      ignored. :meth:`commit` is advisory (lag, retention).
    - **What the watermark and metrics read.** Once messages came, :meth:`assigned` names
      every partition this worker reads, in the names batches use; :meth:`lag` is the
      number of messages not yet delivered (0 once everything was), or None when unknown.
    - **Clear errors.** A stream or topic that does not exist: InvalidInput at :meth:`open`
      ("... does not exist"); a ``start`` other than "earliest"/"latest": InvalidInput.
    """

    name: str

    def open(self, positions: Mapping[str, str] | None) -> None:
        """Start reading after ``positions`` (a checkpoint), or from the configured start."""

    def poll(self, max_messages: int, timeout_seconds: float) -> RawBatch:
        """Up to ``max_messages`` messages; waits at most ``timeout_seconds`` for the first."""

    def commit(self, positions: Mapping[str, str]) -> None:
        """Tell the broker these positions are processed (advisory: lag and retention)."""

    def lag(self) -> int | None:
        """Messages in the source not yet delivered to this worker, when the broker knows."""

    def assigned(self) -> list[str] | None:
        """Every partition this worker reads, read from or not yet (None: not known yet).

        The watermark waits for a partition that has delivered nothing so far.
        """

    def close(self) -> None:
        """Release connections."""


def encode_event(event: Mapping[str, Any]) -> bytes:
    """One event as the JSON bytes sources carry (timestamps as ISO 8601 strings)."""

    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, np.generic):
            return value.item()
        if hasattr(value, "isoformat"):
            return value.isoformat()
        raise TypeError(f"cannot encode {type(value).__name__} in an event")

    return json.dumps(dict(event), default=default, separators=(",", ":")).encode()


class RedisStreamSource:
    """Reads one Redis stream through a consumer group of its own.

    ``group`` is this worker's consumer group (created at the start of the stream if it
    does not exist). On :meth:`open` the group is rewound with ``XGROUP SETID`` to the
    checkpointed entry (or, with no checkpoint yet, to ``start``), so entries read but not
    checkpointed before a crash are delivered again. Entries are read with ``NOACK``: the checkpoint,
    not the pending-entries list, records what is done.
    """

    def __init__(self, client: Any, stream: str, group: str, consumer: str = "worker",
                 start: str = "earliest") -> None:
        if start not in ("earliest", "latest"):
            raise InvalidInput(f"start must be 'earliest' or 'latest', got {start!r}")
        self.client = client
        self.stream = stream
        self.name = f"redis:{stream}"
        self.group = group
        self.consumer = consumer
        self.start = start
        self._key = stream.encode()
        client.response_callbacks["XREADGROUP"] = lambda reply, **_: reply  # raw replies (see poll)

    def open(self, positions: Mapping[str, str] | None) -> None:
        import redis

        try:
            if not self.client.exists(self._key):
                raise InvalidInput(
                    f"Redis stream {self.stream!r} does not exist on {self._where()}; "
                    "check --stream, or publish events first (featurepipe stream publish)"
                )
            if self.client.type(self._key) not in (b"stream", "stream"):
                raise InvalidInput(f"Redis key {self.stream!r} is not a stream")
            begin = (positions or {}).get(self.stream)
            if begin is None:
                begin = "0-0" if self.start == "earliest" else "$"
            try:
                self.client.xgroup_create(self._key, self.group, id=begin, mkstream=False)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                # the group exists: rewind it to the checkpoint, or with no checkpoint to the
                # start (a run killed before its first checkpoint advanced the group past
                # entries whose effects were never made durable)
                self.client.xgroup_setid(self._key, self.group, id=begin)
        except redis.ConnectionError as exc:
            raise BackendUnavailable(f"cannot reach Redis for stream {self.stream!r}: {exc}") from exc

    def _where(self) -> str:
        kw = self.client.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"

    def poll(self, max_messages: int, timeout_seconds: float) -> RawBatch:
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", max_messages]
        if timeout_seconds > 0:
            args += ["BLOCK", max(1, int(timeout_seconds * 1000))]
        # the raw reply (redis-py's stream parsing costs ~15 us a message; this ~2.5 us)
        reply = self.client.execute_command(*args, "NOACK", "STREAMS", self._key, ">")
        entries = reply[0][1] if reply else []
        payloads = [_field(e[1]) for e in entries]
        ids = [e[0].decode() if isinstance(e[0], bytes) else e[0] for e in entries]
        return RawBatch(
            payloads=payloads,
            partitions=np.zeros(len(payloads), dtype=np.int32),
            partition_names=[self.stream],
            positions={self.stream: ids[-1]} if ids else {},
            ids=ids,
            publish_ms=np.fromiter((int(i.partition("-")[0]) for i in ids), dtype=np.int64, count=len(ids)),
        )

    def assigned(self) -> list[str] | None:
        return [self.stream]

    def commit(self, positions: Mapping[str, str]) -> None:
        """Nothing to acknowledge: entries are read with NOACK and rewound from the checkpoint."""

    def lag(self) -> int | None:
        for group in self.client.xinfo_groups(self._key):
            name = group.get("name")
            if name in (self.group, self.group.encode()):
                lag = group.get("lag")
                return int(lag) if lag is not None else None
        return None

    def close(self) -> None:
        self.client.close()


def _field(fields: list[bytes]) -> bytes:
    """The event of a stream entry's flat ``[field, value, ...]`` list (b"" when absent)."""
    if len(fields) >= 2 and fields[0] == EVENT_FIELD:
        return fields[1]
    for name, value in zip(fields[::2], fields[1::2]):
        if name == EVENT_FIELD:
            return value
    return b""


def publish_redis(client: Any, stream: str, events: Iterable[bytes], pipeline_size: int = 1000,
                  maxlen: int | None = None) -> int:
    """XADD JSON events (from :func:`encode_event`) to ``stream``; returns how many."""
    n = 0
    pipe = client.pipeline(transaction=False)
    for payload in events:
        pipe.xadd(stream, {EVENT_FIELD: payload}, maxlen=maxlen, approximate=maxlen is not None)
        n += 1
        if n % pipeline_size == 0:
            pipe.execute()
    pipe.execute()
    return n
