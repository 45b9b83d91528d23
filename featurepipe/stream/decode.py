"""Raw messages to an Arrow table of events, and dead letters for what does not decode.

Every message carries one JSON object. A whole micro-batch is parsed in one call of
Arrow's JSON reader against the source schema (about 1 µs per event); when that fails
(malformed JSON, a string where a number belongs, an empty message) the batch is split
in halves until the bad messages are isolated, so a bad message costs ``log2(batch)``
extra parses and never takes good ones with it. Each bad message becomes a dead letter
with the reason Arrow gave.

Only messages that look like one JSON object (``{...}``) reach Arrow's reader: the others
cannot decode anyway, and a top-level ``null`` crashes the reader (a NULL pointer
dereference in pyarrow's JSON parser, apache/arrow#47409), so a producer sending ``null``
would take the worker down at every restart. They become dead letters at once.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.json as pj

from featurepipe.core.errors import InvalidInput

MSG = "__msg"  # index of the message in its micro-batch

_ARROW_TYPES = {
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "SMALLINT": pa.int16(),
    "DOUBLE": pa.float64(),
    "FLOAT": pa.float32(),
    "VARCHAR": pa.string(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP WITH TIME ZONE": pa.timestamp("us", tz="UTC"),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    "DATE": pa.date32(),
}


def arrow_schema(types: dict[str, str]) -> pa.Schema:
    """The Arrow schema events decode to, from DuckDB type names (timestamps in UTC)."""
    fields = []
    for name, duck in types.items():
        arrow = _ARROW_TYPES.get(duck.upper())
        if arrow is None and duck.upper().startswith("DECIMAL"):
            arrow = pa.float64()
        if arrow is None:
            raise InvalidInput(f"source column {name!r} has type {duck}, which events cannot carry in JSON")
        fields.append(pa.field(name, arrow))
    return pa.schema(fields)


@dataclass
class Decoded:
    """The events that decoded (with their message index) and the messages that did not."""

    events: pa.Table
    dead_index: np.ndarray  # message indexes
    dead_reason: list[str]


class Decoder:
    """Decodes JSON messages into a table with ``schema`` plus :data:`MSG`."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        self._read = pj.ReadOptions(use_threads=False, block_size=1 << 24)

    def _parse_lines(self, payloads: list[bytes]) -> pa.Table:
        table = pj.read_json(io.BytesIO(b"\n".join(payloads)), read_options=self._read, parse_options=self._parse)
        if table.num_rows != len(payloads):
            raise pa.ArrowInvalid(f"{len(payloads)} messages gave {table.num_rows} rows (an empty message?)")
        return table.select(self.schema.names).cast(self.schema)

    def decode(self, payloads: list[bytes]) -> Decoded:
        payloads = [self._one_line(p) for p in payloads] if any(b"\n" in p for p in payloads) else payloads
        # not one JSON object: a dead letter before Arrow's reader sees it (see the module doc)
        odd = [i for i, p in enumerate(payloads) if (p[:1] != b"{" or p[-1:] != b"}") and not _object_like(p)]
        index = np.arange(len(payloads), dtype=np.int64)
        if odd:
            keep = np.ones(len(payloads), dtype=bool)
            keep[odd] = False
            index = index[keep]
            objects = [payloads[i] for i in index]
        else:
            objects = payloads
        tables: list[pa.Table] = []
        indexes: list[np.ndarray] = []
        dead: list[int] = []
        reasons: list[str] = []

        def parse(lo: int, hi: int) -> None:
            if lo >= hi:
                return
            try:
                table = self._parse_lines(objects[lo:hi])
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                if hi - lo == 1:
                    dead.append(int(index[lo]))
                    reasons.append(_reason(objects[lo], exc))
                    return
                mid = (lo + hi) // 2
                parse(lo, mid)
                parse(mid, hi)
                return
            tables.append(table)
            indexes.append(index[lo:hi])

        parse(0, len(objects))
        if odd:  # in message order, as the parse gives its own
            merged = sorted([*zip(dead, reasons), *((i, _reason(payloads[i], None)) for i in odd)])
            dead, reasons = [i for i, _ in merged], [r for _, r in merged]
        if tables:
            events = pa.concat_tables(tables)
            events = events.append_column(MSG, pa.array(np.concatenate(indexes)))
        else:
            events = self.schema.empty_table().append_column(MSG, pa.array([], pa.int64()))
        return Decoded(events, np.asarray(dead, dtype=np.int64), reasons)

    @staticmethod
    def _one_line(payload: bytes) -> bytes:
        if b"\n" not in payload and b"\r" not in payload:
            return payload
        try:
            return json.dumps(json.loads(payload), separators=(",", ":")).encode()
        except ValueError:
            return payload.replace(b"\n", b" ").replace(b"\r", b" ")


def _object_like(payload: bytes) -> bool:
    """Whether ``payload`` starts with ``{`` and ends with ``}`` (whitespace aside)."""
    text = payload.strip()
    return text[:1] == b"{" and text[-1:] == b"}"


def _reason(payload: bytes, exc: Exception | None) -> str:
    """Why ``payload`` did not decode (``exc``: what Arrow's reader raised, if it read it)."""
    if not payload.strip():
        return "decode: empty message"
    try:
        value = json.loads(payload)
    except ValueError as err:
        return f"decode: not JSON ({err})"
    if not isinstance(value, dict):
        return f"decode: a JSON {'null' if value is None else type(value).__name__}, expected an object"
    text = str(exc).split("\n")[0]
    return f"decode: {text}"
