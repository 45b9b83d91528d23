"""Push new transactions: raw log + recomputed windows online.

New events are appended to the raw Parquet (their own file in the day partition, so the
next backfill includes them), then, for every aggregate view fed by that source and every
key the events touch, its schedule is recomputed with the kernel's SQL
(:func:`featurepipe.core.windows.schedule_sql`, from the raw events back to the view's
horizon) and written online as the stream engine writes it
(:mod:`featurepipe.stream.online_rows`): the row at the key's newest event + 1 us into
Feast's fields, it and every later change (each window's drops still to come) into the
key's window schedule, in one atomic write per key where an older write never overwrites
a newer one. The server then serves the row in force at the request's clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from featurepipe.batch.backfill import source_columns
from featurepipe.config import find_repo, online_target, source_path
from featurepipe.core.db import connect
from featurepipe.core.sql import literal, quote
from featurepipe.core.windows import history, micros
from featurepipe.definitions import AggregateView, aggregate_views, shape
from featurepipe.errors import InvalidInput
from featurepipe.online.cluster_writer import open_hash_writer
from featurepipe.online.layout import feature_field, timestamp_field
from featurepipe.online.plan import view_plan
from featurepipe.online.schedule import schedule_field
from featurepipe.quality.contracts import load_contracts
from featurepipe.stream.history import check_raw_history, unreadable_history
from featurepipe.stream.online_rows import POSITION, online_batches, schedule_rows

if TYPE_CHECKING:
    from feast import FeatureStore

REQUIRED = {"transaction_id", "user_id", "merchant_id", "amount", "event_timestamp"}


@dataclass(frozen=True)
class PushResult:
    """What a push did: the events appended, per view the keys written online, the last raw file."""

    events: int
    rows_by_view: dict[str, int]
    raw_file: Path


def _raw_root(input_path: str) -> Path:
    return Path(input_path.split("/**")[0])


def touched_rows(con: duckdb.DuckDBPyConnection, view: AggregateView, events: str) -> pa.Table:
    """For every key of ``view`` in the relation ``events`` (already in the raw files), its
    schedule as the stream engine writes it (:func:`~featurepipe.core.windows.schedule_sql`
    over the key's events of its last horizon): keys, the group, ``event_timestamp``, the
    features, ``v`` in microseconds and the row's place among its key's (0: the row at its
    newest event), sorted by key, group, then ``v``."""
    columns = source_columns(con, view.input_path)
    columns.require(view)
    keys = ", ".join(quote(k) for k in view.join_keys)
    ts = quote(view.timestamp_field)
    raw = f"read_parquet({literal(view.input_path)}, hive_partitioning = true, union_by_name = true)"
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE __in_force AS SELECT {keys}, epoch_us(max({ts})) AS __newest FROM {raw} "
        f"WHERE ({keys}) IN (SELECT ({keys}) FROM {events}) AND {ts} IS NOT NULL GROUP BY {keys}"
    )
    # each key's events its schedule depends on (all of them when an aggregate without a
    # window is not ``last``)
    back = history(view.aggregations)
    reach = "" if back is None else f" AND epoch_us(r.{ts}) >= h.__newest - {micros(back)}"
    needed = dict.fromkeys([*view.join_keys, view.timestamp_field, *(a.column for a in view.aggregations)])
    on = " AND ".join(f"r.{quote(k)} = h.{quote(k)}" for k in view.join_keys)
    con.execute(f"CREATE OR REPLACE TEMP TABLE __touched_events AS SELECT {', '.join(f'r.{quote(c)}' for c in needed)} "
                f"FROM {raw} r JOIN __in_force h ON {on} WHERE r.{ts} IS NOT NULL{reach}")
    return schedule_rows(con, shape(view, {c: columns.types[c] for c in needed}), "__touched_events")


def push_events(store: FeatureStore, events: pa.Table, source: str) -> PushResult:
    """Append ``events`` to the raw source and write the touched keys' windows online."""
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
    computed = []  # every view's rows before any is written: a failed read leaves Redis as it was
    try:
        for view in views:
            computed.append((view, touched_rows(con, view, "__new_events")))
    except duckdb.ConversionException as exc:  # a retyped file the check let through (schema_severity: warn)
        for path in written:
            try:
                path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
            except OSError:  # a day folder something else wrote into meanwhile: kept
                pass
        raise unreadable_history(con, views[0].input_path, source, contracts, exc, who="push", then="push again",
                                 done="The events were not appended and nothing was pushed online") from exc
    con.close()
    rows_by_view: dict[str, int] = {}
    client = online_target(store.config).client()
    try:
        for view, rows in computed:
            rows_by_view[view.name] = int(sum(p == 0 for p in rows.column(POSITION).to_pylist()))
            if rows.num_rows:
                plan = view_plan(store.get_feature_view(view.name), store.config, store.project)
                fields = [*(feature_field(plan.view, f.name) for f in plan.features), schedule_field(plan.view)]
                with open_hash_writer(client, timestamp_field(plan.view), fields, ttl_seconds=plan.key_ttl_seconds,
                                replace_equal=True) as writer:
                    for batch in online_batches(rows, plan):
                        writer.write(batch)
    finally:
        client.close()
    return PushResult(events=events.num_rows, rows_by_view=rows_by_view, raw_file=raw_file)
