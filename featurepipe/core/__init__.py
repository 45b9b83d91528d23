"""What every stage shares and nothing stage-specific.

``errors`` (the error hierarchy), ``sql`` (identifier quoting and literals, no Feast),
``db`` (one DuckDB connection factory with named session profiles), ``timeutils`` (UTC),
``parquet_io`` (atomic Parquet writes). Nothing here imports Feast, Redis or gRPC, and
nothing here imports a stage: the stages import the core, never the reverse.
"""
