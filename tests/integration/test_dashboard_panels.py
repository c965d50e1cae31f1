"""Every dashboard panel's SQL, macros substituted, runs in chDB over data written by the real sink code."""

from datetime import UTC, timedelta
from decimal import Decimal

import orjson
import pytest

from ops.simulate import TrafficGenerator, catalog_from_reference
from streams.fold import FoldConfig, Folder
from streams.sink import RequestWriter, SinkWriter
from tally.dashboard.panels import (
    FILTER_SQL,
    PANELS,
    PANELS_BY_ID,
    PanelFilters,
    default_range,
    filter_values,
    first_data,
    render,
    run_panel,
)
from tests.factories import clock
from tests.integration.test_rollups import run_batch

pytestmark = pytest.mark.integration

END = clock()  # noon UTC: the range's hour and its dense traffic lie inside END's UTC day
START = END - timedelta(hours=1)
MONTH_START = END.replace(day=1, hour=0)  # the history may begin in the month before END's
IN_RANGE = f"ts >= toDateTime({int(START.timestamp())}) AND ts <= toDateTime({int(END.timestamp())})"
COLUMNS = {
    "totals": ["spend_usd", "requests", "wasted_usd", "waste_pct", "unattributed_usd", "unattributed_pct"],
    "spend_by_team": ["time", "team", "usd_per_min"],
    "spend_by_cost_class": ["time", "input", "output", "cache_read", "cache_write", "tools", "reasoning"],
    "top_features": ["feature", "team", "spend_usd", "daily_avg_7d_usd"],
    "reasoning_share": ["feature", "reasoning_share_pct", "reasoning_usd", "spend_usd"],
    "retry_waste": ["time", "team", "wasted_usd_per_min"],
    "unattributed_share": ["time", "unattributed_pct"],
    "open_anomalies": ["started_at", "detected_at", "feature_id", "team_id", "signal", "severity", "value",
                       "baseline", "score", "dimension", "dimension_value", "explanation"],
    "budget_burn": ["scope", "id", "spent_today_usd", "spent_month_usd", "burn_usd_per_hour"],
    "admission": ["feature_id", "action", "reason", "decisions", "avoided_usd", "last_at"],
}
ANOMALY_COLUMNS = ["detected_at", "started_at", "feature_id", "team_id", "signal", "value", "baseline", "score",
                   "severity", "state", "dimension", "dimension_value", "explanation", "incident_id", "incident_key"]


def write_traffic(store, docs, start, rate, requests, seed):
    gen = TrafficGenerator(catalog_from_reference(docs), seed=seed, bad_rate=0.0, start=start, rate=rate)
    events = [e for _ in range(requests) for e in gen.logical_request()]
    attempts, logical = run_batch(events, docs, Folder(FoldConfig(), 4), END)
    SinkWriter(store).write(attempts)
    RequestWriter(store).write(logical)


def anomaly(at, feature, state, severity="warning"):
    """An anomalies row as the sink writes the detect stage's alert records (migration 006)."""
    return [at, at - timedelta(minutes=5), feature, "search", "cost_per_request", 0.5, 0.1, 6.0, severity, state,
            "model", "gpt-5", f"cost per request of {feature} rose", f"{feature}-1", f"anomaly:{feature}:cpr"]


@pytest.fixture
def panel_store(store, docs):
    # Eight days of sparse history (the 7-day averages) ending before the range, then 27 minutes of dense traffic.
    write_traffic(store, docs, END - timedelta(days=8, hours=2), rate=500 / (8 * 86400), requests=500, seed=3)
    write_traffic(store, docs, START + timedelta(minutes=5), rate=0.5, requests=800, seed=4)
    rows = [anomaly(END - timedelta(minutes=50), "search_answer", "firing"),
            anomaly(END - timedelta(minutes=20), "search_answer", "resolved"),  # closed since: not open
            anomaly(END - timedelta(minutes=10), "query_rewrite", "firing", "critical"),
            anomaly(END + timedelta(minutes=10), "semantic_rerank", "firing")]  # after the range: not yet open
    store.client.insert(f"{store.db}.anomalies", rows, column_names=ANOMALY_COLUMNS)
    write_decisions(store)
    return store


def write_decisions(store) -> None:
    """A gateway's admission records in the range: one admitted, one routed to a cheaper model, two denied."""
    from streams.decisions import DecisionWriter, decode_decisions
    from streams.records import Source
    from tally.reference import parse_reference_yaml
    from tally.sdk.admission import Admission
    from tests.unit.test_admission import CARD, REQ, policy, state

    at = (END - timedelta(minutes=15)).timestamp()
    records: list = []
    gateway = Admission("gw-panel", publish=records.append, clock=lambda: at)
    gateway.apply_references(parse_reference_yaml(CARD, "card") + parse_reference_yaml(policy("p", at - 60), "p"))
    gateway.apply_state({**state("0.995"), "computed_at": END.isoformat(), "period_end": (END + timedelta(
        hours=1)).isoformat()})
    gateway.reserve(request_id="ok", **{**REQ, "model": "gpt-4.1-mini"})
    gateway.reserve(request_id="routed", **REQ)  # o4-mini does not fit: gpt-4.1-mini does
    for i in range(2):
        gateway.reserve(request_id=f"no-{i}", **{**REQ, "model": "gpt-4.1-mini", "max_output_tokens": 90_000})
    rows, dead = decode_decisions([(b"\n".join(orjson.dumps(r) for r in records), Source("d", 0, 0))])
    assert not dead
    DecisionWriter(store).write(rows)


def usage_total(store, where):
    return store.query(f"SELECT sum(cost_total_usd) FROM {{db}}.usage_events WHERE {where}").rows[0][0]


def search_spend_since(store, start):
    """search_answer's spend from `start` up to END."""
    return usage_total(store, f"feature_id = 'search_answer' AND ts >= toDateTime({int(start.timestamp())}) "
                              f"AND ts <= toDateTime({int(END.timestamp())})")


def test_every_panel_runs_and_returns_its_columns(panel_store):
    f = PanelFilters(START, END, {"team": (), "environment": ()})
    for panel in PANELS:
        res = panel_store.query(render(panel.sql, f, panel_store.db))
        assert res.columns == COLUMNS[panel.id], panel.id
        assert res.rows, f"{panel.id} returned no rows over data that has them"
    for name, sql in FILTER_SQL.items():
        assert panel_store.query(render(sql, f, panel_store.db)).rows, name


def test_panel_numbers_equal_the_sources(panel_store):
    f = PanelFilters(START, END, {"team": (), "environment": ()})
    q, db = panel_store.query, panel_store.db
    totals = q(render(PANELS_BY_ID["totals"].sql, f, db)).rows[0]
    assert totals[0] == usage_total(panel_store, IN_RANGE) > 0
    assert totals[1] == 800  # logical requests started in the range, each once

    by_team = q(render(PANELS_BY_ID["spend_by_team"].sql, f, db)).rows
    assert sum(r[2] for r in by_team) == totals[0]  # one-minute buckets over an hour: per minute = per bucket

    burn = {(r[0], r[1]): r for r in q(render(PANELS_BY_ID["budget_burn"].sql, f, db)).rows}
    month, today = search_spend_since(panel_store, MONTH_START), search_spend_since(panel_store, END.replace(hour=0))
    assert burn[("feature", "search_answer")][2:4] == (today, month)

    top = q(render(PANELS_BY_ID["top_features"].sql, f, db)).rows
    assert len(top) == 10 and [r[2] for r in top] == sorted((r[2] for r in top), reverse=True)
    assert all(r[3] > 0 for r in top)  # every top feature also spent in the last seven days
    assert all(r[1] for r in top)  # a feature without a team is named "(unattributed)", never a blank team

    admission = {(r[0], r[1], r[2]): (r[3], r[4]) for r in q(render(PANELS_BY_ID["admission"].sql, f, db)).rows}
    assert set(admission) == {("search_answer", "fallback", "reservation_exceeds_remaining"),
                              ("search_answer", "deny", "reservation_exceeds_remaining")}
    assert admission[("search_answer", "deny", "reservation_exceeds_remaining")][0] == 2

    open_now = q(render(PANELS_BY_ID["open_anomalies"].sql, f, db)).rows
    assert [(r[2], r[5]) for r in open_now] == [("query_rewrite", "critical")]


def test_a_team_filter_narrows_every_panel(panel_store):
    everything = PanelFilters(START, END, {"team": (), "environment": ()})
    search = PanelFilters(START, END, {"team": ("search",), "environment": ("prod",)})
    q, db = panel_store.query, panel_store.db
    assert run_panel(PANELS_BY_ID["totals"], q, search, db)["data"]["values"]["spend_usd"] == float(
        usage_total(panel_store, f"{IN_RANGE} AND team_id = 'search' AND environment = 'prod'"))
    series = run_panel(PANELS_BY_ID["spend_by_team"], q, search, db)["data"]["series"]
    assert [s["name"] for s in series] == ["search"]
    for panel in PANELS:
        narrowed = q(render(panel.sql, search, db)).rows
        assert len(narrowed) <= len(q(render(panel.sql, everything, db)).rows), panel.id
    assert filter_values(q, db) == {
        "team": ["data", "growth", "inbox", "platform", "search", "support"],
        "environment": sorted({r[0] for r in q("SELECT DISTINCT environment FROM {db}.usage_events "
                                                "WHERE environment != ''").rows})}


def test_budget_panel_joins_budget_states(panel_store):
    f = PanelFilters(START, END, {"team": (), "environment": ()})
    states = {"feature:search_answer:month": {"scope": "feature", "id": "search_answer", "period": "month",
                                              "budget_usd": "10", "recommendation": "allow", "thresholds": [50]}}
    (budget,) = run_panel(PANELS_BY_ID["budget_burn"], panel_store.query, f, panel_store.db, states)["data"]["budgets"]
    spent = search_spend_since(panel_store, MONTH_START)
    assert budget["spent_usd"] == float(spent)
    assert budget["used_pct"] == float((spent * 100 / Decimal(10)).quantize(Decimal("0.01")))


def test_a_time_series_stops_at_the_last_finished_bucket(panel_store):
    # The range ends 30 s into a minute of the dense traffic: that minute is still filling and is not drawn.
    end = START + timedelta(minutes=15, seconds=30)
    f = PanelFilters(START, end, {"team": (), "environment": ()})
    q, db = panel_store.query, panel_store.db
    assert f.interval_s < 120  # one-minute buckets
    rows = q(render(PANELS_BY_ID["spend_by_team"].sql, f, db)).rows
    last_full = end.replace(second=0)
    assert max(r[0] for r in rows).replace(tzinfo=END.tzinfo) == last_full - timedelta(minutes=1)
    assert sum(r[2] for r in rows) == usage_total(
        panel_store, f"ts >= toDateTime({int(START.timestamp())}) AND ts < toDateTime({int(last_full.timestamp())})")
    totals = q(render(PANELS_BY_ID["totals"].sql, f, db)).rows[0]  # the stat still counts the unfinished minute
    assert totals[0] == usage_total(panel_store, f"ts >= toDateTime({int(START.timestamp())}) AND ts < toDateTime("
                                                 f"{int((last_full + timedelta(minutes=1)).timestamp())})")


def test_a_last_bucket_not_over_is_a_rate_over_its_minutes_so_far(panel_store):
    end = START + timedelta(minutes=20, seconds=30)  # a day's range: 15-minute buckets, the last one 5 minutes in
    f = PanelFilters(end - timedelta(hours=23), end, {"team": (), "environment": ()})
    rows = panel_store.query(render(PANELS_BY_ID["spend_by_team"].sql, f, panel_store.db)).rows
    last = START + timedelta(minutes=15)
    assert max(r[0] for r in rows).replace(tzinfo=END.tzinfo) == last
    five_minutes = usage_total(panel_store, f"ts >= toDateTime({int(last.timestamp())}) "
                                            f"AND ts < toDateTime({int((last + timedelta(minutes=5)).timestamp())})")
    assert sum(r[2] for r in rows if r[0].replace(tzinfo=END.tzinfo) == last) == five_minutes / 5 > 0


def test_long_ranges_read_the_hour_rollup(panel_store):
    month = PanelFilters(END - timedelta(days=30), END, {"team": (), "environment": ()})
    hour = PanelFilters(START, END, {"team": (), "environment": ()})
    q, db = panel_store.query, panel_store.db
    everything = usage_total(panel_store, f"ts <= toDateTime({int(END.timestamp())})")
    panel_store.command("TRUNCATE TABLE {db}.rollup_minute")  # what 14 days of minute retention leave of a month
    assert q(render(PANELS_BY_ID["totals"].sql, month, db)).rows[0][0] == everything > 0
    assert not q(render(PANELS_BY_ID["totals"].sql, hour, db)).rows[0][0]  # an hour still reads the minutes
    series = q(render(PANELS_BY_ID["spend_by_team"].sql, month, db)).rows
    steps = {(b[0] - a[0]).total_seconds() for a, b in zip(series, series[1:], strict=False) if b[0] != a[0]}
    assert steps and all(s % 3600 == 0 for s in steps)  # buckets of whole hours
    assert len(q(render(PANELS_BY_ID["top_features"].sql, month, db)).rows) == 10


def test_the_page_opens_on_the_range_the_data_fills(panel_store):
    q, db = panel_store.query, panel_store.db
    minutes_in = START + timedelta(minutes=12)  # the dense traffic began at START + 5 minutes
    first = q(f"SELECT min(bucket) FROM {{db}}.rollup_minute WHERE bucket >= toDateTime({int(START.timestamp())})")
    assert first_data(q, db, minutes_in) == first.rows[0][0].replace(tzinfo=UTC) >= START
    assert default_range(first_data(q, db, minutes_in), minutes_in) == "15m"
    assert default_range(first_data(q, db, END), END) == "1h"
