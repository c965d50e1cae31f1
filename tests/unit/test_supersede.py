"""The supersede plan: per physical call, every row but the fold's counted one is superseded exactly once."""

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from streams.fold import effective, fact_of
from streams.supersede import CallRow, plan
from tests.factories import attempt_row_factory

T0 = datetime(2026, 1, 1, tzinfo=UTC)  # a pure function: no TTL or window compares with these times
CALL = ("lr-1", "call-1")


def row(event_id, *, reported=True, ms=0, request_id="call-1", ingested_s=0):
    return CallRow("lr-1", request_id, event_id, reported, T0 + timedelta(milliseconds=ms), "inbox", "f",
                   T0 + timedelta(seconds=ingested_s))


def test_a_single_row_call_supersedes_nothing():
    assert plan({CALL: [(row("e1"), False)], ("lr-1", "call-2"): [(row("e2", request_id="call-2"), False)]}) == []


def test_the_real_usage_wins_over_a_later_estimate_in_any_order():
    estimate, real = row("est", reported=False, ms=900, ingested_s=5), row("real", ms=100, ingested_s=2)
    for markers in itertools.permutations([(estimate, False), (real, False)]):
        [s] = plan({CALL: markers})
        assert (s.row, s.by, s.at) == (estimate, real, estimate.ingested_at)


def test_rows_already_superseded_are_not_planned_again():
    estimate, real, again = row("est", reported=False), row("real", ms=1), row("again", ms=2)
    markers = [(estimate, False), (estimate, True), (real, False)]
    assert plan({CALL: markers}) == []
    [s] = plan({CALL: [*markers, (again, False)]})
    assert (s.row, s.by) == (real, again)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=6))
def test_the_row_left_counted_is_the_folds(calls):
    rows = [attempt_row_factory("lr-1", event_id=f"e{i}", request_id="call-1", usage_reported=reported,
                                ts_ms=1_763_208_000_000 + ms) for i, (reported, ms) in enumerate(calls)]
    markers = [(CallRow("lr-1", "call-1", r["event_id"], r["usage_reported"], r["ts"], "inbox", "f", T0), False)
               for r in rows]
    superseded = {s.row.event_id for s in plan({CALL: markers})}
    [kept] = effective(fact_of(r) for r in rows)
    assert superseded == {r["event_id"] for r in rows} - {kept["event_id"]}
