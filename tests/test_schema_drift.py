"""Schema drift in ONE file: every stage checks each input file's own Parquet schema.

DuckDB reads a glob of Parquet files with one combined schema: a new raw file whose
``event_timestamp`` is epoch milliseconds (INT64) still reads as ``TIMESTAMP WITH TIME
ZONE`` overall, so a check of the combined schema passes and the scan then stops with a
``ConversionException``. Here each kind of one-file drift is delivered into a real deployed
copy of the demo repo and the real CLI (``featurepipe backfill`` / ``materialize``, as
subprocesses) must block it with a message naming the file and the column, publish
nothing, and leave the failed check in the run log.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from featurepipe.quality.contracts import ColumnContract, TableContract
from featurepipe.quality.runlog import read_runs
from tests.cli_batch import run_commands
from tests.conftest import deployed_repo

ROWS, DAYS = 3_000, 5
VIEW = "user_transaction_stats"
TS_TYPE = "TIMESTAMP WITH TIME ZONE"


@dataclass
class Deployed:
    repo: Path
    data: Path
    redis_url: str
    env: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "featurepipe.cli", *args, "--repo", str(self.repo)],
                              env=self.env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """A copy of the demo repo with its own data, ``feast apply``, a clean backfill and a
    clean materialisation through the CLI (one process: the setup, not what is tested), into a
    redis-server of its own."""
    from featurepipe.redis_server import RedisServer

    with RedisServer() as server, deployed_repo(tmp_path_factory.mktemp("drift"), server.url, ROWS, DAYS) \
            as (repo, data):
        d = Deployed(repo, data, server.url, os.environ.copy())
        for done in run_commands([("backfill", "--repo", str(repo)), ("materialize", "--no-progress", "--repo", str(repo))],
                                 env=d.env):
            assert done.returncode == 0, done.stderr[-3000:]
        yield d


# ------------------------------------------------------------------------------ helpers

def checks_of(run: Any) -> list[dict[str, Any]]:
    """The check results of a run record, as dicts (a record is a dict today, a dataclass soon)."""
    checks = run["checks"] if isinstance(run, dict) else run.checks
    return [c if isinstance(c, dict) else c.as_dict() for c in checks]


def status_of(run: Any) -> str:
    return run["status"] if isinstance(run, dict) else run.status


def kind_of(run: Any) -> str:
    return run["kind"] if isinstance(run, dict) else run.kind


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def redis_dump(url: str) -> dict[bytes, bytes | None]:
    import redis

    from featurepipe.config import redis_connection_kwargs

    client = redis.Redis(**redis_connection_kwargs(url))  # type: ignore[arg-type]
    try:
        return {k: client.dump(k) for k in client.scan_iter(count=1000)}
    finally:
        client.close()


def retype(table: pa.Table, column: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, array)


def epoch_ms(table: pa.Table, column: str = "event_timestamp") -> pa.Array:
    """The column's instants as INT64 epoch milliseconds (what a producer in another
    language writes)."""
    return pc.divide(table.column(column).cast(pa.int64()), 1000)


def assert_blocked(done: subprocess.CompletedProcess[str], file: Path, column: str, words: list[str]) -> str:
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-5000:]
    assert str(file) in done.stderr and f"`{column}`" in done.stderr, done.stderr
    for w in words:
        assert w in done.stderr, done.stderr
    return done.stderr


def assert_failed_check_in_run_log(data: Path, kind: str, file: Path, column: str) -> None:
    run = read_runs(data)[-1]
    assert kind_of(run) == kind and status_of(run) != "ok", run
    failed = [c for c in checks_of(run) if not c["passed"]]
    assert failed, checks_of(run)
    mine = [c for c in failed if c["check"].startswith("schema") and c["column"] == column and str(file) in c["detail"]]
    assert mine and all(c["severity"] == "block" for c in mine), failed


# ------------------------------------------------------------------------------ raw ingest

def test_backfill_blocks_a_raw_file_with_epoch_millisecond_timestamps(deployed: Deployed) -> None:
    raw_dir = deployed.data / "raw" / "transactions"
    day = sorted(p for p in raw_dir.glob("date=*") if p.is_dir())[-1]
    clean = pq.read_table(next(day.glob("*.parquet")))
    late = day / "late-producer.parquet"
    bad = retype(clean.slice(0, 50), "event_timestamp", epoch_ms(clean.slice(0, 50)))
    bad = retype(bad, "transaction_id", pc.add(bad.column("transaction_id"), 10_000_000))
    assert bad.schema.field("event_timestamp").type == pa.int64()
    offline_before = tree_digest(deployed.data / "offline")
    runs_before = len(read_runs(deployed.data))
    pq.write_table(bad, late)
    try:
        done = deployed.cli("backfill")
        msg = assert_blocked(done, late, "event_timestamp",
                             ["quality gate raw/transactions blocked",
                              f"column `event_timestamp` is BIGINT, expected {TS_TYPE}"])
        assert f"the schema of `{late}` does not match" in msg
        assert tree_digest(deployed.data / "offline") == offline_before  # nothing published
        assert len(read_runs(deployed.data)) == runs_before + 1
        assert_failed_check_in_run_log(deployed.data, "backfill", late, "event_timestamp")
    finally:
        late.unlink()
    again = deployed.cli("backfill", "--no-index")  # the file gone, the same data passes again
    assert again.returncode == 0, again.stderr[-3000:]
    assert status_of(read_runs(deployed.data)[-1]) == "ok"


# ------------------------------------------------------------------------------ materialisation

def _amount_as_text(t: pa.Table) -> pa.Table:
    return retype(t, "amount", t.column("amount").cast(pa.string()))


def _timestamp_as_epoch_ms(t: pa.Table) -> pa.Table:
    return retype(t, "event_timestamp", epoch_ms(t))


@pytest.mark.parametrize("column, mutate", [
    ("amount", _amount_as_text),
    ("event_timestamp", _timestamp_as_epoch_ms),
], ids=["float-as-string", "timestamp-as-epoch-ms"])
def test_materialize_blocks_a_raw_file_with_a_retyped_column(deployed: Deployed, column: str, mutate: Any) -> None:
    """A windowed view is materialised from its raw events (its schedules): a raw file whose
    column changed type, with events newer than any written, stops the view with the file
    named, and nothing is written."""
    raw_dir = deployed.data / "raw" / "transactions"
    day = sorted(p for p in raw_dir.glob("date=*") if p.is_dir())[-1]
    clean = pq.read_table(next(day.glob("*.parquet")))
    # one second newer than the rows it copies: a materialisation that read it would write it
    newer = retype(clean, "event_timestamp",
                   pc.add(clean.column("event_timestamp"), pa.scalar(1_000_000, pa.duration("us"))))
    drifted = day / "part-drift.parquet"
    online_before = redis_dump(deployed.redis_url)
    assert online_before
    pq.write_table(mutate(newer), drifted)
    try:
        done = deployed.cli("materialize", "--no-progress", "--view", VIEW)
        out = done.stdout + done.stderr
        assert done.returncode != 0, out[-3000:]
        assert "Traceback" not in out, out[-5000:]
        assert str(drifted) in done.stderr and column in done.stderr, done.stderr
        for words in (f"quality gate materialize/{VIEW} blocked the view", "Nothing of this view was written to Redis"):
            assert words in done.stderr, done.stderr
        assert redis_dump(deployed.redis_url) == online_before
    finally:
        drifted.unlink()


# ------------------------------------------------------------------------------ the check itself

CONTRACT = TableContract("t", columns=(
    ColumnContract("id", "BIGINT"), ColumnContract("amount", "DOUBLE"), ColumnContract("ts", TS_TYPE),
))


def _write(path: Path, **columns: pa.Array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def _good(path: Path) -> Path:
    return _write(path, id=pa.array([1], pa.int64()), amount=pa.array([1.5]),
                  ts=pa.array([0], pa.timestamp("us", tz="UTC")))


def test_file_schema_checks_name_each_drifted_file_in_one_pass(tmp_path: Path) -> None:
    from featurepipe.quality.checks import file_schema_checks

    files = [_good(tmp_path / f"date=2024-01-{d:02d}" / f"part-{i}.parquet") for d in range(1, 21) for i in range(25)]
    glob = str(tmp_path / "**" / "*.parquet")
    with duckdb.connect() as con:
        assert file_schema_checks(con, "raw", CONTRACT, glob) == []  # all 500 match: nothing to report
        # a struct whose child is named like a declared column does not hide the top-level one
        nested = _write(tmp_path / "date=2024-01-21" / "nested.parquet", id=pa.array([1], pa.int64()),
                        s=pa.array([{"amount": "x"}]), amount=pa.array([1.5]),
                        ts=pa.array([0], pa.timestamp("us", tz="UTC")))
        retyped = [_write(tmp_path / "date=2024-01-22" / f"ms-{i}.parquet", id=pa.array([1], pa.int64()),
                          amount=pa.array([1.5]), ts=pa.array([0], pa.int64())) for i in range(7)]
        renamed = _write(tmp_path / "date=2024-01-23" / "renamed.parquet", id=pa.array([1], pa.int64()),
                         amt=pa.array([1.5]), ts=pa.array([0], pa.timestamp("us", tz="UTC")))
        t0 = time.perf_counter()
        results = file_schema_checks(con, "raw", CONTRACT, glob)
        seconds = time.perf_counter() - t0
    assert seconds < 5, seconds  # footers only, one query
    assert all(not r.passed and r.severity == "block" and r.stage == "raw" and r.table == "t" for r in results)
    by_column = {(r.check, r.column): r for r in results}
    assert set(by_column) == {("schema.type", "ts"), ("schema.missing", "amount")}, results
    ts = by_column[("schema.type", "ts")].detail
    assert f"column `ts` is BIGINT, expected {TS_TYPE}" in ts and "7 files" in ts and "and 4 more" in ts, ts
    assert sum(str(f) in ts for f in retyped) == 3, ts  # the first few named, not all
    missing = by_column[("schema.missing", "amount")].detail
    assert missing.startswith(f"the schema of `{renamed}` does not match: column `amount` is missing"), missing
    assert "['amt']: renamed?" in missing and str(nested) not in ts + missing
    assert not any(str(f) in ts + missing for f in files)


def test_file_schema_checks_without_files_or_with_a_broken_file(tmp_path: Path) -> None:
    from featurepipe.quality.checks import file_schema_checks

    glob = str(tmp_path / "**" / "*.parquet")
    with duckdb.connect() as con:
        assert file_schema_checks(con, "raw", CONTRACT, glob) == []  # no files: the caller says so
        _good(tmp_path / "a.parquet")
        broken = tmp_path / "b.parquet"
        broken.write_bytes(b"not parquet at all")
        (result,) = file_schema_checks(con, "raw", CONTRACT, glob)
    assert result.check == "schema.file" and result.blocking and str(broken) in result.detail, result


def test_table_schema_checks_say_a_whole_table_drift_once_and_a_one_file_drift_by_file(tmp_path: Path) -> None:
    from featurepipe.quality.checks import table_schema_checks

    glob = str(tmp_path / "**" / "*.parquet")
    for d in (1, 2):
        _write(tmp_path / f"date=2024-01-0{d}" / "part-0.parquet", id=pa.array([1], pa.int64()),
               amount=pa.array(["1.5"]), ts=pa.array([0], pa.timestamp("us", tz="UTC")))
    with duckdb.connect() as con:
        types, whole = table_schema_checks(con, "features", CONTRACT, glob)
        assert types is not None and types["amount"] == "VARCHAR" and types["date"] == "DATE"
        assert [(r.check, r.column, r.detail) for r in whole] == [
            ("schema.type", "amount", "column 'amount' is VARCHAR, the contract says DOUBLE")]  # as before
        for d in (1, 2):
            _good(tmp_path / f"date=2024-01-0{d}" / "part-0.parquet")
        late = _write(tmp_path / "date=2024-01-02" / "late.parquet", id=pa.array([1], pa.int64()),
                      amount=pa.array([1.5]), ts=pa.array([0], pa.int64()))
        types, one = table_schema_checks(con, "features", CONTRACT, glob)
    assert types is not None and types["ts"] == TS_TYPE  # what DuckDB's combined schema claims
    assert [(r.check, r.column, r.passed) for r in one] == [("schema.type", "ts", False)], one  # no "schema" pass
    assert one[0].detail == f"the schema of `{late}` does not match: column `ts` is BIGINT, expected {TS_TYPE}"


# ------------------------------------------------------------------------------ streaming

STREAM_TAIL = 20  # live events a stream job would process after the history


def _epoch_ms_raw_file(data: Path, name: str) -> Path:
    """Deliver a late producer's raw file (INT64 epoch-ms ``event_timestamp``) into the newest
    day of the raw history; the caller deletes it."""
    day = sorted(p for p in (data / "raw" / "transactions").glob("date=*") if p.is_dir())[-1]
    clean = pq.read_table(next(day.glob("part-*.parquet"))).slice(0, 50)
    bad = retype(clean, "event_timestamp", epoch_ms(clean))
    bad = retype(bad, "transaction_id", pc.add(bad.column("transaction_id"), 30_000_000))
    assert bad.schema.field("event_timestamp").type == pa.int64()
    path = day / name
    pq.write_table(bad, path)
    return path


def _new_events(data: Path, offset: int) -> pa.Table:
    """Clean events one day after the history's newest, with unused transaction ids."""
    day = sorted(p for p in (data / "raw" / "transactions").glob("date=*") if p.is_dir())[-1]
    clean = pq.read_table(next(day.glob("part-*.parquet"))).slice(0, STREAM_TAIL)
    later = retype(clean, "event_timestamp",
                   pc.add(clean.column("event_timestamp"), pa.scalar(86_400 * 1_000_000, pa.duration("us"))))
    return retype(later, "transaction_id", pc.add(later.column("transaction_id"), offset))


@contextmanager
def _contracts_as(repo: Path, mode: str) -> Iterator[None]:
    """The repo's contracts.yaml as is (``contract``), away (``no-contract``), or with the
    source's schema checks only warning (``warn-contract``: the file check lets the file
    through and the read stops on it); put back after."""
    path = repo / "contracts.yaml"
    text = path.read_text()
    if mode == "no-contract":
        path.unlink()
    elif mode == "warn-contract":
        path.write_text(text.replace("    unique: [transaction_id]\n",
                                     "    unique: [transaction_id]\n    schema_severity: warn\n", 1))
    try:
        yield
    finally:
        path.write_text(text)


EXPECTED_WORDS = {
    "contract": "does not match its contract",
    "no-contract": "differ from the type most of its files have",
    "warn-contract": "cannot read the raw history",
}


@pytest.mark.parametrize("mode", list(EXPECTED_WORDS))
def test_bootstrapping_stream_job_blocks_a_raw_file_with_epoch_millisecond_timestamps(
        deployed: Deployed, mode: str) -> None:
    """``featurepipe stream run`` (a new job: it bootstraps its windows from the raw Parquet
    history) stops before reading that history when a file of it is retyped: against the
    source's contract, or without one against the type the other files have (and when the
    contract only warns, at the read, naming the file all the same). The message names the
    file and the column and says what to do; nothing is written online, offline, to the
    raw history, the dead letters or the job's state, and no traceback."""
    import redis

    from featurepipe.stream.runner import event_payloads
    from featurepipe.stream.source import publish_redis

    job = f"drift-{mode}"
    stream_url = deployed.redis_url.rsplit("/", 1)[0] + "/1"  # the stream apart from the online store
    client = redis.Redis.from_url(stream_url)
    client.delete(job)
    live = _new_events(deployed.data, offset=40_000_000 + 1_000_000 * list(EXPECTED_WORDS).index(mode))
    assert publish_redis(client, job, event_payloads(live)) == STREAM_TAIL
    client.close()
    late = _epoch_ms_raw_file(deployed.data, f"late-producer-{job}.parquet")
    raw_before = tree_digest(deployed.data / "raw")
    offline_before = tree_digest(deployed.data / "offline")
    online_before = redis_dump(deployed.redis_url)
    runs_before = len(read_runs(deployed.data))
    try:
        with _contracts_as(deployed.repo, mode):
            done = deployed.cli("stream", "run", "--stream", job, "--stream-url", stream_url, "--job", job,
                                "--max-events", str(STREAM_TAIL), "--idle-timeout", "3s",
                                "--checkpoint-interval", "1s", "--no-progress")
        msg = assert_blocked(done, late, "event_timestamp",
                             [f"stream job '{job}'", EXPECTED_WORDS[mode],
                              f"column `event_timestamp` is BIGINT, expected {TS_TYPE}",
                              "fix or move each file named", "then restart the job"])
        assert f"the schema of `{late}` does not match" in msg
        assert tree_digest(deployed.data / "raw") == raw_before  # nothing archived
        assert tree_digest(deployed.data / "offline") == offline_before
        assert redis_dump(deployed.redis_url) == online_before
        assert not list((deployed.data / "stream" / job).rglob("checkpoint.json"))  # a restart bootstraps again
        assert not (deployed.data / "quarantine" / "stream" / job).exists()
        assert len(read_runs(deployed.data)) == runs_before
    finally:
        late.unlink()


@pytest.mark.parametrize("mode", ["contract", "warn-contract"])
def test_push_blocks_a_raw_file_with_epoch_millisecond_timestamps(deployed: Deployed, tmp_path: Path,
                                                                  mode: str) -> None:
    """``featurepipe push`` checks each raw file's own schema before appending its events
    to the raw history it then recomputes features from: a retyped file stops it with a
    message naming file and column, nothing appended, nothing online, no traceback (when
    the contract only warns, the recompute stops on the file and the append is undone)."""
    events = tmp_path / "new-events.parquet"
    pq.write_table(_new_events(deployed.data, offset=50_000_000), events)
    late = _epoch_ms_raw_file(deployed.data, f"late-producer-push-{mode}.parquet")
    raw_before = tree_digest(deployed.data / "raw")
    days_before = sorted(p.name for p in (deployed.data / "raw" / "transactions").iterdir())
    online_before = redis_dump(deployed.redis_url)
    try:
        with _contracts_as(deployed.repo, mode):
            done = deployed.cli("push", "--events", str(events))
        first = ("push: the raw history of source 'transactions'" if mode == "contract"
                 else "push: cannot read the raw history of source 'transactions'")
        msg = assert_blocked(done, late, "event_timestamp",
                             [first, f"column `event_timestamp` is BIGINT, expected {TS_TYPE}",
                              "fix or move each file named", "then push again"])
        assert f"the schema of `{late}` does not match" in msg
        assert tree_digest(deployed.data / "raw") == raw_before  # the events were not appended
        assert sorted(p.name for p in (deployed.data / "raw" / "transactions").iterdir()) == days_before
        assert redis_dump(deployed.redis_url) == online_before
    finally:
        late.unlink()


def test_history_schema_checks_without_a_contract_compare_with_the_majority(tmp_path: Path) -> None:
    """Without a contract each file is compared with the type most files give the column: a
    type DuckDB cannot cast there fails, one it casts implicitly (FLOAT among DOUBLE) and a
    missing column (read as NULL) do not; with a contract, the columns it types follow it
    and the others the majority."""
    from featurepipe.quality.checks import history_schema_checks

    glob = str(tmp_path / "**" / "*.parquet")
    for d in (1, 2, 3):
        _good(tmp_path / f"date=2024-01-0{d}" / "part-0.parquet")
    _write(tmp_path / "date=2024-01-03" / "float.parquet", id=pa.array([1], pa.int64()),
           amount=pa.array([1.5], pa.float32()), ts=pa.array([0], pa.timestamp("us", tz="UTC")))
    _write(tmp_path / "date=2024-01-03" / "no-amount.parquet", id=pa.array([1], pa.int64()),
           ts=pa.array([0], pa.timestamp("us", tz="UTC")))
    with duckdb.connect() as con:
        assert history_schema_checks(con, "stream", "t", None, glob) == []
        late = _write(tmp_path / "date=2024-01-03" / "late.parquet", id=pa.array([1], pa.int64()),
                      amount=pa.array([1.5]), ts=pa.array([0], pa.int64()))
        (result,) = history_schema_checks(con, "stream", "t", None, glob)
        assert (result.check, result.column, result.blocking) == ("schema.type", "ts", True)
        assert result.detail == (f"the schema of `{late}` does not match: column `ts` is BIGINT, expected {TS_TYPE} "
                                 "(the type of 5 of the 6 files with that column)")
        typed = TableContract("t", columns=(ColumnContract("amount", "DOUBLE"), ColumnContract("ts")))
        results = history_schema_checks(con, "stream", "t", typed, glob)
    found = {(r.check, r.column): r.detail for r in results}
    assert set(found) == {("schema.type", "amount"), ("schema.missing", "amount"), ("schema.type", "ts")}, results
    assert "float.parquet` does not match: column `amount` is FLOAT, expected DOUBLE" in found["schema.type", "amount"]
    assert "no-amount.parquet` does not match: column `amount` is missing" in found["schema.missing", "amount"]
    assert str(late) in found["schema.type", "ts"]  # untyped in the contract: the majority's
