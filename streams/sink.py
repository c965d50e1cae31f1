"""Sink stage: priced attempts from llm.cost.attempts.v1 into ClickHouse usage_events, with an exactly-once effect."""

from __future__ import annotations

import asyncio
import bisect
import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import orjson
import pyarrow as pa

from streams.fold import (
    REQUEST_COLUMNS,
    REQUEST_COST_COLUMNS,
    REQUEST_TIME_COLUMNS,
    Fact,
    facts_of_detail,
    summarize,
)
from streams.pieces import (
    Piece,
    cut_columns,
    journal_entry,
    journaled_pieces,
    make_pieces,
    plan_id,
    split_piece,
)
from streams.records import (
    ATTEMPT_COLUMNS,
    ATTEMPT_COLUMNS_ADDED,
    COST_COLUMNS,
    STAGE_SINK,
    TIME_COLUMNS,
    Rejection,
    Source,
    encode_record,
)
from streams.sink_columns import (
    PART_SCHEMA,
    REQUEST_SCHEMA,
    SINK_SCHEMA,
    ArrowPart,
    AttemptBatch,
    DictPart,
    Refused,
    arrow_part,
    ipc_part,
    is_arrow,
    request_part,
    rows_table,
    table_rows,
)
from streams.supersede import supersede
from streams.watermarks import is_watermark
from tally.errors import SinkGaveUp, SinkRefused, StoreError
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
    added: Mapping[str, Any] = field(default_factory=dict)  # columns a row written before them may lack → value

    @property
    def column_set(self) -> frozenset[str]:
        return frozenset(self.columns)


ATTEMPT_ROWS = RowShape("priced attempt", "bad_attempt_row", ATTEMPT_COLUMNS, COST_COLUMNS, TIME_COLUMNS,
                        ATTEMPT_COLUMNS_ADDED)
REQUEST_ROWS = RowShape("logical request", "bad_request_row", REQUEST_COLUMNS, REQUEST_COST_COLUMNS,
                        REQUEST_TIME_COLUMNS)


def origin_of(source: Source) -> str:
    """The identity of the sink's input message a row came from, `topic[partition]@offset` (usage_events.origin).

    A Kafka message never changes once written, so every piece planned from it is the same on every replay.
    """
    return f"{source.topic}[{source.partition}]@{source.offset}"


def decode_rows(value: bytes, source: Source, shape: RowShape = ATTEMPT_ROWS
                ) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Decode one NDJSON message of rows ready to insert (Decimal costs, aware datetimes).

    Each row also gets `origin` (origin_of(source)): the message it came from, which the writers group pieces by.
    A line that is not a complete row of the shape is a rejection (stage sink), never an exception.
    """
    origin = origin_of(source)
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
                if (not isinstance(row, dict) or not row.keys() <= column_set
                        or not set(missing) <= shape.added.keys()):
                    raise ValueError(f"not a {shape.what} row (missing {missing[:5]})")
                row.update((c, shape.added[c]) for c in missing)  # written before these columns existed
            for c in shape.decimals:
                row[c] = Decimal(row[c])
            for c in shape.times:
                row[c] = datetime.fromisoformat(row[c])
        except (orjson.JSONDecodeError, ValueError, TypeError, InvalidOperation) as exc:
            bad.append(Rejection(shape.reason, STAGE_SINK, f"cannot decode {shape.what}: {exc}", line, source, n))
            continue
        row["origin"] = origin
        rows.append(row)
    return rows, bad


def decode_batch(messages: Sequence[tuple[bytes | None, Source]], shape: RowShape = ATTEMPT_ROWS,
                 columnar: bool = True) -> tuple[Sequence[dict[str, Any]], dict[int, list[bytes]]]:
    """Decode a batch of messages: rows to insert, and dead-letter lines keyed by partition.

    Attempt rows (with `columnar`) come as an AttemptBatch: an Arrow message as its table (ipc_part; one that is not
    a table of attempts is one dead letter), an NDJSON message in Arrow columns where the fast path
    (streams.sink_columns.arrow_part) takes all of its lines, else through decode_rows, line by line, whose dead
    letters are the only ones. Logical-request rows (with `columnar`) come as an AttemptBatch too: an Arrow message
    as its table (request_part), an NDJSON message through decode_rows. Other shapes are decoded by decode_rows.
    Watermark messages (streams.watermarks, on the requests topic) are the detectors' and are passed over.
    """
    fast = columnar and shape is ATTEMPT_ROWS
    parts = columnar and shape in (ATTEMPT_ROWS, REQUEST_ROWS)  # the writer plans over an AttemptBatch's columns
    rows: list[dict[str, Any]] = []
    batch = AttemptBatch()
    dead: dict[int, list[bytes]] = {}
    for value, source in messages:
        if is_watermark(value):
            continue
        if is_arrow(value):  # the process role's Arrow hand-off
            try:
                if shape is ATTEMPT_ROWS:
                    part = ipc_part(value or b"", source, origin_of(source))
                    if fast:
                        batch.parts.append(part)
                    else:
                        rows.extend(table_rows(part.table))
                elif shape is REQUEST_ROWS:
                    part = request_part(value or b"", source, origin_of(source))
                    if columnar:
                        batch.parts.append(part)
                    else:
                        rows.extend(table_rows(part.table))
                else:
                    raise Refused(f"no Arrow form of {shape.what} rows")
            except Refused as exc:  # the whole message is the dead letter: its rows cannot be told apart
                reject = Rejection(shape.reason, STAGE_SINK, f"cannot decode {shape.what}s: {exc}", value or b"",
                                   source, 1)
                dead.setdefault(source.partition, []).append(encode_record(reject.to_record()))
            continue
        if fast:
            try:
                batch.parts.append(arrow_part(value or b"", source, origin_of(source)))
                continue
            except Refused:
                pass
        ok, bad = decode_rows(value or b"", source, shape)
        if parts:
            batch.parts.append(DictPart(ok))
        else:
            rows.extend(ok)
        if bad:
            dead.setdefault(source.partition, []).extend(encode_record(r.to_record()) for r in bad)
    return (batch if parts else rows), dead


def content_hash(payload: str) -> str:
    """A hash of an event's content: its original fields, whatever their order or spacing on the wire.

    Stable across re-delivery: the same event (same fields, same values) always hashes the same. A payload that is
    not a JSON object (a foreign producer) is hashed as its bytes.
    """
    try:
        canonical = orjson.dumps(orjson.loads(payload), option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        canonical = payload.encode()
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def utc_day(at: datetime) -> date:
    """The UTC day of a time: the partition of rollup_minute, the finest PARTITION BY an insert reaches."""
    return (at.astimezone(UTC) if at.tzinfo is not None else at).date()


@dataclass
class Plan:
    """What a writer decided for one batch: the pieces to insert (in order) and the rows it refused."""

    pieces: list[Piece]
    rejections: list[Rejection] = field(default_factory=list)
    finish: Callable[[], int] | None = None  # an idempotent step after every piece landed (supersede)
    prepare: Callable[[], None] | None = None  # an idempotent step before any piece is sent (journal the plan)


@dataclass
class Journaled:
    """The journaled plans (streams.pieces) that cover some of a batch's messages.

    Their pieces are re-sent before anything else is planned; the messages they cover are left out of the new plan.
    """

    pieces: list[Piece] = field(default_factory=list)
    covered: frozenset[str] = frozenset()


def read_journal(store: Store, origins: Sequence[str], schema: pa.Schema,
                 keys_of: Callable[[pa.Table], list[str]]) -> Journaled:
    """The journaled plans of these input messages (sink_journal), their pieces in the order they were planned."""
    messages = list(dict.fromkeys(o for o in origins if o))
    if not messages:  # rows without an origin (tools, tests) are never journaled
        return Journaled()
    covered, entries = store.journaled_plans(messages)
    missing = set(covered.values()) - entries.keys()
    if missing:  # one insert writes both rows of a plan: this is a damaged journal, not a race
        raise StoreError(f"sink_journal covers messages of plans {sorted(missing)[:3]} but holds no pieces for them")
    pieces = [p for plan in sorted(entries) for p in journaled_pieces(entries[plan], schema, keys_of)]
    return Journaled(pieces, frozenset(covered))


def journal_plan(store: Store, origins: Sequence[str], pieces: Sequence[Piece]) -> None:
    """Journal a plan's pieces for the messages it covers, in one insert (Plan.prepare: before any piece is sent)."""
    store.journal_plan(plan_id(origins), sorted(set(origins)), journal_entry(pieces))


@dataclass
class Written:
    """The outcome of one batch: rows inserted, rows re-sent from the journal, and the dead letters to publish.

    The agent publishes the dead letters before it stores the batch's position.
    """

    inserted: int
    rejections: list[Rejection]
    resent: int = 0

    def dead_letters(self) -> dict[int, list[bytes]]:
        """Dead-letter lines keyed by partition (the partition of the line's source)."""
        out: dict[int, list[bytes]] = {}
        for r in self.rejections:
            out.setdefault(r.source.partition if r.source else 0, []).append(encode_record(r.to_record()))
        return out


class Writer(Protocol):
    """What write_with_retry drives: re-send the journaled plans, plan the rest once, insert until each piece landed."""

    stats: SinkStats

    def journaled(self, rows: Sequence[dict[str, Any]]) -> Journaled: ...

    def plan(self, rows: Sequence[dict[str, Any]], covered: frozenset[str] = frozenset()) -> Plan: ...

    def insert(self, piece: Piece) -> None: ...

    def key(self, row: dict[str, Any]) -> str: ...

    def landed(self, piece: Piece) -> int: ...


@dataclass
class SinkStats:
    """Counters since the worker started."""

    batches: int = 0
    rows_inserted: int = 0
    duplicates_in_batch: int = 0
    already_saved: int = 0
    conflicting_duplicates: int = 0
    resent: int = 0  # rows of a journaled plan re-sent by a replay (absorbed where they landed)
    retries: int = 0
    last_insert_s: float = 0.0
    last_insert_at: float = 0.0  # Unix time the last insert was acknowledged (0: none yet)
    superseded: int = 0
    # Called with (table, seconds) after each acknowledged insert (the worker's latency histogram); None: not kept.
    observe: Callable[[str, float], None] | None = field(default=None, repr=False, compare=False)


def run_plan(writer: Writer, rows: Sequence[dict[str, Any]]) -> int:
    """Re-send the journaled plans, plan and insert once, without retry (tools, tests); returns rows inserted.

    Refuses a batch whose plan dead-letters rows (a caller without a dead-letter route would drop them): use
    write_with_retry, which returns them.
    """
    replay = writer.journaled(rows)
    for piece in replay.pieces:
        writer.insert(piece)
    writer.stats.resent += sum(p.size for p in replay.pieces)
    plan = writer.plan(rows, replay.covered)
    if plan.rejections:
        raise SinkRefused(f"{len(plan.rejections)} rows need the dead-letter topic "
                          f"({plan.rejections[0].reason}: {plan.rejections[0].message})")
    if plan.prepare is not None:
        plan.prepare()
    for piece in plan.pieces:
        writer.insert(piece)
    if plan.finish is not None:
        plan.finish()
    return sum(p.size for p in plan.pieces)


def _insert(writer: Writer, store: Store, piece: Piece, columns: Sequence[str]) -> None:
    """Insert one piece: a columnar piece as one Arrow record batch (Store.insert_arrow), dict rows in columns.

    ClickHouse derives a block's deduplication id from the insert's token *and* how the insert was chunked: the
    same token sent once as one Arrow batch and once as clickhouse-connect's Native blocks is two blocks, both
    kept. So a piece whose replay must be absorbed is always columnar, planned and journaled as one Arrow table.
    """
    started = time.perf_counter()
    if piece.data is not None:
        store.insert_arrow(piece.table, piece.data, piece.token)
    else:
        rows = piece.rows
        store.insert_columns(piece.table, [[r[c] for r in rows] for c in columns], columns, piece.token)
    stats = writer.stats
    stats.last_insert_s = time.perf_counter() - started
    stats.last_insert_at = time.time()
    stats.rows_inserted += piece.size
    if stats.observe is not None:
        stats.observe(piece.table, stats.last_insert_s)


# usage_events as the sink writes it: content_hash (008) and origin, the input message of the row (011).
SINK_COLUMNS: tuple[str, ...] = (*ATTEMPT_COLUMNS, "content_hash", "origin")


@dataclass
class SinkWriter:
    """Writes priced attempts to usage_events so that each event_id lands exactly once, in every table.

    Every row carries `origin`, the llm.cost.attempts.v1 message it was decoded from (decode_rows). Protocol, per
    batch (the Faust agent acks the batch's Kafka offsets only after every piece has landed):
      1. Hash each row's content (its original event, `payload`): content_hash.
      2. Lookup: the event_ids ClickHouse already holds, each with its hash and origin (table event_ids, TTL = the
         dedup window). All copies of an event share its logical request id, hence its partition, hence one sink
         at a time: no race.
      0. Journal: the batch's messages that a journaled plan covers (a replay after a crash mid-insert) have that
         plan's pieces re-sent first, as they were planned (write_with_retry; streams.pieces). Their rows are
         still decided below (their dead letters and the supersede step are derived again) but not planned again.
      3. Decide, in batch order: an event_id not saved, or saved with this row's own origin (a message whose
         insert was cut short), is inserted once; a copy saved by another message, or already planned earlier in
         this batch, is a duplicate if its hash matches, skipped; with another hash it is a dead letter
         conflicting_duplicate (both hashes in its message, the original line as its bytes), never inserted.
      4. Pieces: the rows to insert, of every message of the batch, in pieces of up to DAYS_PER_PIECE UTC days of
         ts (rollup_minute, partitioned by day, is the finest partitioning an insert reaches: a piece never hits
         TOO_MANY_PARTS), one Arrow table each, with insert_deduplication_token = a hash of (table, plan, days,
         sorted event_ids), async_insert = 0. The plan is journaled (sink_journal) before its first insert.
      5. Insert the pieces; write_with_retry re-sends a failed piece unchanged, and a replay after a crash re-sends
         it from the journal (step 0). A re-sent block is deduplicated in every table that holds it (usage_events,
         event_ids and every view target, by their own derived tokens) and fills the ones that missed it: none
         gets it twice.
      6. Supersede (streams.supersede), after every piece landed: rows of the batch's physical calls that no
         longer count (an estimate corrected by real usage) are subtracted from the rollups, once, in any arrival
         order; idempotent, so it is retried like an insert and redone by a replay.
    Not guaranteed: a duplicate arriving after the dedup window (default 7 days) is inserted again; an event saved
    before migration 008 has no hash, so any later copy of it counts as a duplicate; an event saved before 011 has
    no origin, so a replay of its message skips it (a cut-short insert from before 011 is not repaired); a replayed
    piece is absorbed only while its blocks are within each table's dedup window (10,000 inserts a table) and its
    plan within the journal's TTL (the dedup window): a plan covering several partitions is re-sent by every replay
    that meets one of its messages, so a partition whose replay comes more than 10,000 inserts after another's
    (a worker down that long after a crash mid-insert) would have that re-send inserted again; a piece that
    ClickHouse found too large and split (write_with_retry) and whose insert was then cut short by a crash is
    re-sent whole from the journal, under another token than its halves; a sink that still writes a batch after
    its partitions went to another sink (a zombie: Faust waits for the batch before it gives them up, unless the
    group's rebalance timeout passes first) may insert rows the new owner plans in another batch, under other
    tokens (before 012 pieces were per message, so such a copy was absorbed): `tally verify` lists an event_id
    stored twice.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)
    table: str = "usage_events"

    def journaled(self, rows: Sequence[dict[str, Any]]) -> Journaled:
        """Step 0: the journaled plans covering any of the batch's messages."""
        batch = rows if isinstance(rows, AttemptBatch) else AttemptBatch([DictPart(list(rows))])
        return read_journal(self.store, batch.origins(), SINK_SCHEMA, _event_ids)

    def plan(self, rows: Sequence[dict[str, Any]], covered: frozenset[str] = frozenset()) -> Plan:
        """Steps 1-4: the pieces to insert and the conflicting duplicates. Reads ClickHouse, writes nothing.

        In columns: the batch (an AttemptBatch from decode_batch; dict rows are taken as one part) is read column
        by column. An event_id that ClickHouse does not hold and that the batch carries once (nearly all of them)
        is inserted: a set difference. Only the event_ids held or repeated go through the decision of step 3, row
        by row in batch order (a decision depends only on the rows of its own event_id). Rows of the messages in
        `covered` (re-sent from the journal) are decided but not planned. `prepare` journals the pieces.
        """
        batch = rows if isinstance(rows, AttemptBatch) else AttemptBatch([DictPart(list(rows))])
        hashes: list[str] = []
        for part in batch.parts:
            if isinstance(part, ArrowPart):
                hashes.extend(content_hash(p) for p in part.table.column("payload").to_pylist())
                continue
            for row in part.rows:
                if "origin" not in row:
                    raise SinkRefused(f"row {row['event_id']} has no origin: attempt rows reach the sink through "
                                      "decode_rows, which names the message each came from")
                row["content_hash"] = content_hash(row["payload"])
                hashes.append(row["content_hash"])
        eids: list[str] = batch.column("event_id")
        origins: list[str] = batch.column("origin")
        saved = self.store.saved_events(list(dict.fromkeys(eids)))
        contested = saved.keys() | {eid for eid, n in Counter(eids).items() if n > 1}
        held = {eid: s.content_hash for eid, s in saved.items()}  # event_id → hash, as held after this batch
        planned: set[str] = set()
        fresh: list[int] = []  # rows to insert, by position in the batch
        rejections: list[Rejection] = []
        for i, eid in enumerate(eids):
            if eid not in contested:
                fresh.append(i)
                continue
            digest = hashes[i]
            found = saved.get(eid)
            if eid not in planned and (found is None or found == (digest, origins[i])):
                self.stats.resent += found is not None and origins[i] not in covered
                held[eid] = digest
                planned.add(eid)
                fresh.append(i)
                continue
            known, where = held[eid], "earlier in this batch" if eid in planned else "saved"
            if known not in (digest, ""):
                rejections.append(_conflict({**batch[i], "content_hash": digest}, known, where))
            elif eid in planned:
                self.stats.duplicates_in_batch += 1
            else:
                self.stats.already_saved += 1
        self.stats.conflicting_duplicates += len(rejections)
        self.stats.batches += 1
        if covered:
            fresh = [i for i in fresh if origins[i] not in covered]
        messages = [o for o in dict.fromkeys(origins) if o not in covered]
        data = self._rows(batch, fresh, hashes)
        pieces = cut_columns(self.table, data, [eids[i] for i in fresh], "ts", plan_id(messages))
        request_ids: dict[str, str] = {}  # each event_id once, as it counts (conflicting copies never do)
        for i, rid in enumerate(batch.column("request_id")):
            if eids[i] not in contested or held[eids[i]] in (hashes[i], ""):
                request_ids.setdefault(eids[i], rid)
        # supersede reads only the request_id of each counted row
        counted = [{"request_id": rid} for rid in request_ids.values()]
        prepare = functools.partial(journal_plan, self.store, messages, pieces) if pieces else None
        return Plan(pieces, rejections, functools.partial(self.supersede, counted), prepare)

    def _rows(self, batch: AttemptBatch, fresh: Sequence[int], hashes: Sequence[str]) -> pa.Table:
        """The rows at these batch positions as one table of SINK_SCHEMA (their content hashes added), in order."""
        tables: list[pa.Table] = []
        start = 0
        k = 0  # the first of `fresh` not taken yet
        for part in batch.parts:
            end = start + len(part)
            j = bisect.bisect_left(fresh, end, lo=k)
            local = [i - start for i in fresh[k:j]]
            if local:
                if isinstance(part, ArrowPart) and len(local) == len(part):
                    table = part.table  # every row of the message is fresh (nearly always): no copy
                elif isinstance(part, ArrowPart):
                    table = part.table.take(pa.array(local, pa.int64()))
                else:
                    table = rows_table([part.rows[i] for i in local], PART_SCHEMA)
                tables.append(table.add_column(table.num_columns - 1, SINK_SCHEMA.field("content_hash"),
                                               pa.array([hashes[i] for i in fresh[k:j]], pa.string())))
            start, k = end, j
        return pa.concat_tables(tables) if tables else SINK_SCHEMA.empty_table()

    def supersede(self, rows: Sequence[dict[str, Any]]) -> int:
        """Step 6. Runs in the sink's executor thread; returns how many rows it superseded now."""
        n = supersede(self.store, list(rows))
        self.stats.superseded += n
        return n

    def key(self, row: dict[str, Any]) -> str:
        return str(row["event_id"])

    def insert(self, piece: Piece) -> None:
        """Step 5 for one piece. Runs in the sink's executor thread."""
        _insert(self, self.store, piece, SINK_COLUMNS)

    def landed(self, piece: Piece) -> int:
        """How many of the piece's rows usage_events holds (through event_ids)."""
        keys = list(piece.keys) if piece.data is not None else [r["event_id"] for r in piece.rows]
        return len(self.store.saved_events(keys))

    def write(self, rows: Sequence[dict[str, Any]]) -> int:
        """Plan and insert once (run_plan); returns how many rows were inserted."""
        return run_plan(self, rows)


def _conflict(row: dict[str, Any], known: str, where: str) -> Rejection:
    eid = row["event_id"]
    message = (f"event_id {eid} is {where} with content hash {known}; this copy has content hash "
               f"{row['content_hash']} (model {row['model_actual']}, cost {row['cost_total_usd']} USD): "
               "not inserted")
    source = Source(row["source_topic"], row["source_partition"], row["source_offset"])
    return Rejection("conflicting_duplicate", STAGE_SINK, message, row["payload"].encode(), source,
                     row["source_line"], event_id=eid)


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


def _event_ids(data: pa.Table) -> list[str]:
    """SinkWriter's keys of a piece's rows."""
    return [str(e) for e in data.column("event_id").to_pylist()]


def _request_keys(data: pa.Table) -> list[str]:
    """RequestWriter's keys of a piece's rows: logical_request_id#revision#sign."""
    return [f"{lid}#{rev}#{sign}" for lid, rev, sign in zip(
        data.column("logical_request_id").to_pylist(), data.column("revision").to_pylist(),
        data.column("sign").to_pylist(), strict=True)]


@dataclass
class RequestWriter:
    """Writes logical requests to logical_requests so each request counts once, at its latest revision.

    Per batch (rows in topic order, each with its origin message; the agent acks offsets only after every piece
    has landed):
      0. Journal: the batch's messages that a journaled plan covers (a replay after a crash mid-insert) have that
         plan's pieces re-sent first, as they were planned (write_with_retry; streams.pieces), and are not decided
         again. A decision reads logical_request_heads, which an insert cut short may already hold while a rollup
         grain lacks it: deciding again would skip those revisions (a gap) or cut them otherwise (a duplicate).
      1. Look up the latest revision ClickHouse holds of each request (table logical_request_heads): after step 0,
         so the heads show what the re-sent plans wrote.
      2. For each incoming revision: if the head already holds all of its attempts (a replay, a duplicate emission,
         a stale revision), skip it. Otherwise write the new revision — the union of both attempt sets when the
         incoming one lacks some of the head's (a late attempt folded without its request's state) — numbered
         max(incoming, head + 1), together with a cancel row (sign = -1) of the head.
      3. Plan once: a request's rows stay in one piece; pieces of up to DAYS_PER_PIECE UTC days of first_ts
         (rollup_minute, partitioned by day, is the finest partitioning the insert reaches), one Arrow table each,
         with a deterministic token (a hash of table, plan, days and its rows' id#revision#sign).
      4. Journal the plan (Plan.prepare) before any piece is sent.
      5. Insert the pieces; write_with_retry re-sends a failed piece unchanged (never re-deciding through the
         lookup), which fills a view target that failed the first time and is absorbed everywhere else.
    Every decision is a function of attempt sets, so it does not depend on timing. Requests are keyed by
    feature_id, so one sink handles a request at a time. Rows without an origin (tools and tests that write fold
    output directly) are decided and cut as the others, without a journal: a replay of them is skipped by the heads.
    Not guaranteed: a replay after the journal's TTL (the dedup window) is decided again.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)
    table: str = "logical_requests"

    def decide(self, rows: Sequence[dict[str, Any]], found: dict[str, tuple[int, datetime, str]] | None = None
               ) -> list[dict[str, Any]]:
        """Step 2: the rows to insert for these incoming revisions (cancel rows included), in order.

        `found`: the heads of the rows' requests, when the caller has looked them up.
        """
        if found is None:
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
            cancel = summarize(lid, head.facts, head.revision, head.emitted_at, sign=-1)
            out += [cancel, new]
            heads[lid] = _Head(revision, new["emitted_at"], new["attempts_detail"], facts)
        return out

    def journaled(self, rows: Sequence[dict[str, Any]]) -> Journaled:
        """Step 0: the journaled plans covering any of the batch's messages."""
        batch = rows if isinstance(rows, AttemptBatch) else AttemptBatch([DictPart(list(rows))])
        return read_journal(self.store, batch.origins(), REQUEST_SCHEMA, _request_keys)

    def plan(self, rows: Sequence[dict[str, Any]], covered: frozenset[str] = frozenset()) -> Plan:
        """Steps 1-3: the decided rows in pieces by day; `prepare` journals them. `covered` messages are left out.

        In columns: the batch (an AttemptBatch from decode_batch; dict rows are taken as one part) is read column by
        column. A row of an Arrow message whose request ClickHouse does not hold and that the batch carries once
        (nearly all of them) is inserted as it came: a set difference, no row made. Only the others go through the
        decision of step 2, in batch order.
        """
        batch = rows if isinstance(rows, AttemptBatch) else AttemptBatch([DictPart(list(rows))])
        lids: list[str] = []
        origins: list[str] = []
        arrow: list[tuple[ArrowPart, int]] = []  # (part, row in it) of each row of an Arrow part
        others: list[dict[str, Any]] = []  # the dict rows, and the Arrow rows that need a decision, in order
        position: list[int] = []  # for each row of `lids`: its index in `arrow`, or -1 - its index in `others`
        for part in batch.parts:
            if isinstance(part, ArrowPart):
                if part.origin in covered:
                    continue
                ids = part.table.column("logical_request_id").to_pylist()
                for i in range(len(ids)):
                    position.append(len(arrow))
                    arrow.append((part, i))
                lids.extend(ids)
                origins.extend([part.origin] * len(ids))
            else:
                for r in part.rows:
                    if r.get("origin", "") in covered:
                        continue
                    position.append(-1 - len(others))
                    others.append(r)
                    lids.append(r["logical_request_id"])
                    origins.append(r.get("origin", ""))
        found = self.store.request_heads(list(dict.fromkeys(lids)))
        counts = Counter(lids)
        # An Arrow row whose request is neither held nor repeated goes as it came; every other row is decided.
        as_came = [position[n] for n in range(len(lids))
                   if position[n] >= 0 and counts[lids[n]] == 1 and lids[n] not in found]
        taken = set(as_came)
        undecided: list[dict[str, Any]] = []
        for k in position:
            if k < 0:
                undecided.append(others[-1 - k])
            elif k not in taken:
                part, i = arrow[k]
                undecided.append(part.row(i))
        decided = self.decide(undecided, found)
        self.stats.batches += 1
        tables: list[pa.Table] = []
        by_part: dict[int, tuple[ArrowPart, list[int]]] = {}
        for k in as_came:
            part, i = arrow[k]
            by_part.setdefault(id(part), (part, []))[1].append(i)
        for part, local in by_part.values():
            tables.append(part.table.take(pa.array(local, pa.int64())).select(list(REQUEST_COLUMNS)))
        came = sum(t.num_rows for t in tables)
        if decided:
            tables.append(rows_table(decided, REQUEST_SCHEMA))
        data = pa.concat_tables(tables) if tables else REQUEST_SCHEMA.empty_table()
        groups: dict[str, list[int]] = {}  # a request's decided rows (a cancel row and its revision) stay together
        for n, r in enumerate(decided):
            groups.setdefault(r["logical_request_id"], []).append(came + n)
        messages = [o for o in dict.fromkeys(origins) if o]
        pieces = cut_columns(self.table, data, _request_keys(data), "first_ts", plan_id(messages),
                             [g for g in groups.values() if len(g) > 1])
        prepare = functools.partial(journal_plan, self.store, messages, pieces) if pieces and messages \
            else None
        return Plan(pieces, prepare=prepare)

    def key(self, row: dict[str, Any]) -> str:
        return f"{row['logical_request_id']}#{row['revision']}#{row['sign']}"

    def insert(self, piece: Piece) -> None:
        """Step 5 for one piece. Runs in the sink's executor thread."""
        _insert(self, self.store, piece, REQUEST_COLUMNS)

    def landed(self, piece: Piece) -> int:
        """How many of the piece's rows logical_requests holds."""
        keys = list(piece.keys) if piece.data is not None else [self.key(r) for r in piece.rows]
        return self.store.held_request_rows(keys)

    def write(self, rows: Sequence[dict[str, Any]]) -> int:
        """Re-send, plan and insert once (run_plan); returns how many rows were inserted."""
        return run_plan(self, rows)


ANOMALY_COLUMNS: tuple[str, ...] = (
    "detected_at", "feature_id", "team_id", "signal", "state", "severity", "value", "baseline", "score", "dimension",
    "dimension_value", "explanation", "incident_id", "incident_key", "started_at", "window_start", "window_end",
    "requests",
)
_ANOMALY_TIMES = ("detected_at", "started_at", "window_start", "window_end")
_ANOMALY_NUMBERS = ("value", "baseline", "score")


def decode_records(messages: Sequence[tuple[bytes | None, Source]],
                   row_of: Callable[[Any, bytes], dict[str, Any] | None],
                   reason: str, what: str) -> tuple[list[dict[str, Any]], dict[int, list[bytes]]]:
    """Rows from batch messages of JSON-lines records, and dead-letter lines keyed by partition.

    `row_of(record, line)` gives a record's row, None to pass it over, or raises ValueError or TypeError for a
    record that is not one: that line is dead-lettered (`reason`, stage sink) with its bytes.
    """
    rows: list[dict[str, Any]] = []
    dead: dict[int, list[bytes]] = {}
    for value, source in messages:
        for n, line in enumerate((value or b"").split(b"\n"), start=1):
            if not line:
                continue
            try:
                row = row_of(orjson.loads(line), line)
            except (orjson.JSONDecodeError, ValueError, TypeError, InvalidOperation) as exc:
                rej = Rejection(reason, STAGE_SINK, f"cannot decode {what}: {exc}", line, source, n)
                dead.setdefault(source.partition, []).append(encode_record(rej.to_record()))
                continue
            if row is not None:
                rows.append(row)
    return rows, dead


def _anomaly_row(record: Any, line: bytes) -> dict[str, Any] | None:
    if type(record) is not dict:
        raise ValueError("an alert record is a JSON object")
    if record.get("kind") != "anomaly":
        return None
    missing = [c for c in ANOMALY_COLUMNS if c not in record]
    if missing:
        raise ValueError(f"not an anomaly record (missing {missing[:5]})")
    row = {c: record[c] for c in ANOMALY_COLUMNS}
    for c in _ANOMALY_TIMES:
        row[c] = datetime.fromisoformat(row[c])
    for c in _ANOMALY_NUMBERS:
        row[c] = float(row[c])
    row["requests"] = int(row["requests"])
    return row


def decode_anomalies(messages: Sequence[tuple[bytes | None, Source]]
                     ) -> tuple[list[dict[str, Any]], dict[int, list[bytes]]]:
    """Anomaly rows from a batch of llm.cost.alerts.v1 messages, and dead-letter lines keyed by partition.

    Records of another kind (budget alerts) are not anomalies and are passed over; a line that is not an alert
    record of kind anomaly with every anomalies column is dead-lettered (reason bad_alert_row).
    """
    return decode_records(messages, _anomaly_row, "bad_alert_row", "anomaly")


@dataclass
class RecordWriter:
    """Writes records to a ReplacingMergeTree table that feeds no view: anomalies, budget decisions.

    Per batch: split by UTC day of `time_column`, insert each piece with a deterministic token (a hash of its
    records' keys), async_insert = 0; the agent acks offsets only after every piece has landed. A record written
    twice is one key of the ReplacingMergeTree: nothing is looked up or journaled.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)
    table: str = ""
    columns: tuple[str, ...] = ()
    time_column: str = ""

    def journaled(self, rows: Sequence[dict[str, Any]]) -> Journaled:
        """Nothing: the pieces are not journaled (a re-sent record is the same ReplacingMergeTree key)."""
        return Journaled()

    def plan(self, rows: Sequence[dict[str, Any]], covered: frozenset[str] = frozenset()) -> Plan:
        """Every row, by day; nothing is looked up."""
        self.stats.batches += 1
        column = self.time_column
        return Plan(make_pieces(self.table, ((r,) for r in rows), self.key, lambda g: (utc_day(g[0][column]),)))

    def key(self, row: dict[str, Any]) -> str:
        raise NotImplementedError

    def insert(self, piece: Piece) -> None:
        """Insert one piece. Runs in the sink's executor thread."""
        _insert(self, self.store, piece, self.columns)

    def landed(self, piece: Piece) -> int:
        """Always 0: a half re-sent after a partial insert is the same ReplacingMergeTree keys, so splitting is safe."""
        return 0

    def write(self, rows: Sequence[dict[str, Any]]) -> int:
        """Plan and insert once (run_plan); returns how many rows were inserted."""
        return run_plan(self, rows)


@dataclass
class AnomalyWriter(RecordWriter):
    """Writes anomaly records to the anomalies table (migration 006)."""

    table: str = "anomalies"
    columns: tuple[str, ...] = ANOMALY_COLUMNS
    time_column: str = "detected_at"

    def key(self, row: dict[str, Any]) -> str:
        return f"{row['incident_id']}#{row['state']}#{row['detected_at'].isoformat()}"


# ClickHouse error classes that mean "this insert is too big as one piece": split it.
_SPLIT_ERRORS = ("TOO_MANY_PARTS", "TOO_MANY_PARTITIONS", "too many partitions", "max_partitions_per_insert_block",
                 "MEMORY_LIMIT_EXCEEDED", "TOO_LARGE", "Entity Too Large", "max_query_size", "TOO_BIG")


def _too_large(exc: BaseException) -> bool:
    text = str(exc)
    return any(k in text for k in _SPLIT_ERRORS)


@dataclass
class _Backoff:
    """Retries within one deadline for a whole batch, with doubling delays."""

    retry_for_s: float
    stats: SinkStats | None
    deadline: float = 0.0
    delay: float = 0.2

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.retry_for_s

    async def after(self, what: str, exc: BaseException) -> None:
        """Sleep before the next try, or raise SinkGaveUp once the deadline would pass."""
        if time.monotonic() + self.delay > self.deadline:
            raise SinkGaveUp(f"{what} failed for {self.retry_for_s:.0f}s: {exc}") from exc
        if self.stats is not None:
            self.stats.retries += 1
        log.warning("sink: %s failed (%s); retrying in %.1fs", what,
                    exc if isinstance(exc, StoreError) else repr(exc), self.delay)
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, 5.0)

    async def run(self, executor: Executor, what: str, call: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            try:
                result = await loop.run_in_executor(executor, call)
            except Exception as exc:
                await self.after(what, exc)
                continue
            self.delay = 0.2
            return result


async def run_with_retry(call: Callable[[], Any], executor: Executor, retry_for_s: float,
                         stats: SinkStats | None, what: str) -> Any:
    """Run one idempotent ClickHouse call in the executor until it succeeds; SinkGaveUp after `retry_for_s`."""
    return await _Backoff(retry_for_s, stats).run(executor, what, call)


async def write_with_retry(writer: Writer, rows: Sequence[dict[str, Any]], executor: Executor,
                           retry_for_s: float, stats: SinkStats | None = None) -> Written:
    """Re-send the journaled plans of the batch's messages, plan the rest once, insert until every piece landed.

    Every piece lands in every table its insert reaches. A failed piece is re-sent unchanged (same rows, same
    token); the plan is never re-decided through the lookup, which would find rows the source table took and skip
    the views that missed them. A piece ClickHouse finds too large (too many partitions, memory, size) is split in
    halves if its table holds none of its rows yet; if it holds some, a view refused rows its source took and a
    split would insert them twice: SinkGaveUp. Gives up after
    `retry_for_s` seconds in all by raising SinkGaveUp: the worker must then stop without committing.
    Returns the rows inserted and re-sent, and the plan's dead letters (the agent publishes them before it acks).
    """
    backoff = _Backoff(retry_for_s, stats if stats is not None else writer.stats)
    replay: Journaled = await backoff.run(executor, f"reading the journal of {len(rows)} rows",
                                          functools.partial(writer.journaled, rows))
    resent = await _send(writer, replay.pieces, executor, backoff)
    writer.stats.resent += resent
    # Planning writes nothing, so a failed lookup is simply planned again.
    plan: Plan = await backoff.run(executor, f"planning {len(rows)} rows",
                                   functools.partial(writer.plan, rows, replay.covered))
    if plan.prepare is not None:
        await backoff.run(executor, f"journaling the plan of {len(rows)} rows", plan.prepare)
    inserted = await _send(writer, plan.pieces, executor, backoff)
    if plan.finish is not None:
        await backoff.run(executor, f"finishing {len(rows)} rows", plan.finish)
    return Written(inserted, plan.rejections, resent)


async def _send(writer: Writer, pieces: Sequence[Piece], executor: Executor, backoff: _Backoff) -> int:
    """Insert pieces in order until each has landed (splitting one ClickHouse finds too large); rows sent."""
    loop = asyncio.get_running_loop()
    queue = list(pieces)
    sent = 0
    while queue:
        piece = queue[0]
        try:
            await loop.run_in_executor(executor, writer.insert, piece)
        except Exception as exc:
            what = f"insert of {piece.size} rows into {piece.table} ({', '.join(map(str, piece.days))})"
            if _too_large(exc) and piece.splittable:
                held = await backoff.run(executor, f"checking {what}", functools.partial(writer.landed, piece))
                if held:
                    raise SinkGaveUp(f"{what}: {piece.table} took {held} rows but a materialized view refused them "
                                     f"({exc}); splitting would insert them twice. Run `tally verify`.") from exc
                log.warning("sink: %s too large for ClickHouse (%s); splitting", what, exc)
                queue[:1] = split_piece(piece, writer.key)
                continue
            await backoff.after(what, exc)
            continue
        backoff.delay = 0.2
        queue.pop(0)
        sent += piece.size
    return sent
