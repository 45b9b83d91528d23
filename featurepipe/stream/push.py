"""Push new transactions: raw log + recomputed aggregates online.

New events are appended to the raw Parquet (their own file in the day partition, so the
next backfill includes them), then every aggregate view fed by that source is recomputed
for the affected entities with the very SQL the backfill uses (generated from the same
declaration), over the events in the view's longest window, and the new rows are written
to Redis through the view's ``PushSource`` (Feast's writer: older values never overwrite
newer ones). The full streaming engine (issue 6) replaces the recompute with
incremental state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from featurepipe.batch.backfill import source_columns
from featurepipe.batch.sql import aggregate_sql
from featurepipe.config import find_repo, source_path
from featurepipe.core.db import connect, one_row
from featurepipe.core.sql import quote
from featurepipe.definitions import aggregate_views
from featurepipe.errors import InvalidInput
from featurepipe.quality.contracts import load_contracts
from featurepipe.stream.history import check_raw_history, unreadable_history

if TYPE_CHECKING:
    from feast import FeatureStore

REQUIRED = {"transaction_id", "user_id", "merchant_id", "amount", "event_timestamp"}


@dataclass(frozen=True)
class PushResult:
    events: int
    rows_by_view: dict[str, int]
    raw_file: Path


def _raw_root(input_path: str) -> Path:
    return Path(input_path.split("/**")[0])


def push_events(store: FeatureStore, events: pa.Table, source: str) -> PushResult:
    """Append ``events`` to the raw source and push the recomputed features online."""
    from feast.data_source import PushMode

    missing = REQUIRED - set(events.column_names)
    if missing:
        raise InvalidInput(f"events lack column(s) {sorted(missing)}; expected at least {sorted(REQUIRED)}")
    if events.num_rows == 0:
        raise InvalidInput("no events to push")
    ts = events.column("event_timestamp").cast(pa.timestamp("us", tz="UTC"))
    events = events.set_column(events.schema.get_field_index("event_timestamp"), "event_timestamp", ts)
    views = [v for v in aggregate_views(store) if v.timestamp_field == "event_timestamp"
             and source_path(store, source) == v.input_path]
    if not views:
        raise InvalidInput(f"no aggregate view reads source {source!r}")
    raw_root = _raw_root(views[0].input_path)
    con = connect()
    # each raw file's own schema first: the recompute below reads them all, after the append
    contracts = load_contracts(find_repo(store.repo_path))
    check_raw_history(con, views[0].input_path, source, contracts, who="push", then="push again")
    con.register("__new_events", events)
    # conform to the raw schema (label columns stay null: labels arrive later)
    raw_cols = source_columns(con, views[0].input_path).types
    select = ", ".join(
        f"CAST({quote(c)} AS {t}) AS {quote(c)}" if c in events.column_names else f"CAST(NULL AS {t}) AS {quote(c)}"
        for c, t in raw_cols.items() if c != "date"
    )
    conformed = con.sql(f"SELECT {select} FROM __new_events").to_arrow_table()
    con.register("__conformed", conformed)
    digest = hashlib.sha1(str(conformed.column("transaction_id").to_pylist()).encode()).hexdigest()[:12]
    days = sorted(set(con.execute("SELECT DISTINCT strftime(event_timestamp, '%Y-%m-%d') FROM __new_events").fetchall()))
    raw_file = raw_root
    written: list[Path] = []  # new files, then new day folders: undone if the recompute cannot read
    for (day,) in days:
        part = con.sql(
            f"SELECT * FROM __conformed WHERE strftime(event_timestamp, '%Y-%m-%d') = '{day}'"
        ).to_arrow_table()
        if not (raw_root / f"date={day}").exists():
            (raw_root / f"date={day}").mkdir(parents=True)
            written.append(raw_root / f"date={day}")
        raw_file = raw_root / f"date={day}" / f"push-{digest}.parquet"
        if not raw_file.exists():
            written.insert(0, raw_file)
        pq.write_table(part, raw_file)
    lo, hi = one_row(con, "SELECT min(event_timestamp), max(event_timestamp) FROM __new_events")
    computed = []  # every view's rows before any is pushed: a failed read leaves Redis as it was
    try:
        for view in views:
            columns = source_columns(con, view.input_path)
            sql = aggregate_sql(view, columns, lo, hi + timedelta(microseconds=1))
            keys = ", ".join(quote(k) for k in view.join_keys)
            computed.append((view, con.execute(
                f"SELECT * FROM ({sql}) WHERE ({keys}) IN (SELECT ({keys}) FROM __new_events)"
            ).df()))
    except duckdb.ConversionException as exc:  # a retyped file the check let through (schema_severity: warn)
        for path in written:
            try:
                path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
            except OSError:  # a day folder something else wrote into meanwhile: kept
                pass
        raise unreadable_history(con, views[0].input_path, source, contracts, exc, who="push", then="push again",
                                 done="The events were not appended and nothing was pushed online") from exc
    rows_by_view: dict[str, int] = {}
    for view, rows in computed:
        rows_by_view[view.name] = len(rows)
        if len(rows):
            store.push(view.push_source, rows, to=PushMode.ONLINE)
    con.close()
    return PushResult(events=events.num_rows, rows_by_view=rows_by_view, raw_file=raw_file)
