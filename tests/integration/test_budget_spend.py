"""Budget spend read from real rollups (chDB): spend stamped ahead of the wall clock waits for it."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest

from streams.budget import read_spend
from streams.pipeline import process_messages
from streams.records import Source
from streams.sink import ATTEMPT_ROWS, SinkWriter, decode_rows
from streams.validate import Validator
from tally.partitioning import partition_for
from tally.reference import Budget, BudgetSet, snapshot_of
from tests.factories import event_factory

pytestmark = pytest.mark.integration

FEATURE = "summarize_email_v2"


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_the_burn_rate_ends_at_the_wall_clock(store, docs):
    # ClickHouse applies the rollups' TTL with its own clock, so this test's one clock is the real one, read once;
    # every time below is derived from it.
    now = datetime.now(UTC).replace(microsecond=0)
    on_time = event_factory(timestamp=_iso(now - timedelta(minutes=2)))
    ahead = event_factory(timestamp=_iso(now + timedelta(minutes=10)))  # within the allowed skew: accepted
    messages = [(orjson.dumps(e), Source("llm.usage.v1", partition_for(e["request_id"], 4), i))
                for i, e in enumerate((on_time, ahead))]
    out = process_messages(messages, Validator(), snapshot_of(docs), 4, now)
    assert (out.accepted, out.rejected) == (2, 0)
    rows = [r for lines in out.attempts.values() for r in decode_rows(b"\n".join(lines), Source("a", 0, 0),
                                                                       ATTEMPT_ROWS)[0]]
    SinkWriter(store).write(rows)
    cost = {r["event_id"]: Decimal(r["cost_total_usd"]) for r in rows}
    assert cost[on_time["event_id"]] > 0 and cost[ahead["event_id"]] > 0
    budgets = BudgetSet("b1", now - timedelta(days=40),
                        (Budget("feature", FEATURE, "day", Decimal("100"), (50, 100)),))

    def query(sql: str) -> list[tuple[str, str]]:
        return [(str(a), str(b)) for a, b in store.query(sql).rows]

    # Before the fix the burn rate counted every bucket from `since` on, the one ten minutes ahead included.
    _, recent = read_spend(query, budgets, now, 900)
    assert recent == {("feature", FEATURE): cost[on_time["event_id"]]}
    _, recent = read_spend(query, budgets, now + timedelta(minutes=11), 900)
    assert recent == {("feature", FEATURE): cost[on_time["event_id"]] + cost[ahead["event_id"]]}
