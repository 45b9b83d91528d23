"""The online store against the offline store: what Redis holds vs what a materialisation writes.

:func:`verify_view` reads one view exactly as
:func:`~featurepipe.online.window.materialize_window` does (the same scan of the same plan: each
entity's latest offline row, or its window schedule from the raw events; the same quarantine
rule; the same encoders, :func:`~featurepipe.online.window.encode` and
:func:`~featurepipe.online.window.encode_with_schedules`), and where the engine would write a
batch it reads the same fields back instead (``HMGET`` of ``_ts:<view>``, the features and the
schedule, one pipeline per batch: a cluster client's pipeline splits it per node) and compares
them byte for byte, one NumPy comparison per field and batch. Then a ``SCAN`` of every primary
finds the keys of the view's project and join keys that hold ``_ts:<view>`` for an entity the
offline store has none for (``extra``).

Each entity of the offline state is ``equal``, ``missing`` (no ``_ts:<view>`` online),
``different`` (a field differs; the fields are counted) or ``quarantined``: a materialisation
would not write it (a value that does not fit its type, a failed contract check), so it is not
compared. With ``sample``, that many entities chosen at random are compared; the search for
extra keys still covers every key.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis
import redis.cluster

from featurepipe.core.threads import prefetch
from featurepipe.errors import BackendUnavailable
from featurepipe.online import codec, rows
from featurepipe.online.latest import REASON, LatestScan, open_latest
from featurepipe.online.layout import KEY_TYPE_IDS, entity_key_prefix, key_suffix, timestamp_field
from featurepipe.online.schedule import decode, schedule_field
from featurepipe.online.schedule_scan import FIRST, open_schedules
from featurepipe.online.window import ViewPlan, encode, encode_with_schedules
from featurepipe.online.writer import EncodedRows

Client = redis.Redis | redis.cluster.RedisCluster
_REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify: every entity or a random ``sample`` per view (drawn with ``seed``, among
    the entities in the order the scan gives them), ``examples`` kept per view and kind
    (missing, different, extra), batches as the engine reads them."""

    sample: int | None = None
    examples: int = 5
    seed: int | None = None
    batch_rows: int = 5_000
    threads: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class FieldDifference:
    """A field that differs: its Redis field name (``_ts:<view>``, the feature's name,
    ``_fp_sched:<view>``), what a materialisation writes and what Redis holds, decoded."""

    field: str
    expected: str
    found: str


@dataclass(frozen=True)
class Discrepancy:
    """One entity that is ``missing``, ``different`` or ``extra``: its join key values, its
    Redis key (hex: ``bytes.fromhex(key)``) and, when different, the fields that differ."""

    kind: str
    entity: dict[str, Any]
    key: str
    fields: tuple[FieldDifference, ...] = ()

    def describe(self) -> str:
        """One line: ``different user_id=42: txn_count_1h expected 3, found 5``."""
        who = ", ".join(f"{k}={v!r}" for k, v in self.entity.items())
        diffs = "; ".join(f"{d.field} expected {d.expected}, found {d.found}" for d in self.fields)
        return f"{self.kind} {who}" + (f": {diffs}" if diffs else "")


@dataclass
class ViewVerification:
    """What verifying one view found."""

    view: str
    entities: int = 0  # in the offline store's latest state (quarantined ones included)
    checked: int = 0  # compared (every entity but the quarantined, or the sample's)
    equal: int = 0
    missing: int = 0  # no _ts:<view> online
    different: int = 0  # some field differs
    newer_online: int = 0  # of different: online holds a newer event (written since: stream, push)
    extra: int = 0  # online keys of the view for no entity of the offline state
    quarantined: int = 0  # a materialisation would not write them: not compared
    differing_fields: dict[str, int] = field(default_factory=dict)  # entities per differing field
    examples: list[Discrepancy] = field(default_factory=list)
    blocked: dict[str, int] = field(default_factory=dict)  # a blocking check fails: nothing would be written
    prepared: bool = False  # windowed views: schedules read as the backfill prepared them
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether online equals what a materialisation writes (quarantined rows aside)."""
        return not (self.missing or self.different or self.extra or self.blocked)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify_view(plan: ViewPlan, client: Client, start: datetime, end: datetime,
                options: VerifyOptions = VerifyOptions()) -> ViewVerification:
    """Compare what Redis holds for ``plan``'s view with what materialising ``[start, end]``
    writes (see the module documentation)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    result = ViewVerification(view=plan.view)
    scan = _open_scan(plan, start, end, options)
    try:
        result.entities, result.prepared, result.blocked = scan.entities, scan.prepared, dict(scan.blocked)
        if plan.block_null_keys and scan.null_key_rows:  # as the engine's gate: the view is not written
            result.blocked[", ".join(k.name for k in plan.join_keys) + ".not_null"] = scan.null_key_rows
        chosen = _sample(scan.entities, options)
        expected: set[bytes] = set()  # every entity's key: what is not extra
        seen = 0
        batches = prefetch(iter(scan.reader))
        with tqdm(total=scan.entities, desc=f"verify {plan.view}", unit="rows", unit_scale=True,
                  disable=not options.progress, leave=True) as bar, contextlib.closing(batches):
            for batch in batches:
                first = (np.asarray(batch.column(FIRST).to_numpy(zero_copy_only=False), dtype=bool)
                         if plan.kernel is not None else np.ones(batch.num_rows, dtype=bool))
                entity = np.cumsum(first) - 1
                n = int(first.sum())
                bad = np.zeros(n, dtype=bool)  # an entity with a bad row is quarantined whole
                bad[entity[np.asarray(pc.not_equal(batch.column(REASON), "").to_numpy(zero_copy_only=False),
                                      dtype=bool)]] = True
                heads = batch.filter(pa.array(first))
                expected.update(_row_bytes(codec.encode_entity_keys(
                    {k.name: heads.column(k.name) for k in plan.join_keys}, plan.join_keys, plan.project)))
                result.quarantined += int(bad.sum())
                picked = ~bad & _window(chosen, seen, n)
                seen += n
                if picked.any() and not result.blocked:
                    _compare(plan, batch.filter(pa.array(picked[entity])), client, result, options.examples)
                bar.update(n)
        _find_extra(plan, client, expected, result, options.examples)
    finally:
        scan.close()
    result.seconds = time.perf_counter() - t0
    return result


def _open_scan(plan: ViewPlan, start: datetime, end: datetime, options: VerifyOptions) -> LatestScan:
    """The scan :func:`~featurepipe.online.window.materialize_window` opens for the plan."""
    if plan.kernel is not None:
        return open_schedules(plan.query, plan.kernel, start, end, batch_rows=options.batch_rows,
                              threads=options.threads)
    return open_latest(plan.query, start, end, batch_rows=options.batch_rows, threads=options.threads)


def _sample(entities: int, options: VerifyOptions) -> np.ndarray | None:
    """Which entities (by their order in the scan) to compare; None: all."""
    if options.sample is None or options.sample >= entities:
        return None
    chosen = np.zeros(entities, dtype=bool)
    chosen[np.random.default_rng(options.seed).choice(entities, options.sample, replace=False)] = True
    return chosen


def _window(chosen: np.ndarray | None, seen: int, n: int) -> np.ndarray:
    """Whether each of the next ``n`` entities is in the sample (all of them without one)."""
    out = np.ones(n, dtype=bool) if chosen is None else np.zeros(n, dtype=bool)
    if chosen is not None:
        part = chosen[seen:seen + n]
        out[:len(part)] = part
    return out


def _row_bytes(piece: rows.Piece) -> list[bytes]:
    lengths = piece.row_lengths()
    return [piece.data[i, :lengths[i]].tobytes() for i in range(piece.rows)]


def _compare(plan: ViewPlan, batch: pa.RecordBatch, client: Client, result: ViewVerification,
             examples: int) -> None:
    """Read the fields of ``batch``'s entities and count each entity equal, missing or different."""
    encoded: EncodedRows = (encode_with_schedules if plan.kernel is not None else encode)(batch, plan)
    keys = _row_bytes(encoded.keys)
    ts_field = timestamp_field(plan.view)
    fields = [ts_field, *plan.fields]  # (a property: computed once here, not once per key)
    replies = _pipelined(client, [("HMGET", key, *fields) for key in keys], plan.view)
    columns = [encoded.timestamps, *encoded.values]
    missing = np.fromiter((reply[0] is None for reply in replies), dtype=bool, count=len(keys))
    differs = _differing_fields(columns, replies)
    differs[missing] = False
    different = differs.any(axis=1)
    result.checked += len(keys)
    result.missing += int(missing.sum())
    result.different += int(different.sum())
    result.equal += len(keys) - int(missing.sum()) - int(different.sum())
    names = [ts_field.decode(), *(f.name for f in plan.features),
             *([schedule_field(plan.view).decode()] if plan.kernel is not None else [])]
    for j, name in enumerate(names):
        if differs[:, j].any():
            result.differing_fields[name] = result.differing_fields.get(name, 0) + int(differs[:, j].sum())
    for i in np.flatnonzero(differs[:, 0]):  # which timestamps online are newer: few, one at a time
        if _micros(replies[i][0]) > _micros(_row(columns[0], int(i))):
            result.newer_online += 1
    heads = batch.filter(batch.column(FIRST)) if plan.kernel is not None else batch
    room = {kind: examples - sum(e.kind == kind for e in result.examples) for kind in ("missing", "different")}
    for i in np.flatnonzero(missing | different):
        kind = "missing" if missing[i] else "different"
        if max(room.values()) <= 0:
            break
        if room[kind] <= 0:
            continue
        room[kind] -= 1
        entity = {k.name: heads.column(k.name)[int(i)].as_py() for k in plan.join_keys}
        shown = tuple(FieldDifference(names[j], *_shown(plan, j, _row(columns[j], int(i)), replies[i][j]))
                      for j in np.flatnonzero(differs[i]).tolist())
        result.examples.append(Discrepancy(kind, entity, keys[i].hex(), shown))


def _row(piece: rows.Piece, i: int) -> bytes:
    return piece.data[i, :piece.row_lengths()[i]].tobytes()


def _differing_fields(columns: list[rows.Piece], replies: list[list[bytes | None]]) -> np.ndarray:
    """Per entity and field, whether the reply differs from the column's bytes: the whole batch
    compared at once (lengths, then bytes), field by field only when something differs."""
    values = list(itertools.chain.from_iterable(replies))
    got = np.fromiter((-1 if v is None else len(v) for v in values), dtype=np.int64, count=len(values))
    want = np.column_stack([c.row_lengths() for c in columns]).reshape(-1)
    if np.array_equal(got, want) and b"".join(cast(list[bytes], values)) == rows.join(columns)[0].tobytes():
        return np.zeros((len(replies), len(columns)), dtype=bool)
    return np.column_stack([_differing(piece, [reply[j] for reply in replies]) for j, piece in enumerate(columns)])


def _differing(piece: rows.Piece, found: list[bytes | None]) -> np.ndarray:
    """Per row, whether ``found`` (None: no such field) differs from the piece's bytes:
    one comparison of the concatenations, row by row only in a batch where they differ."""
    flat, offsets = rows.join([piece])
    lengths = np.diff(offsets)
    got = np.fromiter((-1 if v is None else len(v) for v in found), dtype=np.int64, count=len(found))
    joined = b"".join(v for v in found if v is not None)
    if np.array_equal(got, lengths):
        if joined == flat.tobytes():
            return np.zeros(len(found), dtype=bool)
        mismatch = np.concatenate([[0], np.cumsum(np.frombuffer(joined, dtype=np.uint8) != flat)])
        return np.asarray(mismatch[offsets[1:]] - mismatch[offsets[:-1]] > 0)
    return np.array([v != flat[a:b].tobytes() for v, a, b in zip(found, offsets[:-1], offsets[1:])], dtype=bool)


def _pipelined(client: Client, commands: list[tuple[Any, ...]], view: str) -> list[Any]:
    """The replies of ``commands`` sent in one pipeline (a cluster's: one per node)."""
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    try:
        return list(pipe.execute())
    except _REDIS_ERRORS as exc:
        raise BackendUnavailable(f"reading {view!r} from Redis failed ({type(exc).__name__}: {exc}); check the "
                                 "server (every primary of a cluster) and run the verification again") from exc


# ------------------------------------------------------------------ keys online


def primaries(client: Client) -> list[redis.Redis]:
    """A client per server holding keys: the server, or every primary of a cluster."""
    if isinstance(client, redis.cluster.RedisCluster):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def _glob(raw: bytes) -> bytes:
    """``raw`` as a literal in a Redis ``MATCH`` pattern."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", raw)


def split_key(key: bytes) -> tuple[dict[str, Any], bytes] | None:
    """The join key values of a Redis key in Feast's layout (entity key serialisation 3) and
    the project name after them; None when ``key`` is not such a key."""
    try:
        (count,), pos = struct.unpack_from("<I", key), 4
        if not 0 < count <= 64:
            return None
        names = []
        for _ in range(count):
            kind, size = struct.unpack_from("<II", key, pos)
            if kind != KEY_TYPE_IDS["STRING"]:
                return None
            names.append(key[pos + 8:pos + 8 + size].decode())
            pos += 8 + size
        values = []
        for _ in range(count):
            kind, size = struct.unpack_from("<II", key, pos)
            raw = key[pos + 8:pos + 8 + size]
            if len(raw) != size:
                return None
            values.append(_key_value(kind, raw))
            pos += 8 + size
    except (struct.error, UnicodeDecodeError, ValueError):
        return None
    return dict(zip(names, values)), key[pos:]


def _key_value(kind: int, raw: bytes) -> Any:
    if kind in (KEY_TYPE_IDS["INT64"], KEY_TYPE_IDS["UNIX_TIMESTAMP"]) and len(raw) == 8:
        return struct.unpack("<q", raw)[0]
    if kind == KEY_TYPE_IDS["INT32"] and len(raw) == 4:
        return struct.unpack("<i", raw)[0]
    if kind == KEY_TYPE_IDS["STRING"]:
        return raw.decode()
    if kind == KEY_TYPE_IDS["BYTES"]:
        return raw.hex()
    raise ValueError(f"join key type {kind} of {len(raw)} bytes")


def project_keys(client: Client, project: str) -> int:
    """How many keys of ``project`` (Feast's layout) the store holds: a ``SCAN`` of every primary."""
    suffix = key_suffix(project)
    total = 0
    for node in primaries(client):
        for key in node.scan_iter(match=b"*" + _glob(suffix), count=1000):
            parsed = split_key(key)
            total += parsed is not None and parsed[1] == suffix
    return total


def _find_extra(plan: ViewPlan, client: Client, expected: set[bytes], result: ViewVerification,
                examples: int) -> None:
    """Count the keys of the view's project and join keys that hold ``_ts:<view>`` but are not
    in ``expected``; keep the first ``examples`` of them."""
    prefix = entity_key_prefix([k.name for k in plan.join_keys])
    suffix = key_suffix(plan.project)
    pattern = _glob(prefix) + b"*" + _glob(suffix)
    candidates = []
    for node in primaries(client):
        try:
            for key in node.scan_iter(match=pattern, count=1000):
                if key not in expected:
                    parsed = split_key(key)
                    if parsed is not None and parsed[1] == suffix:
                        candidates.append(key)
        except _REDIS_ERRORS as exc:
            raise BackendUnavailable(f"scanning the keys of {plan.view!r} failed ({type(exc).__name__}: {exc}); "
                                     "check the server and run the verification again") from exc
    ts_field = timestamp_field(plan.view)
    holds = _pipelined(client, [("HEXISTS", key, ts_field) for key in candidates], plan.view)
    extra = [key for key, held in zip(candidates, holds) if held]
    result.extra = len(extra)
    for key in extra[:examples]:
        parsed = split_key(key)
        assert parsed is not None
        result.examples.append(Discrepancy("extra", parsed[0], key.hex()))


# ------------------------------------------------------------------ values shown


def _micros(raw: bytes | None) -> int:
    """A ``google.protobuf.Timestamp``'s microseconds since the epoch (-1: none)."""
    if raw is None:
        return -1
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp.FromString(raw)
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


def _time(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=int(us))).isoformat()


def _shown(plan: ViewPlan, column: int, expected: bytes, found: bytes | None) -> tuple[str, str]:
    """A differing field's expected and found values as text: a time, a value, a schedule's
    first difference; bytes when they do not decode."""
    if found is None:
        return _text(plan, column, expected), "(no field)"
    if plan.kernel is not None and column == len(plan.features) + 1:
        return _schedule_difference(expected, found, [f.name for f in plan.features])
    return _text(plan, column, expected), _text(plan, column, found)


def _text(plan: ViewPlan, column: int, raw: bytes) -> str:
    try:
        if column == 0:
            return _time(_micros(raw))
        if column <= len(plan.features):
            from feast.protos.feast.types.Value_pb2 import Value
            from feast.type_map import feast_value_type_to_python_type

            return repr(feast_value_type_to_python_type(Value.FromString(raw)))
        schedule = decode(raw, [f.name for f in plan.features])
        return f"{len(schedule.v)} change points {_time(schedule.v[0])} .. {_time(schedule.v[-1])}"
    except Exception:  # noqa: BLE001 - shown only: what does not decode is shown as bytes
        return f"{len(raw)} bytes {raw[:16].hex()}{'...' if len(raw) > 16 else ''}"


def _schedule_difference(expected: bytes, found: bytes, names: list[str]) -> tuple[str, str]:
    """Two schedules as text at their first difference: the change points, else the first
    feature and instant whose values differ."""
    try:
        want, got = decode(expected, names), decode(found, names)
    except Exception:  # noqa: BLE001 - a stale or foreign schedule: shown as bytes
        return (f"{len(expected)} bytes", f"{len(found)} bytes {found[:16].hex()}")
    if len(want.v) != len(got.v) or not np.array_equal(want.v, got.v):
        return (f"{len(want.v)} change points {_time(want.v[0])} .. {_time(want.v[-1])}",
                f"{len(got.v)} change points {_time(got.v[0])} .. {_time(got.v[-1])}" if len(got.v) else "none")
    for name, a, b in zip(names, want.columns, got.columns):
        same = (a == b) | (np.isnan(a) & np.isnan(b) if a.dtype.kind == "f" else False)
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            return f"{name} = {a[i]!r} from {_time(want.v[i])}", f"{name} = {b[i]!r}"
    return f"{len(expected)} bytes", f"{len(found)} bytes (the same rows, other bytes)"
