"""The sink's plan and retry protocol without ClickHouse: pieces by day, re-sent unchanged, split when too large."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import orjson
import pyarrow as pa
import pytest

from streams.records import Source
from streams.sink import (
    DAYS_PER_PIECE,
    AnomalyWriter,
    Piece,
    Plan,
    SinkStats,
    SinkWriter,
    content_hash,
    make_pieces,
    origin_of,
    utc_day,
    write_with_retry,
)
from tally.errors import SinkGaveUp, SinkRefused, StoreError
from tally.store import QueryResult, Saved
from tests.factories import attempt_row_factory, clock, event_factory, in_message

NOW = clock()


class FakeStore:
    """What the writers need of a Store: the event_ids lookup and column inserts, with failures on demand."""

    def __init__(self, fail: list[Exception] | None = None) -> None:
        self.saved: dict[str, Saved] = {}
        self.inserts: list[tuple[str, int, str]] = []  # (table, rows, token) of every insert that landed
        self.fail = list(fail or [])
        self.calls = 0

    def query(self, sql: str, parameters: dict[str, object] | None = None, lookup: bool = False) -> QueryResult:
        """Reads of other tables (the supersede step's call_rows): this store holds none of their rows."""
        return QueryResult([], [])

    def saved_events(self, ids: list[str]) -> dict[str, Saved]:
        return {i: self.saved[i] for i in ids if i in self.saved}

    def insert_columns(self, table: str, columns: list[list[object]], names: tuple[str, ...], token: str) -> None:
        self.calls += 1
        if self.fail:
            raise self.fail.pop(0)
        data = dict(zip(names, columns, strict=True))
        if table == "usage_events":
            for eid, digest, origin in zip(data["event_id"], data["content_hash"], data["origin"], strict=True):
                self.saved.setdefault(eid, Saved(digest, origin))  # type: ignore[arg-type]
        self.inserts.append((table, len(columns[0]), token))

    def insert_arrow(self, table: str, data: pa.Table, token: str) -> None:
        self.insert_columns(table, [data.column(n).to_pylist() for n in data.column_names], tuple(data.column_names),
                            token)


def rows_over_days(n: int, live: int = 0) -> list[dict[str, object]]:
    """One attempt on each of n distinct past days, plus `live` attempts of the last hours, all with a payload."""
    out = []
    for i in range(n):
        out.append(attempt_row_factory(f"old-{i}", ts_ms=int((NOW - timedelta(days=i + 1)).timestamp() * 1000)))
    for i in range(live):
        out.append(attempt_row_factory(f"live-{i}", ts_ms=int((NOW - timedelta(hours=2)).timestamp() * 1000)))
    for r in out:
        r["payload"] = orjson.dumps(event_factory(event_id=r["event_id"])).decode()
    return in_message(out)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_a_plan_has_pieces_of_at_most_50_days_per_message_with_a_token_of_its_rows():
    rows = rows_over_days(400, live=30)  # one message
    plan = SinkWriter(FakeStore()).plan(rows)  # type: ignore[arg-type]
    assert [len(p.days) for p in plan.pieces] == [DAYS_PER_PIECE] * 8 + [1]  # 401 days, sorted, in runs of 50
    days = [d for p in plan.pieces for d in p.days]
    assert days == sorted({utc_day(r["ts"]) for r in rows})  # type: ignore[arg-type]
    assert all(utc_day(r["ts"]) in p.days for p in plan.pieces for r in p.rows)
    assert sum(len(p.rows) for p in plan.pieces) == len(rows)
    other = in_message([dict(r) for r in rows[:3]], Source("llm.cost.attempts.v1", 1, 0))
    assert len(SinkWriter(FakeStore()).plan([*other, *rows[3:]]).pieces) == 1 + 8  # type: ignore[arg-type]
    again = SinkWriter(FakeStore()).plan(rows)  # type: ignore[arg-type]
    assert [p.token for p in again.pieces] == [p.token for p in plan.pieces]  # deterministic
    assert len({p.token for p in plan.pieces}) == len(plan.pieces)


def test_a_failed_piece_is_sent_again_unchanged_never_replanned():
    rows = rows_over_days(3)
    store = FakeStore(fail=[StoreError("view rollup_minute_attempts_mv: Code: 395 failpoint")])
    writer = SinkWriter(store)  # type: ignore[arg-type]
    sent: list[str] = []
    insert = writer.insert

    def recording(piece: Piece) -> None:
        sent.append(piece.token)
        if len(sent) == 1:  # the source took the rows before the view failed: the lookup would now find them
            store.saved.update({r["event_id"]: Saved(r["content_hash"], r["origin"]) for r in piece.rows})
        insert(piece)

    writer.insert = recording  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as ex:
        written = run(write_with_retry(writer, rows, ex, retry_for_s=30))
    assert written.inserted == 3 and written.rejections == []
    assert sent[0] == sent[1]  # the same piece, the same token
    assert len(store.inserts) == 1  # one message over 3 days: one piece
    assert writer.stats.batches == 1 and writer.stats.retries == 1


def test_retries_give_up_within_the_deadline():
    store = FakeStore(fail=[StoreError("ClickHouse is down")] * 50)
    with ThreadPoolExecutor(1) as ex, pytest.raises(SinkGaveUp, match="ClickHouse is down"):
        run(write_with_retry(SinkWriter(store), rows_over_days(1), ex, retry_for_s=0.5))  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [
    "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). (TOO_MANY_PARTS)",
    "Code: 241. DB::Exception: Memory limit (total) exceeded. (MEMORY_LIMIT_EXCEEDED)",
    "HTTP 413 Entity Too Large",
])
def test_too_large_pieces_are_split_when_nothing_landed(error):
    rows = rows_over_days(1, live=0) + [dict(r) for r in rows_over_days(0, live=7)]
    store = FakeStore(fail=[StoreError(error)] * 3)
    writer = SinkWriter(store)  # type: ignore[arg-type]
    with ThreadPoolExecutor(1) as ex:
        written = run(write_with_retry(writer, rows, ex, retry_for_s=5))
    assert written.inserted == 8
    assert sum(n for _, n, _ in store.inserts) == 8
    assert len({t for _, _, t in store.inserts}) == len(store.inserts)  # each half has its own token


def test_a_too_large_piece_whose_source_took_rows_is_never_split():
    rows = rows_over_days(0, live=4)
    store = FakeStore(fail=[StoreError("(TOO_MANY_PARTS)")])
    writer = SinkWriter(store)  # type: ignore[arg-type]
    plan = writer.plan(rows)
    store.saved.update({r["event_id"]: Saved(r["content_hash"], r["origin"])  # the source took them
                        for r in plan.pieces[0].rows})
    writer.plan = lambda _rows: plan  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as ex, pytest.raises(SinkGaveUp, match="splitting would insert them twice"):
        run(write_with_retry(writer, rows, ex, retry_for_s=5))


def test_content_hash_is_over_the_fields_not_their_spelling():
    event = event_factory()
    a = orjson.dumps(event).decode()
    b = orjson.dumps(dict(reversed(list(event.items()))), option=orjson.OPT_INDENT_2).decode()
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash(orjson.dumps({**event, "model_actual": "gpt-4.1"}).decode())


def test_conflicting_duplicates_are_dead_letters_identical_copies_are_not():
    store = FakeStore()
    writer = SinkWriter(store)  # type: ignore[arg-type]
    [first] = rows_over_days(0, live=1)
    writer.write([first])
    event = orjson.loads(first["payload"])
    later = origin_of(Source("llm.cost.attempts.v1", 0, 7))  # the copies come in a later message
    conflicting = {**first, "model_actual": "o3", "cost_total_usd": Decimal("11.2"), "source_offset": 99,
                   "payload": orjson.dumps({**event, "model_actual": "o3",
                                            "usage": {"input_tokens": 1_000_000}}).decode(), "origin": later}
    same = {**first, "payload": orjson.dumps(event, option=orjson.OPT_SORT_KEYS).decode(), "origin": later}
    with ThreadPoolExecutor(1) as ex:
        written = run(write_with_retry(writer, [same, conflicting, dict(conflicting)], ex, retry_for_s=5))
    assert written.inserted == 0
    assert [r.reason for r in written.rejections] == ["conflicting_duplicate"] * 2
    rej = written.rejections[0]
    assert rej.raw == conflicting["payload"].encode() and rej.event_id == first["event_id"]
    assert first["content_hash"] in rej.message and conflicting["content_hash"] in rej.message
    assert rej.source is not None and rej.source.offset == 99
    record = orjson.loads(written.dead_letters()[first["source_partition"]][0])
    assert record["reason"] == "conflicting_duplicate" and record["stage"] == "sink"
    assert writer.stats.already_saved == 1 and writer.stats.conflicting_duplicates == 2


def test_conflicts_within_one_batch_keep_the_first_copy():
    store = FakeStore()
    writer = SinkWriter(store)  # type: ignore[arg-type]
    [first] = rows_over_days(0, live=1)
    other = {**first, "payload": orjson.dumps({**orjson.loads(first["payload"]), "model_actual": "o3"}).decode()}
    plan = writer.plan([first, dict(first), other])
    assert [r["payload"] for p in plan.pieces for r in p.rows] == [first["payload"]]
    assert [r.reason for r in plan.rejections] == ["conflicting_duplicate"]
    assert "earlier in this batch" in plan.rejections[0].message
    assert writer.stats.duplicates_in_batch == 1
    with pytest.raises(SinkRefused):  # write() has no dead-letter route: it refuses rather than drop
        SinkWriter(FakeStore()).write([first, other])  # type: ignore[arg-type]


def test_request_pieces_keep_a_request_together_and_split_by_day():
    day1, day2 = NOW - timedelta(days=3), NOW - timedelta(hours=1)
    groups = [({"k": "a", "first_ts": day1}, {"k": "b", "first_ts": day2}), ({"k": "c", "first_ts": day2},)]
    pieces = make_pieces("logical_requests", groups, lambda r: r["k"],
                         lambda g: (utc_day(r["first_ts"]) for r in g))
    assert sorted(p.days for p in pieces) == sorted([(utc_day(day1), utc_day(day2)), (utc_day(day2),)])
    assert sorted(r["k"] for p in pieces for r in p.rows) == ["a", "b", "c"]


def test_anomaly_writer_plans_by_day_without_lookups():
    rows = [{"incident_id": f"i{i}", "state": "firing", "detected_at": NOW - timedelta(days=i)} for i in range(3)]
    plan: Plan = AnomalyWriter(FakeStore(), SinkStats()).plan(rows)  # type: ignore[arg-type]
    assert len(plan.pieces) == 3 and plan.rejections == []


def message(offset: int, days: int, live: int = 0) -> list[dict[str, object]]:
    return in_message(rows_over_days(days, live), Source("llm.cost.attempts.v1", 0, offset))


def test_a_replayed_message_makes_the_same_pieces_whatever_landed_and_whatever_shares_its_batch():
    a, b, c = message(5, 60, live=3), message(4, 1), message(6, 0, live=2)
    c.append({**a[0], "origin": c[0]["origin"]})  # a later message repeats one of a's events
    first = SinkWriter(FakeStore()).plan([*b, *a, *c])  # type: ignore[arg-type]
    of_a = [(p.token, [r["event_id"] for r in p.rows]) for p in first.pieces if p.origin == a[0]["origin"]]
    assert len(of_a) == 2 and sum(len(ids) for _, ids in of_a) == len(a)  # 61 days: 50, then 11
    for landed in ([], first.pieces[:1], [p for p in first.pieces if p.origin == a[0]["origin"]][:1]):
        store = FakeStore()  # the kill -9 left these pieces in event_ids (and in any subset of the views)
        store.saved.update({r["event_id"]: Saved(r["content_hash"], r["origin"]) for p in landed for r in p.rows})
        writer = SinkWriter(store)  # type: ignore[arg-type]  # a new worker replays a in another batch
        replay = writer.plan([dict(r) for r in (*a, *c)])
        assert [(p.token, [r["event_id"] for r in p.rows]) for p in replay.pieces
                if p.origin == a[0]["origin"]] == of_a
        assert writer.stats.resent == sum(len(p.rows) for p in landed if p.origin == a[0]["origin"])
        assert writer.stats.duplicates_in_batch == 1 and replay.rejections == []  # c's copy of a[0]


def test_an_event_saved_by_another_message_is_a_duplicate_not_a_resend():
    [row] = message(3, 0, live=1)
    store = FakeStore()
    store.saved[row["event_id"]] = Saved(content_hash(row["payload"]), origin_of(Source("llm.cost.attempts.v1", 0, 1)))
    writer = SinkWriter(store)  # type: ignore[arg-type]
    assert writer.plan([row]).pieces == [] and writer.stats.already_saved == 1 and writer.stats.resent == 0
