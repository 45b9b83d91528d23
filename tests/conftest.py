"""Shared fixtures: a real redis-server on an ephemeral loopback port and a real Feast repo.

``pipeline`` copies ``feature_repo/`` into a temporary folder, generates a small data set,
runs the real ``feast apply`` CLI there, backfills with featurepipe and materialises into
Redis: the demo repo is the test repo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from featurepipe.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
SOURCE_REPO = ROOT / "feature_repo"
ROWS, DAYS = 30_000, 12
# 3% fraud (the demo's 0.6% leaves this fixture 5 labelled frauds in the model's holdout and none
# in its validation split, too few for any model assertion to mean something: ROC AUC 0.38
# with request-time windows, 0.98 before, both noise; at 3%, 37 in the holdout)
FRAUD_RATE = 0.03


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set, else a private redis-server stopped at the end of the session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with RedisServer() as server:
        yield server.url


@dataclass
class Pipeline:
    repo: Path
    data: Path
    store: Any
    env: dict[str, str]
    plan_after_apply: subprocess.CompletedProcess[str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the featurepipe CLI on this repo."""
        return subprocess.run(
            [sys.executable, "-m", "featurepipe.cli", *args, "--repo", str(self.repo)]
            if args and args[0] != "feast" else
            [sys.executable, "-m", "featurepipe.cli", "feast", "--repo", str(self.repo), *args[1:]],
            env=self.env, capture_output=True, text=True, timeout=300,
        )

    def run_many(self, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        """Several read-only featurepipe commands on this repo, one after another in one
        process (each process pays Feast's import): a result of its own for each."""
        from tests.cli_batch import run_commands

        return run_commands([(*args, "--repo", str(self.repo)) for args in commands], env=self.env)


@contextmanager
def deployed_repo(base: Path, redis_url: str, rows: int, days: int, seed: int = 7,
                  fraud_rate: float = 0.006) -> Iterator[tuple[Path, Path]]:
    """A copy of feature_repo under ``base`` with ``rows`` generated transactions and the
    real ``feast apply`` run on it; ``REDIS_URL``, ``FEATUREPIPE_DATA_DIR`` and
    ``FEATUREPIPE_REPO`` point at it until the block ends. Yields (repo, data)."""
    from featurepipe.generate import generate_transactions

    repo, data = base / "feature_repo", base / "data"
    shutil.copytree(SOURCE_REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    saved = {k: os.environ.get(k) for k in ("REDIS_URL", "FEATUREPIPE_DATA_DIR", "FEATUREPIPE_REPO")}
    os.environ.update(REDIS_URL=redis_url, FEATUREPIPE_DATA_DIR=str(data), FEATUREPIPE_REPO=str(repo))
    try:
        generate_transactions(rows, data / "raw" / "transactions", days=days, seed=seed, fraud_rate=fraud_rate)
        applied = feast_cli(repo, redis_url, "apply")
        assert applied.returncode == 0, applied.stderr[-3000:]
        yield repo, data
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def feast_cli(repo: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``feast`` CLI on ``repo``, with the online store at ``redis_url``."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "feast"), "--chdir", str(repo), *args],
        env={**os.environ, "FEATUREPIPE_REDIS": redis_url_feast(redis_url)},
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Pipeline]:
    """generate -> feast apply -> backfill -> materialize, on a temporary copy of feature_repo."""
    from featurepipe.config import load_store
    from featurepipe.jobs.backfill import backfill
    from featurepipe.jobs.materialize import materialize

    with deployed_repo(tmp_path_factory.mktemp("pipeline"), redis_url, ROWS, DAYS, fraud_rate=FRAUD_RATE) as (repo, data):
        # before materialisation: Feast counts recorded materialisation intervals as changes
        plan = feast_cli(repo, redis_url, "plan")
        store = load_store(repo)
        backfill(store, progress=False)
        materialize(store)
        yield Pipeline(repo=repo, data=data, store=store, env=os.environ.copy(), plan_after_apply=plan)


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """One Spark session for the whole run (``local[2]``, driver on 127.0.0.1, UI off):
    starting one takes about 10 s here, so every Spark test shares it and batches its cases."""
    from featurepipe.core.spark import spark_session, stop_session

    session = spark_session(master="local[2]", overrides={"spark.sql.shuffle.partitions": "4"})
    yield session
    stop_session()


def redis_url_feast(url: str) -> str:
    from featurepipe.config import redis_url_to_feast

    return redis_url_to_feast(url)


# Fixtures that start a server or run `feast apply` (directly or through another fixture): a
# test that uses none of them and is marked neither slow nor integration is in the fast tier.
SERVICE_FIXTURES = frozenset({"redis_url", "private_redis", "kafka_bootstrap", "repo", "deployed", "spark"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test ``fast`` that needs no server and is not ``slow`` or ``integration``
    (SQLMesh's habit: the quick tier is what is left, so a new test lands in a tier without
    thinking; `make test-fast` runs it)."""
    spark_modules = {item.nodeid.split("::", 1)[0] for item in items if "spark" in getattr(item, "fixturenames", ())}
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if not uses & SERVICE_FIXTURES and not any(item.get_closest_marker(m) for m in ("slow", "integration")):
            item.add_marker(pytest.mark.fast)
        # `make test` runs two pytest-xdist workers with --dist loadgroup: a module's tests stay
        # on one worker (its module fixtures are built once), and every Spark test on one (one
        # JVM, one session, as in a serial run)
        module = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group("spark" if module in spark_modules else module))
