"""The fold's columnar half: logical-request rows of single-attempt requests, built from the attempts' columns.

Most logical requests are one attempt marked final, met for the first time: the fold emits them at once, with no
state (streams.fold, `Folder.fold(..., singles=True)`). Their rows are a column-wise copy of the attempt table's
columns, built here with Arrow instead of a fact dict and a summarize() per request; the rows the fold summarizes
itself (retries, fallbacks, revisions, settled and abandoned requests) join them in the order the fold emitted
everything. The result equals `rows_table(summarize(...) rows, REQUEST_SCHEMA)` value for value, attempts_detail
byte for byte (tests/unit/test_fold_columns.py); Python runs per request only for what has no column form: the
fallback chain and the attempts_detail JSON.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from streams.fold import (
    _FACT_COSTS,
    _FACT_FIELDS,
    _FACT_KEYS,
    CLASS_COSTS,
    OWNER_COLUMNS,
    REQUEST_COLUMNS,
    FoldResult,
    dump_facts,
)
from streams.records import TOKEN_CLASSES
from streams.sink_columns import MONEY, REQUEST_SCHEMA, TIME, rows_table

# The attempt columns a single's row is built from (only these are copied out of the batch's attempt table).
_SINGLE_COLUMNS = list(dict.fromkeys(("logical_request_id", "ts", *_FACT_FIELDS, *_FACT_COSTS)))


def requests_table(result: FoldResult, attempts: pa.Table, emitted_at: datetime) -> pa.Table:
    """Every logical-request row of a fold step, in the order it emitted them, as one REQUEST_SCHEMA table.

    `attempts` is the fold's input as an attempt table (streams.sink_columns.ATTEMPT_SCHEMA), row for row.
    """
    table, order = emitted_requests(result, attempts, emitted_at)
    return table.take(pa.array(order))


def emitted_requests(result: FoldResult, attempts: pa.Table, emitted_at: datetime) -> tuple[pa.Table, np.ndarray]:
    """A fold step's logical-request rows as one REQUEST_SCHEMA table, and the order the fold emitted them in.

    The table holds the singles' rows, then the summarized rows (a concatenation, no copy); `order` lists its rows
    in emission order, so that a caller regrouping them (by output partition) copies the rows once.
    """
    others = rows_table(result.emitted, REQUEST_SCHEMA)
    if not result.singles:
        return others, np.arange(others.num_rows)
    singles = single_requests(attempts.select(_SINGLE_COLUMNS).take(pa.array(result.singles)), emitted_at)
    # result.order: -1 = the next summarized row (after the singles in the concatenation), else the next single
    is_other = np.asarray(result.order) < 0
    order = np.where(is_other, len(result.singles) + np.cumsum(is_other) - 1, np.cumsum(~is_other) - 1)
    return (pa.concat_tables([singles, others]) if result.emitted else singles), order


def single_requests(t: pa.Table, emitted_at: datetime) -> pa.Table:
    """The logical-request rows of requests that are each one final attempt (a row of `t`), revision 1."""
    n = t.num_rows
    requested = t["model_requested"].to_pylist()
    actual = t["model_actual"].to_pylist()
    fallback_from = t["fallback_from"].to_pylist()
    chains = [_chain(r, f, a) for r, f, a in zip(requested, fallback_from, actual, strict=True)]
    cut = pc.equal(t["status"], "terminated")
    versions = t["price_card_version"].combine_chunks()
    priced = pc.not_equal(versions, "")
    ones = np.arange(n + 1, dtype=np.int32)
    columns: dict[str, Any] = {
        "logical_request_id": t["logical_request_id"],
        "revision": pa.repeat(pa.scalar(1, pa.uint32()), n),
        "sign": pa.repeat(pa.scalar(1, pa.int8()), n),
        "first_ts": t["ts"],
        "last_ts": t["ts"],
        "emitted_at": pa.repeat(pa.scalar(emitted_at, TIME), n),
        "closed_by": pa.repeat(pa.scalar("final"), n),
        "attempts": pa.repeat(pa.scalar(1, pa.uint32()), n),
        "retries": pa.repeat(pa.scalar(0, pa.uint32()), n),
        "fallbacks": pa.repeat(pa.scalar(0, pa.uint32()), n),
        "fallback_chain": pa.array(chains, pa.list_(pa.string())),
        "requested_model": pa.array([c[0] for c in chains], pa.string()),
        "final_model": t["model_actual"],
        "final_provider": t["provider"],
        "final_status": t["status"],
        "final_event_id": t["event_id"],
        "terminated": cut,
        "terminated_at_token_n": pc.if_else(cut, t["stream_terminated_at_token_n"], pa.scalar(None, pa.uint64())),
        "usage_complete": t["usage_reported"],
        "pricing_status": t["pricing_status"],
        **{c: t[c] for c in TOKEN_CLASSES},
        **{c: t[c] for c in CLASS_COSTS},
        "cost_total_usd": t["cost_total_usd"],
        "cost_final_usd": t["cost_total_usd"],
        "cost_wasted_usd": pa.repeat(pa.scalar(Decimal(0), MONEY), n),
        **{c: t[c] for c in OWNER_COLUMNS},
        "price_card_versions": pa.ListArray.from_arrays(
            pa.array(np.concatenate(([0], np.cumsum(priced.to_numpy(zero_copy_only=False))), dtype=np.int32)),
            versions.filter(priced)),
        "attempt_event_ids": pa.ListArray.from_arrays(pa.array(ones), t["event_id"].combine_chunks()),
        "attempts_detail": pa.array(_details(t), pa.string()),
    }
    return pa.table([_as(columns[c], REQUEST_SCHEMA.field(c).type) for c in REQUEST_COLUMNS], schema=REQUEST_SCHEMA)


def _as(column: Any, type_: pa.DataType) -> pa.Array | pa.ChunkedArray:
    return column if column.type == type_ else column.cast(type_)


def _chain(requested: str, fallback_from: str, actual: str) -> list[str]:
    """The fallback chain of one attempt, as summarize() writes it."""
    chain = [requested or actual]
    if fallback_from and chain[-1] != fallback_from:
        chain.append(fallback_from)
    if chain[-1] != actual:
        chain.append(actual)
    return chain


def _details(t: pa.Table) -> list[str]:
    """attempts_detail of each row: its one fact as dump_facts writes it (costs in integer atto-dollars)."""
    values = [t[c].to_pylist() for c in _FACT_FIELDS]
    values.append(t["ts"].cast(pa.int64()).to_pylist())
    values.extend(atto(t[c]) for c in _FACT_COSTS)
    out: list[str] = []
    for row in zip(*values, strict=True):
        fact = dict(zip(_FACT_KEYS, row, strict=True))
        try:
            out.append(orjson.dumps([fact]).decode())
        except TypeError:  # a cost beyond 64 bits of atto-dollars: dump_facts' fallback, the same JSON
            out.append(dump_facts([fact]).decode())
    return out


def atto(column: pa.ChunkedArray | pa.Array) -> list[int]:
    """A decimal128(38, 18) column as integer atto-dollars: its unscaled 128-bit integers, exactly."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.type != MONEY:
        raise TypeError(f"not a money column: {array.type}")
    if array.null_count:
        raise ValueError("a money column with nulls")
    n, offset = len(array), array.offset
    words = np.frombuffer(array.buffers()[1], dtype="<i8", count=2 * (offset + n))[2 * offset:].reshape(n, 2)
    low, high = words[:, 0], words[:, 1]
    values: list[int] = low.tolist()
    for i in np.flatnonzero(high != (low >> 63)).tolist():  # beyond 64 bits (≥ $9.22): the whole 128-bit integer
        values[i] = (int(high[i]) << 64) + (int(low[i]) & 0xFFFF_FFFF_FFFF_FFFF)
    return values
