"""Sink stage: priced attempts from llm.cost.attempts.v1 into ClickHouse usage_events, with an exactly-once effect."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from streams.records import (
    ATTEMPT_COLUMNS,
    COST_COLUMNS,
    STAGE_SINK,
    TIME_COLUMNS,
    Rejection,
    Source,
    encode_record,
)
from tally.errors import SinkGaveUp, StoreError
from tally.store import Store

log = logging.getLogger(__name__)

_COLUMN_SET = frozenset(ATTEMPT_COLUMNS)
TABLE = "usage_events"


def decode_attempts(value: bytes, source: Source) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Decode one NDJSON message of priced attempts into rows ready to insert (Decimal costs, aware datetimes).

    A line that is not a complete attempt row is a rejection (stage sink), never an exception.
    """
    rows: list[dict[str, Any]] = []
    bad: list[Rejection] = []
    for n, line in enumerate(value.split(b"\n"), start=1):
        if not line:
            continue
        try:
            row = orjson.loads(line)
            if type(row) is not dict or row.keys() != _COLUMN_SET:
                missing = sorted(_COLUMN_SET - row.keys()) if isinstance(row, dict) else []
                raise ValueError(f"not an attempt row (missing {missing[:5]})")
            for c in COST_COLUMNS:
                row[c] = Decimal(row[c])
            for c in TIME_COLUMNS:
                row[c] = datetime.fromisoformat(row[c])
        except (orjson.JSONDecodeError, ValueError, TypeError, InvalidOperation) as exc:
            bad.append(Rejection("bad_attempt_row", STAGE_SINK, f"cannot decode priced attempt: {exc}", line,
                                 source, n))
            continue
        rows.append(row)
    return rows, bad


def decode_batch(messages: Sequence[tuple[bytes | None, Source]]
                 ) -> tuple[list[dict[str, Any]], dict[int, list[bytes]]]:
    """Decode a batch of attempt messages: rows to insert, and dead-letter lines keyed by partition."""
    rows: list[dict[str, Any]] = []
    dead: dict[int, list[bytes]] = {}
    for value, source in messages:
        ok, bad = decode_attempts(value or b"", source)
        rows.extend(ok)
        if bad:
            dead.setdefault(source.partition, []).extend(encode_record(r.to_record()) for r in bad)
    return rows, dead


def insert_token(event_ids: Sequence[str]) -> str:
    """Deterministic insert_deduplication_token: the same set of rows always gets the same token."""
    h = hashlib.blake2b(digest_size=16)
    for eid in sorted(event_ids):
        h.update(eid.encode())
        h.update(b"\0")
    return f"{TABLE}:{h.hexdigest()}"


@dataclass
class SinkStats:
    """Counters since the worker started."""

    batches: int = 0
    rows_inserted: int = 0
    duplicates_in_batch: int = 0
    already_saved: int = 0
    retries: int = 0
    last_insert_s: float = 0.0


@dataclass
class SinkWriter:
    """Writes priced attempts to usage_events so that each event_id lands exactly once.

    Protocol, per batch (the Faust agent acks the batch's Kafka offsets only after `write` returns):
      1. In-batch dedup: copies of one event_id collapse to the first.
      2. Lookup: event_ids ClickHouse already holds (table event_ids, TTL = the dedup window) are dropped. All copies
         of an event share its logical request id, hence its partition, hence one sink at a time: no race.
      3. Insert the rest, column-oriented, with insert_deduplication_token = a hash of their event_ids and
         async_insert = 0. A retried insert of the same rows after a timeout is absorbed by ClickHouse's dedup window
         (usage_events and the event_ids view target both have one).
      4. Return. A failure raises; the caller retries with backoff and never acks unsaved rows.
    Not guaranteed: a duplicate arriving after the dedup window (default 7 days) is inserted again.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)

    def write(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert the rows not yet saved; returns how many were inserted. Runs in the sink's executor thread."""
        unique: dict[str, dict[str, Any]] = {}
        for row in rows:
            unique.setdefault(row["event_id"], row)
        dup_in_batch = len(rows) - len(unique)
        saved = self.store.existing_event_ids(list(unique))
        fresh = [r for eid, r in unique.items() if eid not in saved]
        if fresh:
            started = time.perf_counter()
            columns = [[r[c] for r in fresh] for c in ATTEMPT_COLUMNS]
            self.store.insert_columns(TABLE, columns, ATTEMPT_COLUMNS, insert_token([r["event_id"] for r in fresh]))
            self.stats.last_insert_s = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.rows_inserted += len(fresh)
        self.stats.duplicates_in_batch += dup_in_batch
        self.stats.already_saved += len(saved)
        return len(fresh)


def _too_large(exc: BaseException) -> bool:
    text = str(exc)
    return any(k in text for k in ("MEMORY_LIMIT_EXCEEDED", "TOO_LARGE", "Entity Too Large", "max_query_size"))


async def write_with_retry(write: Callable[[Sequence[dict[str, Any]]], int], rows: Sequence[dict[str, Any]],
                           executor: Executor, retry_for_s: float, stats: SinkStats | None = None) -> int:
    """Run `write` in the executor until it succeeds, splitting a batch ClickHouse finds too large.

    Gives up after `retry_for_s` seconds by raising SinkGaveUp: the worker must then stop without committing.
    """
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + retry_for_s
    delay = 0.2
    while True:
        try:
            return await loop.run_in_executor(executor, write, rows)
        except Exception as exc:
            if _too_large(exc) and len(rows) > 1:
                half = len(rows) // 2
                log.warning("sink batch of %d rows too large for ClickHouse (%s); splitting", len(rows), exc)
                first = await write_with_retry(write, rows[:half], executor, retry_for_s, stats)
                return first + await write_with_retry(write, rows[half:], executor, retry_for_s, stats)
            if time.monotonic() + delay > deadline:
                raise SinkGaveUp(f"insert of {len(rows)} rows failed for {retry_for_s:.0f}s: {exc}") from exc
            if stats is not None:
                stats.retries += 1
            log.warning("sink insert of %d rows failed (%s); retrying in %.1fs", len(rows),
                        exc if isinstance(exc, StoreError) else repr(exc), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
