"""A stream worker's keyed window state, in DuckDB tables.

Per view, table ``state_<i>`` holds the events of the keys this worker owns back to the
watermark minus the view's horizon (:func:`featurepipe.core.windows.horizon`: the longest
window plus its hop; the columns the view's aggregates read). Every row the job writes,
online and offline, is computed from it with the kernel's SQL
(:func:`featurepipe.core.windows.change_point_sql`, the very SQL the batch backfill
runs, and :func:`~featurepipe.core.windows.schedule_sql`, its rows from each key's newest
event on), so stream and batch agree to the bit. Table ``seen`` holds the contract's unique
columns of the events accepted since the watermark, against which resent events are told
apart.

For a checkpoint the tables are copied in memory (``ck_*``), then pruned to what the
advanced watermark still needs; a background thread writes the copies to a snapshot
folder while micro-batches go on. A restart loads the newest snapshot; a new job may
bootstrap its state from the source's Parquet history instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from featurepipe.batch.sql import aggregate_sql
from featurepipe.core.db import configure
from featurepipe.core.sql import literal, quote
from featurepipe.stream.admission import Condition
from featurepipe.stream.online_rows import schedule_rows
from featurepipe.stream.spec import StreamView
from featurepipe.stream.watermark import NEG_INF, POS_INF, from_us, to_us, ts_sql

_EVENTS = "__events"  # the micro-batch's accepted events, while a view is updated
_KEYS = "__keys"  # the micro-batch's events, while the seen set is asked about them
_TOUCHED = "__touched"  # the state's events of the keys a micro-batch touched, while they are computed


class WindowState:
    """The state tables of one worker (``worker`` of ``workers``) on connection ``con``, or of
    one partition of a keyed topic; ``prefix`` tells the tables of several states apart."""

    def __init__(self, con: duckdb.DuckDBPyConnection, views: Sequence[StreamView], types: dict[str, str],
                 timestamp: str, unique: Sequence[str], worker: int = 0, workers: int = 1, prefix: str = "") -> None:
        self.con = con
        self.views = list(views)
        # one cursor per view, so that views update side by side (DuckDB runs each on its
        # caller's thread without the GIL); temp tables and registered events are a cursor's own
        self.cursors = [con.cursor() for _ in self.views]
        for cur in self.cursors:
            configure(cur)
        self.timestamp = timestamp
        self.unique = tuple(unique)
        self.worker, self.workers = worker, workers
        self.tables = [f"{prefix}state_{i}" for i in range(len(self.views))]
        self.seen = f"{prefix}seen"
        self._keys_sql = [", ".join(quote(k) for k in v.spec.join_keys) for v in self.views]
        for table, v in zip(self.tables, self.views):
            con.execute(f"CREATE TABLE {table} ({', '.join(f'{quote(c)} {types[c]}' for c in v.needed)})")
        if self.unique:
            cols = ", ".join(f"{quote(c)} {types[c]}" for c in self.unique)
            con.execute(f"CREATE TABLE {self.seen} ({cols}, __ts TIMESTAMPTZ)")

    def owned(self, i: int) -> str:
        """SQL condition: the row's key of view ``i`` belongs to this worker."""
        if self.workers == 1:
            return "TRUE"
        return f"hash({self._keys_sql[i]}) % {self.workers} = {self.worker}"

    # ------------------------------------------------------------ a micro-batch

    def update(self, i: int, events: pa.Table) -> pa.Table | None:
        """Add the events of owned keys to view ``i``'s state; return, for each key they
        touched, its schedule (:func:`~featurepipe.core.windows.schedule_sql`: the row at
        its newest event + 1 us, then each window's later change points): keys, the group,
        ``event_timestamp``, the features, ``v`` in microseconds (``__event_us``) and the
        row's place among its key's (``__j``, 0: the row at the newest event), sorted by
        key, group, then ``v``. None when no key of this worker was touched. Views may be
        updated at once from different threads (each on its own cursor)."""
        con, v = self.cursors[i], self.views[i]
        spec, table = v.spec, self.tables[i]
        keys = self._keys_sql[i]
        con.register(_EVENTS, events)
        try:
            cols = ", ".join(quote(c) for c in v.needed)
            con.execute(f"INSERT INTO {table} SELECT {cols} FROM {_EVENTS} WHERE {self.owned(i)}")
            join = " AND ".join(f"s.{quote(k)} = a.{quote(k)}" for k in spec.join_keys)
            con.execute(f"CREATE OR REPLACE TEMP TABLE {_TOUCHED} AS SELECT s.* FROM {table} s SEMI JOIN "
                        f"(SELECT DISTINCT {keys} FROM {_EVENTS} WHERE {self.owned(i)}) a ON {join}")
        finally:
            con.unregister(_EVENTS)
        table = schedule_rows(con, v.shape, _TOUCHED)
        return table if table.num_rows else None

    def final_rows_sql(self, i: int, lo: int, hi: int) -> str:
        """SELECT of view ``i``'s change-point rows with ``v`` in ``[lo, hi)`` (microseconds,
        :data:`NEG_INF` / :data:`POS_INF` for no bound) from the frozen state: the batch
        backfill's own SQL for that range (:func:`featurepipe.batch.sql.aggregate_sql`)."""
        v = self.views[i]
        return aggregate_sql(v.spec, v.columns, None if lo <= NEG_INF else from_us(lo),
                             None if hi >= POS_INF else from_us(hi), source=self.frozen(i))

    def seen_among(self, events: pa.Table) -> pa.Table | None:
        """The distinct unique-column values of ``events`` that the job accepted before
        (None without unique columns): what admission's deduplication needs to know."""
        if not self.unique or not events.num_rows:
            return None
        cols = ", ".join(quote(c) for c in self.unique)
        match = " AND ".join(f"s.{quote(c)} = e.{quote(c)}" for c in self.unique)
        self.con.register(_KEYS, events)
        try:
            return self.con.sql(
                f"SELECT DISTINCT {cols} FROM {_KEYS} e WHERE EXISTS (SELECT 1 FROM {self.seen} s WHERE {match})"
            ).to_arrow_table()
        finally:
            self.con.unregister(_KEYS)

    def remember(self, events: pa.Table) -> None:
        """Add the accepted events' unique-column values (and event times) to the seen set."""
        if not self.unique:
            return
        self.con.register(_EVENTS, events)
        try:
            cols = ", ".join(quote(c) for c in self.unique)
            self.con.execute(f"INSERT INTO {self.seen} SELECT {cols}, {quote(self.timestamp)} FROM {_EVENTS}")
        finally:
            self.con.unregister(_EVENTS)

    # ------------------------------------------------------------ checkpoints

    def frozen(self, i: int) -> str:
        """The table holding view ``i``'s state as of the last :meth:`freeze`."""
        return f"ck_{self.tables[i]}"

    def freeze(self) -> None:
        """Copy every table (in memory) for the checkpoint being written."""
        for i, table in enumerate(self.tables):
            self.con.execute(f"CREATE OR REPLACE TABLE {self.frozen(i)} AS SELECT * FROM {table}")
        if self.unique:
            self.con.execute(f"CREATE OR REPLACE TABLE ck_{self.seen} AS SELECT * FROM {self.seen}")

    def prune(self, watermark_us: int) -> None:
        """Drop what no row at or after the watermark needs: events older than the
        watermark minus the view's horizon (a row at ``v`` reads events from
        ``floor(v, hop) - window`` on, and an older bucket's drop is before ``v``), seen
        values older than the watermark (an event that old is late, so never a duplicate)."""
        for table, v in zip(self.tables, self.views):
            self.con.execute(
                f"DELETE FROM {table} WHERE {quote(self.timestamp)} < {ts_sql(watermark_us - v.horizon_us)}")
        if self.unique:
            self.con.execute(f"DELETE FROM {self.seen} WHERE __ts < {ts_sql(watermark_us)}")

    def save(self, cur: duckdb.DuckDBPyConnection, folder: Path) -> None:
        """Write the frozen copies to ``folder`` (on ``cur``, a cursor of the writer's thread)."""
        for i in range(len(self.tables)):
            cur.execute(f"COPY {self.frozen(i)} TO {literal(str(folder / f'state_{i}.parquet'))} (FORMAT parquet)")
        if self.unique:
            cur.execute(f"COPY ck_{self.seen} TO {literal(str(folder / 'seen.parquet'))} (FORMAT parquet)")

    def load(self, folder: Path) -> None:
        """Add the snapshot in ``folder`` (written by :meth:`save`) to the tables."""
        for i, table in enumerate(self.tables):
            f = folder / f"state_{i}.parquet"
            if f.exists():
                self.con.execute(f"INSERT INTO {table} SELECT * FROM read_parquet({literal(str(f))})")
        if self.unique and (folder / "seen.parquet").exists():
            self.con.execute(f"INSERT INTO {self.seen} SELECT * FROM read_parquet({literal(str(folder / 'seen.parquet'))})")

    def drop(self) -> None:
        """Drop every table (and frozen copy) and close the cursors: the state moved to another worker."""
        for cur in self.cursors:
            cur.close()
        names = [*self.tables, *(self.frozen(i) for i in range(len(self.tables)))]
        if self.unique:
            names += [self.seen, f"ck_{self.seen}"]
        for name in names:
            self.con.execute(f"DROP TABLE IF EXISTS {name}")

    def bootstrap(self, source_glob: str, checks: Sequence[Condition],
                  owned_keys: Callable[[int, str], str] | None = None) -> tuple[int | None, int]:
        """Load each view's owned events of the source's Parquet history within its
        horizon before the newest event, leaving out rows with a null key or that
        fail ``checks`` (as the batch gate leaves them out). ``owned_keys(i, relation)``,
        when given, names a relation of the keys of view ``i`` this state owns among those
        of ``relation`` (a keyed topic's partition owns the keys hashed to it). Returns the
        newest event time in microseconds (None: no history) and the rows loaded. DuckDB's
        conversion error on a file it cannot read is raised as it is."""
        con, ts = self.con, quote(self.timestamp)
        source = f"read_parquet({literal(source_glob)}, hive_partitioning = true, union_by_name = true)"
        try:
            (newest,) = con.execute(f"SELECT max({ts}) FROM {source}").fetchall()[0]
        except duckdb.IOException:
            newest = None
        if newest is None:
            return None, 0
        newest_us = to_us(newest)
        bad = " OR ".join(f"({c.fails})" for c in checks) or "FALSE"
        loaded = 0
        for i, (table, v) in enumerate(zip(self.tables, self.views)):
            cols = ", ".join(quote(c) for c in v.needed)
            keys_ok = " AND ".join(f"{quote(k)} IS NOT NULL" for k in v.spec.join_keys)
            rows = (f"SELECT {cols} FROM {source} WHERE {ts} >= {ts_sql(newest_us + 1 - v.horizon_us)} "
                    f"AND {keys_ok} AND NOT coalesce({bad}, FALSE) AND {self.owned(i)}")
            if owned_keys is not None:
                con.execute(f"CREATE OR REPLACE TEMP TABLE __history AS {rows}")
                join = " AND ".join(f"h.{quote(k)} = o.{quote(k)}" for k in v.spec.join_keys)
                rows = f"SELECT h.* FROM __history h SEMI JOIN ({owned_keys(i, '__history')}) o ON {join}"
            con.execute(f"INSERT INTO {table} {rows}")
            loaded += con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        return newest_us, loaded
