"""`featurepipe generate`: one data set per folder (replaced whole, or appended to), said
in its output line, and a process that ends cleanly once the data is written."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featurepipe.cli import main
from featurepipe.generate import generate_transactions

END = "2026-01-10"


def _generate(out: Path, *args: str, end: str | None = END) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["generate", "--out", str(out), *(["--end", end] if end else []), *args])
    return result.exit_code, result.output


def _days(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def _table(out: Path) -> pa.Table:
    """Every row a reader of out/**/*.parquet sees."""
    files = sorted(out.rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def _hashes(out: Path) -> dict[str, str]:
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.rglob("*"))
            if f.is_file()}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_second_run_with_fewer_days_replaces_the_whole_data_set(tmp_path: Path) -> None:
    out = tmp_path / "raw" / "transactions"
    code, first = _generate(out, "--rows", "3000", "--days", "6")
    assert code == 0, first
    assert "(a new data set)" in first
    assert _days(out) == [f"date=2026-01-0{d}" for d in range(4, 10)]
    # rows another writer put into the data set (a stream job's raw archive) go with it
    archived = out / "date=2026-01-04" / "stream-job-w0-00000001.parquet"
    pq.write_table(_table(out).slice(0, 10), archived)

    code, second = _generate(out, "--rows", "1000", "--days", "2", "--seed", "9")
    assert code == 0, second
    assert _days(out) == ["date=2026-01-08", "date=2026-01-09"]  # only the second run's days
    assert sorted(f.name for f in out.rglob("*") if f.is_file()) == ["part-0.parquet"] * 2
    table = _table(out)
    assert table.num_rows == 1000
    assert table.column("transaction_id").to_pylist() == list(range(1, 1001))
    assert second.startswith(
        f"replaced {out} (6 days, 3,010 rows (10 of them in 1 file of push/stream)) with 2 days, 1,000 rows: "
        "1,000 transactions"
    ), second
    assert _siblings(out) == []  # no stage folder left behind
    # the same run again writes the same files (deterministic), and says what it replaced
    before = _hashes(out)
    code, third = _generate(out, "--rows", "1000", "--days", "2", "--seed", "9")
    assert code == 0 and _hashes(out) == before
    assert third.startswith(f"replaced {out} (2 days, 1,000 rows) with 2 days, 1,000 rows:"), third


def test_append_adds_the_days_after_the_data_set(tmp_path: Path) -> None:
    out = tmp_path / "transactions"
    assert _generate(out, "--rows", "2000", "--days", "3")[0] == 0
    first = _hashes(out)

    code, output = _generate(out, "--rows", "1000", "--days", "2", "--append", end=None)
    assert code == 0, output
    # without --end the new days follow the last one (2026-01-09)
    assert _days(out) == [f"date=2026-01-{d:02d}" for d in range(7, 12)]
    assert {k: v for k, v in _hashes(out).items() if k in first} == first  # earlier days untouched
    table = _table(out)
    assert table.num_rows == 3000
    ids = table.column("transaction_id").to_pylist()
    assert sorted(ids) == list(range(1, 3001))  # ids continue after the data set's greatest
    assert output.startswith(
        f"added 2 days, 1,000 rows to {out} (3 days, 2,000 rows): now 5 days, 3,000 rows: 1,000 transactions"
    ), output
    new_days = pq.read_table(out / "date=2026-01-11" / "part-0.parquet")
    assert new_days.num_rows > 0 and min(new_days.column("transaction_id").to_pylist()) > 2000
    assert _siblings(out) == []


def test_append_refuses_days_the_data_set_has(tmp_path: Path) -> None:
    out = tmp_path / "transactions"
    assert _generate(out, "--rows", "2000", "--days", "3")[0] == 0
    before = _hashes(out)
    code, output = _generate(out, "--rows", "1000", "--days", "4", "--append")  # 2026-01-06 .. 09 (--end given)
    assert code == 2, output
    assert "already has 3 of the 4 day(s) asked for (2026-01-07 .. 2026-01-09)" in output
    assert "holds 2026-01-07 .. 2026-01-09" in output
    assert _hashes(out) == before and _siblings(out) == []  # nothing written
    # --append on a folder with no data set yet is a plain first run
    code, output = _generate(tmp_path / "fresh", "--rows", "500", "--days", "2", "--append")
    assert code == 0 and "(a new data set)" in output, output


def test_a_folder_holding_more_than_a_data_set_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "models").mkdir()
    code, output = _generate(out, "--rows", "500", "--days", "2")
    assert code == 2, output
    assert "'models/', 'notes.txt'" in output and "stops here rather than delete them" in output
    assert sorted(p.name for p in out.iterdir()) == ["models", "notes.txt"]
    assert _siblings(out) == []


def test_an_interrupted_run_leaves_the_previous_data_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import featurepipe.generate as gen

    out = tmp_path / "transactions"
    generate_transactions(2000, out, days=3, end=date(2026, 1, 10))
    before = _hashes(out)
    real = gen.pq.write_table
    calls = []

    def dies_on_the_second_day(*args: object, **kw: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args, **kw)

    monkeypatch.setattr(gen.pq, "write_table", dies_on_the_second_day)
    with pytest.raises(KeyboardInterrupt):
        generate_transactions(1000, out, days=5, end=date(2026, 1, 10), seed=2)
    assert len(calls) == 2
    monkeypatch.undo()
    assert _hashes(out) == before and _siblings(out) == []
    # a stage folder of a run that was killed (its process is gone) is removed by the next run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".transactions.generate-{int(dead.stdout)}-abcd1234"
    (stale / "date=2026-01-01").mkdir(parents=True)
    summary = generate_transactions(1000, out, days=2, end=date(2026, 1, 10))
    assert summary.previous is not None and summary.previous.rows == 2000 and summary.previous.days == 3
    assert not stale.exists() and _days(out) == ["date=2026-01-08", "date=2026-01-09"]


def test_generate_leaves_no_thread_running_and_exits_cleanly(tmp_path: Path) -> None:
    """The process aborted once at exit ("terminate called without an active exception"):
    Arrow's dataset writer left threads holding the table's NumPy buffers. Now every file is
    written and closed on the calling thread: no native thread is left behind."""
    code = (
        "import os, sys\n"
        "from datetime import date\n"
        "from pathlib import Path\n"
        "from featurepipe.generate import generate_transactions\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        f"generate_transactions(20_000, Path({str(tmp_path / 'a')!r}), days=5, end=date(2026, 1, 10))\n"
        "after = len(os.listdir('/proc/self/task'))\n"
        "print(before, after)\n"
    )
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to count threads")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    before, after = map(int, run.stdout.split())
    assert after == before, f"generate left {after - before} native thread(s) running"
    # the command itself, as a user runs it
    cli = subprocess.run([sys.executable, "-m", "featurepipe.cli", "generate", "--rows", "5000", "--days", "3",
                          "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "terminate called" not in cli.stderr
    assert re.match(rf"wrote 3 days, 5,000 rows to {re.escape(str(tmp_path / 'b'))} \(a new data set\)", cli.stdout)
