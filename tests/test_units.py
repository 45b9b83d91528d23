"""Fast checks of pieces that need no services."""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path

import pytest
from click.testing import CliRunner

from featurepipe.cli import main
from featurepipe.config import redis_url_to_feast
from featurepipe.errors import InvalidInput
from featurepipe.generate import generate_transactions


def test_redis_url_conversion() -> None:
    assert redis_url_to_feast("redis://127.0.0.1:6380/2") == "127.0.0.1:6380,db=2"
    assert redis_url_to_feast("rediss://:pw@h:1/0") == "h:1,db=0,password=pw,ssl=true"
    with pytest.raises(InvalidInput, match="not a Redis URL"):
        redis_url_to_feast("http://x")


def _files(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.parquet"))}


def test_generate_is_deterministic_and_partitioned(tmp_path: Path) -> None:
    a = generate_transactions(5_000, tmp_path / "a", days=5, end=date(2026, 1, 10), seed=3)
    generate_transactions(5_000, tmp_path / "b", days=5, end=date(2026, 1, 10), seed=3)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f"date=2026-01-0{d}" for d in range(5, 10)]
    assert a.fraud_rows > 0 and a.labelled_rows < a.rows


def test_cli_help_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "materialize" in result.output
    result = runner.invoke(main, ["backfill", "--repo", str(tmp_path)])
    assert result.exit_code == 2 and "feature_store.yaml" in result.output
