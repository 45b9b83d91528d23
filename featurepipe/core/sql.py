"""SQL text: identifier quoting and literals (DuckDB's dialect). Imports nothing heavy."""

from __future__ import annotations

from datetime import datetime


def quote(identifier: str) -> str:
    """Quote a SQL identifier for DuckDB."""
    return '"' + identifier.replace('"', '""') + '"'


def literal(value: str) -> str:
    """Quote a SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def ts_literal(value: datetime) -> str:
    """A TIMESTAMPTZ literal (naive datetimes are taken as UTC)."""
    return f"TIMESTAMPTZ {literal(value.isoformat() if value.tzinfo else value.isoformat() + '+00:00')}"
