"""Chargeback logic without I/O: periods, the rules file, exact allocation, SQL builders, the report's arithmetic."""

from datetime import UTC, date, datetime
from decimal import Decimal as D
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ops.reports.chargeback import (
    UNALLOCATED,
    UNATTRIBUTED,
    ChargebackData,
    DayCost,
    Deploy,
    EndpointReasoning,
    Period,
    TeamRequests,
    allocate,
    build_queries,
    build_report,
    load_rules,
    parse_period,
    parse_results,
    parse_rules,
    pct,
    wow_end,
)
from tally.errors import ReportError

TODAY = date(2026, 11, 24)
NOV = Period(date(2026, 11, 1), date(2026, 12, 1), "2026-11")
NOW = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)


# ---------------------------------------------------------------- periods
def test_periods():
    assert parse_period("2026-11", None, None, TODAY) == NOV
    assert parse_period("2026-12", None, None, TODAY) == Period(date(2026, 12, 1), date(2027, 1, 1), "2026-12")
    assert parse_period(None, None, None, TODAY) == NOV  # the current UTC month
    span = parse_period(None, date(2026, 11, 3), date(2026, 11, 9), TODAY)
    assert (span.start, span.end, span.label) == (date(2026, 11, 3), date(2026, 11, 10), "2026-11-03 to 2026-11-09")
    assert len(span.days()) == 7
    assert NOV.contains_month("2026-11") and not span.contains_month("2026-11")


@pytest.mark.parametrize(("args", "message"), [
    (("2026-13", None, None), "not a month"),
    (("Nov 2026", None, None), "not a month"),
    (("2026-11", date(2026, 11, 1), date(2026, 11, 2)), "either --period or --from/--to"),
    ((None, date(2026, 11, 1), None), "go together"),
    ((None, date(2026, 11, 5), date(2026, 11, 4)), "is after"),
])
def test_bad_periods_are_clear_errors(args, message):
    with pytest.raises(ReportError, match=message):
        parse_period(*args, TODAY)


def test_week_over_week_ends_at_the_period_end_or_the_current_hour():
    assert wow_end(NOV, NOW) == datetime(2026, 11, 24, 11, tzinfo=UTC)
    assert wow_end(Period(date(2026, 10, 1), date(2026, 11, 1), "2026-10"), NOW) == datetime(2026, 11, 1,
                                                                                          tzinfo=UTC)


# ---------------------------------------------------------------- the rules file
GOOD = """
version: 1
shared_costs:
  - name: observability
    amount_usd: "1200.00"
    period: "2026-11"
    rule: proportional_to_requests
  - name: platform
    description: the platform team
    amount_usd: "3000"
    period: 2026-11
    rule: fixed_split
    split: {search: "62.5", inbox: "37.5"}
"""


def test_rules_file_parses_into_exact_items():
    items = parse_rules(GOOD, "r.yaml")
    assert [(i.name, i.amount_usd, i.period, i.rule, i.split) for i in items] == [
        ("observability", D("1200.00"), "2026-11", "proportional_to_requests", ()),
        ("platform", D("3000"), "2026-11", "fixed_split", (("search", D("62.5")), ("inbox", D("37.5"))))]
    assert items[1].description == "the platform team"


def test_the_example_rules_file_is_valid():
    from pathlib import Path
    items = load_rules(Path(__file__).resolve().parents[2] / "examples" / "reports" / "shared_costs.yaml")
    assert {i.rule for i in items} == {"proportional_to_requests", "proportional_to_tokens", "fixed_split"}


@pytest.mark.parametrize(("text", "messages"), [
    ("", ["the rules file is empty"]),
    ("shared_costs: [", ["r.yaml:2: YAML syntax error"]),
    ("- a\n- b\n", ["must be a mapping with a `shared_costs:` list"]),
    ("version: 2\nshared_costs: []\n", ["only version 1", "non-empty list"]),
    ("costs: []\n", ["missing required key 'shared_costs'", "unknown key 'costs'"]),
    ("shared_costs:\n  - {name: a, amount_usd: 12.5, period: '2026-11', rule: fixed_split, split: {x: '100'}}\n",
     ["r.yaml:2: shared_costs[0].amount_usd: amount_usd must be a quoted decimal string"]),
    ("shared_costs:\n  - {name: a, amount_usd: '1.005', period: '2026-11', rule: proportional_to_tokens}\n",
     ["has 3 decimal places; at most 2"]),
    ("shared_costs:\n  - {name: a, amount_usd: '-1', period: '2026-11', rule: proportional_to_tokens}\n",
     ["not a plain non-negative decimal"]),
    ("shared_costs:\n  - {name: a, amount_usd: '1', period: '2026-13', rule: proportional_to_tokens}\n",
     ["must be a month written YYYY-MM"]),
    ("shared_costs:\n  - {name: a, amount_usd: '1', period: '2026-11', rule: by_headcount}\n",
     ["unknown rule str 'by_headcount'; rules: proportional_to_requests, proportional_to_tokens, fixed_split"]),
    ("shared_costs:\n  - {name: a, amount_usd: '1', period: '2026-11', rule: fixed_split,"
     " split: {x: '60', y: '30'}}\n", ["percentages sum to 90, not 100"]),
    ("shared_costs:\n  - {name: a, amount_usd: '1', period: '2026-11', rule: fixed_split,"
     " split: {x: 60, y: '40'}}\n", ["percentage must be a quoted decimal string"]),
    ("shared_costs:\n  - {name: a, amount_usd: '1', period: '2026-11', rule: fixed_split}\n",
     ["a fixed_split needs `split:`"]),
    ("shared_costs:\n  - {name: a, amount_usd: '1', period: '2026-11', rule: proportional_to_tokens,"
     " split: {x: '100'}}\n", ["`split` belongs to rule fixed_split only"]),
    ("shared_costs:\n  - {name: a, amount_usd: '1', period: '2026-11', rule: proportional_to_tokens}\n"
     "  - {name: a, amount_usd: '2', period: '2026-11', rule: proportional_to_tokens}\n", ["'a' appears twice"]),
    ("shared_costs:\n  - {amount_usd: '1', period: '2026-11', rule: proportional_to_tokens, amount: '2'}\n",
     ["missing required key 'name'", "unknown key 'amount' (did you mean 'amount_usd'?)"]),
])
def test_bad_rules_files_list_every_problem(text, messages):
    with pytest.raises(ReportError) as err:
        parse_rules(text, "r.yaml")
    for m in messages:
        assert m in str(err.value)


def test_unreadable_rules_file(tmp_path):
    with pytest.raises(ReportError, match="cannot read the rules file"):
        load_rules(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- allocation
def test_largest_remainder_by_hand():
    # 10.00 by 4 / 2 / 1: quotas 571.43, 285.71, 142.86 cents; floors 998, two cents to the largest remainders.
    assert allocate(D("10.00"), {"a": 4, "b": 2, "c": 1}) == {"a": D("5.71"), "b": D("2.86"), "c": D("1.43")}
    # Ties go to the smaller key: 0.01 between equals.
    assert allocate(D("0.01"), {"b": 1, "a": 1}) == {"a": D("0.01"), "b": D(0)}
    assert allocate(D("100"), {"x": D("33.33"), "y": D("33.33"), "z": D("33.34")}) == {
        "x": D("33.33"), "y": D("33.33"), "z": D("33.34")}
    assert allocate(D("5"), {"a": 0, "b": 3}) == {"a": D(0), "b": D("5.00")}
    assert allocate(D("1.5"), {"a": 1}, quantum=D("0.1")) == {"a": D("1.5")}


def test_allocation_refuses_what_it_cannot_split_exactly():
    with pytest.raises(ValueError, match="not a multiple"):
        allocate(D("1.005"), {"a": 1})
    with pytest.raises(ValueError, match="sum to zero"):
        allocate(D("1"), {"a": 0})
    with pytest.raises(ValueError, match="negative"):
        allocate(D("1"), {"a": -1, "b": 2})
    with pytest.raises(ValueError, match="power of ten"):
        allocate(D("1"), {"a": 1}, quantum=D("0.05"))


cents = st.integers(min_value=-10**14, max_value=10**14).map(lambda n: D(n).scaleb(-2))
weights = st.dictionaries(st.text(alphabet="abcdefgh", min_size=1, max_size=3),
                          st.one_of(st.integers(0, 10**12), st.decimals(0, 100, places=6)), min_size=1, max_size=12)


@given(cents, weights)
def test_allocations_always_sum_exactly_to_the_item(amount, ws):
    if sum(Fraction(w) for w in ws.values()) == 0:
        ws = {**ws, "zz": 1}
    shares = allocate(amount, ws)
    assert set(shares) == set(ws)
    assert sum(shares.values(), D(0)) == amount
    total = sum(Fraction(w) for w in ws.values())
    for k, w in ws.items():
        exact = Fraction(amount) * Fraction(w) / total
        assert abs(Fraction(shares[k]) - exact) < Fraction(1, 100)  # within a cent of its exact share
        assert shares[k] == shares[k].quantize(D("0.01"))
        assert (shares[k] >= 0) if amount >= 0 else (shares[k] <= 0)


# ---------------------------------------------------------------- queries and parsing
def test_queries_cover_the_period_and_count_requests_with_sign():
    qs = build_queries(NOV, datetime(2026, 11, 24, 11, tzinfo=UTC))
    assert set(qs) == {"daily", "weekly", "requests", "endpoints", "unattributed", "deploys", "cost_centers",
                       "admission"}
    assert "budget_decisions AS d FINAL" in qs["admission"] and "'deny', 'fallback'" in qs["admission"]
    assert "toDateTime('2026-10-25 00:00:00', 'UTC')" in qs["daily"]  # a week of lookback
    assert "bucket < toDateTime('2026-12-01 00:00:00', 'UTC')" in qs["daily"]
    assert "toDateTime('2026-11-10 11:00:00', 'UTC')" in qs["weekly"]  # two 7-day windows
    assert "toDateTime('2026-11-17 11:00:00', 'UTC')" in qs["weekly"]
    assert "sum(sign)" in qs["requests"] and "sum(sign * cost_wasted_usd)" in qs["requests"]
    assert "logical_requests_current" in qs["endpoints"] and "quantileExactIf(0.9)" in qs["endpoints"]
    assert "attribution_status = 'unattributed'" in qs["unattributed"]
    for sql in qs.values():
        assert "{db}." in sql and " / " not in sql  # no Decimal division in ClickHouse
    for name in ("daily", "weekly", "requests", "endpoints", "unattributed", "admission"):  # money exactly, as text
        assert "toString(sum" in qs[name]


def test_results_parse_the_same_from_the_store_and_from_json():
    rows = {"daily": [["", "2026-11-02", "0", "1.5", "0", "0", "0", "0", "1.5", 10]],
            "weekly": [["search", "2", "1"]], "requests": [["search", "2026-11-01", 3, "2", "0.5"]],
            "endpoints": [["search", "/a", 3, 2, 50, 100, 10, 40, "0.01"]],
            "unattributed": [["no_feature_tag", "", 2, "1.5"]],
            "deploys": [["search", "/a", "v2", "2026-11-03 04:05:06.789"]], "cost_centers": [["search", "CC-1"]]}
    data = parse_results(rows, NOW)
    assert data.daily == [DayCost(UNATTRIBUTED, date(2026, 11, 2), (D(0), D("1.5"), D(0), D(0), D(0), D(0)),
                                  D("1.5"), 10)]
    assert data.requests == [TeamRequests("search", "2026-11", 3, D(2), D("0.5"))]
    assert data.deploys == [Deploy("search", "/a", "v2", datetime(2026, 11, 3, 4, 5, 6, 789000, tzinfo=UTC))]
    assert data.weekly == {"search": (D(2), D(1))}


# ---------------------------------------------------------------- the report's arithmetic
def day(team, d, reasoning, total, tokens=0, month=11):
    other = D(total) - D(reasoning)
    return DayCost(team, date(2026, month, d), (D(0), other, D(reasoning), D(0), D(0), D(0)), D(total), tokens)


def data(**overrides):
    base = {
        "daily": [day("search", 28, "0", "1", 100, month=10), day("search", 2, "1", "4", 100),
                  day("search", 3, "3", "4", 300), day("ads", 3, "0", "2", 600), day(UNATTRIBUTED, 3, "0", "1", 0)],
        "weekly": {"search": (D(8), D(0)), "ads": (D(2), D(4))},
        "requests": [TeamRequests("search", "2026-11", 6, D(8), D(2)), TeamRequests("ads", "2026-11", 2, D(2), D(0))],
        "endpoints": [EndpointReasoning("search", "/q", 6, 4, 900, 300, 150, 400, D(4))],
        "unattributed": [("no_feature_tag", "", 3, D(1))],
        "deploys": [Deploy("search", "/q", "v1", datetime(2026, 10, 20, tzinfo=UTC)),
                    Deploy("search", "/q", "v2", datetime(2026, 11, 3, 9, tzinfo=UTC))],
        "cost_centers": {"search": "CC-1100"},
        "wow_to": datetime(2026, 11, 24, 11, tzinfo=UTC),
    }
    base.update(overrides)
    return ChargebackData(**base)


def rows(report, name):
    t = next(t for t in report.tables if t.name == name)
    return [dict(zip(t.columns, r, strict=True)) for r in t.rows]


def test_report_figures_from_results():
    items = parse_rules(GOOD.replace('"3000"', '"30"'), "r.yaml")
    rep = build_report("chargeback", data(), NOV, items, NOW, "test")
    charges = {r["team"]: r for r in rows(rep, "charges")}
    assert list(charges) == ["search", "ads", UNATTRIBUTED, "inbox"]
    # observability 1200.00 by requests 6 / 2 (the unattributed bucket has no requests here): 900 / 300.
    # platform 30 as 62.5 % / 37.5 %: 18.75 / 11.25.
    assert charges["search"] == {"team": "search", "cost_center": "CC-1100", "requests": 6, "direct_usd": D(8),
                                 "allocated_usd": D("918.75"), "charged_usd": D("926.75"),
                                 "reasoning_share_pct": D("50.00"), "retry_waste_pct": D("25.00"),
                                 "wow_change_pct": None}
    assert (charges["ads"]["allocated_usd"], charges["ads"]["wow_change_pct"]) == (D("300.00"), D("-50.00"))
    assert charges["inbox"]["direct_usd"] == 0 and charges["inbox"]["charged_usd"] == D("11.25")
    assert charges[UNATTRIBUTED]["charged_usd"] is None
    jumps = rows(rep, "reasoning_jumps")
    # search: 10-28 0 %, 11-02 25 %, 11-03 75 %: two jumps; v2 (first seen 11-03) sits next to the second.
    assert [(j["day"], j["change_pp"], j["deploys"]) for j in jumps] == [
        (date(2026, 11, 2), D("25.00"), ""), (date(2026, 11, 3), D("50.00"), "/q v2 (2026-11-03 09:00)")]
    assert [(d["deploy_version"], d["previous_version"], d["share_day_before_pct"], d["share_deploy_day_pct"],
             d["share_day_after_pct"]) for d in rows(rep, "deploys")] == [("v2", "v1", D("25.00"), D("75.00"), None)]
    assert rows(rep, "reasoning_endpoints")[0]["reasoning_per_output_token"] == D("3.00")  # 900 / 300
    # The month so far (up to the current hour, 11-24 11:00), not its empty future days.
    assert [r["day"] for r in rows(rep, "reasoning_daily")] == [date(2026, 11, d) for d in range(1, 25)]
    assert rows(rep, "unattributed") == [{"reason": "no_feature_tag", "feature_id": "(none)", "attempts": 3,
                                          "cost_usd": D(1), "pct_of_total": D("9.09")}]
    assert rep.notes[0] == ("Direct LLM cost 11.00 USD; unattributed 1.00 USD (9.09 %); shared costs allocated: "
                            "1,230.00 USD.")


def test_jump_threshold_and_allocation_without_a_basis():
    items = parse_rules("shared_costs:\n  - {name: t, amount_usd: '7', period: '2026-11', "
                        "rule: proportional_to_tokens}\n  - {name: r, amount_usd: '7', period: '2026-10', "
                        "rule: proportional_to_requests}\n", "r.yaml")
    empty = data(daily=[], requests=[], weekly={}, endpoints=[], deploys=[], unattributed=[], cost_centers={})
    rep = build_report("showback", empty, NOV, items, NOW, "test")
    assert rows(rep, "allocations") == [{"item": "t", "rule": "proportional to tokens (all six classes)",
                                         "period": "2026-11", "item_usd": D(7), "team": UNALLOCATED, "basis": 0,
                                         "share_pct": D("100.00"), "allocated_usd": D(7)}]
    assert any("'t' (2026-11) is unallocated: no tokens" in n for n in rep.notes)
    assert any("'r' (2026-10) is not allocated" in n for n in rep.notes)
    assert rows(rep, "charges") == [{"team": UNALLOCATED, "cost_center": "", "requests": 0, "direct_usd": D(0),
                                     "allocated_usd": D(7), "would_be_charged_usd": None,
                                     "reasoning_share_pct": None, "retry_waste_pct": None, "wow_change_pct": None}]
    assert not rows(build_report("chargeback", data(), NOV, [], NOW, "t", D(60)), "reasoning_jumps")


def test_pct_is_a_display_ratio_of_exact_sums():
    assert pct(D(1), D(3)) == D("33.33")
    assert pct(D("0.000000000000000001"), D("99999999999999999999.999999999999999999")) == D("0.00")
    assert pct(D(5), D(0)) is None
    assert pct(2, 8) == D("25.00")
