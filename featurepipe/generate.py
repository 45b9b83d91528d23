"""Deterministic synthetic card transactions, written as Parquet partitioned by day.

Structure that a fraud model can learn from, and that feature code must survive:
skewed activity (a few users and merchants are very busy), bursts (several purchases
within minutes), night-time activity, merchants that appear during the period, and fraud
episodes: a compromised card makes several large online purchases within an hour or
two, often at night, abroad, at new or risky merchants. Fraud labels arrive with a delay
(chargebacks take days to weeks); labels that have not arrived by the end of the period
are null, as they would be in a real table.

Everything is vectorised NumPy; for a given ``seed`` and ``end`` the output is identical.

**One data set per folder.** A run replaces the output folder as a whole: the new data set
is written to a hidden sibling folder and swapped in when complete (an atomic exchange on
Linux), so an interrupted run leaves the previous data set untouched and days of an earlier
run never linger next to the new ones. ``append=True`` adds days to the data set instead,
through the same swap (the existing files are hard-linked into the new folder, not copied);
it refuses days the data set already has. Either way the summary says what the folder held
before.

**No writer outlives the call.** Each day is written with :func:`pyarrow.parquet.write_table`
on the calling thread. ``pyarrow.dataset.write_dataset`` (used before) can return while its
scanner still holds the NumPy-backed buffers of the table on an Arrow thread; released after
the interpreter started finalising, they abort the process ("terminate called without an
active exception", apache/arrow#36389, #36980) after the output was written.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurepipe.core.process import pid_alive
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
class DatasetStats:
    """What a raw data set folder holds (read from the Parquet footers)."""

    days: int  # date=YYYY-MM-DD partitions holding Parquet files
    rows: int
    files: int
    first_day: date | None
    last_day: date | None
    other_files: int = 0  # Parquet files generate did not write (push, stream archives)
    other_rows: int = 0

    def describe(self) -> str:
        """``30 days, 1,000,000 rows`` (and the rows of other writers, when there are)."""
        text = f"{self.days:,} day{'s' if self.days != 1 else ''}, {self.rows:,} rows"
        if self.other_files:
            files = f"{self.other_files:,} file{'s' if self.other_files != 1 else ''}"
            text += f" ({self.other_rows:,} of them in {files} of push/stream)"
        return text


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
    appended: bool = False  # the rows were added to the data set in ``out``
    previous: DatasetStats | None = None  # what ``out`` held before; None: no data set there
    first_id: int = 1  # transaction ids are first_id .. first_id + rows - 1


def default_end() -> date:
    """Today (UTC): the period ends at the start of today, so features are fresh."""
    return datetime.now(timezone.utc).date()


def _weights(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    w = rng.lognormal(0.0, sigma, n)
    weights: np.ndarray = w / w.sum()
    return weights


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
    append: bool = False,
) -> GenerateSummary:
    """Write ``rows`` synthetic transactions as the data set in ``out`` (``date=YYYY-MM-DD/``).

    The period is the ``days`` days before ``end`` (default: today, UTC). The folder is
    replaced as a whole (see the module's notes); it may hold only day partitions, anything
    else is refused rather than deleted. With ``append`` the days are added to the data set
    in ``out`` instead: by default they follow its last day, days it already has are refused,
    and transaction ids continue after its greatest.
    """
    if rows < 100:
        raise InvalidInput(f"--rows must be at least 100, got {rows}")
    if days < 1:
        raise InvalidInput(f"--days must be at least 1, got {days}")
    out = Path(out)
    if out.is_symlink():  # replace the folder the link points at, keep the link
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} is a file, not a data set folder")
    _remove_stale_siblings(out)
    previous = dataset_stats(out) if out.is_dir() else None
    if previous is not None:
        _check_replaceable(out)
    if previous is not None and previous.files == 0:
        previous = None  # an empty folder (or one of hidden files only): a new data set
    first_id = 1
    if append and previous is not None:
        if end is None and previous.last_day is not None:
            end = previous.last_day + timedelta(days=days + 1)
        end = end or default_end()
        new_days = {end - timedelta(days=i) for i in range(1, days + 1)}
        clash = sorted(new_days & _days(out))
        if clash:
            raise InvalidInput(
                f"--append: {out} already has {len(clash)} of the {days} day(s) asked for "
                f"({clash[0]:%Y-%m-%d}{f' .. {clash[-1]:%Y-%m-%d}' if len(clash) > 1 else ''}); it holds "
                f"{previous.first_day} .. {previous.last_day}. Leave --end out to add the "
                "days after them, or drop --append to replace the data set"
            )
        first_id = _max_transaction_id(out) + 1
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
            "transaction_id": pa.array(np.arange(first_id, first_id + rows, dtype=np.int64)),
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
    with _staged(out, keep_existing=append and previous is not None) as stage:
        write_partitioned(table, stage)
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
        appended=append and previous is not None,
        previous=previous,
        first_id=first_id,
    )


def write_partitioned(table: pa.Table, out: Path) -> None:
    """Write ``table`` under ``out/date=.../part-0.parquet``, one file per day.

    The table must hold a string ``date`` column; it becomes the partition folder (and is
    not stored in the files, as in any hive-partitioned data set). Each file is
    written and closed on this thread before the next one starts: nothing of the write is
    left running when this returns.
    """
    out.mkdir(parents=True, exist_ok=True)
    if table.num_rows == 0:
        return
    day = np.asarray(table.column("date").to_numpy(), dtype=object)
    if len(day) > 1 and (day[1:] < day[:-1]).any():
        order = np.argsort(day, kind="stable")
        table, day = table.take(pa.array(order)), day[order]
    data = table.drop_columns(["date"])
    cuts = [0, *(np.flatnonzero(day[1:] != day[:-1]) + 1).tolist(), len(day)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        folder = out / f"date={day[lo]}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(data.slice(lo, hi - lo), folder / "part-0.parquet", row_group_size=1 << 20)


# ---------------------------------------------------------------- the data set folder

_DAY = re.compile(r"date=(\d{4}-\d{2}-\d{2})")
_GENERATED = re.compile(r"part-\d+\.parquet")
_STAGE = ".generate-"  # .<name>.generate-<pid>-<token>: a data set being written, or the one replaced


def _day_of(folder: Path) -> date | None:
    """The day of a ``date=YYYY-MM-DD`` folder; None for any other name."""
    m = _DAY.fullmatch(folder.name)
    try:
        return date.fromisoformat(m.group(1)) if m else None
    except ValueError:
        return None


def _days(out: Path) -> set[date]:
    return {d for p in out.iterdir()
            if p.is_dir() and (d := _day_of(p)) is not None and any(_parquet_files(p))}


def _parquet_files(folder: Path) -> list[Path]:
    """The Parquet files a reader of ``folder/**/*.parquet`` sees (hidden ones are temp files)."""
    return sorted(f for f in folder.rglob("*.parquet")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def dataset_stats(out: Path) -> DatasetStats:
    """Days, rows and files of the data set in ``out`` (from the Parquet footers only)."""
    rows = files = other_files = other_rows = 0
    for f in _parquet_files(out):
        n = pq.ParquetFile(f).metadata.num_rows
        rows += n
        files += 1
        if not _GENERATED.fullmatch(f.name):
            other_files += 1
            other_rows += n
    days = sorted(_days(out)) if out.is_dir() else []
    return DatasetStats(days=len(days), rows=rows, files=files,
                        first_day=days[0] if days else None, last_day=days[-1] if days else None,
                        other_files=other_files, other_rows=other_rows)


def _check_replaceable(out: Path) -> None:
    """Refuse a folder holding more than a data set: replacing it would delete that too."""
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                     if not (p.is_dir() and _day_of(p) is not None)
                     and not (p.is_file() and (p.suffix == ".parquet" or p.name[:1] in "._")))
    if foreign:
        shown = ", ".join(repr(f) for f in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise InvalidInput(
            f"{out} holds more than a data set's day partitions (date=YYYY-MM-DD/): {shown}. "
            "generate replaces the whole folder, so it stops here rather than delete them; "
            "choose another --out or move them away"
        )


def _max_transaction_id(out: Path) -> int:
    top = 0
    for f in _parquet_files(out):
        ids = pq.read_table(f, columns=["transaction_id"]).column("transaction_id")
        m = pc.max(ids).as_py()
        if m is not None:
            top = max(top, int(m))
    return top


def _remove_stale_siblings(out: Path) -> None:
    """Remove the hidden stage folders of runs that died (their process is gone)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}{_STAGE}*"):
        try:
            pid = int(p.name[len(f".{out.name}{_STAGE}"):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)



class _staged:
    """``with _staged(out) as stage:`` write the new data set to ``stage`` (a hidden sibling
    of ``out``); on success it takes ``out``'s place in one step and the old one is deleted.
    With ``keep_existing`` the stage starts as hard links to all of ``out``'s files (copies
    where links are impossible). On an error the stage is removed and ``out`` is as it was."""

    def __init__(self, out: Path, keep_existing: bool = False) -> None:
        self.out = out
        self.stage = out.parent / f".{out.name}{_STAGE}{os.getpid()}-{secrets.token_hex(4)}"
        self.keep_existing = keep_existing

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage.mkdir()
        try:
            if self.keep_existing:
                for f in sorted(p for p in self.out.rglob("*") if p.is_file()):
                    target = self.stage / f.relative_to(self.out)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(f, target)
                    except OSError:
                        shutil.copy2(f, target)
        except BaseException:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise
        return self.stage

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return
        try:
            _swap(self.stage, self.out)
        except BaseException:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise
        shutil.rmtree(self.stage, ignore_errors=True)  # now the replaced data set, if any


def _swap(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out``; the previous ``out`` (if any) ends up at ``new``."""
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):
        return
    # no atomic exchange here: two renames, putting the old data set back if the second fails
    old = out.parent / f".{out.name}{_STAGE}{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    os.rename(old, new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False when the
    system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
