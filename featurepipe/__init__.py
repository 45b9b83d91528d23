"""featurepipe: a feature store and ML feature pipeline built around Feast.

Feast is the definition layer and registry; featurepipe computes, stores and
serves what the definitions describe (DuckDB batch features over Parquet, Redis
online store in Feast's layout, gRPC serving).
"""

__version__ = "0.1.0"
