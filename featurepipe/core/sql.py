"""SQL text: identifier quoting and literals, per dialect (DuckDB's by default). Imports nothing heavy.

The kernel's SQL (:mod:`featurepipe.core.windows`) is generated once for every engine; what
differs between DuckDB and Spark SQL is small and lives here, in :class:`Dialect`: identifier
quoting, timestamp literals, the epoch-microseconds conversions, and the integer type the
kernel packs its counters into. No transpiler: each difference is written down and tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone


def quote(identifier: str) -> str:
    """Quote a SQL identifier for DuckDB."""
    return '"' + identifier.replace('"', '""') + '"'


def literal(value: str) -> str:
    """Quote a SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def ts_literal(value: datetime) -> str:
    """A TIMESTAMPTZ literal (naive datetimes are taken as UTC)."""
    return f"TIMESTAMPTZ {literal(value.isoformat() if value.tzinfo else value.isoformat() + '+00:00')}"


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Dialect:
    """What the generated SQL needs to know of an engine.

    ``counters_per_pack``: how many 32-bit counters the kernel packs side by side into one
    ``pack_type`` integer (one running sum then counts them all); Spark has no 128-bit
    integer and no ``>>`` on decimals, so it keeps one counter per BIGINT.
    """

    name: str
    quote_char: str
    counters_per_pack: int
    pack_type: str

    def quote(self, identifier: str) -> str:
        """Quote an identifier."""
        q = self.quote_char
        return q + identifier.replace(q, q + q) + q

    def literal(self, value: str) -> str:
        """Quote a string literal (Spark also reads ``\\`` as an escape: doubled)."""
        if self.name == "spark":
            value = value.replace("\\", "\\\\")
        return literal(value)

    def epoch_us(self, expr: str) -> str:
        """Microseconds since the Unix epoch of a timestamp expression (BIGINT)."""
        # Spark: a timestamp without time zone (TIMESTAMP_NTZ) is read as UTC, as DuckDB does
        return f"epoch_us({expr})" if self.name == "duckdb" else f"unix_micros(CAST({expr} AS TIMESTAMP))"

    def timestamp(self, micros_expr: str) -> str:
        """The UTC timestamp of a BIGINT of microseconds since the epoch."""
        return f"make_timestamptz({micros_expr})" if self.name == "duckdb" else f"timestamp_micros({micros_expr})"

    def trunc(self, double: str) -> str:
        """A DOUBLE's whole part toward zero, as BIGINT (DuckDB's cast rounds, Spark's truncates)."""
        return f"CAST(trunc({double}) AS BIGINT)" if self.name == "duckdb" else f"CAST({double} AS BIGINT)"

    def ts_literal(self, value: datetime) -> str:
        """A timestamp literal for an instant (naive datetimes are taken as UTC)."""
        if self.name == "duckdb":
            return ts_literal(value)
        aware = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return f"timestamp_micros({(aware - _EPOCH) // _MICROSECOND})"


_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc) - _EPOCH

DUCKDB = Dialect("duckdb", '"', 4, "HUGEINT")
SPARK = Dialect("spark", "`", 1, "BIGINT")
