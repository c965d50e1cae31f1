"""The budget stage without Kafka: states, admission advice, alerts once per threshold crossing per period."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import orjson

from streams.budget import evaluate, period_bounds, recommendation
from streams.records import encode_record
from tally.reference import Budget, BudgetSet

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)  # half the day gone
DAILY = Budget("feature", "summarize_email_v2", "day", Decimal("100"), (50, 80, 100))
MONTHLY = Budget("tenant", "tenant-000", "month", Decimal("3000"), (50, 80, 100))
BUDGETS = BudgetSet("b1", datetime(2026, 11, 1, tzinfo=UTC), (DAILY, MONTHLY))


def spend(daily: str, monthly: str = "0") -> dict[tuple[str, str, str], Decimal]:
    return {("feature", "summarize_email_v2", "day"): Decimal(daily),
            ("tenant", "tenant-000", "month"): Decimal(monthly)}


def wire(states: dict) -> dict:
    """The states as a consumer of llm.budget.state.v1 reads them back."""
    return {k: orjson.loads(encode_record(v)) for k, v in states.items()}


def test_periods_are_utc_days_and_calendar_months():
    assert period_bounds("day", NOW) == (datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 24, tzinfo=UTC))
    assert period_bounds("month", datetime(2026, 12, 31, 23, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def test_state_and_admission_advice():
    ev = evaluate(BUDGETS, spend("40", "100"), {}, 900, NOW, {})
    s = ev.states["feature:summarize_email_v2:day"]
    assert (s["spent_usd"], s["remaining_usd"], s["used_pct"], s["recommendation"]) == (
        Decimal(40), Decimal(60), Decimal("40.00"), "allow")
    assert s["period_start"] == "2026-11-23T00:00:00Z" and s["period_end"] == "2026-11-24T00:00:00Z"
    assert ev.alerts == []
    assert recommendation(DAILY, Decimal(85), Decimal(85)) == "degrade"  # past the 80 % threshold
    assert recommendation(DAILY, Decimal(10), Decimal(120)) == "degrade"  # the forecast reaches the budget
    assert recommendation(DAILY, Decimal(100), Decimal(100)) == "deny"


def test_each_threshold_alerts_once_per_period_and_resolves_when_the_period_rolls_over():
    first = evaluate(BUDGETS, spend("85"), {}, 900, NOW, {})
    keys = [a["incident_key"] for a in first.alerts]
    assert keys == ["budget:feature:summarize_email_v2:day:2026-11-23:50",
                    "budget:feature:summarize_email_v2:day:2026-11-23:80"]
    assert first.alerts[1]["explanation"] == ("feature summarize_email_v2 has spent $85.00 of its $100.00 daily "
                                              "budget (85.00 %, threshold 80 %)")
    # Later ticks (and a restart, which reads the last state back from the topic) do not alert again...
    again = evaluate(BUDGETS, spend("90"), {}, 900, NOW, wire(first.states))
    assert again.alerts == []
    # ...until the next threshold.
    over = evaluate(BUDGETS, spend("101"), {}, 900, NOW, wire(again.states))
    assert [(a["incident_key"][-3:], a["severity"]) for a in over.alerts] == [("100", "critical")]
    assert over.states["feature:summarize_email_v2:day"]["recommendation"] == "deny"
    # A new day: the day's incidents resolve, the count starts again.
    tomorrow = evaluate(BUDGETS, spend("0"), {}, 900, datetime(2026, 11, 24, 0, 5, tzinfo=UTC), wire(over.states))
    assert [(a["state"], a["incident_key"].split(":", 4)[-1]) for a in tomorrow.alerts] == [
        ("resolved", "2026-11-23:50"), ("resolved", "2026-11-23:80"), ("resolved", "2026-11-23:100")]
    assert tomorrow.states["feature:summarize_email_v2:day"]["alerted"] == []


def test_forecast_alert_from_the_burn_rate():
    # $30 spent by noon, $6 in the last 15 minutes: $24/h for 12 more hours ends near $318
    ev = evaluate(BUDGETS, spend("30"), {("feature", "summarize_email_v2"): Decimal(6)}, 900, NOW, {})
    s = ev.states["feature:summarize_email_v2:day"]
    assert s["burn_rate_usd_per_hour"] == Decimal("24.000000") and s["forecast_usd"] == Decimal("318.000000")
    assert [a["signal"] for a in ev.alerts] == ["budget_day_forecast"] and s["recommendation"] == "degrade"
    calm = evaluate(BUDGETS, spend("30"), {}, 900, NOW, wire(ev.states))
    assert [(a["signal"], a["state"]) for a in calm.alerts] == [("budget_day_forecast", "resolved")]


def test_no_budgets_no_states():
    assert evaluate(None, {}, {}, 900, NOW, {}).states == {}
