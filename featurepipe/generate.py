"""Deterministic synthetic card transactions, written as Parquet partitioned by day.

Structure that a fraud model can learn from, and that feature code must survive:
skewed activity (a few users and merchants are very busy), bursts (several purchases
within minutes), night-time activity, merchants that appear during the period, and fraud
episodes: a compromised card makes several large online purchases within an hour or
two, often at night, abroad, at new or risky merchants. Fraud labels arrive with a delay
(chargebacks take days to weeks); labels that have not arrived by the end of the period
are null, as they would be in a real table.

Everything is vectorised NumPy; for a given ``seed`` and ``end`` the output is identical.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from featurepipe.errors import InvalidInput

CATEGORIES = np.array(
    ["grocery", "restaurant", "fuel", "travel", "electronics", "fashion", "pharmacy",
     "entertainment", "utilities", "gaming", "jewelry", "digital_goods"]
)
# categories that fraudsters favour (resellable goods)
RISKY_CATEGORIES = np.array([4, 9, 10, 11])
COUNTRIES = np.array(["US", "GB", "DE", "FR", "ES", "IT", "NL", "PL", "BR", "IN", "NG", "RU"])
COUNTRY_WEIGHTS = np.array([40, 12, 10, 8, 6, 6, 5, 4, 3, 3, 1.5, 1.5])
CHANNELS = np.array(["pos", "online", "contactless", "atm"])

US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND


@dataclass(frozen=True)
class GenerateSummary:
    """What :func:`generate_transactions` wrote."""

    rows: int
    fraud_rows: int
    labelled_rows: int
    users: int
    merchants: int
    days: int
    start: datetime
    end: datetime
    out: Path


def default_end() -> date:
    """Today (UTC): the period ends at the start of today, so features are fresh."""
    return datetime.now(timezone.utc).date()


def _weights(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    w = rng.lognormal(0.0, sigma, n)
    return w / w.sum()


def _time_of_day_us(rng: np.random.Generator, n: int, night: bool) -> np.ndarray:
    """Microseconds into the day: daytime peak for normal activity, 0-5 h for night-time."""
    if night:
        hours = rng.uniform(0.0, 5.0, n)
    else:
        hours = np.clip(rng.normal(14.0, 4.0, n), 0.0, 23.999)
    return (hours * 3600 * US_PER_SECOND).astype(np.int64)


def generate_transactions(
    rows: int,
    out: Path,
    *,
    days: int = 30,
    end: date | None = None,
    seed: int = 7,
    fraud_rate: float = 0.006,
) -> GenerateSummary:
    """Write ``rows`` synthetic transactions under ``out/date=YYYY-MM-DD/``.

    The period is the ``days`` days before ``end`` (default: today, UTC). Existing day
    partitions in ``out`` are replaced.
    """
    if rows < 100:
        raise InvalidInput(f"--rows must be at least 100, got {rows}")
    if days < 1:
        raise InvalidInput(f"--days must be at least 1, got {days}")
    end = end or default_end()
    end_dt = datetime(end.year, end.month, end.day, tzinfo=timezone.utc)
    start_dt = end_dt - timedelta(days=days)
    start_us = int(start_dt.timestamp()) * US_PER_SECOND
    span_us = days * US_PER_DAY
    rng = np.random.default_rng(seed)

    n_users = max(50, rows // 40)
    n_merchants = max(20, rows // 400)
    user_w = _weights(rng, n_users, 1.0)
    merchant_w = _weights(rng, n_merchants, 1.3)
    user_country = rng.choice(len(COUNTRIES), n_users, p=COUNTRY_WEIGHTS / COUNTRY_WEIGHTS.sum())
    user_scale = rng.lognormal(3.3, 0.7, n_users)  # typical spend per user, ~27 on median
    user_online = rng.beta(2, 5, n_users)  # each user's share of online purchases
    merchant_category = rng.integers(0, len(CATEGORIES), n_merchants)
    # 15% of merchants open during the period
    merchant_open_us = np.where(
        rng.random(n_merchants) < 0.15, rng.integers(0, span_us, n_merchants), 0
    ).astype(np.int64)
    risky_merchants = np.flatnonzero(np.isin(merchant_category, RISKY_CATEGORIES))

    n_fraud_target = int(rows * fraud_rate)
    n_episodes = max(1, n_fraud_target // 5)
    episode_len = rng.integers(2, 9, n_episodes)
    n_fraud = int(episode_len.sum())
    n_legit = rows - n_fraud
    n_burst = n_legit // 4
    n_base = n_legit - n_burst

    # --- legitimate activity: base events plus bursts that follow a base event ---
    base_user = rng.choice(n_users, n_base, p=user_w)
    base_day = rng.integers(0, days, n_base).astype(np.int64)
    night = rng.random(n_base) < 0.04
    base_tod = np.where(night, _time_of_day_us(rng, n_base, True), _time_of_day_us(rng, n_base, False))
    base_ts = base_day * US_PER_DAY + base_tod
    parent = rng.integers(0, n_base, n_burst)
    burst_user = base_user[parent]
    burst_ts = base_ts[parent] + rng.exponential(6 * 60 * US_PER_SECOND, n_burst).astype(np.int64) + 1
    legit_user = np.concatenate([base_user, burst_user])
    legit_ts = np.concatenate([base_ts, burst_ts])
    legit_merchant = rng.choice(n_merchants, n_legit, p=merchant_w)
    legit_amount = user_scale[legit_user] * rng.lognormal(0.0, 0.6, n_legit)
    legit_country = np.where(
        rng.random(n_legit) < 0.97, user_country[legit_user],
        rng.integers(0, len(COUNTRIES), n_legit),
    )
    legit_channel = np.where(
        rng.random(n_legit) < user_online[legit_user], 1, rng.choice([0, 2, 3], n_legit, p=[0.6, 0.35, 0.05])
    )

    # --- fraud episodes: a compromised card, several large purchases in a short time ---
    ep_user = rng.choice(n_users, n_episodes, p=user_w)
    ep_start = rng.integers(0, days, n_episodes) * US_PER_DAY + np.where(
        rng.random(n_episodes) < 0.55,
        _time_of_day_us(rng, n_episodes, True),
        _time_of_day_us(rng, n_episodes, False),
    )
    ep_idx = np.repeat(np.arange(n_episodes), episode_len)
    fraud_user = ep_user[ep_idx]
    fraud_ts = ep_start[ep_idx] + rng.integers(0, 2 * 3600 * US_PER_SECOND, n_fraud)
    use_risky = (rng.random(n_fraud) < 0.6) & (risky_merchants.size > 0)
    fraud_merchant = np.where(
        use_risky,
        risky_merchants[rng.integers(0, max(1, risky_merchants.size), n_fraud)] if risky_merchants.size else 0,
        rng.choice(n_merchants, n_fraud, p=merchant_w),
    )
    fraud_amount = user_scale[fraud_user] * rng.lognormal(1.4, 0.7, n_fraud)
    fraud_country = np.where(
        rng.random(n_fraud) < 0.55, rng.integers(0, len(COUNTRIES), n_fraud), user_country[fraud_user]
    )
    fraud_channel = np.where(rng.random(n_fraud) < 0.8, 1, 0)

    user_id = np.concatenate([legit_user, fraud_user]).astype(np.int64) + 1
    merchant_idx = np.concatenate([legit_merchant, fraud_merchant]).astype(np.int64)
    ts = np.concatenate([legit_ts, fraud_ts]).astype(np.int64)
    # a merchant that opens during the period takes no purchases before it opens
    ts = np.maximum(ts, merchant_open_us[merchant_idx] + (ts % US_PER_SECOND))
    ts = ts % span_us  # bursts past the end wrap to the start instead of piling up
    amount = np.round(np.concatenate([legit_amount, fraud_amount]), 2)
    country = np.concatenate([legit_country, fraud_country])
    channel = np.concatenate([legit_channel, fraud_channel])
    is_fraud = np.concatenate([np.zeros(n_legit, np.int8), np.ones(n_fraud, np.int8)])
    # label delay: chargebacks take 1-30 days; legitimate transactions are confirmed
    # when the statement closes (3-10 days)
    delay = np.where(
        is_fraud == 1,
        rng.uniform(1, 30, rows) * US_PER_DAY,
        rng.uniform(3, 10, rows) * US_PER_DAY,
    ).astype(np.int64)
    label_ts = ts + delay
    label_known = label_ts < span_us

    order = np.lexsort((user_id, ts))
    ts_abs = ts[order] + start_us
    label_abs = label_ts[order] + start_us
    known = label_known[order]
    table = pa.table(
        {
            "transaction_id": pa.array(np.arange(1, rows + 1, dtype=np.int64)),
            "user_id": pa.array(user_id[order]),
            "merchant_id": pa.array(merchant_idx[order] + 1),
            "amount": pa.array(amount[order]),
            "category": pa.array(CATEGORIES[merchant_category[merchant_idx[order]]]),
            "country": pa.array(COUNTRIES[country[order]]),
            "channel": pa.array(CHANNELS[channel[order]]),
            "event_timestamp": pa.array(ts_abs, pa.timestamp("us", tz="UTC")),
            "is_fraud": pa.array(is_fraud[order].astype(np.int64), mask=~known),
            "label_timestamp": pa.array(label_abs, pa.timestamp("us", tz="UTC"), mask=~known),
            "date": pa.array(
                (ts_abs // US_PER_DAY).astype("datetime64[D]").astype(str)
            ),
        }
    )
    write_partitioned(table, out)
    return GenerateSummary(
        rows=rows,
        fraud_rows=n_fraud,
        labelled_rows=int(known.sum()),
        users=n_users,
        merchants=n_merchants,
        days=days,
        start=start_dt,
        end=end_dt,
        out=out,
    )


def write_partitioned(table: pa.Table, out: Path) -> None:
    """Write ``table`` under ``out/date=.../part-0.parquet``, replacing those partitions.

    The table must hold a string ``date`` column; it becomes the partition folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    for day in set(table.column("date").to_pylist()):
        shutil.rmtree(out / f"date={day}", ignore_errors=True)
    ds.write_dataset(
        table,
        out,
        format="parquet",
        partitioning=ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive"),
        basename_template="part-{i}.parquet",
        existing_data_behavior="overwrite_or_ignore",
        max_rows_per_file=0,
        max_rows_per_group=1 << 20,
        use_threads=False,
    )
