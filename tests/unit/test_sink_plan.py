"""The sink's plan and retry protocol without ClickHouse: pieces by day, re-sent unchanged, split when too large."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import orjson
import pyarrow as pa
import pytest

from streams.pieces import DAYS_PER_PIECE, Piece, cut_columns, make_pieces, split_piece
from streams.records import Source
from streams.sink import (
    AnomalyWriter,
    Plan,
    SinkStats,
    SinkWriter,
    content_hash,
    origin_of,
    utc_day,
    write_with_retry,
)
from streams.sink_columns import table_rows
from tally.errors import SinkGaveUp, SinkRefused, StoreError
from tally.store import QueryResult, Saved
from tests.factories import attempt_row_factory, clock, event_factory, in_message

NOW = clock()


class FakeStore:
    """What the writers need of a Store: the event_ids lookup and column inserts, with failures on demand."""

    def __init__(self, fail: list[Exception] | None = None) -> None:
        self.saved: dict[str, Saved] = {}
        self.covering: dict[str, str] = {}  # sink_journal: origin → plan, plan → its pieces
        self.plans: dict[str, str] = {}
        self.inserts: list[tuple[str, int, str]] = []  # (table, rows, token) of every insert that landed
        self.fail = list(fail or [])
        self.calls = 0

    def query(self, sql: str, parameters: dict[str, object] | None = None, lookup: bool = False) -> QueryResult:
        """Reads of other tables (the supersede step's call_rows): this store holds none of their rows."""
        return QueryResult([], [])

    def id_set(self, values: list[str]) -> str:
        """The subquery a lookup reads its ids from (Store.id_set); this store answers no query with rows."""
        return "(SELECT arrayJoin([]))"

    def saved_events(self, ids: list[str]) -> dict[str, Saved]:
        return {i: self.saved[i] for i in ids if i in self.saved}

    def journal_plan(self, plan: str, origins: list[str], pieces: str) -> None:
        self.covering.update(dict.fromkeys(origins, plan))
        self.plans[plan] = pieces

    def journaled_plans(self, origins: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        covered = {o: self.covering[o] for o in origins if o in self.covering}
        return covered, {p: self.plans[p] for p in covered.values()}

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


def rows_of(piece: Piece) -> list[dict[str, object]]:
    """A columnar piece's rows as dicts."""
    assert piece.data is not None
    return table_rows(piece.data)


def saved_by(*pieces: Piece) -> dict[str, Saved]:
    """What event_ids holds once these pieces' inserts reached it."""
    return {r["event_id"]: Saved(r["content_hash"], r["origin"]) for p in pieces for r in rows_of(p)}  # type: ignore


def test_a_plan_has_pieces_of_at_most_50_days_whatever_its_messages_with_a_token_of_its_rows():
    rows = rows_over_days(400, live=30)  # one message
    plan = SinkWriter(FakeStore()).plan(rows)  # type: ignore[arg-type]
    assert [len(p.days) for p in plan.pieces] == [DAYS_PER_PIECE] * 8 + [1]  # 401 days, sorted, in runs of 50
    days = [d for p in plan.pieces for d in p.days]
    assert days == sorted({utc_day(r["ts"]) for r in rows})  # type: ignore[arg-type]
    assert all(utc_day(r["ts"]) in p.days for p in plan.pieces for r in rows_of(p))  # type: ignore[arg-type]
    assert sum(p.size for p in plan.pieces) == len(rows)
    other = in_message([dict(r) for r in rows[:3]], Source("llm.cost.attempts.v1", 1, 0))
    merged = SinkWriter(FakeStore()).plan([*other, *rows[3:]])  # type: ignore[arg-type]
    assert len(merged.pieces) == 8 + 1  # two messages, the same cuts: one insert per 50 days, not per message
    assert {r["origin"] for r in rows_of(merged.pieces[-1])} == {rows[0]["origin"]}  # the live rows
    assert {r["origin"] for p in merged.pieces for r in rows_of(p)} == {rows[0]["origin"], other[0]["origin"]}
    again = SinkWriter(FakeStore()).plan(rows)  # type: ignore[arg-type]
    assert [p.token for p in again.pieces] == [p.token for p in plan.pieces]  # deterministic
    assert len({p.token for p in plan.pieces}) == len(plan.pieces)
    assert not {p.token for p in merged.pieces} & {p.token for p in plan.pieces}  # another plan, other tokens


def test_a_failed_piece_is_sent_again_unchanged_never_replanned():
    rows = rows_over_days(3)
    store = FakeStore(fail=[StoreError("view rollup_minute_attempts_mv: Code: 395 failpoint")])
    writer = SinkWriter(store)  # type: ignore[arg-type]
    sent: list[str] = []
    insert = writer.insert

    def recording(piece: Piece) -> None:
        sent.append(piece.token)
        if len(sent) == 1:  # the source took the rows before the view failed: the lookup would now find them
            store.saved.update(saved_by(piece))
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
    store.saved.update(saved_by(plan.pieces[0]))  # the source took them
    writer.plan = lambda _rows, _covered: plan  # type: ignore[method-assign]
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
    assert [r["payload"] for p in plan.pieces for r in rows_of(p)] == [first["payload"]]
    assert [r.reason for r in plan.rejections] == ["conflicting_duplicate"]
    assert "earlier in this batch" in plan.rejections[0].message
    assert writer.stats.duplicates_in_batch == 1
    with pytest.raises(SinkRefused):  # write() has no dead-letter route: it refuses rather than drop
        SinkWriter(FakeStore()).write([first, other])  # type: ignore[arg-type]


def test_request_pieces_keep_a_request_together_and_split_by_day_and_in_halves():
    days = [NOW - timedelta(days=d) for d in (3, 1, 1, 60, 1, 2, *range(10, 60))]  # 54 distinct days
    data = pa.table({"k": [f"k{i}" for i in range(len(days))],
                     "first_ts": pa.array(days, pa.timestamp("ms", tz="UTC"))})
    keys = data.column("k").to_pylist()
    pieces = cut_columns("logical_requests", data, keys, "first_ts", "plan", groups=[[0, 1], [4, 5]])
    assert len(pieces) == 2 and all(len(p.days) <= DAYS_PER_PIECE for p in pieces)
    assert sorted(k for p in pieces for k in p.keys) == sorted(keys)
    assert all(utc_day(d) in p.days for p in pieces for k, d in zip(keys, days, strict=True) if k in p.keys)
    first = next(p for p in pieces if "k0" in p.keys)
    assert {"k0", "k1", "k4", "k5"} <= set(first.keys) and first.breaks  # each request's rows in one piece
    for half in split_piece(first, str):
        got = set(half.keys)
        assert {"k0", "k1"} <= got or not {"k0", "k1"} & got  # a request's rows never split apart
        assert {"k4", "k5"} <= got or not {"k4", "k5"} & got
    assert sum(h.size for h in split_piece(first, str)) == first.size
    pair = cut_columns("logical_requests", data.slice(0, 2), keys[:2], "first_ts", "plan", groups=[[0, 1]])
    assert [p.breaks for p in pair] == [(0,)] and not pair[0].splittable  # a cancel row and its revision: one insert
    with pytest.raises(ValueError):
        split_piece(pair[0], str)


def test_dict_pieces_keep_a_group_together_and_split_by_day():
    day1, day2 = NOW - timedelta(days=3), NOW - timedelta(hours=1)
    groups = [({"k": "a", "first_ts": day1}, {"k": "b", "first_ts": day2}), ({"k": "c", "first_ts": day2},)]
    pieces = make_pieces("anomalies", groups, lambda r: r["k"], lambda g: (utc_day(r["first_ts"]) for r in g))
    assert sorted(p.days for p in pieces) == sorted([(utc_day(day1), utc_day(day2)), (utc_day(day2),)])
    assert sorted(r["k"] for p in pieces for r in p.rows) == ["a", "b", "c"]


def test_anomaly_writer_plans_by_day_without_lookups():
    rows = [{"incident_id": f"i{i}", "state": "firing", "detected_at": NOW - timedelta(days=i)} for i in range(3)]
    plan: Plan = AnomalyWriter(FakeStore(), SinkStats()).plan(rows)  # type: ignore[arg-type]
    assert len(plan.pieces) == 3 and plan.rejections == []


def message(offset: int, days: int, live: int = 0) -> list[dict[str, object]]:
    return in_message(rows_over_days(days, live), Source("llm.cost.attempts.v1", 0, offset))


def test_a_replay_resends_the_journaled_plan_whatever_landed_and_whatever_shares_its_batch():
    a, b, c = message(5, 60, live=3), message(4, 1), message(6, 0, live=2)
    c.append({**a[0], "origin": c[0]["origin"]})  # a later message repeats one of a's events
    crashed = FakeStore()
    first = SinkWriter(crashed)  # type: ignore[arg-type]
    plan = first.plan([*b, *a, *c])
    assert plan.prepare is not None and len(plan.pieces) == 2  # 62 days of three messages: 50, then 12
    plan.prepare()  # journaled before the first insert
    for landed in ([], plan.pieces[:1]):
        store = FakeStore()  # the kill -9 left these pieces in event_ids (and in any subset of the views)
        store.covering, store.plans = dict(crashed.covering), dict(crashed.plans)
        store.saved.update(saved_by(*landed))
        d = message(7, 0, live=4)  # a message after the crash shares the replay's batch
        writer = SinkWriter(store)  # type: ignore[arg-type]
        with ThreadPoolExecutor(1) as ex:
            written = run(write_with_retry(writer, [dict(r) for r in (*a, *c, *d)], ex, retry_for_s=5))
        tokens = [t for _, _, t in store.inserts]
        assert tokens[:2] == [p.token for p in plan.pieces]  # the journaled pieces, first and unchanged
        assert written.resent == sum(p.size for p in plan.pieces) and written.inserted == len(d)
        assert writer.stats.duplicates_in_batch == 1 and written.rejections == []  # c's copy of a[0]
        assert set(store.covering) == {r["origin"] for r in (*a, *b, *c, *d)}  # d's plan journaled too
        assert len(store.plans) == 2


def test_a_journal_entry_gives_back_the_pieces_it_was_made_of():
    rows = rows_over_days(120, live=5)
    writer = SinkWriter(FakeStore())  # type: ignore[arg-type]
    plan = writer.plan(rows)
    assert plan.prepare is not None
    plan.prepare()
    again = writer.journaled(rows)
    assert again.covered == {rows[0]["origin"]}
    assert [(p.token, p.days, p.keys, p.breaks) for p in again.pieces] == [
        (p.token, p.days, p.keys, p.breaks) for p in plan.pieces]
    assert all(a.data.equals(b.data) for a, b in zip(again.pieces, plan.pieces, strict=True))  # type: ignore


def test_an_event_saved_by_another_message_is_a_duplicate_not_a_resend():
    [row] = message(3, 0, live=1)
    store = FakeStore()
    store.saved[row["event_id"]] = Saved(content_hash(row["payload"]), origin_of(Source("llm.cost.attempts.v1", 0, 1)))
    writer = SinkWriter(store)  # type: ignore[arg-type]
    assert writer.plan([row]).pieces == [] and writer.stats.already_saved == 1 and writer.stats.resent == 0
