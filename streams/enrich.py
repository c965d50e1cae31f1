"""The enrich stage: owners from the registry in effect, exact cost lines from the price card in effect."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal, DecimalException, localcontext
from typing import Any, NamedTuple

from streams.records import ATTEMPT_COLUMNS, STAGE_ENRICH, Accepted, Rejection
from tally.reference import MONEY_CONTEXT, ClassPrices, OwnerRegistry, PriceCard, ReferenceSnapshot

# pricing_status values.
PRICED = "priced"          # every token class, tool and multiplier had a price
PARTIAL = "partial"        # a class with tokens, a tool, a service tier or batch had no price: see the note
UNPRICED = "unpriced"      # no card in effect, or the model is not in it: costs 0, row kept and flagged
NO_USAGE = "no_usage"      # usage not reported (see usage_reported) and no stream_terminated_at_token_n: unknown, 0
ESTIMATED = "estimated"    # usage not reported but the cut point is known: input usage + n output tokens

# attribution_status values and attribution_reason codes.
ATTRIBUTED = "attributed"
UNATTRIBUTED = "unattributed"
FROM_TAG = "tag"                            # the gateway sent team_id
FROM_FEATURE = "feature_registry"           # team of the feature_id in the registry
FROM_API_KEY = "api_key_registry"           # team of the api_key_id (no feature_id tag)
NO_FEATURE_TAG = "no_feature_tag"           # no team_id, feature_id nor api_key_id tag: nothing to look up
NO_REGISTRY = "no_registry"                 # no owners version in effect at the event's timestamp
UNKNOWN_TEAM = "unknown_team"               # a team_id tag the registry does not know
UNKNOWN_FEATURE = "unknown_feature"         # a feature_id tag the registry does not know
UNKNOWN_COST_CENTER = "unknown_cost_center"  # a cost_center tag the registry does not know
UNKNOWN_TENANT = "unknown_tenant"           # a tenant_id tag not in a registry that lists its tenants
UNKNOWN_API_KEY = "unknown_api_key"         # no feature_id; api_key_id not in the registry

# Rejection reasons of this stage (both should never happen with validated input and cards).
COST_OUT_OF_RANGE = "cost_out_of_range"
ENRICH_FAILED = "enrich_failed"

ZERO = Decimal(0)
# The largest value of ClickHouse Decimal(38, 18).
COST_MAX = Decimal("99999999999999999999.999999999999999999")


class Owner(NamedTuple):
    """The resolved owner columns of a row."""

    team_id: str
    product: str
    cost_center: str
    business_unit: str
    status: str
    reason: str
    conflict: str


def resolve_owner(tags: Mapping[str, str], registry: OwnerRegistry | None) -> Owner:
    """Resolve team, product, cost center and business unit: gateway tags win, the registry fills the gaps.

    The registry entry is the feature_id's, else the api_key_id's. A team's cost_center/business_unit come
    from `teams` unless the entry overrides them (and its team is the resolved team). A tag that disagrees
    with the registry is kept and recorded in `conflict` ("team_id: tag=search registry=inbox; ..."). No team
    after resolution → unattributed, with the most precise reason code above.

    A team_id, feature_id or cost_center tag the registry in effect does not know, or a tenant_id tag absent
    from a registry that lists its tenants (`tenants`; a registry without that list leaves tenants open-ended),
    makes the row unattributed: reason unknown_team, unknown_feature, unknown_cost_center or unknown_tenant (the
    first, in that order), team '' (the bucket no chargeback bills), and every unknown tag named in `conflict`
    ("team_id: tag=ghost_team not in registry 2026-02-01"). The tags themselves stay on the row (its `tags`;
    product, cost center and business unit keep the tag's value). With no registry in effect nothing is checked.
    """
    return Owner(*_owner(tags, registry))


def _owner(tags: Mapping[str, str], registry: OwnerRegistry | None) -> tuple[str, ...]:
    """Return the Owner fields as a plain tuple (the hot path)."""
    team = tags.get("team_id", "")
    feature = tags.get("feature_id", "")
    api_key = tags.get("api_key_id", "")
    entry = None
    source = FROM_TAG
    if registry is not None:
        unknown = _unknown_tags(tags, registry)
        if unknown:
            note = "; ".join(f"{name}: tag={tags[name]} not in registry {registry.version}" for name, _ in unknown)
            return ("", tags.get("product", ""), tags.get("cost_center", ""), tags.get("business_unit", ""),
                    UNATTRIBUTED, unknown[0][1], note)
        if feature:
            entry = registry.features.get(feature)
            source = FROM_FEATURE
        if entry is None and api_key:
            entry = registry.api_keys.get(api_key)
            source = FROM_API_KEY
    tag_product = tags.get("product", "")
    tag_cc = tags.get("cost_center", "")
    tag_bu = tags.get("business_unit", "")
    if entry is None:
        if not team:
            if not feature and not api_key:
                reason = NO_FEATURE_TAG
            elif registry is None:
                reason = NO_REGISTRY
            else:
                reason = UNKNOWN_API_KEY  # (an unknown feature_id was caught above)
            return ("", tag_product, tag_cc, tag_bu, UNATTRIBUTED, reason, "")
        known = registry.teams.get(team) if registry is not None else None
        return (team, tag_product, tag_cc or (known.cost_center if known else ""),
                tag_bu or (known.business_unit if known else ""), ATTRIBUTED, FROM_TAG, "")
    assert registry is not None
    reg_team = registry.teams[entry.team]
    reg_cc = entry.cost_center or reg_team.cost_center
    reg_bu = entry.business_unit or reg_team.business_unit
    if not team or team == entry.team:
        if not (tag_product or tag_cc or tag_bu):  # the common case: nothing to compare
            return entry.team, entry.product, reg_cc, reg_bu, ATTRIBUTED, FROM_TAG if team else source, ""
        cc, bu = reg_cc, reg_bu
    else:
        tagged = registry.teams.get(team)
        cc = tagged.cost_center if tagged else ""
        bu = tagged.business_unit if tagged else ""
    pairs = (("team_id", team, entry.team), ("product", tag_product, entry.product),
             ("cost_center", tag_cc, reg_cc), ("business_unit", tag_bu, reg_bu))
    conflicts = [f"{field}: tag={tag} registry={reg}" for field, tag, reg in pairs
                 if tag and reg and tag != reg]
    return (team or entry.team, tag_product or entry.product, tag_cc or cc, tag_bu or bu, ATTRIBUTED,
            FROM_TAG if team else source, "; ".join(conflicts))


def _unknown_tags(tags: Mapping[str, str], registry: OwnerRegistry) -> list[tuple[str, str]]:
    """(tag, reason) of every checked tag whose value the registry does not know, in the order of precedence."""
    return [(name, reason) for name, reason, known in (
        ("team_id", UNKNOWN_TEAM, registry.teams), ("feature_id", UNKNOWN_FEATURE, registry.features),
        ("cost_center", UNKNOWN_COST_CENTER, registry.cost_centers), ("tenant_id", UNKNOWN_TENANT, registry.tenants))
        if known is not None and tags.get(name) and tags[name] not in known]


class Costs(NamedTuple):
    """The cost columns of a row (exact Decimal USD) with pricing_status and pricing_note."""

    input: Decimal
    output: Decimal
    reasoning: Decimal
    cache_read: Decimal
    cache_write: Decimal
    tools: Decimal
    total: Decimal
    status: str
    note: str
    priced_as: str = ""  # the card entry that priced the event, provider/model ('' when unpriced)


def usage_reported(event: Mapping[str, Any]) -> bool:
    """Whether the provider reported the event's usage: the row's `usage_reported` column.

    Not reported: `usage_reported` is false, or the status is ok and the usage object holds no token class at all
    (`usage: {}`: a successful call always used tokens, so an empty object is a missing report, not a zero; the
    cost is unknown). A class present with 0 is the provider's explicit zero and is priced as one; an error or a
    terminated attempt may really have used nothing, so its empty usage counts as reported zeros.
    """
    return bool(event["usage"] or event["status"] != "ok") and bool(event.get("usage_reported", True))


def price_event(event: Mapping[str, Any], card: PriceCard | None) -> Costs:
    """Price one event with the card in effect at its timestamp (enrich's pricing, for callers and tests).

    Rules: cost of a class = tokens × (price per million / 1,000,000) × batch_discount (batch=true) × service
    tier multiplier; the long-context prices replace the base prices for the whole request when input +
    cache_read + cache_write + cache_write_1h tokens > above_input_tokens; reasoning defaults to the output
    price; cost_cache_write = 5m tokens × cache_write_5m + 1h tokens × cache_write_1h; tools = calls × USD per
    call (no multipliers). Total = exact sum. Nothing is rounded (validated cards keep ≤ 18 decimal places).
    """
    with localcontext(MONEY_CONTEXT):
        return Costs(*_price(event, card))


_NOT_PRICED = (ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO)
_CLASS_NAMES = ClassPrices._fields


def _price(ev: Mapping[str, Any], card: PriceCard | None) -> tuple[Any, ...]:
    """Return the Costs fields as a plain tuple (the hot path); runs under MONEY_CONTEXT."""
    if card is None:
        return (*_NOT_PRICED, UNPRICED, "no price card in effect", "")
    provider = ev["provider"]
    model = ev["model_actual"]
    pricing = card.pricing(provider, model, ev.get("batch", False), ev.get("service_tier", ""))
    if pricing is None:
        return (*_NOT_PRICED, UNPRICED, card.match(provider, model).how, "")
    priced_as = pricing.entry.priced_as
    usage = ev["usage"]
    n_cut = None
    if not ev.get("usage_reported", True) or (not usage and ev["status"] == "ok"):  # = not usage_reported(ev)
        n_cut = ev.get("stream_terminated_at_token_n")
        if n_cut is None:
            if usage or not ev.get("usage_reported", True):
                why = ev.get("usage_note")
                if why:  # a lenient normalizer's error, kept by the gateway instead of losing the call
                    return (*_NOT_PRICED, NO_USAGE, f"usage not reported: the gateway could not normalize it "
                            f"({why}): cost unknown, not zero", priced_as)
                return (*_NOT_PRICED, NO_USAGE, "usage not reported by the provider: cost unknown, not zero",
                        priced_as)
            return (*_NOT_PRICED, NO_USAGE, "status ok but the usage object is empty (no token count at all): "
                    "cost unknown, not zero", priced_as)
    n_in = usage.get("input_tokens", 0)
    n_cr = usage.get("cache_read_tokens", 0)
    n_cw = usage.get("cache_write_tokens", 0)
    n_cw1h = usage.get("cache_write_1h_tokens", 0)
    if n_cut is None:
        n_out = usage.get("output_tokens", 0)
        n_re = usage.get("reasoning_tokens", 0)
    else:
        n_out, n_re = n_cut, 0
    entry, threshold, rates, long_rates = pricing
    long = threshold is not None and n_in + n_cr + n_cw + n_cw1h > threshold
    if long:
        assert long_rates is not None
        rates = long_rates
    # An unpriced class has rate 0 in `filled`; whether it had tokens is checked below, off the common path.
    p_in, p_out, p_re, p_cr, p_cw, p_cw1h = rates.filled
    c_in = p_in * n_in if n_in else ZERO
    c_out = p_out * n_out if n_out else ZERO
    total = c_in + c_out
    if n_re:
        c_re = p_re * n_re
        total += c_re
    else:
        c_re = ZERO
    if n_cr:
        c_cr = p_cr * n_cr
        total += c_cr
    else:
        c_cr = ZERO
    c_cw = ZERO
    if n_cw:
        c_cw = p_cw * n_cw
    if n_cw1h:
        c_cw += p_cw1h * n_cw1h
    if n_cw or n_cw1h:
        total += c_cw
    c_tools = ZERO
    notes = list(rates.notes)  # usually empty: a fresh list, appended to only on the rare paths below
    if rates.missing:  # common (OpenAI and Google bill no cache writes), so a plain loop
        counts = (n_in, n_out, n_re, n_cr, n_cw, n_cw1h)
        for i in rates.missing:
            if counts[i]:
                where = " (long context)" if long else ""
                notes.append(f"no {_CLASS_NAMES[i]} price for {provider}/{model}{where}: {counts[i]} tokens "
                             "unpriced")
    tool_calls = ev.get("tool_calls")
    if tool_calls:
        for name, calls in tool_calls.items():
            if calls:
                price = entry.tools.get(name)
                if price is None:
                    notes.append(f"no price for tool {name!r} of {provider}/{model}: {calls} calls unpriced")
                else:
                    c_tools += price * calls
        total += c_tools
    if n_cut is not None:
        note = (f"estimated: usage not reported; priced input usage plus {n_cut} output tokens generated "
                f"before the cut")
        return c_in, c_out, c_re, c_cr, c_cw, c_tools, total, ESTIMATED, "; ".join([note, *notes]), priced_as
    if notes:
        return c_in, c_out, c_re, c_cr, c_cw, c_tools, total, PARTIAL, "; ".join(notes), priced_as
    return c_in, c_out, c_re, c_cr, c_cw, c_tools, total, PRICED, "", priced_as


_ROW_TEMPLATE: dict[str, Any] = dict.fromkeys(ATTEMPT_COLUMNS)


class _OutOfRange(ValueError):
    """A cost does not fit ClickHouse Decimal(38, 18)."""


def _row(acc: Accepted, card: PriceCard | None, registry: OwnerRegistry | None,
         ingested_at: datetime) -> dict[str, Any]:
    ev = acc.event
    usage = ev["usage"]
    tags = ev["tags"]
    c_in, c_out, c_re, c_cr, c_cw, c_tools, total, status, note, priced_as = _price(ev, card)
    if total > COST_MAX:
        raise _OutOfRange(f"cost_total_usd {total} does not fit Decimal(38, 18)")
    team, product, cost_center, business_unit, attribution, reason, conflict = _owner(tags, registry)
    model_actual = ev["model_actual"]
    source = acc.source
    # Copying a template keyed in ATTEMPT_COLUMNS order and assigning is ~2x faster than a 56-key literal.
    row = _ROW_TEMPLATE.copy()
    row["event_id"] = ev["event_id"]
    row["request_id"] = ev["request_id"]
    row["logical_request_id"] = acc.logical_id
    row["attempt"] = ev.get("attempt", 0)
    row["final"] = ev.get("final", False)
    row["ts"] = acc.ts
    row["ingested_at"] = ingested_at
    row["provider"] = ev["provider"]
    row["model_requested"] = ev.get("model_requested") or model_actual
    row["model_actual"] = model_actual
    row["fallback_from"] = ev.get("fallback_from") or ""
    row["status"] = ev["status"]
    row["error"] = ev.get("error") or ""
    row["batch"] = ev.get("batch", False)
    row["service_tier"] = ev.get("service_tier", "")
    row["usage_reported"] = usage_reported(ev)
    row["stream_terminated_at_token_n"] = ev.get("stream_terminated_at_token_n")
    row["latency_ms"] = ev.get("latency_ms")
    row["input_tokens"] = usage.get("input_tokens", 0)
    if status == ESTIMATED:
        # The tokens priced are the tokens counted: the cut point stands in for the unreported output, so token
        # rollups and costs agree. The original event (payload) keeps what the gateway sent.
        row["output_tokens"] = ev["stream_terminated_at_token_n"]
        row["reasoning_tokens"] = 0
    else:
        row["output_tokens"] = usage.get("output_tokens", 0)
        row["reasoning_tokens"] = usage.get("reasoning_tokens", 0)
    row["cache_read_tokens"] = usage.get("cache_read_tokens", 0)
    row["cache_write_tokens"] = usage.get("cache_write_tokens", 0)
    row["cache_write_1h_tokens"] = usage.get("cache_write_1h_tokens", 0)
    row["tool_calls"] = ev.get("tool_calls") or {}
    row["cost_input_usd"] = c_in
    row["cost_output_usd"] = c_out
    row["cost_reasoning_usd"] = c_re
    row["cost_cache_read_usd"] = c_cr
    row["cost_cache_write_usd"] = c_cw
    row["cost_tools_usd"] = c_tools
    row["cost_total_usd"] = total
    row["pricing_status"] = status
    row["pricing_note"] = note
    row["price_card_version"] = card.version if card is not None else ""
    row["priced_as"] = priced_as
    row["tenant_id"] = tags.get("tenant_id", "")
    row["team_id"] = team
    row["feature_id"] = tags.get("feature_id", "")
    row["product"] = product
    row["endpoint"] = tags.get("endpoint", "")
    row["environment"] = tags.get("environment", "")
    row["cost_center"] = cost_center
    row["business_unit"] = business_unit
    row["api_key_id"] = tags.get("api_key_id", "")
    row["deploy_version"] = tags.get("deploy_version", "")
    row["user_segment"] = tags.get("user_segment", "")
    row["tags"] = tags
    row["ownership_version"] = registry.version if registry is not None else ""
    row["attribution_status"] = attribution
    row["attribution_reason"] = reason
    row["attribution_conflict"] = conflict
    row["source_topic"] = source.topic
    row["source_partition"] = source.partition
    row["source_offset"] = source.offset
    row["source_line"] = acc.line
    row["payload"] = acc.raw.decode("utf-8")
    return row



def enrich(batch: Sequence[Accepted], refs: ReferenceSnapshot,
           ingested_at: datetime) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Turn accepted events into priced, attributed attempt rows (keys = streams.records.ATTEMPT_COLUMNS).

    Contract: every accepted event becomes exactly one row or one Rejection (stage "enrich"), in input order;
    no exception escapes for a single event. The price card and owners version are those in effect at the
    event's timestamp in `refs` (one immutable snapshot for the whole batch); their versions are stamped on
    the row ('' when none). Costs are exact Decimal USD (never rounded: any inexact operation is a rejection).
    Rows share the event's `tags` and `tool_calls` dicts rather than copying them: do not mutate them later.
    """
    rows: list[dict[str, Any]] = []
    rejections: list[Rejection] = []
    cards = refs.price_cards
    owners = refs.owners
    card: PriceCard | None = None
    registry: OwnerRegistry | None = None
    c_lo = c_hi = o_lo = o_hi = ingested_at  # an empty interval: the first event looks both up
    with localcontext(MONEY_CONTEXT):
        for acc in batch:
            ts = acc.ts
            if not c_lo <= ts < c_hi:
                card, c_lo, c_hi = cards.span_at(ts)
            if not o_lo <= ts < o_hi:
                registry, o_lo, o_hi = owners.span_at(ts)
            try:
                rows.append(_row(acc, card, registry, ingested_at))
            except (_OutOfRange, DecimalException) as exc:
                rejections.append(Rejection(COST_OUT_OF_RANGE, STAGE_ENRICH, f"cannot price exactly: {exc!r}",
                                            acc.raw, acc.source, acc.line, acc.event.get("event_id")))
            except Exception as exc:  # one bad event must never stop the batch (it would be acked and lost)
                rejections.append(Rejection(ENRICH_FAILED, STAGE_ENRICH, f"{type(exc).__name__}: {exc}",
                                            acc.raw, acc.source, acc.line, acc.event.get("event_id")))
    return rows, rejections
