"""Day two: what a user meets after `make demo`, run as separate processes with no variables set.

* the repo's local redis-server (no ``REDIS_URL``) is shared by separate commands, keeps its
  files under ``<repo>/.redis/``, and keeps its data over a stop and a start;
* the Feast SDK reads the same online values with no environment variables at all;
* a copied project reads its own data, and a registry applied in another checkout stops the
  command with a message that says to run ``featurepipe apply``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from featurepipe.redis_server import LocalRedis, _pid_alive, free_port
from tests.cli_batch import run_commands
from tests.conftest import Pipeline

SERVICE = "fraud_detection_v1"
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("REDIS_URL", "FEATUREPIPE_REDIS", "FEATUREPIPE_REPO", "FEATUREPIPE_DATA_DIR")}


def cli(repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "featurepipe.cli", *args, "--repo", str(repo)],
                          env=env if env is not None else CLEAN_ENV, capture_output=True, text=True,
                          timeout=timeout)


def cli_in_one_process(repo: Path, commands: list[tuple[str, ...]], env: dict[str, str] | None = None,
                       timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """:func:`cli` of each read-only command, one after another in one process (each
    ``featurepipe`` process pays Feast's import): each with its own exit code and output."""
    return run_commands([(*args, "--repo", str(repo)) for args in commands],
                        env=env if env is not None else CLEAN_ENV, timeout=timeout)


@pytest.fixture(scope="module")
def project(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the pipeline's whole project (repo, its data beside it, registry) in a new
    folder; the local redis-server it may start is stopped, by PID, at the end."""
    base = tmp_path_factory.mktemp("daytwo") / "project"
    shutil.copytree(pipeline.repo.parent, base, symlinks=True,
                    ignore=shutil.ignore_patterns(".redis", ".featurepipe", "__pycache__"))
    repo = base / "feature_repo"
    yield repo
    state = LocalRedis(repo).status()
    if state is not None:
        LocalRedis(repo).stop()


def _sample_rows(pipeline: Pipeline, n: int = 5) -> list[dict[str, int]]:
    table = ds.dataset(pipeline.data / "raw" / "transactions", partitioning="hive").to_table(
        columns=["user_id", "merchant_id"])
    rows = table.slice(0, 2_000).to_pylist()
    seen: dict[int, dict[str, int]] = {}
    for row in rows:
        seen.setdefault(row["user_id"], row)
    return list(seen.values())[:n]


def _grpc_values(address: str, rows: list[dict[str, int]]) -> dict[str, list[object]]:
    from serving.client import FeatureClient

    with FeatureClient(address) as client:
        got = client.get_features({"user_id": [r["user_id"] for r in rows],
                                   "merchant_id": [r["merchant_id"] for r in rows]},
                                  feature_service=SERVICE,
                                  request_context={"amount": [10.0] * len(rows), "txn_epoch": [1.8e9] * len(rows)})
    # every stored feature is found; a window with no event in it has a null mean or max
    # (request-time windows), so those may be NULL_VALUE, while counts are always PRESENT
    assert all(s in ("PRESENT", "NULL_VALUE") for name, statuses in got.statuses.items() for s in statuses
               if not name.startswith(("amount_to", "seconds_since"))), got.statuses
    assert all(s == "PRESENT" for name, statuses in got.statuses.items() for s in statuses
               if "count" in name or name in ("user_id", "merchant_id", "last_txn_epoch")), got.statuses
    return {name: list(values) for name, values in got.values.items()}


@pytest.mark.slow
def test_separate_processes_share_the_local_online_store(pipeline: Pipeline, project: Path) -> None:
    """No REDIS_URL: one process materialises, the next serves over gRPC, a third reads with
    Feast's SDK; all see what the session's own Redis (the oracle, filled by the same
    materialisation) holds. The server keeps its files under .redis/ and its data over a
    restart."""
    repo = project
    local = LocalRedis(repo)
    assert local.status() is None
    done = cli(repo, "materialize")
    assert done.returncode == 0, done.stderr[-3000:]
    state = local.status()
    assert state is not None, "materialize should have started the repo's local redis-server"
    assert f"127.0.0.1:{state.port}" in done.stdout

    # a second, separate process serves what the first wrote
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "featurepipe.cli", "serve", "--repo", str(repo),
                               "--port", str(port)],
                              env=CLEAN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        address = _wait_serving(server, f"127.0.0.1:{port}")
        rows = _sample_rows(pipeline)
        served = _grpc_values(address, rows)
    finally:
        server.terminate()
        server.wait(timeout=30)

    # the oracle: the same rows served from the session's Redis, materialised from the same data
    from serving.server import FeatureServer

    with FeatureServer(pipeline.repo, port=0) as reference:
        expected = _grpc_values(reference.address, rows)
    assert served == expected

    # the Feast SDK, in a process with no featurepipe variables, from another folder
    script = (
        "import json, sys\nfrom feast import FeatureStore\n"
        f"store = FeatureStore(repo_path={str(repo)!r})\n"
        f"rows = {json.dumps([{'user_id': r['user_id']} for r in rows])}\n"
        "got = store.get_online_features(features=['user_transaction_stats:txn_count_24h',"
        "'user_transaction_stats:amount_sum_7d'], entity_rows=rows).to_dict()\n"
        "print(json.dumps(got))\n"
    )
    sdk = subprocess.run([sys.executable, "-c", script], env=CLEAN_ENV, cwd="/", capture_output=True,
                         text=True, timeout=120)
    assert sdk.returncode == 0, sdk.stderr[-3000:]
    got = json.loads(sdk.stdout.strip().splitlines()[-1])
    # Feast's SDK reads Feast's own fields: each user's values as of its newest event (its
    # window schedule's first row), where the server answers at its clock. The oracle is
    # featurepipe's reader pinned to each user's newest event + 1 us.
    import pyarrow.compute as pc

    from featurepipe.config import load_store
    from featurepipe.online.read import online_features

    raw = ds.dataset(pipeline.data / "raw" / "transactions", partitioning="hive").to_table(
        columns=["user_id", "event_timestamp"])
    store = load_store(pipeline.repo)
    for i, r in enumerate(rows):
        newest = pc.max(raw.filter(pc.equal(raw["user_id"], r["user_id"]))["event_timestamp"]).as_py()
        at_newest = online_features(store, [{"user_id": r["user_id"]}],
                                    ["user_transaction_stats:txn_count_24h", "user_transaction_stats:amount_sum_7d"],
                                    at=newest + timedelta(microseconds=1))
        assert got["txn_count_24h"][i] == at_newest["txn_count_24h"][0]
        assert got["amount_sum_7d"][i] == pytest.approx(at_newest["amount_sum_7d"][0])

    # its files stay under <repo>/.redis/, and nowhere else in the project
    assert Path(state.dir) == (repo / ".redis").resolve()
    import redis

    client = redis.Redis(host="127.0.0.1", port=state.port)
    assert client.config_get("dir")["dir"] == str((repo / ".redis").resolve())
    keys = client.dbsize()
    client.close()
    assert keys > 0
    assert not [p for p in repo.parent.rglob("dump.rdb") if ".redis" not in p.parts]

    # a stop saves, a start loads: the online store survives
    stopped = cli(repo, "redis", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert not _pid_alive(state.pid) or local.status() is None
    assert (repo / ".redis" / "dump.rdb").is_file()
    status = cli(repo, "redis", "status")
    assert status.returncode == 1 and "not running" in status.stdout
    started = cli(repo, "redis", "start")
    assert started.returncode == 0, started.stderr
    after = local.status()
    assert after is not None
    client = redis.Redis(host="127.0.0.1", port=after.port)
    assert client.dbsize() == keys
    client.close()
    status = cli(repo, "redis", "status")
    assert status.returncode == 0 and f"{keys:,} keys" in status.stdout


def _wait_serving(process: subprocess.Popen[str], address: str, timeout: float = 60) -> str:
    """Wait until the server process answers the standard gRPC health check."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"featurepipe serve exited: {process.stderr.read() if process.stderr else ''}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return address
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"featurepipe serve did not answer on {address} in {timeout}s")


def _raw_rows(data: Path) -> int:
    return ds.dataset(data / "raw" / "transactions", partitioning="hive").count_rows()


def _offline_days(data: Path, view: str) -> dict[str, int]:
    """Rows per day partition of a view's offline table."""
    return {day.name: ds.dataset(day).count_rows()
            for day in sorted((data / "offline" / view).glob("date=*"))}


@pytest.mark.slow
def test_a_copied_project_reads_its_own_data(pipeline: Pipeline, tmp_path: Path) -> None:
    """Copy the project, drop the first days of raw data in the copy only, and backfill there
    from scratch: the copy's tables hold the kept days and their trailing window drops, equal
    to the original's wherever the dropped days no longer reach; the original's are untouched."""
    base = tmp_path / "copy"
    shutil.copytree(pipeline.repo.parent, base, ignore=shutil.ignore_patterns(".redis", ".featurepipe"))
    data = base / "data"
    days = sorted((data / "raw" / "transactions").glob("date=*"))
    dropped = days[: len(days) // 2]
    for day in dropped:
        shutil.rmtree(day)
    shutil.rmtree(data / "offline")
    assert _raw_rows(data) < _raw_rows(pipeline.data)
    original = _offline_days(pipeline.data, "user_transaction_stats")
    env = {**CLEAN_ENV, "FEATUREPIPE_DATA_DIR": str(data)}
    done = cli(base / "feature_repo", "backfill", "--no-index", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    copied = _offline_days(data, "user_transaction_stats")
    kept = {day.name for day in days} - {day.name for day in dropped}
    # change-point rows: the copy's table starts with its first kept day and runs past its
    # last one for the longest window plus its hop (7 days 1 hour: windows still empty out)
    assert set(copied) >= kept and min(copied) == min(kept)
    assert all(day > max(kept) for day in set(copied) - kept)
    assert len(set(copied) - kept) <= 8
    # a day's rows depend on the events of the 7 days 1 hour before it: from the first kept
    # day + 8 days on, the copy's rows are the original's, day for day
    settled = {day for day in copied
               if date.fromisoformat(day[5:]) >= date.fromisoformat(min(kept)[5:]) + timedelta(days=8)}
    assert settled, sorted(copied)
    assert {day: copied[day] for day in settled} == {day: original[day] for day in settled}
    assert _offline_days(pipeline.data, "user_transaction_stats") == original


def _absolute_registry(registry: Path, repo: Path) -> None:
    """Rewrite a registry's file sources to absolute paths, as earlier versions stored them."""
    from feast.protos.feast.core.Registry_pb2 import Registry

    proto = Registry()
    proto.ParseFromString(registry.read_bytes())
    sources = [s for s in proto.data_sources]
    for fv in proto.feature_views:
        sources += [fv.spec.batch_source, fv.spec.stream_source]
    for source in sources:
        uri = source.file_options.uri
        if uri and not uri.startswith("/"):
            source.file_options.uri = os.path.normpath(repo / uri)
        if source.batch_source.file_options.uri and not source.batch_source.file_options.uri.startswith("/"):
            source.batch_source.file_options.uri = os.path.normpath(repo / source.batch_source.file_options.uri)
    registry.write_bytes(proto.SerializeToString())


@pytest.mark.slow
def test_a_registry_applied_in_another_checkout_stops_with_a_message(pipeline: Pipeline, tmp_path: Path) -> None:
    """A copy whose registry holds absolute paths into the original checkout (what earlier
    versions stored) would backfill from the original's data: it stops instead, naming the
    way out; after `featurepipe apply` the copy works."""
    base = tmp_path / "stale"
    shutil.copytree(pipeline.repo.parent, base, ignore=shutil.ignore_patterns(".redis", ".featurepipe"))
    repo, data = base / "feature_repo", base / "data"
    _absolute_registry(repo / "data" / "registry.db", pipeline.repo)
    env = {**CLEAN_ENV, "FEATUREPIPE_DATA_DIR": str(data), "REDIS_URL": pipeline.env["REDIS_URL"]}
    before = sorted(p.name for p in (pipeline.data / "offline" / "user_transaction_stats").glob("date=*/*"))
    stopped = cli(repo, "backfill", "--no-index", env=env)
    assert stopped.returncode != 0
    assert "Traceback" not in stopped.stderr
    assert "featurepipe apply" in stopped.stderr and str(pipeline.repo.parent) in stopped.stderr
    assert sorted(p.name for p in (pipeline.data / "offline" / "user_transaction_stats").glob("date=*/*")) == before
    applied = cli(repo, "apply", env=env)
    assert applied.returncode == 0, applied.stderr[-3000:]
    done = cli(repo, "backfill", "--no-index", env=env)
    assert done.returncode == 0, done.stderr[-3000:]


# -- after `make demo`: every read-only command of the README -----------------------------------

VIEWS = ("merchant_activity", "merchant_fraud", "user_transaction_stats")


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`featurepipe demo` on small data (streaming step included) in a fresh copy of
    feature_repo, with no REDIS_URL: the repo's own redis-server, stopped by PID at the end."""
    from tests.conftest import SOURCE_REPO

    repo = tmp_path_factory.mktemp("demo") / "feature_repo"
    shutil.copytree(SOURCE_REPO, repo, ignore=shutil.ignore_patterns("data", ".redis", "__pycache__"))
    try:
        done = cli(repo, "demo", "--rows", "10000", "--score", "20", timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "stream live events" in done.stdout and "online and offline agree" in done.stdout
        yield repo
    finally:
        if LocalRedis(repo).status() is not None:
            LocalRedis(repo).stop()


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_every_read_only_command_works_after_the_demo(demo_project: Path) -> None:
    """The README's next steps after `make demo`: status, status --prometheus, report,
    lineage of a view and of a feature, index and skew all exit 0 and show the demo's runs,
    the streaming checkpoint among them."""
    from featurepipe.quality.records import KIND_STREAM
    from featurepipe.quality.runlog import read_runs

    repo = demo_project
    runs = read_runs(repo / "data")
    kinds = [r.kind for r in runs]
    assert kinds.count("backfill") == 1 and kinds.count("materialize") == len(VIEWS) and KIND_STREAM in kinds
    stream = next(r for r in runs if r.kind == KIND_STREAM)
    assert stream.ok and stream.stream is not None and stream.inputs[0].rows == 2_000

    # the read-only commands in one process (each featurepipe process pays Feast's import)
    status, prometheus, report, view, feature, info, index, skew = (_ok(done) for done in cli_in_one_process(repo, [
        ("status",), ("status", "--prometheus"), ("report",), ("lineage", "user_transaction_stats"),
        ("lineage", "amount_sum_1h"), ("lineage", "user_transaction_stats:txn_count_1h", "--json"),
        ("index",), ("skew", "--sample", "200")]))
    for view_name in VIEWS:
        assert view_name in status
    assert stream.run_id in status and "stream_checkpoint" in status and "checks of run" in status

    assert 'featurepipe_runs_total{job="stream_checkpoint",status="ok"} 1.0' in prometheus
    assert 'featurepipe_runs_total{job="materialize",status="ok"} 3.0' in prometheus
    for view_name in VIEWS:
        assert f'featurepipe_feature_view_newest_event_timestamp_seconds{{feature_view="{view_name}",store="online"}}' \
            in prometheus

    page = repo / "data" / "reports" / "quality.html"
    assert f"wrote {page}" in report and f"({len(runs)} runs," in report
    html = page.read_text()
    assert all(r.run_id in html for r in runs)

    assert view.startswith("feature view user_transaction_stats")
    assert "online: materialised by run" in view and f"stream: last checkpoint {stream.run_id}" in view
    assert feature.startswith("feature amount_sum_1h of view user_transaction_stats")
    assert "computed as sum(amount) over 1.0h" in feature and "input transactions:" in feature
    info = json.loads(info)
    assert info["feature"] == "txn_count_1h" and info["runs"] and info["online"] and info["stream"]

    for view_name in VIEWS:
        assert view_name in index

    assert "online and offline agree" in skew


OLD_RUN_LOG = [  # what featurepipe 0.1 wrote: a stream checkpoint whose inputs is a dict, ...
    {"kind": "stream_checkpoint", "run_id": "demo-w0-00000001", "job": "demo", "worker": 0,
     "source": "redis:transactions-live", "inputs": {"positions": {"transactions-live": "1-0"}},
     "outputs": ["/old/data/offline/user_transaction_stats/date=2026-01-01/demo-w0-00000001.parquet"],
     "views": ["user_transaction_stats"], "definitions_hash": "x", "code_version": {"featurepipe": "0.1.0"},
     "counters": {"messages": 5}, "watermark": None, "lag": 0, "seconds": 0.1,
     "finished_at": "2026-01-01T00:00:00+00:00"},
    # ... a materialisation with `online_store` and a window dict,
    {"run_id": "20260101T000000-aaaaaa", "kind": "materialize", "status": "ok", "error": None,
     "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:00:01+00:00", "seconds": 1.0,
     "window": {"start": "1970-01-01T00:00:00+00:00", "end": "2026-01-01T00:00:00+00:00"},
     "inputs": [{"view": "user_transaction_stats", "path": "/old/offline", "files": ["a"], "rows": 3,
                 "passed": 3, "quarantined": 0, "window_rows": 3}],
     "outputs": [{"view": "user_transaction_stats", "online_store": "redis://127.0.0.1:1/0", "rows": 3,
                  "written": 3, "skipped": 0, "quarantine_files": [],
                  "newest_event": "2025-12-31T23:00:00+00:00"}],
     "checks": []},
]


@pytest.mark.slow
def test_an_old_run_log_does_not_crash_the_commands(demo_project: Path, tmp_path: Path) -> None:
    """Run records of featurepipe 0.1 (and a torn line) in front of the demo's: status, report,
    lineage and the metrics still work; the line that is not a run record is named."""
    repo = tmp_path / "feature_repo"
    shutil.copytree(demo_project, repo, symlinks=True, ignore=shutil.ignore_patterns(".redis"))
    log = repo / "data" / "runs" / "runs.jsonl"
    current = log.read_text()
    log.write_text("".join(json.dumps(r) + "\n" for r in OLD_RUN_LOG) + '{"run_id": "torn\n' + current)
    env = {**CLEAN_ENV, "REDIS_URL": "redis://127.0.0.1:1/0"}  # read-only commands need no Redis
    commands = [("status", "--runs", "20"), ("status", "--prometheus"), ("report",), ("lineage", "amount_sum_1h")]
    for args, done in zip(commands, cli_in_one_process(repo, commands, env=env), strict=True):
        out = _ok(done)
        assert f"{log} line 3 is not a run record" in done.stderr, (args, done.stderr[-2000:])
        if args[0] == "status" and len(args) == 3:
            assert "demo-w0-00000001" in out and "20260101T000000-aaaaaa" in out
