"""A terminated stream's estimate and its real usage count once, at the real cost, in every aggregate (chDB)."""

import itertools
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal as D

import pytest

from ops.reports.chargeback import UNATTRIBUTED, Period, build_report
from ops.reports.chargeback import fetch as fetch_chargeback
from ops.verify import verify
from streams.budget import read_spend
from streams.pieces import insert_token
from streams.records import ATTEMPT_COLUMNS, ATTEMPT_COLUMNS_ADDED, Source
from streams.sink import SinkWriter, origin_of
from streams.supersede import SUPERSEDED_COLUMNS, SUPERSEDED_TABLE
from tally import store as store_module
from tally.config import load_settings
from tally.errors import StoreError
from tally.reference import Budget, BudgetSet
from tally.store import Store
from tests.factories import attempt_row_factory, in_message

pytestmark = pytest.mark.integration

# The one clock of this file: every time a TTL, a period or a window compares with derives from it.
NOW = datetime.now(UTC).replace(microsecond=0)
CALL_TS = NOW.replace(second=0)  # this minute: in this day, month and budget window
ESTIMATE_COST, REAL_COST = D("0.004000000000000001"), D("0.002500000000000003")
GRAINS = ("minute", "hour", "day")
FEATURE = "summarize_email_v2"
OFFSETS = itertools.count()  # each attempts message of these tests at its own offset


def call_rows(call, *, team="inbox"):
    """The estimate (usage not reported, cut at token 120) and the real usage of one physical call."""
    logical = f"lr-{call}"
    at = int(CALL_TS.timestamp() * 1000)
    estimate = attempt_row_factory(logical, event_id=f"{call}-estimate", request_id=call, ts_ms=at,
                                   usage_reported=False, token_n=120, output_tokens=120, cost=ESTIMATE_COST,
                                   pricing_status="estimated")
    real = attempt_row_factory(logical, event_id=f"{call}-real", request_id=call, ts_ms=at + 400,
                               output_tokens=75, cost=REAL_COST, final=True)
    for row, ingested in ((estimate, NOW - timedelta(seconds=30)), (real, NOW)):
        row.update(team_id=team, ingested_at=ingested)
        if not team:
            row.update(attribution_status="unattributed", attribution_reason="unknown_feature")
        in_message([row], Source("llm.cost.attempts.v1", 0, next(OFFSETS)))  # each published on its own
    return estimate, real


def rollups(store, grain):
    return store.query(
        "SELECT toInt64(sum(attempts)), toInt64(sum(output_tokens)), toString(sum(cost_total_usd)), "
        f"toString(sum(cost_output_usd)), toString(sum(cost_unattributed_usd)) FROM {{db}}.rollup_{grain}").rows[0]


def counted(store):
    """What each source says the call cost: every rollup grain, budgets, chargeback and usage_events_current."""
    def query(sql):
        res = store.query(sql)
        return res.columns, [list(r) for r in res.rows]

    out = {grain: rollups(store, grain) for grain in GRAINS}
    budgets = BudgetSet("b-1", NOW - timedelta(days=1),
                        (Budget("feature", FEATURE, "day", D(100), (80,)),
                         Budget("feature", FEATURE, "month", D(1000), (80,))))
    spend, recent = read_spend(lambda sql: query(sql)[1], budgets, NOW, 3600)
    out["budget"] = (spend.get(("feature", FEATURE, "day")), spend.get(("feature", FEATURE, "month")),
                     recent.get(("feature", FEATURE)))
    period = Period(date(NOW.year, NOW.month, 1), CALL_TS.date() + timedelta(days=1), "this month")
    data = fetch_chargeback(query, period, NOW)
    report = build_report("chargeback", data, period, [], NOW, "chDB")
    classes = next(t for t in report.tables if t.name == "classes")
    team, total = classes.columns.index("team"), classes.columns.index("total_usd")
    out["chargeback"] = {r[team]: r[total] for r in classes.rows}
    out["chargeback_unattributed"] = [(cost, attempts) for _, _, attempts, cost in data.unattributed]
    out["current"] = store.query("SELECT event_id, toString(cost_total_usd) FROM {db}.usage_events_current").rows
    return out


def differences(store):
    """`tally verify` over the call's day: every rollup grain against usage_events_current and logical_requests."""
    s = store.settings
    retention = {"minute": s.rollup_minute_retention_days, "hour": s.rollup_hour_retention_days,
                 "day": s.rollup_day_retention_days}

    def query(sql):
        res = store.query(sql)
        return res.columns, [list(r) for r in res.rows]

    audit = verify(query, CALL_TS.date(), CALL_TS.date(), NOW, retention)
    return [d.describe() for d in audit.differences]


def expect_once(team="inbox"):
    """The call counted once at its real cost (75 output tokens)."""
    unattributed = "0" if team else str(REAL_COST)
    grain = (1, 75, str(REAL_COST), str(REAL_COST), unattributed)
    return {**dict.fromkeys(GRAINS, grain), "budget": (REAL_COST, REAL_COST, REAL_COST),
            "chargeback": {team or UNATTRIBUTED: REAL_COST},
            "chargeback_unattributed": [] if team else [(REAL_COST, 1)], "current": [("c-1-real", str(REAL_COST))]}


ORDERS = {
    "one batch": lambda e, r: [[e, r]],
    "one batch, correction first": lambda e, r: [[r, e]],
    "estimate, then correction": lambda e, r: [[e], [r]],
    "correction, then estimate": lambda e, r: [[r], [e]],
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_estimate_and_correction_count_once_at_the_real_cost(store, order):
    estimate, real = call_rows("c-1")
    batches = ORDERS[order](estimate, real)
    writer = SinkWriter(store)
    for batch in batches:
        writer.write(batch)
    assert store.query("SELECT count() FROM {db}.usage_events").rows == [(2,)]  # both kept, as received
    assert writer.stats.superseded == 1
    once = counted(store)
    assert once == expect_once()
    assert differences(store) == []  # verify counts the call once too (it read usage_events, with both rows)

    # Replays of every batch, and of everything at once: nothing more is subtracted.
    for batch in [*batches, [estimate, real]]:
        writer.write(batch)
    assert writer.stats.superseded == 1
    # An insert of the supersession retried after a timeout carries the same token: ClickHouse absorbs it, in
    # the rollups too.
    row = store.query(f"SELECT {', '.join(SUPERSEDED_COLUMNS)} FROM {{db}}.{SUPERSEDED_TABLE}")
    assert [r[0] for r in row.rows] == ["c-1-estimate"]
    assert row.rows[0][SUPERSEDED_COLUMNS.index("superseded_by")] == "c-1-real"
    store.insert_columns(SUPERSEDED_TABLE, [list(c) for c in zip(*row.rows, strict=True)], SUPERSEDED_COLUMNS,
                         insert_token(SUPERSEDED_TABLE, ["c-1-estimate"]))
    assert counted(store) == once


def test_an_unattributed_call_counts_once_in_the_unattributed_cost(store):
    estimate, real = call_rows("c-1", team="")
    writer = SinkWriter(store)
    writer.write([estimate])
    writer.write([real])
    assert counted(store) == expect_once(team="")


def test_a_call_published_again_counts_at_its_latest_cost_and_other_calls_are_untouched(store):
    estimate, real = call_rows("c-1")
    again = {**real, "event_id": "c-1-real-again", "ts": real["ts"] + timedelta(milliseconds=5),
             "cost_output_usd": D("0.003"), "cost_total_usd": D("0.003"),
             "origin": origin_of(Source("llm.cost.attempts.v1", 0, next(OFFSETS)))}
    other_estimate, _ = call_rows("c-2")
    writer = SinkWriter(store)
    writer.write([estimate, other_estimate])
    writer.write([real])
    writer.write([again])
    assert writer.stats.superseded == 2
    assert rollups(store, "day") == (2, 195, str(D("0.003") + ESTIMATE_COST), str(D("0.003") + ESTIMATE_COST), "0")
    assert sorted(store.query("SELECT event_id, superseded_by FROM {db}.superseded_events").rows) == [
        ("c-1-estimate", "c-1-real"), ("c-1-real", "c-1-real-again")]


def test_a_crash_between_the_row_and_its_supersession_is_completed_by_the_replay(store, monkeypatch):
    estimate, real = call_rows("c-1")
    writer = SinkWriter(store)
    writer.write([estimate])
    insert = store.insert_columns

    def crash_on_supersession(table, *args):
        if table == SUPERSEDED_TABLE:
            raise StoreError("connection reset")
        insert(table, *args)

    monkeypatch.setattr(store, "insert_columns", crash_on_supersession)
    with pytest.raises(StoreError):
        writer.write([real])
    assert rollups(store, "day")[0] == 2  # both rows saved, the estimate not subtracted yet: the batch is not acked
    monkeypatch.setattr(store, "insert_columns", insert)
    # The replay re-sends its message's journaled piece (absorbed: usage_events holds the row once); the
    # supersession is written now.
    assert writer.write([real]) == 0 and writer.stats.resent == 1
    assert counted(store) == expect_once()


@pytest.mark.parametrize("saved_before", ["estimate", "estimate and correction"])
def test_migration_009_applies_to_a_database_that_already_holds_the_call(tmp_path, monkeypatch, saved_before):
    settings = load_settings(env={}, data_dir=tmp_path)
    before = [m for m in store_module.migrations() if m[0] < 9]
    monkeypatch.setattr(store_module, "migrations", lambda: before)
    estimate, real = call_rows("c-1")
    old_rows = [estimate] if saved_before == "estimate" else [estimate, real]
    with Store(settings) as old:
        old.migrate()
        # As the sink of before wrote them: usage_events (and its views) only, UInt64 rollup sums.
        then = [c for c in ATTEMPT_COLUMNS if c not in ATTEMPT_COLUMNS_ADDED]  # the columns of before 009
        old.insert_columns("usage_events", [[r[c] for r in old_rows] for c in then], then, "before-009")
        assert rollups(old, "day")[0] == len(old_rows)
    monkeypatch.undo()
    with Store(settings) as store:
        assert store.migrate() == [name for n, name, _ in store_module.migrations() if n >= 9]
        if real in old_rows:  # the migration supersedes what is already there
            assert counted(store) == expect_once()
        SinkWriter(store).write([real])  # the correction arrives (or is replayed)
        assert counted(store) == expect_once()


def test_a_request_id_reused_by_another_logical_request_is_another_call(store):
    estimate, real = call_rows("c-1")
    elsewhere = {**real, "event_id": "c-1-elsewhere", "logical_request_id": "lr-other"}
    writer = SinkWriter(store)
    writer.write([estimate, real, elsewhere])
    assert writer.stats.superseded == 1
    assert rollups(store, "day")[:3] == (2, 150, str(2 * REAL_COST))
