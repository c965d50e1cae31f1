"""Reconcile parsing and variance, FOCUS rows and the FOCUS validator, repricing arithmetic (no I/O)."""

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import orjson
import pytest

from ops.reports.chargeback import UNALLOCATED, UNATTRIBUTED, Period, allocate_items, parse_results, parse_rules
from ops.reports.focus import COLUMNS, Export, build_rows, parse_period, shared_rows
from ops.reports.focus_spec import validate
from ops.reports.reconcile import (
    INVOICE_ONLY,
    OK,
    OVER,
    TALLY_ONLY,
    compare,
    parse_invoice,
    parse_invoice_text,
    variance_pct,
)
from ops.reports.reprice import Repricing, event_of, reprice_rows
from streams.enrich import price_event
from tally.config import REPO_ROOT
from tally.errors import ReportError
from tally.reference import load_reference_files, snapshot_of

INVOICES = REPO_ROOT / "examples" / "invoices"
D = date(2026, 11, 20)


@pytest.fixture(scope="module")
def cards():
    docs = load_reference_files(sorted((REPO_ROOT / "examples" / "reference").glob("*.yaml")))
    return {c.version: c for c in snapshot_of(docs).price_cards.items}


# ---------------------------------------------------------------- reconcile: parsing
def test_every_sample_invoice_parses_with_exact_costs():
    canonical = parse_invoice(INVOICES / "canonical.csv")
    assert canonical.shape == "canonical"
    assert [(ln.model, ln.token_class, ln.cost) for ln in canonical.lines] == [
        ("gpt-5", "input", Decimal("1.505")), ("gpt-5", "cache_read", Decimal("0.0475")),
        ("gpt-5", "output", Decimal("2.12")), ("claude-sonnet-4-5", "", Decimal("4.8231"))]
    assert canonical.lines[0].quantity == 1204000
    openai = parse_invoice(INVOICES / "openai_costs.csv")
    assert openai.shape == "openai" and {ln.day for ln in openai.lines} == {D}
    assert (openai.lines[1].model, openai.lines[1].token_class) == ("gpt-5-2025-08-07", "cache_read")
    assert (openai.lines[4].model, openai.lines[4].token_class) == ("", "tools")
    anthropic = parse_invoice(INVOICES / "anthropic_cost_report.csv")
    assert anthropic.shape == "anthropic"
    assert [ln.cost for ln in anthropic.lines] == [Decimal("1.80"), Decimal("2.70"), Decimal("0.036"),
                                                   Decimal("0.2871"), Decimal("0.20")]  # cents → USD
    assert [ln.token_class for ln in anthropic.lines] == ["input", "output", "cache_read", "cache_write", "tools"]


def test_malformed_rows_are_all_reported_with_line_numbers():
    text = ("date,provider,model,token_class,quantity,cost_usd\n"
            "2026-11-20,openai,gpt-5,input,10,1.5\n"
            "2026-11-20,openai,gpt-5,output,10,$1.50\n"
            "2026-13-01,openai,gpt-5,output,10,1\n"
            "2026-11-20,openai,gpt-5,vibes,10,1\n"
            "2026-11-20,openai,gpt-5,input,10\n")
    with pytest.raises(ReportError) as err:
        parse_invoice_text(text, "bad.csv")
    msg = str(err.value)
    for expected in ("bad.csv:3: cost_usd '$1.50'", "bad.csv:4: date '2026-13-01'", "bad.csv:5: unknown token class",
                     "bad.csv:6: 5 fields"):
        assert expected in msg


def test_unknown_header_overlaps_and_partial_buckets_are_refused():
    with pytest.raises(ReportError, match="unrecognized header"):
        parse_invoice_text("day,amount\n2026-11-20,1\n", "x.csv")
    with pytest.raises(ReportError, match="counted twice"):
        parse_invoice_text("date,provider,model,token_class,cost_usd\n2026-11-20,openai,gpt-5,,2\n"
                           "2026-11-20,openai,gpt-5,input,1\n", "x.csv")
    with pytest.raises(ReportError, match="not at midnight UTC"):
        parse_invoice_text("start_time,end_time,line_item,amount_value,amount_currency\n"
                           "1795136400,1795222800,\"gpt-5, input\",1,usd\n", "x.csv")
    with pytest.raises(ReportError, match="only USD"):
        parse_invoice_text("date,provider,model,cost_usd,currency\n2026-11-20,openai,gpt-5,1,EUR\n", "x.csv")


# ---------------------------------------------------------------- reconcile: variance
def test_variance_per_line_and_total():
    invoice = parse_invoice_text(
        "date,provider,model,token_class,cost_usd\n"
        "2026-11-20,openai,gpt-5-2025-08-07,input,103\n"      # 3 % over tally's 100 (snapshot name matches gpt-5)
        "2026-11-20,openai,gpt-5,output,50\n"                 # exact
        "2026-11-20,openai,o3,,7\n"                           # tally has nothing: invoice only
        "2026-11-20,anthropic,claude-haiku-4-5,,10.1\n", "x.csv")  # all classes: 10 in tally
    cells = {(D, "openai", "gpt-5", "input"): (Decimal(100), 1000),
             (D, "openai", "gpt-5", "output"): (Decimal(50), 9),
             (D, "openai", "gpt-5", "cache_read"): (Decimal("0.5"), 5),   # not on the invoice: tally only
             (D, "anthropic", "claude-haiku-4-5", "input"): (Decimal(4), 1),
             (D, "anthropic", "claude-haiku-4-5", "output"): (Decimal(6), 1)}
    rec = compare(invoice, cells, Decimal(1))
    by = {(ln.model, ln.token_class): ln for ln in rec.lines}
    assert by[("gpt-5", "input")].status == OVER and by[("gpt-5", "input")].variance_usd == 3
    assert by[("gpt-5", "output")].status == OK and by[("gpt-5", "output")].variance_pct == 0
    assert by[("o3", "")].status == INVOICE_ONLY
    tally_only = by[("gpt-5", "cache_read")]
    assert tally_only.status == TALLY_ONLY and tally_only.variance_usd == Decimal("-0.5")
    haiku = by[("claude-haiku-4-5", "")]
    assert haiku.tally_usd == 10 and haiku.status == OK  # 0.1 / 10.1 = 0.99 % of the invoice: within 1 %
    assert rec.invoice_total == Decimal("170.1") and rec.tally_total == Decimal("160.5")
    assert rec.variance_usd == Decimal("9.6") and rec.over


def test_variance_pct_is_relative_to_the_invoice():
    assert variance_pct(Decimal(100), Decimal(97)) == 3
    assert variance_pct(Decimal(0), Decimal(0)) == 0
    assert variance_pct(Decimal(0), Decimal(1)) is None


# ---------------------------------------------------------------- focus
def _group(version="2026-11-01", provider="openai", model="gpt-5", batch=False, tier="", long_ctx=0,
           tokens=(1_234_567, 345, 1000, 0, 0, 0), costs=None, tools=None, attempts=3):
    return [provider, model, version, batch, tier, long_ctx, "search", "CC-1", "bu", "search", "search_answer",
            "acme", *tokens, *(costs or ["0"] * 6), tools or {}, attempts]


def test_focus_rows_are_exact_and_valid(cards):
    card = cards["2026-11-01"]
    pricing = card.pricing("openai", "gpt-5", True, "priority")
    tokens = (1_234_567, 345, 1000, 77, 0, 0)
    costs = [str(pricing.base.filled[i] * n) for i, n in enumerate(tokens[:4])] + ["0", "0.02"]
    export = Export()
    build_rows(D, [_group(batch=True, tier="priority", tokens=tokens, costs=costs, tools={"web_search": 2})],
               cards, export)
    assert len(export.rows) == 5 and validate(COLUMNS, export.rows) == []
    row = dict(zip(COLUMNS, export.rows[0], strict=True))
    assert row["PricingUnit"] == "1000000 Tokens" and row["ConsumedQuantity"] == 1_234_567
    assert row["PricingQuantity"] * row["ListUnitPrice"] == row["BilledCost"] == Decimal(costs[0])
    assert row["SkuPriceId"] == "2026-11-01:openai/gpt-5:input:batch:tier=priority"
    assert orjson.loads(row["Tags"])["team_id"] == "search"
    assert export.total == sum(Decimal(c) for c in costs)


def test_focus_refuses_costs_the_card_does_not_explain(cards):
    with pytest.raises(ReportError, match="differs from the one the rows were priced with"):
        build_rows(D, [_group(costs=["1", "0", "0", "0", "0", "0"])], cards, Export())
    export = Export()  # an unknown model without cost: left out and counted, never exported as zero
    build_rows(D, [_group(model="mystery-1")], cards, export)
    assert not export.rows and export.unpriced_attempts == 3


def _valid_row(cards):
    export = Export()
    pricing = cards["2026-11-01"].pricing("openai", "gpt-5", False, "")
    build_rows(D, [_group(tokens=(1000, 0, 0, 0, 0, 0), costs=[str(pricing.base.filled[0] * 1000), "0", "0", "0",
                                                                 "0", "0"])], cards, export)
    return dict(zip(COLUMNS, export.rows[0], strict=True))


@pytest.mark.parametrize(("change", "expected"), [
    ({"ListCost": Decimal("0.1")}, "PricingQuantity × ListUnitPrice"),
    ({"ChargeCategory": "Usages"}, "not an allowed value"),
    ({"BillingAccountId": None}, "must not be null"),
    ({"ChargeDescription": ""}, "empty string"),
    ({"SkuPriceId": None}, "must not be null for a Usage charge"),
    ({"PricingUnit": None}, "must be null exactly when PricingQuantity is null"),
    ({"ChargePeriodEnd": "2026-11-20T00:00:00Z"}, "is not after"),
    ({"BillingPeriodStart": "2026-11-20"}, "YYYY-MM-DDTHH:mm:ssZ"),
    ({"Tags": '{"team": {"nested": 1}}'}, "KeyValueFormat"),
    ({"AllocatedTags": '{"x": "y"}'}, "must be null when the charge is not a split cost allocation"),
])
def test_validator_rejects_broken_rows(cards, change, expected):
    row = {**_valid_row(cards), **change}
    problems = validate(COLUMNS, [tuple(row[c] for c in COLUMNS)])
    assert any(expected in str(p) for p in problems), problems


def test_validator_checks_columns_and_allocation_ratios(cards):
    assert any("mandatory column missing" in str(p) for p in validate(COLUMNS[1:], []))
    assert any("neither a FOCUS column" in str(p) for p in validate((*COLUMNS, "Team"), []))
    row = _valid_row(cards)
    alloc = {**row, "AllocatedMethodId": "tally-shared-by-requests", "AllocatedResourceId": "platform",
             "AllocatedResourceName": "Platform", "AllocatedTags": '{"shared_pool": "gateway"}'}
    halves = [{**alloc, "AllocatedResourceId": r, "AllocatedMethodDetails": orjson.dumps(
        {"Elements": [{"AllocatedRatio": ratio, "UsageUnit": "Requests", "UsageQuantity": 5}]}).decode()}
        for r, ratio in (("a", "0.5"), ("b", "0.5"))]
    for h in halves:
        h["AllocatedMethodDetails"] = h["AllocatedMethodDetails"].replace('"0.5"', "0.5")
    assert validate(COLUMNS, [tuple(h[c] for c in COLUMNS) for h in halves]) == []
    halves[1]["AllocatedMethodDetails"] = halves[1]["AllocatedMethodDetails"].replace("0.5", "0.4")
    assert any("sum to 0.9" in str(p) for p in validate(COLUMNS, [tuple(h[c] for c in COLUMNS) for h in halves]))
    clash = {**halves[0], "AllocatedTags": '{"team_id": "x"}'}
    assert any("already in Tags" in str(p) for p in validate(COLUMNS, [tuple(clash[c] for c in COLUMNS)]))


SHARED_RULES = """
shared_costs:
  - {name: observability, amount_usd: "1000.00", period: "2026-11", rule: proportional_to_requests}
  - {name: commitment, amount_usd: "0.10", period: "2026-11", rule: proportional_to_tokens}
  - name: platform
    amount_usd: "3.00"
    period: "2026-11"
    rule: fixed_split
    split: {search: "33.33", inbox: "33.33", growth: "33.34"}
  - {name: december_tool, amount_usd: "7.00", period: "2026-12", rule: proportional_to_requests}
  - {name: october_tool, amount_usd: "5.00", period: "2026-10", rule: proportional_to_requests}
"""


def _basis():
    """Query results as chargeback.fetch parses them: tokens per team and day, logical requests per team and month."""
    money = ["0.1", "0", "0", "0", "0", "0", "0.1"]
    daily = [["search", "2026-11-10", *money, 3000], ["", "2026-11-11", *money, 1000],
             ["inbox", "2026-11-12", *money, 2000]]
    requests = [["search", "2026-11-01", 3, "0.3", "0"], ["", "2026-11-01", 1, "0.1", "0"],
                ["inbox", "2026-11-01", 3, "0.3", "0"]]
    empty = {n: [] for n in ("weekly", "endpoints", "unattributed", "deploys", "cost_centers")}
    return parse_results({"daily": daily, "requests": requests, **empty}, datetime(2027, 1, 1, tzinfo=UTC))


def test_shared_costs_become_valid_allocated_rows_summing_exactly_to_each_item():
    period = Period(date(2026, 11, 1), date(2027, 1, 1), "Nov-Dec")
    items = parse_rules(SHARED_RULES, "rules.yaml")
    allocations, notes = allocate_items(items, _basis(), period)
    export = Export()
    shared_rows(allocations, export)
    assert validate(COLUMNS, export.rows) == []
    rows = [dict(zip(COLUMNS, r, strict=True)) for r in export.rows]
    by_item: dict[str, list[dict]] = {}
    for r in rows:
        by_item.setdefault(orjson.loads(r["Tags"])["shared_cost"], []).append(r)
    assert set(by_item) == {"observability", "commitment", "platform", "december_tool"}  # october: outside
    assert any("october_tool" in n for n in notes)
    for item in items[:4]:
        assert sum((r["BilledCost"] for r in by_item[item.name]), Decimal(0)) == item.amount_usd
    # The chargeback's own allocation, row for row: 1000 by requests 3:1:3 → 428.57 / 142.86 / 428.57.
    assert {(a.item.name, a.team): a.allocated for a in allocations} == {
        (orjson.loads(r["Tags"])["shared_cost"], r["AllocatedResourceId"] or UNALLOCATED): r["BilledCost"]
        for r in rows}
    obs = {r["AllocatedResourceId"]: r for r in by_item["observability"]}
    assert obs[UNATTRIBUTED]["BilledCost"] == Decimal("142.86") and obs[UNATTRIBUTED]["AllocatedTags"] is None
    assert orjson.loads(obs["search"]["AllocatedTags"]) == {"team_id": "search"}
    assert obs["search"]["AllocatedMethodId"] == "proportional_to_requests"
    details = json.loads(obs["search"]["AllocatedMethodDetails"], parse_float=Decimal)
    assert details == {"Elements": [{"AllocatedRatio": Decimal("0.42857"), "UsageUnit": "Requests",
                                     "UsageQuantity": 3}]}
    for r in rows:
        assert r["PricingQuantity"] * r["ListUnitPrice"] == r["ListCost"] == r["BilledCost"]
        assert r["ChargeCategory"] == "Purchase" and r["ConsumedQuantity"] is None
    # 3.00 split 33.33/33.33/33.34 gives 1.00 each: the ratios (1/3 does not terminate) still sum to exactly 1.
    ratios = [json.loads(r["AllocatedMethodDetails"], parse_float=Decimal)["Elements"][0]["AllocatedRatio"]
              for r in by_item["platform"]]
    assert [r["BilledCost"] for r in by_item["platform"]] == [Decimal("1.00")] * 3
    assert sum(ratios) == 1 and sorted(ratios) == [Decimal("0.333333333333333333")] * 2 + [
        Decimal("0.333333333333333334")]
    # December has no requests: one unsplit row of the whole amount, no Allocated* columns.
    (dec,) = by_item["december_tool"]
    assert dec["BilledCost"] == Decimal("7.00") and dec["AllocatedMethodId"] is None
    assert export.unallocated_total == Decimal("7.00")
    assert export.allocated_total == Decimal("1003.10")
    # A missing allocated row breaks the ratio rule; the validator sees it.
    broken = [r for r in export.rows if r is not export.rows[-2]]
    assert any("sum to" in str(p) for p in validate(COLUMNS, broken))


def test_parse_period():
    assert parse_period("2026-11") == (date(2026, 11, 1), date(2026, 12, 1))
    assert parse_period("2026-12") == (date(2026, 12, 1), date(2027, 1, 1))
    assert parse_period("2026-11-20..2026-11-21") == (D, date(2026, 11, 22))
    with pytest.raises(ReportError):
        parse_period("November")


# ---------------------------------------------------------------- reprice
def test_reprice_uses_the_enrich_pricer_for_every_path(cards, now):
    old = cards["2025-10-01"]
    base = {"event_id": "e1", "ts": "2026-11-20 12:00:00.000", "provider": "google", "model_actual": "gemini-2.5-pro",
            "batch": False, "service_tier": "", "usage_reported": True, "stream_terminated_at_token_n": None,
            "input_tokens": 1000, "output_tokens": 200, "reasoning_tokens": 50, "cache_read_tokens": 4000,
            "cache_write_tokens": 0, "cache_write_1h_tokens": 0, "tool_calls": {"google_search": 1},
            "billed_total": "0.01", "billed_version": "2026-11-01", "billed_status": "priced", "team_id": "search",
            "product": "p", "feature_id": "f", "tenant_id": "t", "cost_center": "cc"}
    cut = {**base, "event_id": "e2", "usage_reported": False, "stream_terminated_at_token_n": 200,
           "reasoning_tokens": 0, "billed_status": "estimated"}
    unknown = {**base, "event_id": "e3", "model_actual": "mystery", "billed_status": "priced"}
    out = Repricing(old.version, D, date(2026, 11, 21))
    rows = reprice_rows([list(r.values()) for r in (base, cut, unknown)], old, out, now, True)
    expected = [price_event(event_of(r), old) for r in (base, cut, unknown)]
    assert [r["cost_total_usd"] for r in rows] == [e.total for e in expected]
    assert rows[1]["pricing_status"] == "estimated" and rows[2]["pricing_status"] == "unpriced"
    assert out.total.events == 3 and out.total.billed == Decimal("0.03")
    assert out.total.rerated == sum(e.total for e in expected)
    assert out.status_changes == {("priced", "unpriced"): 1}
    assert out.by_team["search"].rerated == out.total.rerated
