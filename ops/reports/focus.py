"""`tally report focus`: a FOCUS 1.2 cost and usage export (with the 1.3 allocation columns) of usage_events."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, timedelta
from decimal import Decimal, localcontext
from typing import Any

import orjson

from ops.reports.chargeback import (
    UNALLOCATED,
    UNATTRIBUTED,
    Allocation,
    Period,
    SharedCost,
    allocate,
    allocate_items,
    fetch_allocation_basis,
    month_start,
    next_month,
)
from ops.reports.output import Report, Table
from ops.reports.rating import Query, day_start, days, money, parse_day, ts_window_sql
from tally.errors import ReportError
from tally.reference import MONEY_CONTEXT, STANDARD_TIERS, PriceCard

COLUMNS: tuple[str, ...] = (
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency", "BillingPeriodEnd",
    "BillingPeriodStart", "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargeFrequency", "ChargePeriodEnd",
    "ChargePeriodStart", "ConsumedQuantity", "ConsumedUnit", "ContractedCost", "ContractedUnitPrice",
    "EffectiveCost", "InvoiceId", "InvoiceIssuerName", "ListCost", "ListUnitPrice", "PricingCategory",
    "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
    "ServiceSubcategory", "SkuId", "SkuMeter", "SkuPriceDetails", "SkuPriceId", "Tags",
    "AllocatedMethodId", "AllocatedMethodDetails", "AllocatedResourceId", "AllocatedResourceName", "AllocatedTags",
    "x_Model", "x_TokenClass", "x_PriceCardVersion",
)
TOKENS_UNIT = "1000000 Tokens"  # price cards quote USD per million tokens
CALLS_UNIT = "Requests"
PROVIDER_NAMES = {"openai": "OpenAI", "anthropic": "Anthropic", "google": "Google", "azure_openai": "Microsoft",
                  "bedrock": "Amazon Web Services", "mistral": "Mistral AI", "cohere": "Cohere"}
# Token classes in ClassPrices order: (x_TokenClass, SkuMeter, usage_events token column).
TOKEN_CLASSES: tuple[tuple[str, str, str], ...] = (
    ("input", "Input Tokens", "input_tokens"), ("output", "Output Tokens", "output_tokens"),
    ("reasoning", "Reasoning Tokens", "reasoning_tokens"), ("cache_read", "Cache Read Tokens", "cache_read_tokens"),
    ("cache_write_5m", "Cache Write 5m Tokens", "cache_write_tokens"),
    ("cache_write_1h", "Cache Write 1h Tokens", "cache_write_1h_tokens"),
)
# Stored cost column → the indexes of TOKEN_CLASSES it sums (cache writes share one column).
COST_COLUMNS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("cost_input_usd", (0,)), ("cost_output_usd", (1,)), ("cost_reasoning_usd", (2,)),
    ("cost_cache_read_usd", (3,)), ("cost_cache_write_usd", (4, 5)))
OWNER_TAGS = ("team_id", "cost_center", "business_unit", "product", "feature_id", "tenant_id")
_GROUP = ("provider", "model_actual", "price_card_version", "batch", "service_tier", "long_context", *OWNER_TAGS)
_PERIOD_RE = re.compile(r"^(\d{4}-\d{2})$|^(\d{4}-\d{2}-\d{2})(?:\.\.(\d{4}-\d{2}-\d{2}))?$")


def parse_period(text: str) -> tuple[date, date]:
    """Return the UTC days [start, end) of a period: YYYY-MM (a month), YYYY-MM-DD, or YYYY-MM-DD..YYYY-MM-DD.

    The range form includes both days. ReportError for anything else.
    """
    m = _PERIOD_RE.match(text.strip())
    if m is None:
        raise ReportError(f"--period {text!r}: use YYYY-MM, YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD")
    if m.group(1):
        start = parse_day(m.group(1) + "-01", "--period")
        return start, _next_month(start)
    start = parse_day(m.group(2), "--period")
    last = parse_day(m.group(3), "--period") if m.group(3) else start
    if last < start:
        raise ReportError(f"--period {text!r}: the last day is before the first")
    return start, last + timedelta(days=1)


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _sql_str(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def long_context_sql(combos: Iterable[Sequence[Any]], cards: Mapping[str, PriceCard]) -> str:
    """Return a ClickHouse expression that is 1 for a row its card prices at long-context rates, else 0.

    `combos` are the distinct (price_card_version, provider, model_actual) of the rows; only models with a
    long-context tier need a branch (prompt = input + cache read + both cache writes > above_input_tokens).
    """
    prompt = "(input_tokens + cache_read_tokens + cache_write_tokens + cache_write_1h_tokens)"
    branches = []
    for version, provider, model in combos:
        card = cards.get(str(version))
        entry = card.find(str(provider), str(model)) if card is not None else None
        if entry is not None and entry.long_context is not None:
            branches.append(f"price_card_version = {_sql_str(str(version))} AND provider = {_sql_str(str(provider))} "
                            f"AND model_actual = {_sql_str(str(model))}, {prompt} > "
                            f"{int(entry.long_context.above_input_tokens)}")
    return f"multiIf({', '.join(branches)}, 0)" if branches else "0"


def _group_sql(day: date, long_expr: str) -> str:
    sums = ", ".join(f"sum({col})" for _, _, col in TOKEN_CLASSES)
    costs = ", ".join(f"toString(sum({col}))" for col, _ in COST_COLUMNS)
    return f"""
SELECT provider, model_actual, price_card_version, batch, service_tier, {long_expr} AS long_context,
       {', '.join(OWNER_TAGS)}, {sums}, {costs}, toString(sum(cost_tools_usd)), sumMap(tool_calls), count()
FROM {{db}}.usage_events_current
WHERE {ts_window_sql(day, day + timedelta(days=1))}
GROUP BY {', '.join(_GROUP)}
ORDER BY {', '.join(_GROUP)}"""


class Export:
    """FOCUS rows plus what was left out (tokens without a price: cost unknown, not zero)."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.total = Decimal(0)
        self.unpriced_tokens = 0
        self.unpriced_calls = 0
        self.unpriced_attempts = 0
        self.shared = False                   # a rules file was given (add_shared_costs ran)
        self.allocated_total = Decimal(0)     # BilledCost of the allocated shared-cost rows
        self.unallocated_total = Decimal(0)   # BilledCost of shared costs left unallocated (no basis in their month)
        self.shared_notes: list[str] = []


def _ts(day: date) -> str:
    return day_start(day).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tool_map(value: Any) -> dict[str, int]:
    if isinstance(value, dict):
        return {str(k): int(v) for k, v in value.items()}
    keys, values = value  # sumMap of a Map can come back as (keys, values)
    return {str(k): int(v) for k, v in zip(keys, values, strict=True)}


def build_rows(day: date, groups: Iterable[Sequence[Any]], cards: Mapping[str, PriceCard], export: Export) -> None:
    """Append the FOCUS rows of one UTC day's groups (rows of _group_sql) to `export`; pure, exact.

    One row per group × token class (and × tool) with a non-zero quantity: PricingQuantity = tokens / 1,000,000
    at the card's price per million (after batch, service-tier and long-context rules, as the enrich stage
    prices: ClassPrices via PriceCard.pricing), so PricingQuantity × ListUnitPrice = cost exactly. The rows'
    costs are checked against the stored cost columns of each group; a difference (the card loaded now is not
    the one the rows were priced with) raises ReportError. Tokens of a class the card does not price, and
    rows with no card or an unknown model, have no unit price: they are counted in `export`, not exported.
    """
    period_start, period_end = day.replace(day=1), _next_month(day)
    with localcontext(MONEY_CONTEXT):
        for cells in groups:
            g = dict(zip(_GROUP, cells[:len(_GROUP)], strict=True))
            rest = cells[len(_GROUP):]
            tokens = [int(v) for v in rest[:6]]
            stored = [money(v) for v in rest[6:12]]
            tools, attempts = _tool_map(rest[12]), int(rest[13])
            version, provider, model = str(g["price_card_version"]), str(g["provider"]), str(g["model_actual"])
            card = cards.get(version)
            tier = str(g["service_tier"])
            pricing = card.pricing(provider, model, bool(g["batch"]), tier) if card is not None else None
            if card is None or pricing is None:
                if any(stored):
                    raise ReportError(f"{day} {provider}/{model}: stored cost {sum(stored)} USD but price card "
                                      f"{version!r} is not loaded (or lacks the model): load the cards it was priced "
                                      "with, or pass --price-cards")
                export.unpriced_attempts += attempts
                export.unpriced_tokens += sum(tokens)
                export.unpriced_calls += sum(tools.values())
                continue
            long_ctx = bool(int(g["long_context"]))
            rates = pricing.long if long_ctx and pricing.long is not None else pricing.base
            variant = (":batch" if g["batch"] else "") + (f":tier={tier}" if tier not in STANDARD_TIERS else "") \
                + (":long_context" if long_ctx else "")
            sku = f"{provider}/{pricing.entry.model}"
            details = {"x_PriceCardVersion": version, "x_Batch": bool(g["batch"]), "x_ServiceTier": tier or "standard",
                       "x_LongContext": long_ctx}
            tags = {k: str(g[k]) for k in OWNER_TAGS if g[k]}
            common = _common(day, period_start, period_end, provider, model, version, tags)
            computed = [Decimal(0)] * 6
            for i, (cls, meter, _) in enumerate(TOKEN_CLASSES):
                n = tokens[i]
                if not n:
                    continue
                if i in rates.missing:
                    export.unpriced_tokens += n
                    continue
                per_million = rates.filled[i].scaleb(6)
                quantity = Decimal(n).scaleb(-6)
                cost = quantity * per_million
                computed[i] = cost
                export.rows.append(_row(common, cost, n, "Tokens", quantity, TOKENS_UNIT, per_million,
                                        f"{sku}:{cls}", f"{version}:{sku}:{cls}{variant}", meter, details, cls,
                                        f"{model} {meter.lower()}, price card {version}"))
            for (col, idx), kept in zip(COST_COLUMNS, stored, strict=False):
                have = sum((computed[i] for i in idx), Decimal(0))
                if have != kept:
                    raise ReportError(f"{day} {provider}/{model} card {version}: {col} stored {kept} USD, the card's "
                                      f"prices × tokens give {have} USD: the card loaded now differs from the one the "
                                      "rows were priced with")
            tools_cost = Decimal(0)
            for name, calls in sorted(tools.items()):
                price = pricing.entry.tools.get(name)
                if not calls:
                    continue
                if price is None:
                    export.unpriced_calls += calls
                    continue
                cost = price * calls
                tools_cost += cost
                export.rows.append(_row(common, cost, calls, CALLS_UNIT, Decimal(calls), CALLS_UNIT, price,
                                        f"{sku}:tool:{name}", f"{version}:{sku}:tool:{name}", f"{name} calls",
                                        details, f"tool:{name}", f"{model} {name} calls, price card {version}"))
            if tools_cost != stored[5]:
                raise ReportError(f"{day} {provider}/{model} card {version}: cost_tools_usd stored {stored[5]} USD, "
                                  f"the card's tool prices give {tools_cost} USD")
            export.total += sum(computed, tools_cost)


def _common(day: date, period_start: date, period_end: date, provider: str, model: str, version: str,
            tags: Mapping[str, str]) -> dict[str, Any]:
    name = PROVIDER_NAMES.get(provider, provider)
    return {
        "BillingAccountId": provider, "BillingAccountName": name, "BillingCurrency": "USD",
        "BillingPeriodStart": _ts(period_start), "BillingPeriodEnd": _ts(period_end),
        "ChargeCategory": "Usage", "ChargeClass": None, "ChargeFrequency": "Usage-Based",
        "ChargePeriodStart": _ts(day), "ChargePeriodEnd": _ts(day + timedelta(days=1)), "InvoiceId": None,
        "InvoiceIssuerName": name, "PricingCategory": "Standard", "ProviderName": name, "PublisherName": name,
        "ServiceCategory": "AI and Machine Learning", "ServiceName": f"{name} API",
        "ServiceSubcategory": "Generative AI",
        "Tags": orjson.dumps(dict(tags), option=orjson.OPT_SORT_KEYS).decode() if tags else None,
        "AllocatedMethodId": None, "AllocatedMethodDetails": None, "AllocatedResourceId": None,
        "AllocatedResourceName": None, "AllocatedTags": None, "x_Model": model, "x_PriceCardVersion": version,
    }


def _row(common: Mapping[str, Any], cost: Decimal, consumed: int, consumed_unit: str, quantity: Decimal, unit: str,
         price: Decimal, sku_id: str, sku_price_id: str, meter: str, details: Mapping[str, Any], cls: str,
         description: str) -> tuple[Any, ...]:
    row = {**common, "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost, "ContractedCost": cost,
           "ConsumedQuantity": Decimal(consumed), "ConsumedUnit": consumed_unit, "PricingQuantity": quantity,
           "PricingUnit": unit, "ListUnitPrice": price, "ContractedUnitPrice": price, "SkuId": sku_id,
           "SkuPriceId": sku_price_id, "SkuMeter": meter,
           "SkuPriceDetails": orjson.dumps(dict(details)).decode(), "ChargeDescription": description,
           "x_TokenClass": cls}
    return tuple(row[c] for c in COLUMNS)


def export_focus(query: Query, cards: Mapping[str, PriceCard], start: date, end: date,
                 step: Callable[[str], None] = lambda label: None) -> Export:
    """Build the FOCUS rows of usage_events with ts in the UTC days [start, end); one query per day (`step`)."""
    _, combos = query("SELECT DISTINCT price_card_version, provider, model_actual "
                      f"FROM {{db}}.usage_events_current "
                      f"WHERE {ts_window_sql(start, end)}")
    long_expr = long_context_sql(combos, cards)
    export = Export()
    for day in days(start, end):
        step(day.isoformat())
        _, groups = query(_group_sql(day, long_expr))
        build_rows(day, groups, cards, export)
    return export


# ---------------------------------------------------------------- shared costs (FOCUS 1.3 split cost allocation)
SHARED_NAME = "Shared costs"           # BillingAccountName, ProviderName, PublisherName, InvoiceIssuerName
SHARED_ACCOUNT = "shared-costs"        # BillingAccountId
SHARED_SERVICE = "Shared LLM costs"    # ServiceName
SHARED_UNIT = "USD"                    # PricingUnit: quantity = the amount in USD, unit price 1 (exact, splittable)
# AllocatedRatio is the row's share of its item (allocated / amount), to 18 decimal places by largest remainder, so
# the ratios of one item sum to exactly 1 even when a share is not a terminating decimal.
RATIO_QUANTUM = Decimal("1E-18")
USAGE_UNITS = {"proportional_to_requests": "Requests", "proportional_to_tokens": "Tokens", "fixed_split": "Percent"}


def _json_number(value: int | Decimal) -> str:
    return str(value) if isinstance(value, int) else format(value.normalize(), "f")


def method_details(rule: str, ratio: Decimal, basis: int | Decimal) -> str:
    """Return AllocatedMethodDetails: one element with the exact AllocatedRatio and the rule's basis as usage.

    Built as text so the ratio and basis are JSON numbers written exactly (never through a float).
    """
    unit = orjson.dumps(USAGE_UNITS[rule]).decode()
    return (f'{{"Elements":[{{"AllocatedRatio":{_json_number(ratio)},"UsageUnit":{unit},'
            f'"UsageQuantity":{_json_number(basis)}}}]}}')


def _shared_common(item: SharedCost) -> dict[str, Any]:
    first = month_start(item.period)
    month = (_ts(first), _ts(next_month(first)))
    return {
        "BillingAccountId": SHARED_ACCOUNT, "BillingAccountName": SHARED_NAME, "BillingCurrency": "USD",
        "BillingPeriodStart": month[0], "BillingPeriodEnd": month[1], "ChargeCategory": "Purchase",
        "ChargeClass": None, "ChargeFrequency": "Recurring", "ChargePeriodStart": month[0],
        "ChargePeriodEnd": month[1], "InvoiceId": None, "InvoiceIssuerName": SHARED_NAME,
        "PricingCategory": "Standard", "ProviderName": SHARED_NAME, "PublisherName": SHARED_NAME,
        "ServiceCategory": "AI and Machine Learning", "ServiceName": SHARED_SERVICE,
        "ServiceSubcategory": "Other (AI and Machine Learning)",
        "Tags": orjson.dumps({"shared_cost": item.name}).decode(),
        "ChargeDescription": f"shared cost {item.name} ({item.period})"
                             + (f": {item.description}" if item.description else ""),
        "ConsumedQuantity": None, "ConsumedUnit": None, "PricingUnit": SHARED_UNIT, "ListUnitPrice": Decimal(1),
        "ContractedUnitPrice": Decimal(1), "SkuId": f"shared/{item.name}",
        "SkuPriceId": f"{item.period}:shared/{item.name}", "SkuMeter": "Shared cost", "SkuPriceDetails": None,
        "x_Model": None, "x_TokenClass": None, "x_PriceCardVersion": None,
    }


def _shared_row(common: Mapping[str, Any], cost: Decimal, allocation: Mapping[str, Any]) -> tuple[Any, ...]:
    row = {**common, "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost, "ContractedCost": cost,
           "PricingQuantity": cost, "AllocatedMethodId": None, "AllocatedMethodDetails": None,
           "AllocatedResourceId": None, "AllocatedResourceName": None, "AllocatedTags": None, **allocation}
    return tuple(row[c] for c in COLUMNS)


def shared_rows(allocations: Sequence[Allocation], export: Export) -> None:
    """Append FOCUS rows for shared costs allocated by chargeback.allocate_items (pure, exact).

    Each item is an origin charge (a monthly Purchase of `amount_usd`) split into one allocated charge per
    receiving team: BilledCost = the team's allocation (to the cent, summing exactly to the item), dimensions
    and unit price equal across the item's rows, PricingQuantity = the cost in USD at ListUnitPrice 1 (so the
    quantities sum to the item too), AllocatedMethodId = the rule, AllocatedResourceId/Name = the team,
    AllocatedTags = {"team_id": team} (null for the unattributed bucket, which has no owner tags). An item
    with no basis in its month (allocated to "(unallocated)") is one unsplit row, Allocated* null.
    """
    by_item: dict[SharedCost, list[Allocation]] = {}
    for a in allocations:
        by_item.setdefault(a.item, []).append(a)
    for item, allocs in by_item.items():
        common = _shared_common(item)
        if [a.team for a in allocs] == [UNALLOCATED]:
            export.rows.append(_shared_row(common, item.amount_usd, {}))
            export.unallocated_total += item.amount_usd
            continue
        weights: dict[str, int | Decimal] = ({a.team: a.allocated for a in allocs} if item.amount_usd
                                             else {a.team: a.basis for a in allocs})
        ratios = allocate(Decimal(1), weights, RATIO_QUANTUM)
        for a in allocs:
            export.rows.append(_shared_row(common, a.allocated, {
                "AllocatedMethodId": item.rule,
                "AllocatedMethodDetails": method_details(item.rule, ratios[a.team], a.basis),
                "AllocatedResourceId": a.team, "AllocatedResourceName": a.team,
                "AllocatedTags": None if a.team == UNATTRIBUTED else orjson.dumps({"team_id": a.team}).decode()}))
            export.allocated_total += a.allocated


def add_shared_costs(query: Query, items: Sequence[SharedCost], start: date, end: date, export: Export,
                     step: Callable[[str], None] = lambda label: None) -> None:
    """Allocate the shared cost items whose month lies wholly inside [start, end) and append their FOCUS rows.

    The allocation is the chargeback's own (chargeback.allocate_items over the same basis queries), so the
    amounts equal the chargeback report's allocations table for the same rules file and month.
    """
    period = Period(start, end, f"{start} … {end}")
    data = fetch_allocation_basis(query, period, step)
    allocations, notes = allocate_items(items, data, period)
    export.shared = True
    shared_rows(allocations, export)
    export.shared_notes += notes


def build_report(export: Export, start: date, end: date, source: str) -> Report:
    """Return the export as a one-table Report (CSV by default); notes say what is and is not in it."""
    notes = [f"FOCUS 1.2 columns with the 1.3 allocation columns; one row per UTC day × owner × model × token class "
             f"× SKU price (price card version, batch, service tier, long context); price cards from {source}.",
             f"BilledCost total of the usage rows (ChargeCategory Usage) {export.total} USD = sum(cost_total_usd) of "
             "usage_events in the period."]
    if not export.shared:
        notes.append("direct costs only: no shared-cost rules were given, so the Allocated* columns are null.")
    else:
        notes.append(f"shared costs (ChargeCategory Purchase, Tags shared_cost): {export.allocated_total} USD "
                     f"allocated to teams (AllocatedMethodId = the rule, to the cent by largest remainder), "
                     f"{export.unallocated_total} USD unallocated; the usage rows' Allocated* columns are null.")
        notes += export.shared_notes
    if export.unpriced_attempts or export.unpriced_tokens or export.unpriced_calls:
        notes.append(f"not exported (no price: cost unknown, not zero): {export.unpriced_attempts:,} attempts without "
                     f"a card or model price, {export.unpriced_tokens:,} tokens and {export.unpriced_calls:,} tool "
                     "calls without a class price")
    table = Table("focus", "FOCUS cost and usage rows", COLUMNS, export.rows)
    return Report("FOCUS export", f"{start} … {end} (exclusive), UTC", (table,), tuple(notes))
