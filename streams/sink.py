"""Sink stage: priced attempts from llm.cost.attempts.v1 into ClickHouse usage_events, with an exactly-once effect."""

from __future__ import annotations

import asyncio
import base64
import bisect
import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import orjson
import pyarrow as pa
import pyarrow.compute as pc

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
from streams.sink_columns import (
    REQUEST_SCHEMA,
    SINK_SCHEMA,
    ArrowPart,
    AttemptBatch,
    DictPart,
    Part,
    Refused,
    arrow_part,
    decode_message,
    ipc_part,
    ipc_stream,
    is_arrow,
    request_part,
    rows_table,
    table_rows,
)
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

    @property
    def column_set(self) -> frozenset[str]:
        return frozenset(self.columns)


ATTEMPT_ROWS = RowShape("priced attempt", "bad_attempt_row", ATTEMPT_COLUMNS, COST_COLUMNS, TIME_COLUMNS)
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
                raise ValueError(f"not a {shape.what} row (missing {missing[:5]})")
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


def insert_token(table: str, keys: Iterable[str], scope: Iterable[str] = ()) -> str:
    """Deterministic insert_deduplication_token: the same set of rows (in the same scope) always gets the same token.

    `scope` names what the piece was cut from (its origin message and days); it is hashed before the sorted keys.
    """
    h = hashlib.blake2b(digest_size=16)
    for key in (*scope, "", *sorted(keys)) if scope else sorted(keys):
        h.update(key.encode())
        h.update(b"\0")
    return f"{table}:{h.hexdigest()}"


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


Group = tuple[dict[str, Any], ...]  # rows that land in one insert or not at all (a cancel row and its revision)


@dataclass(frozen=True)
class Piece:
    """One insert of a plan: whole groups of rows, their days, and the token that makes a re-send a no-op.

    `origin` is the input message all its rows came from ('' for a writer that does not group by message).
    A columnar piece (the attempts' fast path) holds its rows as an Arrow table in `data` (every column of the
    insert, in order) and their keys in `keys`, and no groups: each row is its own group.
    """

    table: str
    groups: tuple[Group, ...]
    token: str
    days: tuple[date, ...]
    origin: str = ""
    data: pa.Table | None = None
    keys: tuple[str, ...] = ()

    @property
    def rows(self) -> list[dict[str, Any]]:
        if self.data is not None:
            raise TypeError("a columnar piece holds an Arrow table (data), not dict rows")
        return [r for g in self.groups for r in g]

    @property
    def size(self) -> int:
        """How many rows the piece inserts."""
        return len(self.keys) if self.data is not None else sum(len(g) for g in self.groups)

    @property
    def splittable(self) -> bool:
        """Whether it has more than one group, so that halves can be sent."""
        return self.size > 1 if self.data is not None else len(self.groups) > 1


# Days in one piece of a message at most: rollup_minute is partitioned by day and ClickHouse refuses an insert block
# that spans more than max_partitions_per_insert_block (100) partitions; half of it leaves room.
DAYS_PER_PIECE = 50


def make_pieces(table: str, groups: Iterable[Group], key: Callable[[dict[str, Any]], str],
                days: Callable[[Group], Iterable[date]],
                origin: Callable[[Group], str] | None = None, days_per_piece: int = 1) -> list[Piece]:
    """Split groups into pieces by origin message (if `origin` is given) and set of UTC days, in that order.

    One day per piece unless a group spans two; with `days_per_piece` > 1, the single-day groups of one origin are
    gathered over up to that many consecutive (sorted) days of theirs. Each piece's token is a hash of its origin,
    days and rows' keys, so the same rows always make the same piece.
    """
    by_cut: dict[tuple[str, tuple[date, ...]], list[Group]] = {}
    for g in groups:
        by_cut.setdefault((origin(g) if origin else "", tuple(sorted(set(days(g))))), []).append(g)
    cuts: list[tuple[str, tuple[date, ...], list[Group]]] = []
    for (o, d), gs in sorted(by_cut.items()):
        last = cuts[-1] if cuts else None
        if (days_per_piece > 1 and last is not None and last[0] == o and len(d) == 1
                and len(last[1]) < days_per_piece):
            last[2].extend(gs)
            cuts[-1] = (o, (*last[1], *d), last[2])
        else:
            cuts.append((o, d, gs))
    return [_piece(table, tuple(gs), key, d, o) for o, d, gs in cuts]


def _piece(table: str, groups: tuple[Group, ...], key: Callable[[dict[str, Any]], str], days: tuple[date, ...],
           origin: str) -> Piece:
    scope = (origin, *map(str, days)) if origin else ()
    return Piece(table, groups, insert_token(table, (key(r) for g in groups for r in g), scope), days, origin)


def split_piece(piece: Piece, key: Callable[[dict[str, Any]], str]) -> list[Piece]:
    """Two halves of a piece ClickHouse found too large, each with the token of its own rows."""
    if piece.data is not None:
        half = piece.size // 2
        return [_arrow_piece(piece.table, piece.data.slice(start, stop - start), piece.keys[start:stop], piece.days,
                             piece.origin) for start, stop in ((0, half), (half, piece.size))]
    half = len(piece.groups) // 2
    return [_piece(piece.table, gs, key, piece.days, piece.origin)
            for gs in (piece.groups[:half], piece.groups[half:])]


def _arrow_piece(table: str, data: pa.Table, keys: Sequence[str], days: tuple[date, ...], origin: str) -> Piece:
    """A columnar piece, with the token _piece gives the same rows (same table, origin, days and keys)."""
    scope = (origin, *map(str, days)) if origin else ()
    return Piece(table, (), insert_token(table, keys, scope), days, origin, data, tuple(keys))


@dataclass
class Plan:
    """What a writer decided for one batch: the pieces to insert (in order) and the rows it refused."""

    pieces: list[Piece]
    rejections: list[Rejection] = field(default_factory=list)
    finish: Callable[[], int] | None = None  # an idempotent step after every piece landed (supersede)
    prepare: Callable[[], None] | None = None  # an idempotent step before any piece is sent (journal the plan)


@dataclass
class Written:
    """The outcome of one batch: rows inserted and the dead letters the agent must publish before it acks."""

    inserted: int
    rejections: list[Rejection]

    def dead_letters(self) -> dict[int, list[bytes]]:
        """Dead-letter lines keyed by partition (the partition of the line's source)."""
        out: dict[int, list[bytes]] = {}
        for r in self.rejections:
            out.setdefault(r.source.partition if r.source else 0, []).append(encode_record(r.to_record()))
        return out


class Writer(Protocol):
    """What write_with_retry drives: plan a batch once, then insert its pieces until each has landed."""

    stats: SinkStats

    def plan(self, rows: Sequence[dict[str, Any]]) -> Plan: ...

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
    resent: int = 0  # rows saved by their own message before, re-sent by its replay (absorbed where they landed)
    retries: int = 0
    last_insert_s: float = 0.0
    superseded: int = 0


def run_plan(writer: Writer, rows: Sequence[dict[str, Any]]) -> int:
    """Plan and insert once, without retry (tools, tests); returns rows inserted.

    Refuses a batch whose plan dead-letters rows (a caller without a dead-letter route would drop them): use
    write_with_retry, which returns them.
    """
    plan = writer.plan(rows)
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


def _insert(writer: Writer, store: Store, piece: Piece, columns: Sequence[str], schema: pa.Schema | None = None
            ) -> None:
    """Insert one piece. With `schema`, every piece goes in one form: an Arrow table of it (Store.insert_arrow).

    ClickHouse derives a block's deduplication id from the insert's token *and* how the insert was chunked: the
    same token sent once as one Arrow batch and once as clickhouse-connect's Native blocks is two blocks, both
    kept. A replay re-sends a piece in the form a journal or another path gives it (a columnar piece of a message
    comes back as dict rows from request_plans), so the writers whose replays must be absorbed pass their schema.
    """
    started = time.perf_counter()
    if piece.data is not None:
        store.insert_arrow(piece.table, piece.data, piece.token)
    elif schema is not None:
        store.insert_arrow(piece.table, rows_table(piece.rows, schema), piece.token)
    else:
        rows = piece.rows
        store.insert_columns(piece.table, [[r[c] for r in rows] for c in columns], columns, piece.token)
    writer.stats.last_insert_s = time.perf_counter() - started
    writer.stats.rows_inserted += piece.size


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
      3. Decide, in batch order: an event_id not saved, or saved with this row's own origin (the replay of a message
         whose insert was cut short: some tables may hold it, others not), is inserted once; a copy saved by
         another message, or already planned earlier in this batch, is a duplicate if its hash matches, skipped;
         with another hash it is a dead letter conflicting_duplicate (both hashes in its message, the original line
         as its bytes), never inserted.
      4. Pieces: the rows to insert grouped by origin message, and within it by up to DAYS_PER_PIECE UTC days of ts
         (rollup_minute, partitioned by day, is the finest partitioning an insert reaches: a piece never hits
         TOO_MANY_PARTS), each with insert_deduplication_token = a hash of (table, origin, days, sorted
         event_ids), async_insert = 0. A
         message's content never changes and messages are replayed in order from the stored position, so a piece
         is the same on every replay whatever batch it falls in and whatever part of it landed before.
      5. Insert the pieces; write_with_retry re-sends a failed piece unchanged, and a replay after a crash re-sends
         it too (step 3). A re-sent block is deduplicated in every table that holds it (usage_events, event_ids and
         every view target, by their own derived tokens) and fills the ones that missed it: none gets it twice.
      6. Supersede (streams.supersede), after every piece landed: rows of the batch's physical calls that no
         longer count (an estimate corrected by real usage) are subtracted from the rollups, once, in any arrival
         order; idempotent, so it is retried like an insert and redone by a replay.
    Not guaranteed: a duplicate arriving after the dedup window (default 7 days) is inserted again; an event saved
    before migration 008 has no hash, so any later copy of it counts as a duplicate; an event saved before 011 has
    no origin, so a replay of its message skips it (a cut-short insert from before 011 is not repaired); a replayed
    piece is absorbed only while its blocks are within each table's dedup window (10,000 inserts: the replay is of
    the last batch, well within it); a piece that ClickHouse found too large and split (write_with_retry) and
    whose insert was then cut short by a crash is re-sent whole, under another token than its halves.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)
    table: str = "usage_events"

    def plan(self, rows: Sequence[dict[str, Any]]) -> Plan:
        """Steps 1-4: the pieces to insert and the conflicting duplicates. Reads ClickHouse, writes nothing.

        In columns: the batch (an AttemptBatch from decode_batch; dict rows are taken as one part) is read column
        by column. An event_id that ClickHouse does not hold and that the batch carries once (nearly all of them)
        is inserted: a set difference. Only the event_ids held or repeated go through the decision of step 3, row
        by row in batch order (a decision depends only on the rows of its own event_id). The rows of a message the
        fast path decoded become columnar pieces (one insert_arrow each); dict rows make dict pieces, with the
        same tokens for the same rows.
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
                self.stats.resent += found is not None
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
        pieces = self._pieces(batch, fresh, eids, origins, hashes)
        request_ids: dict[str, str] = {}  # each event_id once, as it counts (conflicting copies never do)
        for i, rid in enumerate(batch.column("request_id")):
            if eids[i] not in contested or held[eids[i]] in (hashes[i], ""):
                request_ids.setdefault(eids[i], rid)
        # supersede reads only the request_id of each counted row
        counted = [{"request_id": rid} for rid in request_ids.values()]
        return Plan(pieces, rejections, functools.partial(self.supersede, counted))

    def _pieces(self, batch: AttemptBatch, fresh: Sequence[int], eids: Sequence[str], origins: Sequence[str],
                hashes: Sequence[str]) -> list[Piece]:
        """Step 4 over positions: make_pieces' cuts (origin message, then up to DAYS_PER_PIECE sorted days).

        Each cut is a columnar piece when its rows are all of one fast-path message, else a piece of dict rows.
        """
        days = batch.days()
        by_cut: dict[tuple[str, date], list[int]] = {}
        for i in fresh:
            by_cut.setdefault((origins[i], days[i]), []).append(i)
        cuts: list[tuple[str, list[date], list[int]]] = []
        for (origin, day), positions in sorted(by_cut.items()):
            last = cuts[-1] if cuts else None
            if last is not None and last[0] == origin and len(last[1]) < DAYS_PER_PIECE:
                last[1].append(day)
                last[2].extend(positions)
            else:
                cuts.append((origin, [day], list(positions)))
        starts: list[int] = []
        n = 0
        for each in batch.parts:
            starts.append(n)
            n += len(each)
        pieces: list[Piece] = []
        for origin, cut_days, positions in cuts:
            where = {bisect.bisect_right(starts, i) - 1 for i in (positions[0], positions[-1])}
            part_n = where.pop() if len(where) == 1 else -1
            part: Part | None = batch.parts[part_n] if part_n >= 0 else None
            if (isinstance(part, ArrowPart) and part.origin == origin
                    and all(starts[part_n] <= i < starts[part_n] + len(part) for i in positions)):
                data = part.table.take(pa.array([i - starts[part_n] for i in positions], pa.int64()))
                data = data.add_column(data.num_columns - 1, SINK_SCHEMA.field("content_hash"),
                                       pa.array([hashes[i] for i in positions], pa.string()))
                pieces.append(_arrow_piece(self.table, data, [eids[i] for i in positions], tuple(cut_days), origin))
                continue
            groups: list[Group] = []
            for i in positions:
                p, local = batch.locate(i)
                row = batch.parts[p].row(local)
                row["content_hash"] = hashes[i]
                groups.append((row,))
            pieces.append(_piece(self.table, tuple(groups), self.key, tuple(cut_days), origin))
        return pieces

    def supersede(self, rows: Sequence[dict[str, Any]]) -> int:
        """Step 6. Runs in the sink's executor thread; returns how many rows it superseded now."""
        from streams.supersede import supersede  # it builds on this module (insert_token)

        n = supersede(self.store, list(rows))
        self.stats.superseded += n
        return n

    def key(self, row: dict[str, Any]) -> str:
        return str(row["event_id"])

    def insert(self, piece: Piece) -> None:
        """Step 5 for one piece. Runs in the sink's executor thread."""
        _insert(self, self.store, piece, SINK_COLUMNS, SINK_SCHEMA)

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


JOURNAL_ARROW = "arrow:"  # request_plans.lines: base64 of an Arrow IPC stream of REQUEST_SCHEMA after it; else NDJSON


def journal_rows(text: str) -> list[dict[str, Any]]:
    """A message's journaled rows (RequestWriter.journal), as dict rows; a journal written as NDJSON reads too."""
    if text.startswith(JOURNAL_ARROW):
        table = decode_message(base64.b64decode(text[len(JOURNAL_ARROW):]), REQUEST_SCHEMA, "request_plans")
        return table_rows(table)
    rows = decode_rows(text.encode(), Source("request_plans", 0, 0), REQUEST_ROWS)[0]
    for row in rows:
        del row["origin"]  # the caller gives them the origin of the message they were decided for
    return rows


def _take(arrow_parts: Sequence[tuple[int, ArrowPart]], positions: Sequence[int]) -> pa.Table | None:
    """The REQUEST_COLUMNS of these batch positions, if they all lie in one Arrow part (None otherwise, or if none)."""
    if not positions:
        return None
    starts = [start for start, _ in arrow_parts]
    n = bisect.bisect_right(starts, positions[0]) - 1
    if n < 0:
        return None
    start, part = arrow_parts[n]
    if not all(start <= i < start + len(part) for i in positions):
        return None
    return part.table.take(pa.array([i - start for i in positions], pa.int64())).select(list(REQUEST_COLUMNS))


@dataclass
class RequestWriter:
    """Writes logical requests to logical_requests so each request counts once, at its latest revision.

    Per batch (rows in topic order, each with its origin message; the agent acks offsets only after every piece
    has landed):
      1. Look up the journaled decisions of the batch's messages (request_plans, migration 011) and the latest
         revision ClickHouse holds of each request (table logical_request_heads).
      2. A journaled message is not decided again: its journaled rows are sent as they are and move the heads as
         they did (the replay of an insert a crash cut short, whose heads may already show its revisions while a
         rollup grain lacks them). For each other incoming revision: if the head already holds all of its attempts
         (a replay, a duplicate emission, a stale revision), skip it. Otherwise write the new revision — the union
         of both attempt sets when the incoming one lacks some of the head's (a late attempt folded without its
         request's state) — numbered max(incoming, head + 1), together with a cancel row (sign = -1) of the head.
      3. Plan once: a request's rows from one message stay in one piece; pieces by (origin message, UTC days of
         first_ts) (rollup_minute, partitioned by day, is the finest partitioning the insert reaches), each with a
         deterministic token (a hash of origin, days and its rows' id#revision#sign).
      4. Journal the rows decided now, per message, in one insert (Plan.prepare), before any piece is sent.
      5. Insert the pieces; write_with_retry re-sends a failed piece unchanged (never re-deciding through the
         lookup), which fills a view target that failed the first time and is absorbed everywhere else.
    Every decision is a function of attempt sets, so it does not depend on timing. Requests are keyed by
    feature_id, so one sink handles a request at a time. Rows without an origin (tools and tests that write fold
    output directly) are decided and cut as before, without a journal: a replay of them is skipped by the heads.
    Not guaranteed: a replay after the journal's TTL (the dedup window) is decided again.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)
    table: str = "logical_requests"

    def decide(self, rows: Sequence[dict[str, Any]], journaled: dict[str, str] | None = None,
               found: dict[str, tuple[int, datetime, str]] | None = None) -> list[dict[str, Any]]:
        """Steps 1-2: the rows to insert for these incoming revisions (cancel rows included), in order.

        A message whose decision is journaled (`journaled`: origin → its journal, journal_rows) is not decided
        again: its journaled rows are taken as they are, and the heads move as they moved then. `found`: the heads
        of the rows' requests, when the caller has looked them up.
        """
        journaled = journaled or {}
        if found is None:
            found = self.store.request_heads(list({r["logical_request_id"] for r in rows}))
        heads = {lid: _Head(rev, at, detail) for lid, (rev, at, detail) in found.items()}
        out: list[dict[str, Any]] = []
        replayed: set[str] = set()
        for row in rows:
            origin = row.get("origin", "")
            if origin in journaled:
                if origin not in replayed:
                    replayed.add(origin)
                    again = journal_rows(journaled[origin])
                    for r in again:
                        r["origin"] = origin
                        if r["sign"] == 1:
                            heads[r["logical_request_id"]] = _Head(r["revision"], r["emitted_at"],
                                                                   r["attempts_detail"])
                    self.stats.resent += len(again)
                    out.extend(again)
                continue
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
            if "origin" in row:
                cancel["origin"] = new["origin"] = origin
            out += [cancel, new]
            heads[lid] = _Head(revision, new["emitted_at"], new["attempts_detail"], facts)
        return out

    def plan(self, rows: Sequence[dict[str, Any]]) -> Plan:
        """Steps 1-4: the decided rows grouped by message and request, in pieces by day; `prepare` journals them.

        In columns: the batch (an AttemptBatch from decode_batch; dict rows are taken as one part) is read column by
        column. A row of an Arrow message not journaled, whose request ClickHouse does not hold and that the batch
        carries once (nearly all of them), is inserted as it came: a set difference, no row made. Only the others
        go through the decision of step 2, in batch order. A cut whose rows are all of one Arrow message is one
        insert_arrow; any other is a piece of dict rows, with the same token for the same rows either way.
        """
        batch = rows if isinstance(rows, AttemptBatch) else AttemptBatch([DictPart(list(rows))])
        lids: list[str] = batch.column("logical_request_id")
        origins: list[str] = []
        days: list[date | None] = []  # the UTC day of first_ts of a row that may go as it came
        arrow_parts: list[tuple[int, ArrowPart]] = []  # (first position, part)
        for part in batch.parts:
            if isinstance(part, ArrowPart):
                arrow_parts.append((len(origins), part))
                origins.extend([part.origin] * len(part))
                days.extend(pc.cast(part.table.column("first_ts"), pa.date32()).to_pylist())
            else:
                origins.extend(r.get("origin", "") for r in part.rows)
                days.extend([None] * len(part))
        messages = list(dict.fromkeys(o for o in origins if o))
        journaled = self.store.request_plans(messages) if messages else {}
        found = self.store.request_heads(list(dict.fromkeys(lids)))
        counts = Counter(lids)
        as_came = [i for i in range(len(lids)) if days[i] is not None and origins[i] not in journaled
                   and counts[lids[i]] == 1 and lids[i] not in found]
        taken = set(as_came)
        # A row of a journaled message is replaced by its journal: decide reads only its origin.
        decided = self.decide([{"origin": origins[i]} if origins[i] in journaled else batch[i]
                               for i in range(len(lids)) if i not in taken], journaled, found)
        self.stats.batches += 1
        # Cuts as make_pieces makes them: (origin, sorted UTC days of the group); a group is a request's rows of
        # one message (a cancel row and its revision), a row that goes as it came is a group alone.
        cuts: dict[tuple[str, tuple[date, ...]], tuple[list[int], list[Group]]] = {}
        for i in as_came:
            cuts.setdefault((origins[i], (days[i],)), ([], []))[0].append(i)  # type: ignore[arg-type]
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in decided:
            groups.setdefault((r.get("origin", ""), r["logical_request_id"]), []).append(r)
        for (origin, _), group in groups.items():
            cut = (origin, tuple(sorted({utc_day(r["first_ts"]) for r in group})))
            cuts.setdefault(cut, ([], []))[1].append(tuple(group))
        pieces = [self._piece(origin, cut_days, positions, dict_groups, batch, arrow_parts)
                  for (origin, cut_days), (positions, dict_groups) in sorted(cuts.items())]
        came: dict[str, list[int]] = {o: [] for o in messages if o not in journaled}
        made: dict[str, list[dict[str, Any]]] = {o: [] for o in came}
        for i in as_came:
            came[origins[i]].append(i)
        for r in decided:
            if r.get("origin") in made:
                made[r["origin"]].append(r)
        fresh: dict[str, pa.Table] = {}
        for origin, positions in came.items():
            tables = [_take(arrow_parts, positions), rows_table(made[origin], REQUEST_SCHEMA)]
            fresh[origin] = pa.concat_tables([t for t in tables if t is not None])
        return Plan(pieces, prepare=functools.partial(self.journal, fresh) if fresh else None)

    def _piece(self, origin: str, days: tuple[date, ...], positions: list[int], groups: list[Group],
               batch: AttemptBatch, arrow_parts: list[tuple[int, ArrowPart]]) -> Piece:
        """One cut: an Arrow piece when all its rows came as they are from one message, else a piece of dicts."""
        if not groups:
            data = _take(arrow_parts, positions)
            if data is not None:
                keys = [f"{lid}#{rev}#{sign}" for lid, rev, sign in zip(
                    data.column("logical_request_id").to_pylist(), data.column("revision").to_pylist(),
                    data.column("sign").to_pylist(), strict=True)]
                return _arrow_piece(self.table, data, keys, days, origin)
        all_groups = tuple((batch[i],) for i in positions) + tuple(groups)
        return _piece(self.table, all_groups, self.key, days, origin)

    def journal(self, fresh: dict[str, pa.Table]) -> None:
        """Step 0: the decided rows of each message, before any of them is sent (request_plans, migration 011).

        Each message's rows as one Arrow IPC stream of REQUEST_SCHEMA, base64 after "arrow:" (journal_rows).
        """
        origins = sorted(fresh)
        lines = [JOURNAL_ARROW + base64.b64encode(ipc_stream(fresh[o])).decode("ascii") for o in origins]
        self.store.insert_columns("request_plans", [origins, lines], ("origin", "lines"),
                                  insert_token("request_plans", origins))

    def key(self, row: dict[str, Any]) -> str:
        return f"{row['logical_request_id']}#{row['revision']}#{row['sign']}"

    def insert(self, piece: Piece) -> None:
        """Step 4 for one piece. Runs in the sink's executor thread."""
        _insert(self, self.store, piece, REQUEST_COLUMNS, REQUEST_SCHEMA)

    def landed(self, piece: Piece) -> int:
        """How many of the piece's rows logical_requests holds."""
        keys = list(piece.keys) if piece.data is not None else [self.key(r) for r in piece.rows]
        return self.store.held_request_rows(keys)

    def write(self, rows: Sequence[dict[str, Any]]) -> int:
        """Plan and insert once (run_plan); returns how many rows were inserted."""
        return run_plan(self, rows)


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

    Per batch: split by UTC day of detected_at, insert each piece with a deterministic token (a hash of its
    records' keys), async_insert = 0; the agent acks offsets only after every piece has landed. A record written
    twice is one key of the ReplacingMergeTree, and the table feeds no view.
    """

    store: Store
    stats: SinkStats = field(default_factory=SinkStats)
    table: str = "anomalies"

    def plan(self, rows: Sequence[dict[str, Any]]) -> Plan:
        """Every row, by day; nothing is looked up."""
        self.stats.batches += 1
        return Plan(make_pieces(self.table, ((r,) for r in rows), self.key, lambda g: (utc_day(g[0]["detected_at"]),)))

    def key(self, row: dict[str, Any]) -> str:
        return f"{row['incident_id']}#{row['state']}#{row['detected_at'].isoformat()}"

    def insert(self, piece: Piece) -> None:
        """Insert one piece. Runs in the sink's executor thread."""
        _insert(self, self.store, piece, ANOMALY_COLUMNS)

    def landed(self, piece: Piece) -> int:
        """Always 0: a half re-sent after a partial insert is the same ReplacingMergeTree keys, so splitting is safe."""
        return 0

    def write(self, rows: Sequence[dict[str, Any]]) -> int:
        """Plan and insert once (run_plan); returns how many rows were inserted."""
        return run_plan(self, rows)


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
    """Plan a batch once, then insert its pieces until every one has landed in every table its insert reaches.

    A failed piece is re-sent unchanged (same rows, same token); the plan is never re-decided through the lookup,
    which would find rows the source table took and skip the views that missed them. A piece ClickHouse finds too
    large (too many partitions, memory, size) is split in halves if its table holds none of its rows yet; if it holds
    some, a view refused rows its source took and a split would insert them twice: SinkGaveUp. Gives up after
    `retry_for_s` seconds in all by raising SinkGaveUp: the worker must then stop without committing.
    Returns the rows inserted and the plan's dead letters (the agent publishes them before it acks).
    """
    loop = asyncio.get_running_loop()
    backoff = _Backoff(retry_for_s, stats if stats is not None else writer.stats)
    # Planning writes nothing, so a failed lookup is simply planned again.
    plan: Plan = await backoff.run(executor, f"planning {len(rows)} rows", functools.partial(writer.plan, rows))
    if plan.prepare is not None:
        await backoff.run(executor, f"journaling the plan of {len(rows)} rows", plan.prepare)
    queue = list(plan.pieces)
    inserted = 0
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
        inserted += piece.size
    if plan.finish is not None:
        await backoff.run(executor, f"finishing {len(rows)} rows", plan.finish)
    return Written(inserted, plan.rejections)
