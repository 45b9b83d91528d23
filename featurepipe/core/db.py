"""One DuckDB connection factory with named session profiles.

Every connection is in UTC (``TimeZone``), whatever the profile:

* ``default``: all cores, insertion order kept (what most queries assume);
* ``deterministic``: one thread, so parallel window aggregation cannot add floats in a
  varying order: a rerun writes the same bytes (the batch engine's profile);
* ``scan``: all cores (or ``threads``), rows may stream out in any order, and a
  direct-indexed group-by table up to 2^20 key values (the latest-row scans).

Opening a DuckDB database costs 25-30 ms here (and closing it a few more), as much as a
small query, so hot paths use :func:`shared_cursor`: one in-memory database per process
and setting, handed out as cursors (each cursor is its own session: its temp tables and
registered Arrow tables are its own and go when it is closed).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any, Literal

import duckdb

Profile = Literal["default", "deterministic", "scan"]


def connect(profile: Profile = "default", threads: int | None = None,
            database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A new DuckDB connection with ``profile``'s session settings (see the module doc)."""
    con = duckdb.connect(database)
    configure(con, profile, threads)
    return con


def configure(con: duckdb.DuckDBPyConnection, profile: Profile = "default", threads: int | None = None) -> None:
    """Apply ``profile``'s session settings to an open connection or cursor."""
    con.execute("SET TimeZone = 'UTC'")
    if profile == "deterministic":
        con.execute("SET threads = 1")
        con.execute("SET preserve_insertion_order = true")
    elif profile == "scan":
        con.execute(f"SET threads = {int(threads or os.cpu_count() or 1)}")
        con.execute("SET preserve_insertion_order = false")
        con.execute("SET perfect_ht_threshold = 20")
    elif profile == "default":
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        con.execute("SET preserve_insertion_order = true")
    else:
        raise ValueError(f"unknown DuckDB profile {profile!r}; one of default, deterministic, scan")


_SHARED: dict[tuple[object, ...], duckdb.DuckDBPyConnection] = {}
_SHARED_LOCK = threading.Lock()


def shared_cursor(profile: Profile = "default", threads: int | None = None,
                  settings: Mapping[str, str | int] | None = None) -> duckdb.DuckDBPyConnection:
    """A cursor with ``profile``'s session settings on this process's database for
    ``(profile, threads, settings)``, created on first use. ``settings`` are database-wide
    (``temp_directory``, ``memory_limit``); close the cursor when done.
    """
    items = tuple(sorted((settings or {}).items()))
    key = (profile, threads, items, os.getpid())  # a database inherited through fork() has lost its threads
    with _SHARED_LOCK:
        database = _SHARED.get(key)
        if database is None:
            database = duckdb.connect()
            for name, value in items:
                database.execute(f"SET {name} = {value if isinstance(value, int) else _quote(value)}")
            configure(database, profile, threads)
            _SHARED[key] = database
        con = database.cursor()
    configure(con, profile, threads)
    return con


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def one_row(con: duckdb.DuckDBPyConnection, query: str) -> tuple[Any, ...]:
    """The row of a query that returns exactly one (an aggregate without ``GROUP BY``, a
    ``SELECT`` of settings), so callers can index it without a None check."""
    row = con.execute(query).fetchone()
    assert row is not None, f"no row from a query that always returns one: {query}"
    return row
