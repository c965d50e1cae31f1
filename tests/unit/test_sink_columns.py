"""The sink's columnar decode: the fast path takes exactly what the precise path would, to the last digit."""

import random
from datetime import UTC, timedelta, timezone
from decimal import Decimal, localcontext
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from streams.records import ATTEMPT_COLUMNS, COST_COLUMNS, Source, encode_row
from streams.sink import (
    ATTEMPT_ROWS,
    REQUEST_ROWS,
    SinkWriter,
    decode_batch,
    decode_rows,
    origin_of,
    utc_day,
)
from streams.sink_columns import MONEY, SINK_SCHEMA, ArrowPart, AttemptBatch, DictPart, Refused, arrow_part
from tally.store import Saved
from tests.factories import attempt_row_factory, clock, event_factory

SOURCE = Source("llm.cost.attempts.v1", 2, 41)


def attempt(n: int, rng: random.Random, days: int = 120, **overrides: Any) -> dict[str, Any]:
    """A priced attempt row with random money (up to 18 decimals, up to 20 integer digits), its ts in the last
    `days` days (before the suite's clock)."""
    at = clock() - timedelta(days=rng.randrange(0, days), milliseconds=rng.randrange(0, 86_400_000))
    row = attempt_row_factory(f"lr-{n}", ts_ms=int(at.timestamp() * 1000))
    for c in COST_COLUMNS:
        digits = rng.choice([0, 1, 6, 12, 18])
        whole = rng.choice([0, 0, 1, 37, 10**rng.randrange(1, 20) - 1])
        frac = rng.randrange(0, 10**digits) if digits else 0
        row[c] = Decimal(f"{whole}.{frac:0{digits}d}") if digits else Decimal(whole)
    row["ts"] = at.replace(microsecond=rng.choice([0, 590_000, rng.randrange(0, 1_000_000)]))
    row["ingested_at"] = clock().replace(microsecond=rng.randrange(0, 1_000_000))
    row["tags"] = {"team_id": "inbox", "feature_id": f"f{n % 3}"}
    row["tool_calls"] = {"web_search": n % 4} if n % 2 else {}
    row["latency_ms"] = None if n % 5 == 0 else rng.randrange(0, 60_000)
    row["stream_terminated_at_token_n"] = rng.randrange(0, 500) if n % 7 == 0 else None
    row["payload"] = orjson.dumps(event_factory(event_id=row["event_id"])).decode()
    row.update(overrides)
    return row


def message(rows: list[dict[str, Any]]) -> bytes:
    return b"\n".join(encode_row(r) for r in rows) + b"\n"


def dead_records(dead: dict[int, list[bytes]]) -> list[dict[str, Any]]:
    """Dead letters without their rejected_at (the clock of the decode)."""
    out = []
    for lines in dead.values():
        for line in lines:
            record = orjson.loads(line)
            record.pop("rejected_at")
            out.append(record)
    return out


def test_the_fast_path_gives_the_precise_rows_with_money_exact_to_the_last_digit():
    rng = random.Random(7)
    rows = [attempt(n, rng) for n in range(300)]
    value = message(rows)
    part = arrow_part(value, SOURCE, origin_of(SOURCE))
    precise, bad = decode_rows(value, SOURCE)
    assert not bad and len(part) == len(precise) == 300
    table = part.table
    for c in COST_COLUMNS:
        assert table.schema.field(c).type == MONEY  # decimal128(38, 18), never a float
        assert table.column(c).to_pylist() == [r[c] for r in precise]  # Decimal equality: every digit
        with localcontext(prec=60):  # in atto-dollars, as ClickHouse stores Decimal(38, 18)
            assert [int(v.scaleb(18)) for v in table.column(c).to_pylist()] == [
                int(r[c].scaleb(18)) for r in precise]
    for c in ("ts", "ingested_at"):  # DateTime64(3): the precise time floored to the millisecond
        assert table.column(c).to_pylist() == [r[c].replace(microsecond=r[c].microsecond // 1000 * 1000)
                                               for r in precise]
    for c in ATTEMPT_COLUMNS:
        if c not in (*COST_COLUMNS, "ts", "ingested_at", "tags", "tool_calls"):
            assert table.column(c).to_pylist() == [r[c] for r in precise], c
    assert [dict(m) for m in table.column("tags").to_pylist()] == [r["tags"] for r in precise]
    assert [dict(m) for m in table.column("tool_calls").to_pylist()] == [r["tool_calls"] for r in precise]
    assert table.column("origin").to_pylist() == [origin_of(SOURCE)] * 300
    assert [part.row(i) for i in range(300)] == precise  # a row read back is the precise path's, exactly


def test_times_in_other_offsets_are_the_same_instants():
    rng = random.Random(11)
    rows = [attempt(n, rng) for n in range(50)]
    lines = []
    for n, r in enumerate(rows):
        offset = timedelta(hours=(n % 27) - 13, minutes=30 * (n % 2))
        line = orjson.loads(encode_row(r))
        line["ts"] = r["ts"].astimezone(timezone(offset)).isoformat()
        if n % 3 == 1:
            line["ts"] = r["ts"].astimezone(UTC).isoformat().replace("+00:00", "Z")
        lines.append(orjson.dumps(line))
    value = b"\n".join(lines)
    part = arrow_part(value, SOURCE, origin_of(SOURCE))
    precise, _ = decode_rows(value, SOURCE)
    got = part.table.column("ts").to_pylist()
    assert got == [r["ts"].astimezone(UTC).replace(microsecond=r["ts"].microsecond // 1000 * 1000) for r in precise]
    # the UTC day a plan cuts its pieces by (streams.pieces.cut_columns casts ts to a date)
    assert pc.cast(part.table.column("ts"), pa.date32()).to_pylist() == [utc_day(r["ts"]) for r in precise]


# Lines the precise path accepts but the fast path does not take exactly: its whole message goes the precise way.
ACCEPTED_ELSEWHERE = {
    "a float cost": {"cost_total_usd": 0.5},
    "an integer cost": {"cost_total_usd": 3},
    "more than 18 decimals": {"cost_total_usd": "0.1234567890123456789"},
    "a naive time": {"ts": (clock() - timedelta(hours=2)).replace(tzinfo=None).isoformat(timespec="seconds")},
    "a space for T": {"ts": (clock() - timedelta(hours=2)).isoformat(sep=" ", timespec="seconds")},
    "a float token count": {"output_tokens": 300.0},
    "a bool token count": {"input_tokens": True},
    "a null error": {"error": None},
    "a float tool count": {"tool_calls": {"web_search": 1.0}},
}
# Lines no path accepts: the precise path's dead letter, byte for byte.
REJECTED = {
    "not JSON": b"{not json",
    "a missing column": "drop:latency_ms",
    "an extra column": {"prompt": "hello"},
    "a bad cost": {"cost_total_usd": "12 USD"},
    "a bad time": {"ts": "yesterday"},
    "a JSON array": b"[1, 2]",
}


def _mutated(base: dict[str, Any], how: Any) -> bytes:
    if isinstance(how, bytes):
        return how
    line = orjson.loads(encode_row(base))
    if isinstance(how, str):
        line.pop(how.split(":", 1)[1])
    else:
        line.update(how)
    return orjson.dumps(line)


@pytest.mark.parametrize("case", sorted(ACCEPTED_ELSEWHERE))
def test_a_line_the_fast_path_refuses_is_decoded_by_the_precise_path(case):
    rng = random.Random(3)
    good = [attempt(n, rng) for n in range(4)]
    value = b"\n".join([encode_row(good[0]), _mutated(good[1], ACCEPTED_ELSEWHERE[case]), *map(encode_row, good[2:])])
    with pytest.raises(Refused):
        arrow_part(value, SOURCE, origin_of(SOURCE))
    other = Source(SOURCE.topic, SOURCE.partition, SOURCE.offset + 1)
    batch, dead = decode_batch([(value, SOURCE), (message(good), other)], ATTEMPT_ROWS)
    assert isinstance(batch, AttemptBatch) and not dead
    assert [type(p) for p in batch.parts] == [DictPart, ArrowPart]  # the other message stays in columns
    assert list(batch) == decode_batch([(value, SOURCE), (message(good), other)], ATTEMPT_ROWS, columnar=False)[0]


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_a_rejected_line_has_the_precise_paths_dead_letter(case):
    rng = random.Random(5)
    good = [attempt(n, rng) for n in range(5)]
    value = b"\n".join([*map(encode_row, good[:2]), _mutated(good[2], REJECTED[case]), *map(encode_row, good[3:])])
    batch, dead = decode_batch([(value, SOURCE)], ATTEMPT_ROWS)
    rows, precise_dead = decode_batch([(value, SOURCE)], ATTEMPT_ROWS, columnar=False)
    assert dead_records(dead) == dead_records(precise_dead)
    [record] = dead_records(dead)
    assert record["reason"] == "bad_attempt_row" and record["stage"] == "sink" and record["source_line"] == 3
    assert list(batch) == rows and len(rows) == 4


def test_a_bad_request_line_is_a_dead_letter_and_request_rows_come_as_a_batch():
    rows, dead = decode_batch([(b'{"a": 1}', Source("llm.cost.requests.v1", 0, 0))], REQUEST_ROWS)
    assert isinstance(rows, AttemptBatch) and list(rows) == [] and len(dead_records(dead)) == 1
    rows, dead = decode_batch([(b'{"a": 1}', Source("llm.cost.requests.v1", 0, 0))], REQUEST_ROWS, columnar=False)
    assert isinstance(rows, list) and rows == [] and len(dead_records(dead)) == 1


class LookupOnly:
    """The event_ids lookup of a Store; the plan reads nothing else and writes nothing."""

    def __init__(self, saved: dict[str, Saved] | None = None) -> None:
        self.saved = saved or {}

    def saved_events(self, ids: list[str]) -> dict[str, Saved]:
        return {i: self.saved[i] for i in ids if i in self.saved}


def _plans(messages: list[tuple[bytes, Source]], saved: dict[str, Saved] | None = None) -> tuple[Any, Any]:
    columnar, _ = decode_batch(messages, ATTEMPT_ROWS)
    rows, _ = decode_batch(messages, ATTEMPT_ROWS, columnar=False)
    return (SinkWriter(LookupOnly(saved)).plan(columnar),  # type: ignore[arg-type]
            SinkWriter(LookupOnly(saved)).plan(rows))  # type: ignore[arg-type]


def test_the_columnar_plan_cuts_the_same_pieces_with_the_same_tokens():
    rng = random.Random(13)
    rows = [attempt(n, rng) for n in range(400)]  # 120 days: pieces of up to 50 days
    messages = [(message(rows[i:i + 100]), Source(SOURCE.topic, 1, 500 + i)) for i in range(0, 400, 100)]
    fast, slow = _plans(messages)
    assert len(fast.pieces) > 1
    assert [(p.token, p.days, p.size) for p in fast.pieces] == [(p.token, p.days, p.size) for p in slow.pieces]
    assert all(p.data is not None and p.data.schema.equals(SINK_SCHEMA) for p in (*fast.pieces, *slow.pieces))
    for a, b in zip(fast.pieces, slow.pieces, strict=True):
        assert a.keys == b.keys and a.data.equals(b.data)
    assert fast.finish is not None and slow.finish is not None
    assert fast.finish.args == slow.finish.args  # the same calls are superseded


def test_duplicates_and_conflicts_are_decided_as_by_the_row_plan():
    rng = random.Random(17)
    rows = [attempt(n, rng) for n in range(30)]
    changed = dict(rows[4], payload=orjson.dumps(event_factory(event_id=rows[4]["event_id"], attempt=3)).decode())
    first = message(rows[:20])
    second = message([*rows[15:], rows[2], changed])  # 5 copies of the first message's rows, then a conflict
    saved = {rows[25]["event_id"]: Saved("someone-else", "elsewhere"), rows[26]["event_id"]: Saved("", "")}
    messages = [(first, Source(SOURCE.topic, 0, 1)), (second, Source(SOURCE.topic, 0, 2))]
    fast, slow = _plans(messages, saved)
    assert [(p.token, p.size) for p in fast.pieces] == [(p.token, p.size) for p in slow.pieces]
    assert [r.to_record(clock()) for r in fast.rejections] == [r.to_record(clock()) for r in slow.rejections]
    assert {r.reason for r in fast.rejections} == {"conflicting_duplicate"} and len(fast.rejections) == 2
    assert fast.finish.args == slow.finish.args  # type: ignore[union-attr]


def test_an_empty_batch_plans_nothing():
    batch, dead = decode_batch([(b"", SOURCE), (b"\n\n", SOURCE)], ATTEMPT_ROWS)
    assert len(batch) == 0 and not dead
    assert SinkWriter(LookupOnly()).plan(batch).pieces == []  # type: ignore[arg-type]


def test_money_is_never_a_float_in_the_insert():
    assert [f.name for f in SINK_SCHEMA if pa.types.is_floating(f.type)] == []
    assert all(SINK_SCHEMA.field(c).type == pa.decimal128(38, 18) for c in COST_COLUMNS)


# ---------------------------------------------------------------- the Arrow hand-off (process role → sink)


def test_arrow_attempt_messages_give_the_rows_of_the_json_path_to_the_last_digit():
    from streams.sink_columns import encode_attempt_rows, is_arrow

    rng = random.Random(11)
    rows = [attempt(n, rng) for n in range(500)]
    messages = encode_attempt_rows(rows, 900 * 1024)
    assert len(messages) == 1 and is_arrow(messages[0]) and not is_arrow(message(rows))
    got, dead = decode_batch([(messages[0], SOURCE)])
    want, bad = decode_rows(message(rows), SOURCE)
    assert not dead and not bad
    assert isinstance(got, AttemptBatch) and [type(p) for p in got.parts] == [ArrowPart]
    for mine, theirs in zip(got, want, strict=True):
        for c in ("ts", "ingested_at"):  # DateTime64(3): floored to the millisecond, as the JSON path's insert does
            assert mine[c] == theirs[c].replace(microsecond=theirs[c].microsecond // 1000 * 1000)
            assert mine[c].utcoffset() == timedelta(0)
        for c in COST_COLUMNS:
            assert mine[c] == theirs[c]  # every digit
            assert "." not in str(mine[c]) or not str(mine[c]).endswith("0")  # without decimal128's padding
        assert {k: v for k, v in mine.items() if k not in ("ts", "ingested_at")} == {
            k: v for k, v in theirs.items() if k not in ("ts", "ingested_at")}
    # the same table as the NDJSON message's fast path
    assert got.parts[0].table.equals(arrow_part(message(rows), SOURCE, origin_of(SOURCE)).table)


def test_arrow_attempt_messages_are_cut_to_the_size_limit_in_row_order():
    from streams.sink_columns import decode_attempt_message, encode_attempt_rows

    rng = random.Random(3)
    rows = [attempt(n, rng) for n in range(400)]
    whole = encode_attempt_rows(rows, 10**7)
    assert len(whole) == 1
    limit = len(whole[0]) // 5
    messages = encode_attempt_rows(rows, limit)
    assert len(messages) >= 5 and all(len(m) <= limit for m in messages)
    ids = [eid for m in messages for eid in decode_attempt_message(m).column("event_id").to_pylist()]
    assert ids == [r["event_id"] for r in rows]
    assert encode_attempt_rows([], 1024) == []


def test_a_large_table_is_cut_into_about_as_few_messages_as_its_size_needs():
    """The first rows estimate the size; each message then sizes the next: neither uniform rows nor a big head
    cut a table into many more messages than its compressed size needs (and none exceeds the limit)."""
    import pyarrow as pa
    from pyarrow import ipc

    from streams.sink_columns import encode_table, ipc_stream

    rng = random.Random(5)
    uniform = pa.table({"id": list(range(6_000)),
                        "text": ["".join(rng.choices("abcdef", k=300)) for _ in range(6_000)]})
    head_big = pa.table({"id": list(range(6_000)),
                         "text": ["".join(rng.choices("abcdef", k=2_000 if i < 500 else 100)) for i in range(6_000)]})
    for table in (uniform, head_big):
        limit = len(ipc_stream(table)) // 4
        assert table.nbytes > limit  # the estimate is used
        messages = encode_table(table, limit)
        assert all(len(m) <= limit for m in messages)
        assert len(messages) <= 7  # four messages' worth at nine tenths full, the tail, one re-made smaller
        ids = [i for m in messages for i in ipc.open_stream(pa.py_buffer(m)).read_all()["id"].to_pylist()]
        assert ids == list(range(6_000))


def test_an_arrow_message_that_is_not_attempts_is_one_dead_letter_with_its_bytes():
    import base64

    import pyarrow.ipc as ipc

    sink = pa.BufferOutputStream()
    other = pa.table({"event_id": ["a"]})
    with ipc.new_stream(sink, other.schema) as writer:
        writer.write_table(other)
    foreign = sink.getvalue().to_pybytes()
    truncated = encode_attempt_rows_of(3)[:-40]
    for value in (foreign, truncated):
        got, dead = decode_batch([(value, SOURCE)])
        (record,) = dead_records(dead)
        assert len(got) == 0
        assert record["reason"] == "bad_attempt_row" and record["stage"] == "sink"
        assert base64.b64decode(record["original_b64"]) == value
        assert record["source_offset"] == SOURCE.offset


def encode_attempt_rows_of(n: int) -> bytes:
    from streams.sink_columns import encode_attempt_rows

    rng = random.Random(n)
    (value,) = encode_attempt_rows([attempt(i, rng) for i in range(n)], 10**6)
    return value


def test_a_batch_of_thousands_of_rows_is_cut_into_messages_that_fit_in_row_order():
    from streams.sink_columns import decode_attempt_message, encode_attempt_rows

    rng = random.Random(5)
    rows = [attempt(n, rng) for n in range(3000)]
    (whole,) = encode_attempt_rows(rows, 10**8)
    limit = len(whole) // 3
    messages = encode_attempt_rows(rows, limit)
    assert 3 <= len(messages) <= 5 and all(len(m) <= limit for m in messages)
    ids = [eid for m in messages for eid in decode_attempt_message(m).column("event_id").to_pylist()]
    assert ids == [r["event_id"] for r in rows]


def test_messages_an_older_process_worker_wrote_without_priced_as_are_read_with_it_empty():
    # The version rule of the hand-off (docs/handoff.md): a column added after the first release may be absent.
    from streams.sink_columns import ATTEMPT_SCHEMA_BEFORE, encode_rows

    rng = random.Random(5)
    rows = [attempt(n, rng, priced_as="openai/gpt-4o") for n in range(20)]
    older = [{k: v for k, v in r.items() if k != "priced_as"} for r in rows]
    (arrow_before,) = encode_rows(older, ATTEMPT_SCHEMA_BEFORE, 10**6)
    ndjson_before = b"\n".join(orjson.dumps({k: v for k, v in orjson.loads(encode_row(r)).items() if k != "priced_as"})
                               for r in rows) + b"\n"
    assert b"priced_as" not in ndjson_before
    for value in (arrow_before, ndjson_before):
        got, dead = decode_batch([(value, SOURCE)])
        assert not dead and len(got) == len(rows)
        assert [r["priced_as"] for r in got] == [""] * len(rows)
        assert [r["event_id"] for r in got] == [r["event_id"] for r in rows]
    precise, bad = decode_rows(ndjson_before, SOURCE)
    assert not bad and {r["priced_as"] for r in precise} == {""}
    # a row missing any other column is still not a row
    short = orjson.dumps({k: v for k, v in orjson.loads(encode_row(rows[0])).items() if k != "model_actual"})
    assert decode_rows(short + b"\n", SOURCE)[1][0].reason == "bad_attempt_row"


def test_a_plan_an_older_sink_journaled_replays_with_the_added_columns_filled() -> None:
    # A sink killed mid-batch before an upgrade leaves a journaled plan without priced_as; the upgraded sink must
    # re-send it as planned (not refuse it and stop for good: its position is never stored otherwise).

    from streams.pieces import Piece, journal_entry, journaled_pieces
    from streams.records import ATTEMPT_COLUMNS_ADDED
    from streams.sink_columns import SINK_SCHEMA, rows_table

    rng = random.Random(8)
    rows = [{**attempt(n, rng), "content_hash": f"h{n}", "origin": origin_of(SOURCE)} for n in range(5)]
    table = rows_table(rows, SINK_SCHEMA)
    older = table.drop_columns(list(ATTEMPT_COLUMNS_ADDED))
    ids = tuple(r["event_id"] for r in rows)
    entry = journal_entry([Piece("usage_events", (), "tok-1", (clock().date(),), older, ids, ())])
    (piece,) = journaled_pieces(entry, SINK_SCHEMA, lambda t: t.column("event_id").to_pylist())
    assert piece.data is not None and piece.data.schema.equals(SINK_SCHEMA)
    assert piece.data.column("priced_as").to_pylist() == [""] * 5
    assert piece.keys == ids and piece.token == "tok-1"
