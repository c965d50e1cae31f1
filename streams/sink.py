"""Sink stage: priced attempts from llm.cost.attempts.v1 into ClickHouse usage_events, with an exactly-once effect."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from streams.fold import (
    REQUEST_COLUMNS,
    REQUEST_COST_COLUMNS,
    REQUEST_TIME_COLUMNS,
    Fact,
    facts_of_detail,
    summarize,
)
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


@dataclass(frozen=True)
class RowShape:
    """The rows one sink agent reads: their columns, which hold exact decimals and which hold times."""

    what: str
    reason: str  # the dead-letter reason for a line that is not such a row
    columns: tuple[str, ...]
    decimals: tuple[str, ...]
    times: tuple[str, ...]

    @property
    def column_set(self) -> frozenset[str]:
        return frozenset(self.columns)


ATTEMPT_ROWS = RowShape("priced attempt", "bad_attempt_row", ATTEMPT_COLUMNS, COST_COLUMNS, TIME_COLUMNS)
REQUEST_ROWS = RowShape("logical request", "bad_request_row", REQUEST_COLUMNS, REQUEST_COST_COLUMNS,
                        REQUEST_TIME_COLUMNS)


def decode_rows(value: bytes, source: Source, shape: RowShape = ATTEMPT_ROWS
                ) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Decode one NDJSON message of rows ready to insert (Decimal costs, aware datetimes).

    A line that is not a complete row of the shape is a rejection (stage sink), never an exception.
    """
    rows: list[dict[str, Any]] = []
    bad: list[Rejection] = []
    column_set = shape.column_set
    for n, line in enumerate(value.split(b"\n"), start=1):
        if not line:
            continue
        try:
            row = orjson.loads(line)
            if type(row) is not dict or row.keys() != column_set:
                missing = sorted(column_set - row.keys()) if isinstance(row, dict) else []
                raise ValueError(f"not a {shape.what} row (missing {missing[:5]})")
            for c in shape.decimals:
                row[c] = Decimal(row[c])
            for c in shape.times:
                row[c] = datetime.fromisoformat(row[c])
        except (orjson.JSONDecodeError, ValueError, TypeError, InvalidOperation) as exc:
            bad.append(Rejection(shape.reason, STAGE_SINK, f"cannot decode {shape.what}: {exc}", line, source, n))
            continue
        rows.append(row)
    return rows, bad


def decode_batch(messages: Sequence[tuple[bytes | None, Source]], shape: RowShape = ATTEMPT_ROWS
                 ) -> tuple[list[dict[str, Any]], dict[int, list[bytes]]]:
    """Decode a batch of messages: rows to insert, and dead-letter lines keyed by partition."""
    rows: list[dict[str, Any]] = []
    dead: dict[int, list[bytes]] = {}
    for value, source in messages:
        ok, bad = decode_rows(value or b"", source, shape)
        rows.extend(ok)
        if bad:
            dead.setdefault(source.partition, []).extend(encode_record(r.to_record()) for r in bad)
    return rows, dead


def insert_token(table: str, keys: Iterable[str]) -> str:
    """Deterministic insert_deduplication_token: the same set of rows always gets the same token."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(keys):
        h.update(key.encode())
        h.update(b"\0")
    return f"{table}:{h.hexdigest()}"


@dataclass
class SinkStats:
    """Counters since the worker started."""

    batches: int = 0
    rows_inserted: int = 0
    duplicates_in_batch: int = 0
    already_saved: int = 0
    retries: int = 0
    last_insert_s: float = 0.0
    superseded: int = 0


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
      4. Supersede (streams.supersede): rows of the batch's physical calls that no longer count (an estimate
         corrected by real usage) are subtracted from the rollups, once, in any arrival order.
      5. Return. A failure raises; the caller retries with backoff and never acks unsaved rows.
    Not guaranteed: a duplicate arriving after the dedup window (default 7 days) is inserted again.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)
    table: str = "usage_events"

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
            self.store.insert_columns(self.table, columns, ATTEMPT_COLUMNS,
                                      insert_token(self.table, (r["event_id"] for r in fresh)))
            self.stats.last_insert_s = time.perf_counter() - started
        from streams.supersede import supersede  # it builds on this module (insert_token)
        self.stats.superseded += supersede(self.store, list(unique.values()))
        self.stats.batches += 1
        self.stats.rows_inserted += len(fresh)
        self.stats.duplicates_in_batch += dup_in_batch
        self.stats.already_saved += len(saved)
        return len(fresh)


@dataclass
class _Head:
    """The latest revision of a logical request as ClickHouse holds it (or as this batch is about to write it)."""

    revision: int
    emitted_at: datetime
    detail: str
    _facts: list[Fact] | None = None

    @property
    def facts(self) -> list[Fact]:
        if self._facts is None:
            self._facts = facts_of_detail(self.detail)
        return self._facts

    def event_ids(self) -> set[str]:
        return {f["event_id"] for f in self.facts}


@dataclass
class RequestWriter:
    """Writes logical requests to logical_requests so each request counts once, at its latest revision.

    Per batch (rows in topic order; the agent acks offsets only after `write` returns):
      1. Look up the latest revision ClickHouse holds of each request (table logical_request_heads).
      2. For each incoming revision: if the head already holds all of its attempts (a replay, a duplicate emission,
         a stale revision), skip it. Otherwise write the new revision — the union of both attempt sets when the
         incoming one lacks some of the head's (a late attempt folded without its request's state) — numbered
         max(incoming, head + 1), together with a cancel row (sign = -1) of the head.
      3. Insert cancel and new rows in one insert with a deterministic deduplication token.
    A replayed batch finds its own revisions as heads and writes nothing; every decision is a function of attempt
    sets, so it does not depend on timing. Requests are keyed by feature_id, so one sink handles a request at a time.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)
    table: str = "logical_requests"

    def plan(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows to insert for these incoming revisions (cancel rows included)."""
        found = self.store.request_heads(list({r["logical_request_id"] for r in rows}))
        heads = {lid: _Head(rev, at, detail) for lid, (rev, at, detail) in found.items()}
        out: list[dict[str, Any]] = []
        for row in rows:
            lid = row["logical_request_id"]
            head = heads.get(lid)
            if head is None:
                out.append(row)
                heads[lid] = _Head(row["revision"], row["emitted_at"], row["attempts_detail"])
                continue
            held = head.event_ids()
            incoming = set(row["attempt_event_ids"])
            if incoming <= held:
                self.stats.already_saved += 1
                continue
            facts = facts_of_detail(row["attempts_detail"])
            if not held <= incoming:
                facts += [f for f in head.facts if f["event_id"] not in incoming]
            revision = max(row["revision"], head.revision + 1)
            new = summarize(lid, facts, revision, row["emitted_at"])
            out.append(summarize(lid, head.facts, head.revision, head.emitted_at, sign=-1))
            out.append(new)
            heads[lid] = _Head(revision, new["emitted_at"], new["attempts_detail"], facts)
        return out

    def write(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert what `plan` decides; returns how many rows were inserted. Runs in the sink's executor thread."""
        out = self.plan(rows)
        if out:
            started = time.perf_counter()
            columns = [[r[c] for r in out] for c in REQUEST_COLUMNS]
            keys = (f"{r['logical_request_id']}#{r['revision']}#{r['sign']}" for r in out)
            self.store.insert_columns(self.table, columns, REQUEST_COLUMNS, insert_token(self.table, keys))
            self.stats.last_insert_s = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.rows_inserted += len(out)
        return len(out)


ANOMALY_COLUMNS: tuple[str, ...] = (
    "detected_at", "feature_id", "team_id", "signal", "state", "severity", "value", "baseline", "score", "dimension",
    "dimension_value", "explanation", "incident_id", "incident_key", "started_at", "window_start", "window_end",
    "requests",
)
_ANOMALY_TIMES = ("detected_at", "started_at", "window_start", "window_end")
_ANOMALY_NUMBERS = ("value", "baseline", "score")


def decode_anomalies(messages: Sequence[tuple[bytes | None, Source]]
                     ) -> tuple[list[dict[str, Any]], dict[int, list[bytes]]]:
    """Anomaly rows from a batch of llm.cost.alerts.v1 messages, and dead-letter lines keyed by partition.

    Records of another kind (budget alerts) are not anomalies and are passed over; a line that is not an alert
    record of kind anomaly with every anomalies column is dead-lettered (reason bad_alert_row).
    """
    rows: list[dict[str, Any]] = []
    dead: dict[int, list[bytes]] = {}
    for value, source in messages:
        for n, line in enumerate((value or b"").split(b"\n"), start=1):
            if not line:
                continue
            try:
                record = orjson.loads(line)
                if type(record) is not dict:
                    raise ValueError("an alert record is a JSON object")
                if record.get("kind") != "anomaly":
                    continue
                missing = [c for c in ANOMALY_COLUMNS if c not in record]
                if missing:
                    raise ValueError(f"not an anomaly record (missing {missing[:5]})")
                row = {c: record[c] for c in ANOMALY_COLUMNS}
                for c in _ANOMALY_TIMES:
                    row[c] = datetime.fromisoformat(row[c])
                for c in _ANOMALY_NUMBERS:
                    row[c] = float(row[c])
                row["requests"] = int(row["requests"])
            except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
                rej = Rejection("bad_alert_row", STAGE_SINK, f"cannot decode anomaly: {exc}", line, source, n)
                dead.setdefault(source.partition, []).append(encode_record(rej.to_record()))
                continue
            rows.append(row)
    return rows, dead


@dataclass
class AnomalyWriter:
    """Writes anomaly records to the anomalies table.

    Per batch: insert every row with a deterministic token (a hash of the records' keys), async_insert = 0; the
    agent acks offsets only after `write` returns. A record written twice is one key of the ReplacingMergeTree.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)
    table: str = "anomalies"

    def write(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert the rows; returns how many. Runs in the sink's executor thread."""
        if rows:
            columns = [[r[c] for r in rows] for c in ANOMALY_COLUMNS]
            keys = (f"{r['incident_id']}#{r['state']}#{r['detected_at'].isoformat()}" for r in rows)
            self.store.insert_columns(self.table, columns, ANOMALY_COLUMNS, insert_token(self.table, keys))
        self.stats.batches += 1
        self.stats.rows_inserted += len(rows)
        return len(rows)


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
