"""The sink's hot path in columns: priced attempt rows decoded into Arrow tables, inserted with insert_arrow.

A message of llm.cost.attempts.v1 (NDJSON, one priced attempt per line: decimal strings for money, RFC 3339 times)
is decoded here into one Arrow table (`arrow_part`) whose columns have usage_events' types: Decimal(38, 18) money
as decimal128(38, 18) (never a float), DateTime64(3, 'UTC') as timestamp[ms, UTC], maps as Arrow maps. The fast
path accepts a message only if every line is a row the precise decode (streams.sink.decode_rows) would accept with
the same values, and every value fits its column as the column-oriented insert would write it:
  - each line is a JSON object with exactly the attempt columns (orjson, as the precise path);
  - strings, integers, booleans and maps hold exactly those Python types (no float where an integer goes, no
    null where the column is not Nullable), integers within their column's range;
  - money is a decimal string that Arrow casts to decimal128(38, 18) without losing a digit (it refuses a value
    with more than 18 decimals or 38 digits, which the precise path would round);
  - a time is `YYYY-MM-DDTHH:MM:SS[.fff|.ffffff](Z|±HH:MM)` at or after 1970, truncated to the millisecond as the
    column-oriented insert does.
Anything else (a bad line, a float, a naive time) makes the whole message fall back to the precise per-line decode,
so a dead letter keeps its exact reason, message and bytes, and the rows of that message are inserted as before.

The process role publishes attempts as Arrow instead (`handoff_format = "arrow"`, the default): one message is an
Arrow IPC stream (zstd) of ATTEMPT_SCHEMA, thousands of rows in ≤ 900 KB where NDJSON held ~400
(`encode_attempt_rows`). The sink reads such a message straight into a part (`ipc_part`); a message that starts like
an IPC stream but is not one of ATTEMPT_SCHEMA is dead-lettered whole, with its bytes. The sink takes both formats
on one topic, so a topic written before the switch (or by a third party, in NDJSON) is read as before.

`AttemptBatch` is a batch of such parts in topic order (Arrow parts and precise parts side by side); SinkWriter
plans over its columns and inserts each Arrow piece with one `insert_arrow`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import accumulate, chain
from typing import Any, overload

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from streams.fold import REQUEST_COLUMNS, REQUEST_COST_COLUMNS, REQUEST_TIME_COLUMNS
from streams.records import ATTEMPT_COLUMNS, ATTEMPT_COLUMNS_ADDED, COST_COLUMNS, TIME_COLUMNS, TOKEN_CLASSES, Source

MONEY = pa.decimal128(38, 18)  # usage_events' Decimal(38, 18), schemas/migrations/002
TIME = pa.timestamp("ms", tz="UTC")  # DateTime64(3, 'UTC')
_TIME_US = pa.timestamp("us", tz="UTC")

# The Arrow type of each attempt column (schemas/migrations/002_usage_events.sql), and whether it may hold null.
_STRING_COLUMNS = (
    "event_id", "request_id", "logical_request_id", "provider", "model_requested", "model_actual", "fallback_from",
    "status", "error", "service_tier", "pricing_status", "pricing_note", "price_card_version", "priced_as",
    "tenant_id", "team_id", "feature_id", "product", "endpoint", "environment", "cost_center", "business_unit",
    "api_key_id", "deploy_version", "user_segment", "ownership_version", "attribution_status", "attribution_reason",
    "attribution_conflict", "source_topic", "payload",
)
_BOOL_COLUMNS = ("final", "batch", "usage_reported")
_INT_COLUMNS: dict[str, pa.DataType] = {
    "attempt": pa.uint32(), "input_tokens": pa.uint64(), "output_tokens": pa.uint64(),
    "reasoning_tokens": pa.uint64(), "cache_read_tokens": pa.uint64(), "cache_write_tokens": pa.uint64(),
    "cache_write_1h_tokens": pa.uint64(), "source_partition": pa.uint16(), "source_offset": pa.uint64(),
    "source_line": pa.uint32(),
}
_NULLABLE_INT_COLUMNS: dict[str, pa.DataType] = {"stream_terminated_at_token_n": pa.uint64(),
                                                 "latency_ms": pa.uint32()}
_MAP_COLUMNS: dict[str, tuple[pa.DataType, type]] = {
    "tool_calls": (pa.map_(pa.string(), pa.uint32()), int),
    "tags": (pa.map_(pa.string(), pa.string()), str),
}


def _arrow_type(column: str) -> pa.DataType:
    if column in _STRING_COLUMNS:
        return pa.string()
    if column in _BOOL_COLUMNS:
        return pa.bool_()
    if column in COST_COLUMNS:
        return MONEY
    if column in TIME_COLUMNS:
        return TIME
    for types in (_INT_COLUMNS, _NULLABLE_INT_COLUMNS):
        if column in types:
            return types[column]
    if column in _MAP_COLUMNS:
        return _MAP_COLUMNS[column][0]
    raise KeyError(f"no Arrow type for attempt column {column}")


# usage_events as the sink writes it: the attempt columns, then content_hash (008) and origin (011).
SINK_SCHEMA = pa.schema([pa.field(c, _arrow_type(c), nullable=c in _NULLABLE_INT_COLUMNS) for c in ATTEMPT_COLUMNS]
                        + [pa.field("content_hash", pa.string(), nullable=False),
                           pa.field("origin", pa.string(), nullable=False)])
PART_SCHEMA = pa.schema([*SINK_SCHEMA][:-2] + [SINK_SCHEMA.field("origin")])  # before the plan adds the hash

# llm.cost.attempts.v1 in Arrow: the attempt columns with usage_events' types, in ATTEMPT_COLUMNS order.
ATTEMPT_SCHEMA = pa.schema([SINK_SCHEMA.field(c) for c in ATTEMPT_COLUMNS])
# The schema before the columns added since the first release (records.ATTEMPT_COLUMNS_ADDED): a message of it is
# read with those columns at the value they stand for.
ATTEMPT_SCHEMA_BEFORE = pa.schema([f for f in ATTEMPT_SCHEMA if f.name not in ATTEMPT_COLUMNS_ADDED])
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
IPC_MAGIC = b"\xff\xff\xff\xff"  # an Arrow IPC stream's first bytes (continuation marker); NDJSON starts with "{"


def _request_type(column: str) -> pa.DataType:
    """The Arrow type of a logical_requests column (schemas/migrations/004_logical_requests.sql)."""
    if column in REQUEST_COST_COLUMNS:
        return MONEY
    if column in REQUEST_TIME_COLUMNS:
        return TIME
    if column in ("attempts", "retries", "fallbacks", "revision"):
        return pa.uint32()
    if column == "sign":
        return pa.int8()
    if column in TOKEN_CLASSES or column == "terminated_at_token_n":
        return pa.uint64()
    if column in ("terminated", "usage_complete"):
        return pa.bool_()
    if column in ("fallback_chain", "price_card_versions", "attempt_event_ids"):
        return pa.list_(pa.string())
    return pa.string()


# llm.cost.requests.v1 in Arrow: the logical_requests columns with their ClickHouse types, in REQUEST_COLUMNS order.
REQUEST_SCHEMA = pa.schema([pa.field(c, _request_type(c), nullable=c == "terminated_at_token_n")
                            for c in REQUEST_COLUMNS])

_TIME_TEXT = (r"^\d{4}-\d{2}-\d{2}T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{3}|\.\d{6})?"
              r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)$")
_COLUMN_SET = frozenset(ATTEMPT_COLUMNS)


class Refused(ValueError):
    """The fast path does not take this message; the precise decode does (streams.sink.decode_rows)."""


def _only(values: Sequence[Any], *kinds: type) -> None:
    """Refused unless every value is of one of these exact types (True is not an int, 1.0 is not an int)."""
    if not set(map(type, values)) <= set(kinds):
        raise Refused(f"a value that is not {' or '.join(k.__name__ for k in kinds)}")


def _not_null(array: pa.Array) -> pa.Array:
    if array.null_count:
        raise Refused("null in a column that is not Nullable")
    return array


def _column(name: str, values: Sequence[Any]) -> pa.Array:
    """One attempt column as Arrow, or Refused where the precise path and the column-oriented insert might differ.

    pyarrow refuses a non-string for a string, a non-bool for a bool, a negative or too large integer for an
    unsigned column (ArrowInvalid, ArrowTypeError, OverflowError); it would take 1.0 for an integer, hence _only.
    """
    if name in _STRING_COLUMNS:
        return _not_null(pa.array(values, pa.string()))
    if name in _BOOL_COLUMNS:
        return _not_null(pa.array(values, pa.bool_()))
    if name in COST_COLUMNS:  # ArrowInvalid on any digit lost (more than 18 decimals or 38 digits)
        return _not_null(pc.cast(pa.array(values, pa.string()), MONEY))
    if name in TIME_COLUMNS:
        text = _not_null(pa.array(values, pa.string()))
        if not pc.all(pc.match_substring_regex(text, _TIME_TEXT)).as_py():
            raise Refused(f"{name}: a time the fast path does not parse")
        micros = pc.cast(text, _TIME_US)
        if len(micros) and pc.min(micros.cast(pa.int64())).as_py() < 0:
            raise Refused(f"{name}: a time before 1970")
        return pc.cast(micros, TIME, safe=False)  # floor to the millisecond (after 1970), as DateTime64(3) is written
    if name in _INT_COLUMNS:
        _only(values, int)
        return _not_null(pa.array(values, _INT_COLUMNS[name]))
    if name in _NULLABLE_INT_COLUMNS:
        _only(values, int, type(None))
        return pa.array(values, _NULLABLE_INT_COLUMNS[name])
    if name in _MAP_COLUMNS:
        arrow_type, kind = _MAP_COLUMNS[name]
        _only(values, dict)
        keys = list(chain.from_iterable(values))
        items = list(chain.from_iterable(m.values() for m in values))
        _only(keys, str)
        _only(items, kind)
        offsets = pa.array([0, *accumulate(map(len, values))], pa.int32())
        return pa.MapArray.from_arrays(offsets, pa.array(keys, pa.string()), pa.array(items, arrow_type.item_type),
                                       type=arrow_type)
    raise KeyError(name)


def is_arrow(value: bytes | None) -> bool:
    """Whether a message is an Arrow IPC stream (the process role's hand-off) rather than NDJSON."""
    return bool(value) and value[:4] == IPC_MAGIC  # type: ignore[index]


def rows_table(rows: Sequence[dict[str, Any]], schema: pa.Schema = ATTEMPT_SCHEMA) -> pa.Table:
    """Rows as the stages hold them (Decimal money, aware datetimes, dicts, lists) as one table of `schema`.

    Money goes in as decimal128(38, 18), refused (ArrowInvalid) if a digit would be lost; times are floored to the
    millisecond, as ClickHouse's DateTime64(3) stores them. The dicts are read in C, as one struct array: an attempt
    row 10.6 -> 8.5 µs, a request row 9.0 -> 5.9 µs against a column at a time (one-off, 20,000 bench events, best
    of 3). Keys beyond the schema's are ignored; a missing key is a null, as a None is: the sink refuses a message
    with a null where its column cannot hold one (decode_message), as it always did.
    """
    return pa.Table.from_struct_array(pa.array(rows, type=pa.struct(list(schema))))


def ipc_stream(table: pa.Table) -> bytes:
    """A table as one Arrow IPC stream, zstd-compressed."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def encode_rows(rows: Sequence[dict[str, Any]], schema: pa.Schema, max_bytes: int) -> list[bytes]:
    """Rows as Arrow IPC messages of `schema`, at most `max_bytes` each (one row alone may exceed it), in order."""
    return encode_table(rows_table(rows, schema), max_bytes) if rows else []


_SAMPLE_ROWS = 500  # the rows a large table's message size is estimated from


def encode_table(table: pa.Table, max_bytes: int) -> list[bytes]:
    """A table as Arrow IPC messages of at most `max_bytes` each (one row alone may exceed it), rows in order.

    Each message takes as many rows as the bytes per row of the message before it say fit in nine tenths of
    `max_bytes` (the first: the whole table, or for a table larger than `max_bytes` in memory, as many as its first
    500 rows compressed say). A message that still comes out too large is made again with fewer rows.
    """
    n = table.num_rows
    out: list[bytes] = []
    per_row: float | None = None
    if n > 2 * _SAMPLE_ROWS and table.nbytes > max_bytes:
        per_row = len(ipc_stream(table.slice(0, _SAMPLE_ROWS))) / _SAMPLE_ROWS
    start = 0
    while start < n:
        rows = n - start if per_row is None else max(1, int(max_bytes * 0.9 / max(per_row, 1e-9)))
        part = table.slice(start, rows)
        blob = ipc_stream(part)
        per_row = len(blob) / part.num_rows
        if len(blob) > max_bytes and part.num_rows > 1:
            continue  # again, with the rows its size allows
        out.append(blob)
        start += part.num_rows
    return out


def encode_attempt_rows(rows: Sequence[dict[str, Any]], max_bytes: int) -> list[bytes]:
    """Priced attempt rows as llm.cost.attempts.v1 Arrow messages of at most `max_bytes` each."""
    return encode_rows(rows, ATTEMPT_SCHEMA, max_bytes)


def decode_message(value: bytes, schema: pa.Schema, what: str) -> pa.Table:
    """An Arrow message as its table of `schema`; Refused if it is not exactly one (nulls only where Nullable).

    The version rule (docs/handoff.md): a message of `schema` without the columns added since the first release
    (ATTEMPT_COLUMNS_ADDED: an older process worker's message, or a plan an older sink journaled) is read with
    them filled in at the value they stand for.
    """
    try:
        table = ipc.open_stream(pa.py_buffer(value)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise Refused(f"not an Arrow IPC stream: {exc}") from exc
    if not table.schema.equals(schema):
        added = [f for f in schema if f.name in ATTEMPT_COLUMNS_ADDED]
        before = pa.schema([f for f in schema if f.name not in ATTEMPT_COLUMNS_ADDED])
        if not added or not table.schema.equals(before):
            raise Refused(f"an Arrow IPC stream whose schema is not {what}'s")
        for f in added:
            table = table.add_column(schema.get_field_index(f.name), f,
                                     pa.array([ATTEMPT_COLUMNS_ADDED[f.name]] * table.num_rows, f.type))
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise Refused(f"null in column {f.name}, which is not Nullable")
    return table


def decode_attempt_message(value: bytes) -> pa.Table:
    """An Arrow attempts message as its ATTEMPT_SCHEMA table (an older worker's too); Refused if it is not one."""
    return decode_message(value, ATTEMPT_SCHEMA, "llm.cost.attempts.v1")


def _message_part(table: pa.Table, source: Source, origin: str) -> ArrowPart:
    """A decoded Arrow message as a part of a sink batch: its table plus the origin column."""
    table = table.combine_chunks()
    table = table.append_column(PART_SCHEMA.field("origin"), pa.array([origin] * table.num_rows, pa.string()))
    return ArrowPart(table, [], source, origin)


def ipc_part(value: bytes, source: Source, origin: str) -> ArrowPart:
    """One Arrow attempts message as a part of the sink's batch (its table plus the origin column)."""
    return _message_part(decode_attempt_message(value), source, origin)


def request_part(value: bytes, source: Source, origin: str) -> ArrowPart:
    """One Arrow logical-requests message as a part of the request sink's batch (its table plus the origin column)."""
    return _message_part(decode_message(value, REQUEST_SCHEMA, "llm.cost.requests.v1"), source, origin)


def plain_decimal(value: Decimal) -> Decimal:
    """A decimal128(38, 18) value without its padding zeros, as the JSON path reads it (0.0008068, not 0.000806800…)."""
    text = format(value, "f")
    return Decimal(text.rstrip("0").rstrip(".") if "." in text else text)


def table_rows(table: pa.Table, plain: bool = False) -> list[dict[str, Any]]:
    """Every row of a table as the precise JSON decode gives rows, converted column by column.

    Decimal money (equal to the last digit; with `plain`, also written without decimal128's padding zeros), UTC
    datetimes, dict maps.
    """
    names = table.column_names
    columns: list[list[Any]] = []
    for f in table.schema:
        values = [] if pa.types.is_timestamp(f.type) else table.column(f.name).to_pylist()
        if pa.types.is_decimal(f.type) and plain:
            values = [plain_decimal(v) for v in values]
        elif pa.types.is_timestamp(f.type):  # via epoch ms: pyarrow's own datetimes cost ~6x more here
            millis = table.column(f.name).cast(pa.int64()).to_pylist()
            values = [_EPOCH + timedelta(milliseconds=v) for v in millis]
        elif pa.types.is_map(f.type):
            values = [dict(v) for v in values]
        columns.append(values)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def table_row(table: pa.Table, i: int) -> dict[str, Any]:
    """Row `i` of a table as the precise decode gives a row."""
    return table_rows(table.slice(i, 1), plain=True)[0]


def arrow_part(value: bytes, source: Source, origin: str) -> ArrowPart:
    """One message's attempt rows as an Arrow table (SINK_SCHEMA without content_hash).

    Refused if any line is not a row the fast path takes exactly (see the module's docstring).
    """
    lines = [line for line in value.split(b"\n") if line]
    try:
        rows = [orjson.loads(line) for line in lines]
    except orjson.JSONDecodeError as exc:
        raise Refused(str(exc)) from exc
    for row in rows:
        if type(row) is not dict or row.keys() != _COLUMN_SET:
            raise Refused("not an attempt row")
    try:
        arrays = [_column(name, [r[name] for r in rows]) for name in ATTEMPT_COLUMNS]
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
        raise Refused(str(exc)) from exc
    arrays.append(pa.array([origin] * len(rows), pa.string()))
    return ArrowPart(pa.Table.from_arrays(arrays, schema=PART_SCHEMA), lines, source, origin)


@dataclass
class ArrowPart:
    """The rows of one message decoded by the fast path.

    Its table, and the message's lines to re-read one row exactly as the precise path gives it (a dead letter's
    message quotes its values).
    """

    table: pa.Table
    lines: list[bytes]  # empty for an Arrow message: its rows are read from the table
    source: Source
    origin: str

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, i: int) -> dict[str, Any]:
        from streams.sink import decode_rows  # the precise decode, which builds on this module

        if not self.lines:
            return table_row(self.table, i)

        (row,), bad = decode_rows(self.lines[i], self.source)
        assert not bad, bad  # the fast path took this line, so the precise one does
        return row


@dataclass
class DictPart:
    """Rows decoded by the precise path (or handed over as dicts by tools and tests)."""

    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> dict[str, Any]:
        return self.rows[i]


Part = ArrowPart | DictPart


@dataclass
class AttemptBatch(Sequence[dict[str, Any]]):
    """A sink batch of priced attempts in topic order: one part per message, in columns where the fast path took it.

    As a Sequence it yields each row as a dict (the precise path's values); the writer reads its columns instead.
    """

    parts: list[Part] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[dict[str, Any]]: ...

    def __getitem__(self, i: int | slice) -> dict[str, Any] | Sequence[dict[str, Any]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        part, local = self.locate(i if i >= 0 else len(self) + i)
        return self.parts[part].row(local)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for p in self.parts:
            for i in range(len(p)):
                yield p.row(i)

    def locate(self, i: int) -> tuple[int, int]:
        """(part, row in that part) of row `i` of the batch."""
        if i < 0:
            raise IndexError(i)
        for n, p in enumerate(self.parts):
            if i < len(p):
                return n, i
            i -= len(p)
        raise IndexError(i)

    def column(self, name: str) -> list[Any]:
        """One column over the whole batch as Python values (strings, dates of days): what the plan reads."""
        out: list[Any] = []
        for p in self.parts:
            if isinstance(p, ArrowPart):
                out.extend(p.table.column(name).to_pylist())
            else:
                out.extend(r[name] for r in p.rows)
        return out

    def origins(self) -> list[str]:
        """The input messages of the batch's rows, each once, in batch order."""
        out: dict[str, None] = {}
        for p in self.parts:
            if isinstance(p, ArrowPart):
                out[p.origin] = None
            else:
                out.update((r.get("origin", ""), None) for r in p.rows)
        return [o for o in out if o]
