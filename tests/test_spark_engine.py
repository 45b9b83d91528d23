"""One contract suite, two engines: the Spark backfill gives DuckDB's values, to the bit.

The views of the demo repo on generated data, and an adversarial view over a table built to
break a careless port (ties at one instant, events exactly on window and hop boundaries,
null values, refunds, -0.0, sums above 2^53 / 1e9, a compound key, empty days, a window
without a window), are backfilled by both engines; the tables must hold equal Arrow values
per (keys, time), in the same files. A partial rerun on Spark gives the rows of a full run
in its range. One Spark session for the whole test run (the ``spark`` fixture).
"""

from __future__ import annotations

import dataclasses
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurepipe.batch import backfill as duckdb_engine
from featurepipe.batch import spark as spark_engine
from featurepipe.core.windows import KERNEL_METADATA_KEY, KERNEL_VERSION
from featurepipe.definitions import AggregateSpec, AggregateView, aggregate_views

H, D = timedelta(hours=1), timedelta(days=1)
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)  # a day, hop and window boundary


def adversarial_events(seed: int = 3) -> pa.Table:
    """Events of a compound key (user_id, merchant) meant to break a port of the kernel."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []

    def add(user: int, merchant: str, at: datetime, amount: float | None) -> None:
        rows.append({"user_id": user, "merchant": merchant, "ts": at, "amount": amount})

    # keys (1, "23") and (12, "3") would collide if keys were concatenated without a separator
    for user, merchant in ((1, "23"), (12, "3"), (7, "a")):
        add(user, merchant, T0, 10.0)                      # exactly on a day, hour and 5-minute boundary
        add(user, merchant, T0, 2.5)                       # a tie at the same instant
        add(user, merchant, T0, None)                      # a null value in the tie
        add(user, merchant, T0 + H, -12.5)                 # a refund exactly one window later
        add(user, merchant, T0 + H + timedelta(microseconds=1), 0.0)
        add(user, merchant, T0 + 5 * timedelta(minutes=1), -0.0)  # on a hop boundary; -0.0 vs 0.0
        add(user, merchant, T0 + D, 0.01)                  # exactly one 24h window later
        add(user, merchant, T0 + 7 * D, 99.99)             # after empty days, exactly 7d later
    # big amounts: sums above 2^53 / 1e9 (exact decimals must not round). Amounts have 2 decimals,
# as money does, and each is below 2^53 / 1e9: a double with more than 9 decimals, or above
# that, is rounded to DECIMAL(38, 9) differently by the two engines (the kernel's module doc)
    for i in range(40):
        add(3, "big", T0 + i * timedelta(minutes=7), round(4_999_999.99 - i * 0.01, 2))
    # a random tail: many keys, ties, nulls, refunds, across 12 days with a gap
    n = 3_000
    offsets = rng.integers(0, 12 * 24 * 12, size=n) * 5 * 60 * 1_000_000  # on 5-minute hop boundaries
    offsets += rng.choice([0, 0, 1, 299_999_999], size=n)  # and just after / just before them
    for k in range(n):
        at = T0 + timedelta(microseconds=int(offsets[k]))
        if timedelta(days=4) <= at - T0 < timedelta(days=6):
            continue  # two empty days
        amount = None if k % 17 == 0 else round(float(rng.normal(40, 60)), 2)
        add(int(rng.integers(100, 140)), str(rng.integers(0, 3)), at, amount)
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("user_id", pa.int64()), ("merchant", pa.string()), ("ts", pa.timestamp("us", tz="UTC")),
        ("amount", pa.float64()),
    ]))


AGGREGATIONS = (
    AggregateSpec("n_1h", "count", "amount", H),
    AggregateSpec("sum_1h", "sum", "amount", H),
    AggregateSpec("mean_24h", "mean", "amount", 24 * H),
    AggregateSpec("min_24h", "min", "amount", 24 * H),
    AggregateSpec("max_7d", "max", "amount", 7 * D),
    AggregateSpec("sum_30d", "sum", "amount", 30 * D),
    AggregateSpec("n_all", "count", "amount", None),
    AggregateSpec("mean_all", "mean", "amount", None),
    AggregateSpec("last_ts", "last", "ts", None),
)


def write_days(table: pa.Table, folder: Path) -> None:
    """The events as raw Parquet partitioned by day (date=YYYY-MM-DD/part-0.parquet)."""
    days = pa.compute.strftime(table["ts"], "%Y-%m-%d")
    for day in sorted(set(days.to_pylist())):
        part = folder / f"date={day}"
        part.mkdir(parents=True)
        pq.write_table(table.filter(pa.compute.equal(days, day)), part / "part-0.parquet")


def sorted_table(path: Path, keys: list[str]) -> pa.Table:
    table = pq.read_table(path, partitioning=None)
    return table.sort_by([(k, "ascending") for k in [*keys, "event_timestamp"]])


def assert_same_tables(duck: Path, spark: Path, keys: list[str]) -> int:
    """Both engines wrote the same files, holding equal Arrow values per (keys, time)."""
    files = sorted(str(p.relative_to(duck)) for p in duck.glob("date=*/*.parquet"))
    assert files and files == sorted(str(p.relative_to(spark)) for p in spark.glob("date=*/*.parquet"))
    for f in spark.glob("date=*/*.parquet"):
        assert pq.read_metadata(f).metadata[KERNEL_METADATA_KEY.encode()] == str(KERNEL_VERSION).encode()
    a, b = sorted_table(duck, keys), sorted_table(spark, keys)
    b = b.select(a.column_names)
    assert a.schema.types == b.schema.types  # (Spark also marks some columns not null)
    for name in a.column_names:
        left, right = a[name].combine_chunks(), b[name].combine_chunks()
        if pa.types.is_floating(left.type):  # bit for bit: -0.0 is not 0.0, NaN is NaN
            left, right = (pa.compute.cast(c, pa.float64()).to_numpy(zero_copy_only=False) for c in (left, right))
            assert np.array_equal(left.view(np.int64), right.view(np.int64)), name
        else:
            assert left.equals(right), name
    return a.num_rows


@pytest.fixture(scope="module")
def adversarial(tmp_path_factory: pytest.TempPathFactory) -> AggregateView:
    base = tmp_path_factory.mktemp("adversarial")
    write_days(adversarial_events(), base / "raw")
    return AggregateView(
        name="adversarial", join_keys=("user_id", "merchant"), input_path=str(base / "raw" / "**" / "*.parquet"),
        timestamp_field="ts", aggregations=AGGREGATIONS, offline_path=base / "duckdb" / "adversarial",
        push_source="", ttl=None,
    )


def test_adversarial_table_equal_on_both_engines(adversarial: AggregateView, spark: Any) -> None:
    on_spark = dataclasses.replace(adversarial, offline_path=adversarial.offline_path.parent.parent / "spark" / "x")
    duck = duckdb_engine.backfill_view(adversarial)
    ours = spark_engine.backfill_view(on_spark, spark=spark)
    assert (ours.rows, ours.entities, ours.published) == (duck.rows, duck.entities, duck.published)
    rows = assert_same_tables(adversarial.offline_path, on_spark.offline_path, ["user_id", "merchant"])
    assert rows == duck.rows > 5_000
    # the adversarial parts were there: a sum above 2^53 / 1e9, a refund, -0.0 met by min
    table = sorted_table(on_spark.offline_path, ["user_id", "merchant"])
    assert pa.compute.max(table["sum_30d"]).as_py() > 2**53 / 1e9
    assert pa.compute.min(table["sum_1h"]).as_py() < 0

    # a partial rerun on Spark gives the full run's rows in its range, and leaves the rest
    partial = dataclasses.replace(on_spark, offline_path=on_spark.offline_path.parent / "partial")
    shutil.copytree(on_spark.offline_path, partial.offline_path)  # a full run's table
    start, end = T0 + 3 * D, T0 + 8 * D
    rerun = spark_engine.backfill_view(partial, start, end, spark=spark)
    assert rerun.published == tuple(f"date={(start + i * D):%Y-%m-%d}" for i in range(5))
    assert_same_tables(on_spark.offline_path, partial.offline_path, ["user_id", "merchant"])


def test_demo_views_equal_on_both_engines(pipeline: Any, spark: Any, tmp_path: Path) -> None:
    views = aggregate_views(pipeline.store)
    assert len(views) >= 3
    for view in views:
        duck = dataclasses.replace(view, offline_path=tmp_path / "duckdb" / view.name)
        on_spark = dataclasses.replace(view, offline_path=tmp_path / "spark" / view.name)
        expected = duckdb_engine.backfill_view(duck)
        got = spark_engine.backfill_view(on_spark, spark=spark)
        assert (got.rows, got.entities, got.published) == (expected.rows, expected.entities, expected.published)
        assert assert_same_tables(duck.offline_path, on_spark.offline_path, list(view.join_keys)) == expected.rows
