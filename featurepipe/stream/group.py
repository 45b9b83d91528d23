"""What the workers of a consumer group have done together, read from their checkpoints.

Every worker of a partitioned job keeps its shares' checkpoints under the job's one state
folder (``<data>/stream/<job>/<share>/``; shared storage when the workers run on several
machines), so any worker can add up the group's progress: its own shares' live counters and
the last checkpoint of every other partition. A bounded run (``max_events``, the tests and
benchmarks) stops when the group as a whole has done that many messages, whichever worker
did them and however partitions moved meanwhile.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from featurepipe.stream.checkpoint import MANIFEST
from featurepipe.stream.keys import KeySet
from featurepipe.stream.options import Counters
from featurepipe.stream.placement import share_name
from featurepipe.stream.share import StateShare


class GroupProgress:
    """The counters of a partitioned job over all its partitions: ``topics`` maps each keyed
    topic to its key set, ``source`` tells how many partitions each has (once open)."""

    def __init__(self, root: Path, topics: Mapping[str, KeySet], source: Any, every_seconds: float = 0.5) -> None:
        self.root, self.topics, self.source, self.every = root, dict(topics), source, every_seconds
        self._read_at = -1e9
        self._others: dict[str, Counters] = {}

    def _partitions(self) -> list[tuple[str, str]]:
        """(source partition name, share name) of every partition of the job's topics."""
        return [(f"{topic}:{p}", share_name(keys, p))
                for topic, keys in self.topics.items() for p in range(self.source.partitions(topic))]

    def _checkpointed(self, held: Mapping[str | None, StateShare], fresh: bool) -> dict[str, Counters]:
        """The last checkpointed counters of each partition this worker does not hold."""
        now = time.monotonic()
        if fresh or now - self._read_at >= self.every:
            others = {}
            for partition, share in self._partitions():
                if partition in held:
                    continue
                manifest = self.root / share / MANIFEST
                try:
                    others[partition] = Counters(**json.loads(manifest.read_text())["counters"])
                except FileNotFoundError:
                    others[partition] = Counters()
                except (ValueError, KeyError, TypeError):  # being replaced: read again next time
                    others[partition] = self._others.get(partition, Counters())
            self._others, self._read_at = others, now
        return {p: c for p, c in self._others.items() if p not in held}

    def messages(self, held: Mapping[str | None, StateShare]) -> int:
        """Messages done by the group: the held shares' so far, the others' as checkpointed."""
        return (sum(s.counters.messages for s in held.values())
                + sum(c.messages for c in self._checkpointed(held, fresh=False).values()))

    def counters(self, held: Mapping[str | None, StateShare]) -> Counters:
        """Totals over every partition of the job (held ones live, others as checkpointed)."""
        total = Counters()
        parts = [s.counters for s in held.values()] + list(self._checkpointed(held, fresh=True).values())
        for c in parts:
            for name, value in vars(c).items():
                setattr(total, name, getattr(total, name) + value)
        return total
