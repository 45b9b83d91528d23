"""Operations commands on the deployed demo repo: ``featurepipe backfill --plan`` (metadata
only, writes nothing) and ``featurepipe registry backup|restore``.

Oracles: the plan's counts against the files themselves (a DuckDB scan of the offline table,
the raw files' footers) and its time against the run log; a restored registry against
Feast's own ``feast plan`` on the definitions, and against the registry it was taken from.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from feast.protos.feast.core.Registry_pb2 import Registry

from featurepipe.definitions import aggregate_views
from featurepipe.errors import InvalidInput, NotFound
from featurepipe.feast.registry_backup import backup_registry, restore_registry
from featurepipe.jobs.plan import plan_backfill
from featurepipe.quality.runlog import runs_path
from tests.cli_batch import run_commands
from tests.conftest import Pipeline, deployed_repo, feast_cli


def tree_state(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folders``: (mtime in ns, size)."""
    out = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                st = path.stat()
                out[str(path)] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def fresh_repo(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> tuple[Path, dict[str, str]]:
    """A demo repo just applied (never materialised: after a materialisation Feast 0.67's `feast
    plan` reports every materialised view as updated, restored or not), its environment."""
    base = tmp_path_factory.mktemp("fresh")
    with deployed_repo(base, redis_url, rows=2_000, days=3) as (repo, _data):
        env = os.environ.copy()
    return repo, env


def empty_copy(repo: Path, copy: Path) -> Path:
    """A copy of the repo's definitions at ``copy``, without a registry."""
    copy.mkdir()
    for file in ("feature_store.yaml", "features.py", "contracts.yaml", ".feastignore"):
        if (repo / file).exists():
            shutil.copy(repo / file, copy / file)
    return copy


@dataclass
class Commands:
    """The CLI runs this module checks, in one process (each process pays Feast's import):
    two plans on the pipeline, then a backup of the fresh repo restored into an empty copy,
    twice; and the pipeline's files and run log before and after."""

    results: dict[str, subprocess.CompletedProcess[str]]
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]
    log_before: bytes
    log_after: bytes
    backup: Path
    copy: Path


@pytest.fixture(scope="module")
def commands(pipeline: Pipeline, fresh_repo: tuple[Path, dict[str, str]]) -> Commands:
    repo, _ = fresh_repo
    copy = empty_copy(repo, repo.parent / "restored")  # beside it: the same relative data paths
    backup = repo.parent / "backup" / "registry.pb"
    before, log_before = tree_state(pipeline.repo, pipeline.data), runs_path(pipeline.data).read_bytes()
    names = ("plan", "plan spark", "backup", "restore", "restore again")
    results = run_commands([
        ("backfill", "--plan", "--repo", str(pipeline.repo)),
        ("backfill", "--plan", "--engine", "spark", "--view", "user_transaction_stats",
         "--start", "2026-01-01", "--end", "2026-01-08", "--repo", str(pipeline.repo)),
        ("registry", "backup", "--out", str(backup), "--repo", str(repo)),
        ("registry", "restore", str(backup), "--repo", str(copy)),
        ("registry", "restore", str(backup), "--repo", str(copy)),
    ], env=pipeline.env)
    return Commands(dict(zip(names, results)), before, tree_state(pipeline.repo, pipeline.data), log_before,
                    runs_path(pipeline.data).read_bytes(), backup, copy)


def test_backfill_plan_reads_footers_and_writes_nothing(pipeline: Pipeline, commands: Commands) -> None:
    full, spark = commands.results["plan"], commands.results["plan spark"]
    assert full.returncode == 0, full.stderr[-3000:]
    assert spark.returncode == 0, spark.stderr[-3000:]
    assert commands.after == commands.before
    assert commands.log_after == commands.log_before
    assert commands.log_before  # the fixture's backfill was recorded: the plan's time comes from it
    before = tree_state(pipeline.repo, pipeline.data)
    plan = plan_backfill(pipeline.store)  # the library, for the numbers
    assert tree_state(pipeline.repo, pipeline.data) == before

    raw = sorted(glob.glob(str(pipeline.data / "raw" / "transactions" / "**" / "*.parquet"), recursive=True))
    raw_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in raw)
    views = {v.name: v for v in aggregate_views(pipeline.store)}
    assert {v.view for v in plan.views} == views.keys()
    con = duckdb.connect()
    for v in plan.views:
        assert v.files == len(raw) and v.rows == raw_rows and v.bytes == sum(os.path.getsize(f) for f in raw)
        assert v.events == raw_rows  # the default range reads every event
        # the default range covers every day partition the backfill wrote: the rows it would write again
        table = con.execute(f"SELECT count(*), min(date), max(date) FROM read_parquet("
                            f"'{views[v.view].offline_path}/*/*.parquet', hive_partitioning = true)").fetchone()
        assert table is not None
        assert v.start.date() <= date.fromisoformat(str(table[1])) and date.fromisoformat(str(table[2])) < v.end.date()
        if v.days_new == 0:
            assert v.output_rows == table[0], (v, table)
        else:  # another module of this session pushed events since the backfill: its days are estimated
            assert v.output_rows >= table[0] and v.days_new <= 2, (v, table)
        assert re.search(r"events/s measured over \d+ earlier backfill", v.seconds_basis), v.seconds_basis
        assert 0 < v.seconds < 60
        line = next(line for line in full.stdout.splitlines() if line.startswith(v.view + " "))
        assert f"{v.output_rows:,}" in line and f"{raw_rows:,}" in line, line
    assert "nothing was run or written" in full.stdout

    # a range before the data: nothing to read, seven days to replace, Spark's documented rate
    assert "backfill plan (spark)" in spark.stdout
    line = next(line for line in spark.stdout.splitlines() if line.startswith("user_transaction_stats "))
    assert "2026-01-01 .. 2026-01-07" in line and " 7 (7) " in line, line
    assert "150 CPU-s per M events" in spark.stdout and "Spark session start-up" in spark.stdout


def test_backup_restored_into_an_empty_repo_plans_no_changes(fresh_repo: tuple[Path, dict[str, str]],
                                                               commands: Commands, redis_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, env = fresh_repo
    backup, copy = commands.backup, commands.copy
    made, restored, again = (commands.results[n] for n in ("backup", "restore", "restore again"))
    assert made.returncode == 0, made.stderr[-3000:]
    sidecar = json.loads(backup.with_name("registry.pb.json").read_text())
    assert sidecar["project"] == "featurepipe_demo" and sidecar["sha256"] == hashlib.sha256(backup.read_bytes()).hexdigest()
    assert sidecar["objects"]["feature_views"] == 3 and sidecar["feast_version"] and sidecar["featurepipe_version"]
    assert f"to {backup}" in made.stdout
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert "restored the registry of project featurepipe_demo (2 entities" in restored.stdout
    assert again.returncode == 2 and "is not empty" in again.stderr and "--force" in again.stderr, again.stderr

    for name in ("FEATUREPIPE_DATA_DIR", "FEATUREPIPE_REPO", "REDIS_URL"):
        monkeypatch.setenv(name, env[name])  # the fresh repo's data, not the session's pipeline's
    plan = feast_cli(copy, redis_url, "plan")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "No changes to registry" in plan.stdout, plan.stdout[-3000:]
    assert "No changes to infrastructure" in plan.stdout, plan.stdout[-3000:]
    assert not any(word in plan.stdout for word in ("Created", "Updated", "Deleted")), plan.stdout[-3000:]


def test_restore_keeps_the_materialised_state_and_refuses_what_does_not_fit(pipeline: Pipeline,
                                                                            tmp_path: Path) -> None:
    default = backup_registry(pipeline.repo)
    assert default.path.parent == pipeline.data / "backups"
    assert re.fullmatch(r"registry-\d{8}T\d{6}Z(-\d+)?\.pb", default.path.name), default.path
    assert default.sidecar.is_file() and json.loads(default.sidecar.read_text())["sha256"] == default.sha256
    backup = backup_registry(pipeline.repo, tmp_path / "registry.pb")
    assert backup.sidecar == tmp_path / "registry.pb.json"
    assert backup.path.read_bytes() == default.path.read_bytes()
    with pytest.raises(InvalidInput, match="already exists"):
        backup_registry(pipeline.repo, backup.path)

    copy = empty_copy(pipeline.repo, tmp_path / "restored")
    try:
        restore_registry(backup.path, copy)
        ours = _definitions(pipeline.repo / "data" / "registry.db")
        assert _definitions(copy / "data" / "registry.db") == ours  # materialisation intervals included
        assert any(fv.meta.materialization_intervals for fv in ours.feature_views)

        # forced over a registry with definitions: the one it replaces is backed up first
        result = restore_registry(backup.path, copy, force=True)
        assert result.replaced is not None and result.replaced.path.is_file()
        assert result.replaced.path.parent == pipeline.data / "backups"

        other = empty_copy(copy, tmp_path / "other")
        yaml = other / "feature_store.yaml"
        yaml.write_text(yaml.read_text().replace("project: featurepipe_demo", "project: someone_else"))
        with pytest.raises(InvalidInput, match="project 'featurepipe_demo'.*'someone_else'"):
            restore_registry(backup.path, other)
        assert not (other / "data").exists()

        backup.path.write_bytes(backup.path.read_bytes()[:-10])
        with pytest.raises(InvalidInput, match="does not match its sidecar"):
            restore_registry(backup.path, copy, force=True)
        backup.sidecar.unlink()
        with pytest.raises(NotFound, match="has no sidecar"):
            restore_registry(backup.path, copy)
    finally:
        for leftover in (default.path, default.sidecar, *(pipeline.data / "backups").glob("registry-*-replaced*")):
            leftover.unlink()


def _definitions(path: Path) -> Registry:
    """A file registry's proto without what every write changes (its version and time)."""
    proto = Registry()
    proto.ParseFromString(path.read_bytes())
    proto.ClearField("version_id")
    proto.ClearField("last_updated")
    return proto
