"""Offline store: Parquet feature tables queried with DuckDB (point-in-time ASOF joins)."""
