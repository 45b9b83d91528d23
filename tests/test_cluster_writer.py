"""ClusterHashWriter on a real 3-node Redis Cluster; the oracle is the single-node HashWriter
writing the same rows into a plain redis-server: every key's hash must be the same, after
fresh keys (RESTORE), a rerun, newer and older rows (the script), replace_equal, slots
moved between batches (MOVED, ASK), a flushed script cache (NOSCRIPT) and a lost node."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster

from featurepipe.errors import BackendUnavailable
from featurepipe.online import codec, rows
from featurepipe.online.cluster_writer import (
    ClusterHashWriter,
    ClusterNodeUnavailable,
    key_slots,
    open_hash_writer,
)
from featurepipe.online.codec import JoinKeySpec
from featurepipe.online.schedule import schedule_field
from featurepipe.online.writer import EncodedRows, HashWriter, WriteCounts, split_rows
from featurepipe.redis_server import RedisClusterServers, RedisServer

pytestmark = pytest.mark.integration

TS = b"_ts:view"
FIELDS = [b"view:amount", b"view:count", b"view:note"]
T0 = 1_700_000_000_000_000  # epoch microseconds
DAY = 86_400_000_000
N = 3_000
Content = dict[bytes, dict[bytes, bytes]]


def encoded(ids: Sequence[int], micros: np.ndarray, seed: int) -> EncodedRows:
    """Feast's bytes of users ``ids``: every 7th key holds a hash tag shared by many keys
    (``{g1}-21``); a note over 64 bytes encoded is too long for RESTORE (the script writes it)."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    names = [f"{{g{i % 10}}}-{i}" if i % 7 == 0 else f"user-{i}" for i in ids]
    keys = codec.encode_entity_keys({"user": pa.array(names)}, [JoinKeySpec("user", "STRING")], "proj")
    amount = np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n))  # NaN: a null Value
    values = [
        codec.encode_values(pa.array(amount), "DOUBLE"),
        codec.encode_values(pa.array(rng.integers(-5, 10**6, n)), "INT64"),
        codec.encode_values(pa.array(["x" * int(k) for k in rng.integers(0, 90, n)]), "STRING"),
    ]
    return EncodedRows(keys, codec.encode_timestamps(np.asarray(micros, dtype=np.int64)), values)


def chunks(batch: EncodedRows, size: int = 700) -> list[EncodedRows]:
    index = np.arange(batch.count)
    return [split_rows(batch, (index >= a) & (index < a + size)) for a in range(0, batch.count, size)]


def fresh_rows(n: int = N, seed: int = 1) -> EncodedRows:
    return encoded(range(n), T0 + np.random.default_rng(seed).integers(0, DAY, n), seed)


def key_list(keys: rows.Piece) -> list[bytes]:
    flat, offsets = rows.join([keys])
    return [flat[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])]


def content(clients: Sequence[redis.Redis]) -> Content:
    """Every hash on these servers (every primary of a cluster), by key."""
    out: Content = {}
    for client in clients:
        keys = list(client.scan_iter(count=1_000))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        out.update(zip(keys, pipe.execute()))
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as servers:
        yield servers


@pytest.fixture(scope="module")
def single() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def nodes(cluster: RedisClusterServers) -> Iterator[list[redis.Redis]]:
    """A plain client per primary, every primary emptied first."""
    clients = [redis.Redis(port=port) for port in cluster.ports]
    for client in clients:
        client.flushall()
    yield clients
    for client in clients:
        client.close()


@pytest.fixture
def oracle(single: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis(port=single.port) as client:
        client.flushall()
        yield client


def cluster_client(cluster: RedisClusterServers) -> RedisCluster:
    return RedisCluster(host="127.0.0.1", port=cluster.ports[0])


def write_cluster(cluster: RedisClusterServers, batches: Sequence[EncodedRows], **options: object) -> WriteCounts:
    with cluster_client(cluster) as client, ClusterHashWriter(client, TS, FIELDS, **options) as writer:  # type: ignore[arg-type]
        assert writer.restore_available == options.get("restore", True)
        for batch in batches:
            writer.write(batch)
    return writer.counts


def write_single(client: redis.Redis, batches: Sequence[EncodedRows], **options: object) -> WriteCounts:
    with HashWriter(client, TS, FIELDS, **options) as writer:  # type: ignore[arg-type]
        for batch in batches:
            writer.write(batch)
    return writer.counts


def same(a: WriteCounts, b: WriteCounts) -> bool:
    return (a.written, a.skipped) == (b.written, b.skipped)


# ------------------------------------------------------------ slots


KEYSLOT_CASES = [b"", b"{}", b"\x7b\x00\x7d", b"{}{a}", b"a{b}c", b"}{", b"{", b"}", b"{{}}", b"{a}{b}", b"x{}y{z}"]


def keyslots(client: redis.Redis, keys: Sequence[bytes]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("CLUSTER", "KEYSLOT", key)
    return [int(s) for s in pipe.execute()]


def piece(keys: Sequence[bytes]) -> rows.Piece:
    offsets = np.cumsum([0, *(len(k) for k in keys)])
    return rows.from_flat(np.frombuffer(b"".join(keys), dtype=np.uint8), offsets)


def test_slots_of_edge_keys_equal_cluster_keyslot(cluster: RedisClusterServers) -> None:
    with redis.Redis(port=cluster.ports[0]) as client:
        assert key_slots(piece(KEYSLOT_CASES)).tolist() == keyslots(client, KEYSLOT_CASES)
        keys = key_list(fresh_rows(2_000).keys)  # Feast keys, some with a tag
        assert key_slots(piece(keys)).tolist() == keyslots(client, keys)


braced = st.lists(st.sampled_from([b"{", b"}", b"\x00", b"a", b"\xff", b"{}"]), max_size=10).map(b"".join)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(keys=st.lists(st.binary(max_size=16) | braced, min_size=1, max_size=40))
def test_slots_equal_cluster_keyslot(cluster: RedisClusterServers, keys: list[bytes]) -> None:
    with redis.Redis(port=cluster.ports[0]) as client:
        assert key_slots(piece(keys)).tolist() == keyslots(client, keys)


# ------------------------------------------------------------ content


def test_writes_equal_the_single_node_writers(nodes: list[redis.Redis], oracle: redis.Redis,
                                              cluster: RedisClusterServers) -> None:
    first = fresh_rows()
    newer = encoded(range(N), T0 + DAY + np.arange(N), seed=2)
    older = encoded(range(N), T0 - DAY + np.arange(N), seed=3)
    for batch, expect_written in ((first, N), (first, 0), (newer, N), (older, 0)):
        got = write_cluster(cluster, chunks(batch), ttl_seconds=3_600)
        want = write_single(oracle, chunks(batch), ttl_seconds=3_600)
        assert same(got, want) and got.written == expect_written, (got, want)
        if batch is first and expect_written:
            assert got.restored > N // 2  # the RESTORE path, on every node
        assert content(nodes) == content([oracle])
    assert len(content(nodes)) == N
    for node in nodes:
        pipe = node.pipeline(transaction=False)
        for key in node.scan_iter(count=1_000):
            pipe.ttl(key)
        assert all(0 < ttl <= 3_600 for ttl in pipe.execute())
    assert all(len(list(node.scan_iter(count=1_000))) > N // 5 for node in nodes)  # spread over all three
    assert not any(node.keys(b"featurepipe:probe:*") for node in nodes)  # the probes clean up


def test_script_path_equals_single_node_without_restore(nodes: list[redis.Redis], oracle: redis.Redis,
                                                        cluster: RedisClusterServers) -> None:
    first, newer = fresh_rows(), encoded(range(N), T0 + DAY + np.arange(N), seed=2)
    for batch in (first, newer, first):
        got = write_cluster(cluster, chunks(batch), restore=False)
        want = write_single(oracle, chunks(batch), restore=False)
        assert same(got, want) and got.restored == 0
        assert content(nodes) == content([oracle])


def test_replace_equal_lets_the_latest_row_of_equal_time_win(nodes: list[redis.Redis], oracle: redis.Redis,
                                                             cluster: RedisClusterServers) -> None:
    micros = T0 + np.arange(N)
    first = encoded(range(N), micros, seed=1)
    # the same event times, other values, every key twice (the later row must win)
    again = encoded([*range(N), *range(N)], np.r_[micros, micros], seed=5)
    for options in ({}, {"replace_equal": True}):
        for batch in (first, again):
            got = write_cluster(cluster, chunks(batch), **options)
            want = write_single(oracle, chunks(batch), **options)
            assert same(got, want)
            assert content(nodes) == content([oracle])
    assert content(nodes)[key_list(again.keys)[0]][FIELDS[2]] == key_list(again.values[2])[N]


# ------------------------------------------------------------ redirections


def node_ids(nodes: Sequence[redis.Redis]) -> list[str]:
    return [str(n.execute_command("CLUSTER", "MYID"), "ascii") for n in nodes]


def start_moving(nodes: Sequence[redis.Redis], slot: int, src: int, dst: int) -> None:
    ids = node_ids(nodes)
    nodes[dst].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
    nodes[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])


def migrate(nodes: Sequence[redis.Redis], cluster: RedisClusterServers, slot: int, src: int, dst: int,
            limit: int = 100_000) -> int:
    keys = nodes[src].execute_command("CLUSTER", "GETKEYSINSLOT", slot, limit)
    if keys:
        nodes[src].execute_command("MIGRATE", "127.0.0.1", cluster.ports[dst], "", 0, 5_000, "KEYS", *keys)
    return len(keys)


def finish_moving(nodes: Sequence[redis.Redis], cluster: RedisClusterServers, slot: int, src: int, dst: int) -> None:
    migrate(nodes, cluster, slot, src, dst)
    dst_id = node_ids(nodes)[dst]
    for node in nodes:
        node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


def move_slot(nodes: Sequence[redis.Redis], cluster: RedisClusterServers, slot: int, src: int, dst: int) -> None:
    start_moving(nodes, slot, src, dst)
    finish_moving(nodes, cluster, slot, src, dst)


def test_slots_moved_between_batches_lose_nothing(nodes: list[redis.Redis], oracle: redis.Redis,
                                                  cluster: RedisClusterServers) -> None:
    first = fresh_rows()
    # newer rows of every key, and new keys (some in the slot being imported: ASK for absent keys)
    newer = encoded(range(N + 700), T0 + DAY + np.arange(N + 700), seed=2)
    slots = key_slots(first.keys)
    lo, hi = cluster.slot_ranges(0)
    mine = slots[(slots >= lo) & (slots <= hi)]
    values, counts = np.unique(mine, return_counts=True)
    moved, asked = (int(s) for s in values[np.argsort(-counts)[:2]])  # node 0's two fullest slots
    state = {"moved": False, "asking": False, "asked": False}
    try:
        with cluster_client(cluster) as client, ClusterHashWriter(client, TS, FIELDS) as writer:
            for batch in chunks(first):
                writer.write(batch)
            writer.flush()
            move_slot(nodes, cluster, moved, 0, 1)  # done: node 0 answers MOVED
            state["moved"] = True
            start_moving(nodes, asked, 0, 2)  # half done: node 0 answers ASK for keys it no longer holds
            state["asking"] = True
            assert 0 < migrate(nodes, cluster, asked, 0, 2, limit=int(counts.max()) // 4)
            for batch in chunks(newer):
                writer.write(batch)
        finish_moving(nodes, cluster, asked, 0, 2)
        state["asked"] = True
        assert writer.retries.get("MOVED", 0) > 0 and writer.retries.get("ASK", 0) > 0, writer.retries
        want = [write_single(oracle, chunks(b)) for b in (first, newer)]
        assert writer.counts.written == sum(w.written for w in want)
        assert content(nodes) == content([oracle])
        assert nodes[1].execute_command("CLUSTER", "COUNTKEYSINSLOT", moved) > 0
        assert nodes[2].execute_command("CLUSTER", "COUNTKEYSINSLOT", asked) > 0
    finally:  # the slots back where slot_ranges() says they are
        for node in nodes:
            node.flushall()
        if state["moved"]:
            move_slot(nodes, cluster, moved, 1, 0)
        if state["asked"]:
            move_slot(nodes, cluster, asked, 2, 0)
        elif state["asking"]:
            for node in (nodes[0], nodes[2]):
                node.execute_command("CLUSTER", "SETSLOT", asked, "STABLE")
        cluster.wait_ok()


def test_a_key_refused_twice_keeps_its_latest_row(nodes: list[redis.Redis], oracle: redis.Redis,
                                                  cluster: RedisClusterServers) -> None:
    micros = T0 + np.arange(N)
    first = encoded(range(N), micros, seed=1)
    slots = key_slots(first.keys)
    lo, hi = cluster.slot_ranges(0)
    values, counts = np.unique(slots[(slots >= lo) & (slots <= hi)], return_counts=True)
    slot = int(values[np.argmax(counts)])
    # two batches of the same keys and event times (a stream's recomputed rows), both sent to
    # node 0 after the slot moved (the second before the first's replies are read): both
    # refused, only the second may be written (restore=False: one command per batch)
    in_slot = [i for i in range(N) if slots[i] == slot]
    again = [encoded(in_slot, micros[in_slot], seed=seed) for seed in (6, 7)]
    moved = False
    try:
        with cluster_client(cluster) as client, ClusterHashWriter(client, TS, FIELDS, restore=False,
                                                                 replace_equal=True) as writer:
            writer.write(first)
            writer.flush()
            move_slot(nodes, cluster, slot, 0, 1)
            moved = True
            for batch in again:
                writer.write(batch)
        assert writer.retries == {"MOVED": len(in_slot)}  # rows sent again: one per key
        assert writer.counts.skipped == len(in_slot)  # the first of each key's two refused rows
        for batch in (first, *again):
            write_single(oracle, [batch], restore=False, replace_equal=True)
        assert content(nodes) == content([oracle])
    finally:
        for node in nodes:
            node.flushall()
        if moved:
            move_slot(nodes, cluster, slot, 1, 0)
        cluster.wait_ok()


def test_flushed_script_cache_is_loaded_again(nodes: list[redis.Redis], oracle: redis.Redis,
                                              cluster: RedisClusterServers) -> None:
    first, newer = fresh_rows(), encoded(range(N), T0 + DAY + np.arange(N), seed=2)
    with cluster_client(cluster) as client, ClusterHashWriter(client, TS, FIELDS) as writer:
        for batch in chunks(first):
            writer.write(batch)
        writer.flush()
        for node in nodes:
            node.script_flush()
        for batch in chunks(newer):
            writer.write(batch)
    assert writer.retries.get("NOSCRIPT", 0) > 0, writer.retries
    for batch in (first, newer):
        write_single(oracle, chunks(batch))
    assert writer.counts.written == 2 * N
    assert content(nodes) == content([oracle])


def test_a_slot_no_node_serves_gives_up_after_five_rounds(nodes: list[redis.Redis], cluster: RedisClusterServers) -> None:
    first = fresh_rows()
    slot = int(key_slots(first.keys)[0])
    owner = next(i for i in range(3) if cluster.slot_ranges(i)[0] <= slot <= cluster.slot_ranges(i)[1])
    try:
        with pytest.raises(BackendUnavailable, match="after 5 rounds") as caught:
            with cluster_client(cluster) as client, ClusterHashWriter(client, TS, FIELDS) as writer:
                for node in nodes:  # the slot unassigned: every node answers CLUSTERDOWN for it
                    node.execute_command("CLUSTER", "DELSLOTS", slot)
                writer.write(first)
        assert not isinstance(caught.value, ClusterNodeUnavailable)
        assert writer.retries == {"CLUSTERDOWN": 5 * int((key_slots(first.keys) == slot).sum())}
        assert len(content(nodes)) == N - int((key_slots(first.keys) == slot).sum())  # all the others
    finally:
        nodes[owner].execute_command("CLUSTER", "ADDSLOTS", slot)
        deadline = time.monotonic() + 30  # until every node has heard (cluster_state is ok meanwhile)
        while any(b"cluster_slots_assigned:16384" not in n.execute_command("CLUSTER", "INFO") for n in nodes):
            assert time.monotonic() < deadline, "the slot given back did not reach every node in 30 s"
            time.sleep(0.05)


# ------------------------------------------------------------ a lost node


def test_lost_node_names_its_slots_and_a_rerun_completes(nodes: list[redis.Redis], oracle: redis.Redis,
                                                         cluster: RedisClusterServers) -> None:
    batches = chunks(fresh_rows(), size=500)
    lost, (lo, hi) = 1, cluster.slot_ranges(1)
    sent = 0
    try:
        with pytest.raises(ClusterNodeUnavailable) as caught:
            with cluster_client(cluster) as client, ClusterHashWriter(client, TS, FIELDS) as writer:
                for batch in batches:
                    if sent == 2:
                        cluster.kill(lost)
                    sent += 1
                    writer.write(batch)
        message = str(caught.value)
        assert f"127.0.0.1:{cluster.ports[lost]}" in message and f"{lo}-{hi}" in message, message
        assert "rerun the same command over the same range" in message and "half-written" in message
        # the other nodes hold every row sent to them, as one server holds it
        write_single(oracle, batches[:sent])
        want = {k: v for k, v in content([oracle]).items() if not lo <= int(key_slots(piece([k]))[0]) <= hi}
        assert content([nodes[0], nodes[2]]) == want
    finally:
        cluster.restart(lost)
    oracle.flushall()
    write_single(oracle, batches)
    write_cluster(cluster, batches)
    assert content(nodes) == content([oracle])


# ------------------------------------------------------------ commands


def test_per_key_commands_are_what_redis_py_sends() -> None:
    fields = [*FIELDS, schedule_field("view")]
    batch = fresh_rows(50)
    schedule = [b"FPS1" + bytes([7] * 4) + b"names!" + bytes([i]) * i for i in range(50)]
    batch = EncodedRows(batch.keys, batch.timestamps, [*batch.values, piece(schedule)])
    with redis.Redis(port=1) as client:  # never connected
        writer = HashWriter(client, TS, fields, ttl_seconds=60, per_key=True)
        head = [TS, b"4", b"60", b"4", b"FPS1", b"names!", *fields]
        conn = redis.Connection()
        values = [key_list(v) for v in (batch.timestamps, *batch.values)]
        want = [b"".join(conn.pack_command("EVALSHA", writer.script_sha, 1, key, *head, *(v[i] for v in values)))
                for i, key in enumerate(key_list(batch.keys))]
        assert writer.per_key_command(batch) == b"".join(want)
        asking = b"".join(conn.pack_command("ASKING"))
        assert writer.per_key_command(batch, asking=True) == b"".join(asking + w for w in want)


def test_open_hash_writer_picks_the_cluster_writer(cluster: RedisClusterServers) -> None:
    with cluster_client(cluster) as client, redis.Redis(port=cluster.ports[0]) as plain:
        assert isinstance(open_hash_writer(client, TS, FIELDS), ClusterHashWriter)
        assert isinstance(open_hash_writer(plain, TS, FIELDS), HashWriter)
