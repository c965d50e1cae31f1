"""logical_requests in real ClickHouse (chDB): revisions collapse, replays and late attempts count once."""

import itertools
from datetime import timedelta
from decimal import Decimal

import orjson
import pytest

from ops.simulate import TrafficGenerator, catalog_from_reference
from streams.fold import FoldConfig, Folder, apply_writes
from streams.pipeline import FoldStep, process_messages
from streams.records import Source
from streams.sink import REQUEST_ROWS, RequestWriter, decode_batch, decode_rows
from streams.sink_columns import REQUEST_SCHEMA, encode_rows
from streams.validate import Validator
from tally.reference import snapshot_of
from tests.factories import attempt_row_factory as row

pytestmark = pytest.mark.integration



def per_request(store):
    """Each logical request as the aggregate queries see it: sum(sign) and signed sums."""
    res = store.query("SELECT logical_request_id, sum(sign), sum(sign * cost_total_usd), sum(sign * attempts) "
                      "FROM {db}.logical_requests GROUP BY logical_request_id")
    return {r[0]: (r[1], r[2], r[3]) for r in res.rows}


def current(store):
    """Each logical request as the row-level view sees it."""
    res = store.query("SELECT logical_request_id, revision, cost_total_usd, attempts "
                      "FROM {db}.logical_requests_current")
    return {r[0]: (r[1], r[2], r[3]) for r in res.rows}


OFFSETS = itertools.count(1)


def as_arrow_messages(rows):
    """Rows as the process role hands them over (one Arrow message at a new offset), decoded as the sink does."""
    messages = [(m, Source("llm.cost.requests.v1", 0, next(OFFSETS)))
                for m in encode_rows(rows, REQUEST_SCHEMA, 900_000)]
    batch, dead = decode_batch(messages, REQUEST_ROWS)
    assert not dead
    return batch


@pytest.mark.parametrize("handoff", ["rows", "arrow"])
def test_revisions_collapse_and_replays_change_nothing(store, now, handoff):
    folder, state = Folder(FoldConfig(grace_ms=0), 4), {}
    request_writer = RequestWriter(store)

    class writer:  # noqa: N801 - the writer as the test drives it: dict rows, or Arrow messages of those rows
        @staticmethod
        def write(rows):
            return request_writer.write(rows if handoff == "rows" else as_arrow_messages(rows))
    t0 = int((now - timedelta(hours=1)).timestamp() * 1000)  # event time (ms) an hour before emission

    def fold(*rows, wall=t0 / 1000 + 60):
        res = folder.fold(list(rows), state, wall, now)
        apply_writes(state, res.writes)
        return res.emitted

    first = fold(row("A", status="error", cost=Decimal("0.25"), ts_ms=t0),
                 row("A", attempt=1, final=True, cost=Decimal("1"), ts_ms=t0 + 5))
    first += fold(row("B", final=True, cost=Decimal("3"), ts_ms=t0))
    assert writer.write(first) == 2
    assert writer.write(first) == 0  # replayed batch
    # A late attempt for A (its fold state already gone with grace 0) and one for B (never had state).
    # Neither is final: the fold holds them until event time says they are abandoned (a quiet stream here).
    assert fold(row("A", attempt=2, status="error", cost=Decimal("0.5"), ts_ms=t0 + 9),
                row("B", attempt=1, status="error", cost=Decimal("0.125"), ts_ms=t0 + 1)) == []
    res = folder.tick(range(4), state, t0 / 1000 + 10**6, now)
    late = sorted(res.emitted, key=lambda r: r["logical_request_id"])
    assert [(r["revision"], r["final_status"]) for r in late] == [(1, "abandoned")] * 2
    assert writer.write(late) == 4  # two cancel rows, two new revisions
    assert writer.write(late + first) == 0
    expected = {"A": (1, Decimal("1.75"), 3), "B": (1, Decimal("3.125"), 2)}
    assert per_request(store) == expected
    assert current(store) == {k: (2, v[1], v[2]) for k, v in expected.items()}
    store.command("OPTIMIZE TABLE {db}.logical_requests FINAL")  # merges collapse the pairs; nothing changes
    assert per_request(store) == expected
    assert store.query("SELECT count() FROM {db}.logical_requests").rows[0][0] == 2


def test_generated_traffic_folds_to_one_row_per_logical_request(store, docs, now):
    gen = TrafficGenerator(catalog_from_reference(docs), seed=11, bad_rate=0.0, start=now - timedelta(hours=1))
    events = [e for _ in range(400) for e in gen.logical_request()]
    msg = b"\n".join(orjson.dumps(e) for e in events)
    folder = Folder(FoldConfig(), 1)
    out = process_messages([(msg, Source("llm.usage.v1", 0, 1))], Validator(), snapshot_of(docs), 1, now,
                           FoldStep(folder, {}, 4))
    rows = []
    for lines in out.requests.values():
        got, bad = decode_rows(b"\n".join(lines), Source("llm.cost.requests.v1", 0, 1), REQUEST_ROWS)
        assert not bad
        rows.extend(got)
    assert len(rows) == 400  # every generated request ends with a final attempt
    RequestWriter(store).write(rows)
    got = store.query("SELECT sum(sign), sum(sign * attempts), sum(sign * cost_total_usd), "
                      "sum(sign * (cost_wasted_usd + cost_final_usd - cost_total_usd)) FROM {db}.logical_requests")
    n, attempts, cost, identity = got.rows[0]
    attempt_cost = sum((Decimal(r["cost_total_usd"]) for r in rows), Decimal(0))
    assert (n, attempts, cost, identity) == (400, len(events), attempt_cost, 0)


def test_a_replay_of_a_large_message_after_its_pieces_landed_counts_each_request_once(store, now):
    """The kill -9 case: a message's rows landed as one Arrow piece, its position was not stored, it is replayed.

    The replay re-sends the journaled piece (streams.pieces) under its token. ClickHouse's block id depends on the
    token and on the insert's chunking, and clickhouse-connect cuts a Native insert into ~2 MB blocks: before every
    piece went as one Arrow batch, a message of some thousands of requests was inserted a second time.
    """
    t0 = int((now - timedelta(hours=1)).timestamp() * 1000)
    folder = Folder(FoldConfig(), 1)
    attempts = [row(f"big-{i:05d}", final=True, cost=Decimal("0.001"), ts_ms=t0 + i) for i in range(6_000)]
    emitted = folder.fold(attempts, {}, t0 / 1000 + 60, now).emitted
    assert len(emitted) == 6_000
    batch = as_arrow_messages(emitted)
    assert len(batch.parts) == 1  # one message, inserted as it came: a columnar piece
    assert RequestWriter(store).write(batch) == 6_000
    again = RequestWriter(store)  # the restarted worker: the same message, now journaled
    assert again.write(batch) == 0  # nothing planned again: the journaled piece was re-sent
    assert again.stats.resent == 6_000
    got = store.query("SELECT count(), sum(sign), uniqExact(logical_request_id) FROM {db}.logical_requests").rows[0]
    assert got == (6_000, 6_000, 6_000)
    minute = store.query("SELECT sum(requests) FROM {db}.rollup_minute").rows[0][0]
    assert minute == 6_000  # the view targets absorbed the replay too
