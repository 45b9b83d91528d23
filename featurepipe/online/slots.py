"""Redis Cluster key slots, and the primary that owns each slot.

The hash-tag rule: a key's slot is CRC-16/XMODEM of the key, modulo 16,384, unless the key
holds a ``{`` with a ``}`` after it and at least one byte between the two; then only the
bytes between the first ``{`` and the first ``}`` after it are hashed (``{user1}.a`` and
``{user1}.b`` share a slot; ``{}x`` is hashed whole). Feast's keys carry no tags.

:func:`key_slots` gives the slot of a whole column of keys at once (the writer's batches);
:func:`redis.crc.key_slot` is the one-key form, faster for the few keys of one request.
:class:`SlotMap` names the primary of every slot, as redis-py's nodes manager last read it
(``CLUSTER SLOTS``), patched by ``-MOVED`` replies; the cluster writer
(:mod:`featurepipe.online.cluster_writer`) and the server (:mod:`serving.cluster_fetch`)
share it. Only numpy and redis-py here, no pyarrow: the server process imports this module.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import count
from typing import TYPE_CHECKING

import numpy as np
from redis.crc import key_slot

if TYPE_CHECKING:
    from redis.cluster import NodesManager

    from featurepipe.online.rows import Piece

SLOTS = 16_384


def _crc16_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint16)
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = (c << 1) ^ 0x1021 if c & 0x8000 else c << 1
        table[i] = c & 0xFFFF
    return table


_CRC16 = _crc16_table()  # CRC-16/XMODEM, the checksum of Redis Cluster's key slots


def key_slots(keys: Piece) -> np.ndarray:
    """The cluster slot of every key (int64), as ``CLUSTER KEYSLOT`` gives it.

    The hashed bytes of every row (its hash tag, or the whole key) are right-aligned
    (leading zeros leave a CRC with initial value 0 unchanged) and all rows are hashed
    together, one byte column at a time.
    """
    data = np.asarray(keys.data, dtype=np.uint8)
    n, width = data.shape
    lengths = keys.row_lengths()
    if n == 0 or width == 0:
        return np.zeros(n, dtype=np.int64)  # CRC-16 of nothing: slot 0
    first, last = np.zeros(n, dtype=np.int64), lengths.copy()
    braced = np.flatnonzero((data == 0x7B).any(axis=1))  # the few rows that may hold a tag
    if len(braced):
        first[braced], last[braced] = _tag_bounds(data[braced], lengths[braced])
    # rows hashed whole and full width are right-aligned already; shift only the others
    shifted = np.flatnonzero((first != 0) | (last != width))
    if len(shifted) == 0:
        columns = np.ascontiguousarray(data.T)
    else:
        aligned = data.copy()
        cols = np.arange(width)
        part, begin, end = data[shifted], first[shifted], last[shifted]
        hashed = (cols >= begin[:, None]) & (cols < end[:, None])
        right = np.zeros_like(part)
        right[cols >= (width - (end - begin))[:, None]] = part[hashed]
        aligned[shifted] = right
        columns = np.ascontiguousarray(aligned.T)
    crc = np.zeros(n, dtype=np.uint16)
    for column in columns:
        crc = (crc << 8) ^ _CRC16[(crc >> 8) ^ column]
    return (crc & (SLOTS - 1)).astype(np.int64)


def _tag_bounds(data: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hashed part ``[first, last)`` of every key: its hash tag, or the whole key."""
    width = data.shape[1]
    cols = np.arange(width)
    inside = cols < lengths[:, None]
    opening = (data == 0x7B) & inside
    has_open = opening.any(axis=1)
    start = np.where(has_open, opening.argmax(axis=1), width)
    closing = (data == 0x7D) & inside & (cols > start[:, None])
    end = closing.argmax(axis=1)
    tagged = has_open & closing.any(axis=1) & (end > start + 1)
    return np.where(tagged, start + 1, 0), np.where(tagged, end, lengths)


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare with ==
class SlotMap:
    """The primary owning every slot: ``nodes[owner[slot]]`` (``owner`` -1: no primary).

    A value: :meth:`moved` and :meth:`of` return new maps. For one key at a time,
    :attr:`owners` names the primary by slot:

    >>> SlotMap.of(client.nodes_manager).owners[key_slot(b"user:1")]  # doctest: +SKIP
    '127.0.0.1:7000'
    """

    owner: np.ndarray  # (16384,) int64, read-only
    nodes: tuple[str, ...]  # "host:port"

    def __post_init__(self) -> None:
        self.owner.flags.writeable = False

    @classmethod
    def of(cls, manager: NodesManager, previous: SlotMap | None = None) -> SlotMap:
        """The map redis-py's nodes manager holds (``CLUSTER SLOTS`` at its last refresh).

        With ``previous``, a slot the manager no longer reports keeps its owner there, so
        a primary that died and whose slots no node claims yet is still named.
        """
        with manager._lock:
            cache = dict(manager.slots_cache)
        owner = np.full(SLOTS, -1, dtype=np.int64)
        nodes: dict[str, int] = {}
        for slot, serving in cache.items():
            if serving:
                owner[slot] = nodes.setdefault(serving[0].name, len(nodes))
        if previous is not None:
            missing = np.flatnonzero(owner < 0)
            kept = previous.owner[missing]
            for index in np.unique(kept[kept >= 0]):
                owner[missing[kept == index]] = nodes.setdefault(previous.nodes[index], len(nodes))
        return cls(owner, tuple(nodes))

    def moved(self, moves: Mapping[int, str]) -> SlotMap:
        """This map with each slot of ``moves`` served by its node (``-MOVED`` replies said so)."""
        nodes = [*self.nodes, *sorted(set(moves.values()) - set(self.nodes))]
        owner = self.owner.copy()
        for slot, node in moves.items():
            owner[slot] = nodes.index(node)
        return SlotMap(owner, tuple(nodes))

    @cached_property
    def owners(self) -> tuple[str, ...]:
        """The primary of each slot by name, "" where none serves it (one lookup per key)."""
        names = np.array([*self.nodes, ""], dtype=object)  # owner -1 picks ""
        return tuple(names[self.owner].tolist())

    def primaries(self) -> list[str]:
        """The nodes that own at least one slot, in slot order."""
        indexes, first = np.unique(self.owner, return_index=True)
        return [self.nodes[i] for i in indexes[np.argsort(first)].tolist() if i >= 0]

    def ranges(self, node: str) -> str:
        """The slots ``node`` serves ("": the slots no primary serves), as ranges:
        ``"0-5460"``, ``"0-99,5461-10922"``; ``"none"`` when there are none."""
        if node and node not in self.nodes:
            return "none"
        mine = np.flatnonzero(self.owner == (self.nodes.index(node) if node else -1))
        if len(mine) == 0:
            return "none"
        breaks = np.flatnonzero(np.diff(mine) > 1)
        starts, ends = mine[np.r_[0, breaks + 1]], mine[np.r_[breaks, len(mine) - 1]]
        return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends))

    def tag(self, node: str) -> bytes | None:
        """A hash tag whose slot ``node`` serves (for keys that must land on it), or None."""
        if node not in self.nodes or not (self.owner == self.nodes.index(node)).any():
            return None
        prefix, index = uuid.uuid4().hex[:8].encode(), self.nodes.index(node)
        for i in count():  # a third of the tries land on one of three nodes
            tag = b"%s-%d" % (prefix, i)
            if self.owner[key_slot(tag)] == index:
                return tag
        raise AssertionError("unreachable")
