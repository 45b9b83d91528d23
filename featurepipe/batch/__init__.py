"""Batch feature computation: DuckDB SQL over the raw Parquet, generated from the registry."""
