"""The gateway's admission client (tally.sdk.admission): decide before dispatch, one reservation per logical request,
fallbacks, denials with their payload, the stream guard's ceiling, stale state, and the policy's effective dates."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any

import pytest

from tally.errors import ReferenceDataError
from tally.reference import MONEY_CONTEXT, parse_reference_yaml
from tally.sdk.admission import (
    _EPOCH,
    ADMIT,
    BUDGET_EXHAUSTED,
    DENY,
    EXCEEDS_REMAINING,
    FALLBACK,
    REASONING_DENIED,
    STALE_STATE,
    WITHIN_BUDGET,
    Admission,
    _integer_rates,
    _micros,
    _Stamps,
    _usd,
    _utc,
)
from tests.factories import clock

NOW = clock()
T = NOW.timestamp()


def iso(ts: float) -> str:
    return (NOW + timedelta(seconds=ts - T)).isoformat().replace("+00:00", "Z")


CARD = f"""\
kind: price_card
version: "c1"
effective_at: "{iso(T - 86_400 * 30)}"
currency: USD
models:
  - {{provider: openai, model: o4-mini, input: "1.10", output: "4.40"}}
  - {{provider: openai, model: gpt-4.1-mini, input: "0.40", output: "1.60"}}
"""


def policy(version: str, at: float, feature_reasoning: str = "allow", on_breach: str = "fallback",
           on_stale: str = "open") -> str:
    return f"""\
kind: routing_policy
version: "{version}"
effective_at: "{iso(at)}"
reasoning_models: [openai/o4-mini]
stream_ceiling: "2"
stale_state_s: 60
on_stale_state: {on_stale}
default: {{reasoning: allow, max_reasoning_tokens: 1000, on_breach: deny}}
features:
  search_answer: {{reasoning: {feature_reasoning}, fallback_model: openai/gpt-4.1-mini, on_breach: {on_breach}}}
"""


def state(spent: str, budget: str = "1.00", computed: float = T, key: str = "feature:search_answer:day") -> dict:
    return {"key": key, "scope": "feature", "id": "search_answer", "period": "day", "budget_usd": budget,
            "spent_usd": spent, "computed_at": iso(computed), "period_end": iso(T + 3600),
            "recommendation": "allow"}


def admission(*policies: str, now: list[float] | None = None) -> tuple[Admission, list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    moment = now if now is not None else [T]
    a = Admission("gw-1", publish=records.append, clock=lambda: moment[0])
    for text in (CARD, *(policies or (policy("p1", T - 3600),))):
        a.apply_references(parse_reference_yaml(text, "test"))
    return a, records


# o4-mini worst case: 1,000 input × 1.10/M + 500 output × 4.40/M + 1,000 reasoning (policy ceiling) × 4.40/M
WORST = Decimal("0.0011") + Decimal("0.0022") + Decimal("0.0044")
REQ: dict[str, Any] = {"feature_id": "search_answer", "provider": "openai", "model": "o4-mini",
                       "input_tokens": 1000, "max_output_tokens": 500}


def test_a_request_within_budget_reserves_its_worst_case_once_for_all_its_attempts() -> None:
    a, records = admission()
    a.apply_state(state("0.50"))
    d = a.reserve(request_id="r-1", **REQ)
    assert (d.action, d.reason, d.model) == (ADMIT, WITHIN_BUDGET, "o4-mini")
    assert d.reservation is not None and d.reservation.amount_usd == WORST
    # a retry and a fallback of the same logical request draw from the same hold
    d.reservation.attempt("openai", "gpt-4.1-mini")
    again = a.reserve(request_id="r-1b", parent_request_id="r-1", **REQ)
    assert again.reservation is d.reservation and again.record["reserve_delta_usd"] == "0"
    assert a._held["feature:search_answer:day"] == WORST and a.open_reservations == 1
    released = d.reservation.settle(Decimal("0.003"))
    assert released == WORST - Decimal("0.003") and a.open_reservations == 0
    assert d.reservation.settle(Decimal("0.003")) == 0  # idempotent
    assert [r["action"] for r in records] == ["admit", "attempt", "admit", "settle"]
    # the settled cost stays debited until a state computed settle_lag_s (30) after it counts it in spent
    b = a._budgets("search_answer", "", T)[0]
    assert b.held_usd == Decimal("0.003")
    a.apply_state(state("0.50", computed=T + 5))  # too soon: the rollups may not hold it yet
    assert a._budgets("search_answer", "", T + 5)[0].held_usd == Decimal("0.003")
    a.apply_state(state("0.503", computed=T + 31))
    assert a._budgets("search_answer", "", T + 31)[0].held_usd == 0


def test_a_request_the_budget_cannot_hold_falls_back_or_is_denied_with_an_auditable_payload() -> None:
    a, _ = admission()
    a.apply_state(state("0.995"))  # 0.005 left: o4-mini's 0.0077 does not fit, gpt-4.1-mini's 0.0012 does
    d = a.reserve(request_id="r-2", tenant_id="acme", **REQ)
    assert (d.action, d.reason, d.provider, d.model) == (FALLBACK, EXCEEDS_REMAINING, "openai", "gpt-4.1-mini")
    assert d.reservation is not None and d.reservation.amount_usd == Decimal("0.0004") + Decimal("0.0008")
    strict, _ = admission(policy("p1", T - 3600, on_breach="deny"))
    strict.apply_state(state("0.995"))
    denied = strict.reserve(request_id="r-3", parent_request_id="lr-3", tenant_id="acme", tier="pro", **REQ)
    assert (denied.action, denied.reason, denied.admitted, denied.reservation) == (
        DENY, EXCEEDS_REMAINING, False, None)
    p = denied.payload()
    assert {k: p[k] for k in ("request_id", "parent_request_id", "feature_id", "tenant_id", "tier", "model",
                              "reason", "reserve_delta_usd", "requested_usd", "policy_version",
                              "price_card_version", "budgets")} == {
        "request_id": "r-3", "parent_request_id": "lr-3", "feature_id": "search_answer", "tenant_id": "acme",
        "tier": "pro", "model": "o4-mini", "reason": EXCEEDS_REMAINING, "reserve_delta_usd": "0",
        "requested_usd": str(WORST), "policy_version": "p1", "price_card_version": "c1",
        "budgets": ["feature:search_answer:day"]}
    window = p["budget_windows"]["feature:search_answer:day"]
    assert window["remaining_usd"] == "0.005" and window["period_end"] == iso(T + 3600)
    spent, _ = admission()
    spent.apply_state(state("1.00"))
    assert spent.reserve(request_id="r-4", **REQ).reason == BUDGET_EXHAUSTED


def test_stale_state_fails_open_or_closed_as_the_policy_says() -> None:
    opened, _ = admission()
    opened.apply_state(state("0.10", computed=T - 120))  # older than stale_state_s (60)
    d = opened.reserve(request_id="r-5", **REQ)
    assert (d.action, d.reason) == (ADMIT, STALE_STATE)
    closed, _ = admission(policy("p1", T - 3600, on_stale="closed"))
    closed.apply_state(state("0.10", computed=T - 120))
    assert (closed.reserve(request_id="r-6", **REQ).action, closed.reserve(request_id="r-6", **REQ).reason) == (
        DENY, STALE_STATE)


def test_the_policy_in_effect_at_the_decision_is_the_one_applied() -> None:
    moment = [T - 10]
    a, _ = admission(policy("p1", T - 3600), policy("p2", T, feature_reasoning="deny"), now=moment)
    a.apply_state(state("0.10", computed=T - 10))
    before = a.reserve(request_id="r-7", **REQ)
    assert (before.model, before.record["policy_version"]) == ("o4-mini", "p1")
    moment[0] = T + 1
    a.apply_state(state("0.10", computed=T))
    after = a.reserve(request_id="r-8", **REQ)
    assert (after.action, after.reason, after.model, after.record["policy_version"]) == (
        FALLBACK, REASONING_DENIED, "gpt-4.1-mini", "p2")


def test_the_stream_guard_cuts_at_the_hard_ceiling() -> None:
    a, _ = admission()
    a.apply_state(state("0.10"))
    d = a.reserve(request_id="r-9", **REQ)
    assert d.reservation is not None
    guard = d.reservation.stream_guard()
    ceiling_tokens = int(2 * WORST / Decimal("0.0000044"))  # 2 × the reservation at o4-mini's output price
    assert guard.add(ceiling_tokens) is True
    assert guard.add(1) is False


def test_concurrent_requests_never_hold_more_than_the_budget() -> None:
    a, _ = admission(policy("p1", T - 3600, on_breach="deny"))
    a.apply_state(state("0.90"))  # 0.10 left: room for 12 reservations of 0.0077
    admitted: list[bool] = []

    def ask(i: int) -> None:
        admitted.append(a.reserve(request_id=f"c-{i}", **REQ).admitted)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admitted.count(True) == int(Decimal("0.10") / WORST) == 12
    assert a._held["feature:search_answer:day"] <= Decimal("0.10")


def test_policy_documents_are_validated_with_their_lines() -> None:
    bad = policy("p9", T).replace("on_stale_state: open", "on_stale_state: maybe").replace(
        "fallback_model: openai/gpt-4.1-mini", "fallback_model: gpt-4.1-mini")
    with pytest.raises(ReferenceDataError) as err:
        parse_reference_yaml(bad, "policy.yaml")
    assert any(p.startswith("policy.yaml:7: on_stale_state: must be one of open, closed") for p in err.value.problems)
    assert any("features.search_answer.fallback_model: 'gpt-4.1-mini' is not provider/model" in p
               for p in err.value.problems)


def test_other_gateways_holds_in_the_state_and_this_gateways_share_limit_what_it_admits() -> None:
    # The budget stage publishes the gateways' open reservations (reserved_by_gateway); this gateway counts the
    # others' and replaces its own by its live holds. With share 1/3, it holds at most a third of what is left.
    a, _ = admission(policy("p1", T - 3600, on_breach="deny"))
    a.apply_state({**state("0.90"), "reserved_usd": "0.05", "reserved_by_gateway": {"gw-1": "0.02", "gw-2": "0.03"}})
    (b,) = a._budgets("search_answer", "", T)
    assert b.remaining_usd == Decimal("0.07")  # 1.00 − 0.90 spent − 0.03 held by gw-2 (gw-1's own is live here)
    admitted = sum(a.reserve(request_id=f"s-{i}", **REQ).admitted for i in range(20))
    assert admitted == int(Decimal("0.07") / WORST) == 9
    shared, _ = admission(policy("p1", T - 3600, on_breach="deny"))
    shared.share = Decimal(1) / 3
    shared.apply_state(state("0.90"))
    admitted = sum(shared.reserve(request_id=f"t-{i}", **REQ).admitted for i in range(20))
    assert admitted == int(Decimal("0.10") / 3 / WORST) == 4  # a third of the 0.10 left


def test_reasoning_ceilings_per_session_and_per_day_route_to_the_fallback_then_deny() -> None:
    text = policy("p1", T - 3600).replace(
        "search_answer: {reasoning: allow, fallback_model: openai/gpt-4.1-mini, on_breach: fallback}",
        "search_answer: {reasoning: allow, fallback_model: openai/gpt-4.1-mini, on_breach: fallback, "
        "max_reasoning_tokens_per_session: 2500, max_reasoning_tokens_per_day: 3000}")
    a, _ = admission(text)
    a.apply_state(state("0.10"))
    # each o4-mini request may reason 1,000 tokens (the default rule's max_reasoning_tokens)
    first = a.reserve(request_id="s-1", session_id="chat-1", **REQ)
    second = a.reserve(request_id="s-2", session_id="chat-1", **REQ)
    assert (first.model, second.model) == ("o4-mini", "o4-mini")
    third = a.reserve(request_id="s-3", session_id="chat-1", **REQ)  # 2,000 held + 1,000 > 2,500
    assert (third.action, third.reason, third.model) == (FALLBACK, "reasoning_ceiling", "gpt-4.1-mini")
    assert first.reservation is not None and second.reservation is not None
    first.reservation.settle(Decimal("0.001"), reasoning_tokens=200)  # it reasoned less than it could
    again = a.reserve(request_id="s-4", session_id="chat-1", **REQ)  # 200 + 1,000 + 1,000 ≤ 2,500
    assert again.model == "o4-mini"
    other = a.reserve(request_id="s-5", session_id="chat-2", **REQ)  # the feature's day: 2,200 + 1,000 > 3,000
    assert (other.reason, other.model) == ("reasoning_ceiling", "gpt-4.1-mini")
    strict, _ = admission(text.replace("on_breach: fallback, max_reasoning", "on_breach: deny, max_reasoning"))
    strict.apply_state(state("0.10"))
    for i in range(2):
        strict.reserve(request_id=f"d-{i}", session_id="chat-9", **REQ)
    denied = strict.reserve(request_id="d-2", session_id="chat-9", **REQ)
    assert (denied.action, denied.reason) == (DENY, "reasoning_ceiling")


def test_a_denial_says_whether_spend_or_open_reservations_left_too_little() -> None:
    a, _ = admission(policy("p1", T - 3600, on_breach="deny"))
    a.apply_state(state("0.99"))  # 0.01 left: one o4-mini worst case (0.0077) fits
    assert a.reserve(request_id="h-1", **REQ).admitted
    held = a.reserve(request_id="h-2", **REQ)  # the spend leaves 0.01, the open hold leaves 0.0023
    assert (held.action, held.reason) == (DENY, "held_by_open_reservations")
    big = a.reserve(request_id="h-3", **{**REQ, "max_output_tokens": 50_000})  # more than the spend leaves
    assert big.reason == EXCEEDS_REMAINING


# -- the decision path's caches and integer shortcuts (issue 18) give what the plain computation gives -----------


def test_a_new_policy_or_card_version_replaces_the_one_kept_for_its_interval() -> None:
    a, records = admission()
    a.apply_state(state("0.10"))
    assert a.reserve(request_id="v-1", **REQ).record["policy_version"] == "p1"
    # a version that took effect in the past arrives: the kept (policy, card, interval) must not answer any more
    a.apply_references(parse_reference_yaml(policy("p2", T - 60, feature_reasoning="deny"), "test"))
    routed = a.reserve(request_id="v-2", **REQ)
    assert (routed.reason, routed.model, routed.record["policy_version"]) == (REASONING_DENIED, "gpt-4.1-mini", "p2")
    dearer = CARD.replace('version: "c1"', 'version: "c2"').replace(
        f'effective_at: "{iso(T - 86_400 * 30)}"', f'effective_at: "{iso(T - 60)}"').replace('"1.60"', '"3.20"')
    a.apply_references(parse_reference_yaml(dearer, "test"))
    d = a.reserve(request_id="v-3", **REQ)
    assert d.record["price_card_version"] == "c2"
    assert d.reservation is not None and d.reservation.amount_usd == Decimal("0.0004") + Decimal("0.0016")
    assert [r["price_card_version"] for r in records if r["action"] != "settle"] == ["c1", "c1", "c2"]


def test_the_kept_policy_ends_where_the_next_version_takes_effect() -> None:
    moment = [T - 1e-6]  # one microsecond before p2: p1 decides; at p2's effective_at exactly, p2 does
    a, _ = admission(policy("p1", T - 3600), policy("p2", T, feature_reasoning="deny"), now=moment)
    a.apply_state(state("0.10"))
    versions = []
    for i, at in enumerate((T - 1e-6, T - 5e-7, T, T + 1e-6, T - 1)):  # T - 5e-7 rounds to T, as datetimes round it
        moment[0] = at
        versions.append(a.reserve(request_id=f"e-{i}", **REQ).record["policy_version"])
    assert versions == ["p1", "p2", "p2", "p2", "p1"]


def test_times_in_integer_microseconds_round_as_datetime_does() -> None:
    base = clock().timestamp()
    stamps = _Stamps()
    for ts in (base, base + 0.9999995, base + 0.9995, base + 0.0004999, base + 59.9999996, base - 86_400.25,
               base + 1e-7, base - 1e-7, 0.0, -0.5, -1e-7, 1.9999995):
        micros = _micros(ts)
        assert _EPOCH + timedelta(microseconds=micros) == datetime.fromtimestamp(ts, UTC), ts
        assert stamps(micros) == _utc(ts), ts


def test_the_worst_case_in_integers_is_the_decimal_sum_digit_for_digit() -> None:
    rates = (Decimal("0.0000011"), Decimal("0.00000440"), Decimal("0.000000000000000001"))
    exp, *ks = _integer_rates(*rates) or ()
    for tokens in ((1200, 800, 4000), (0, 0, 0), (1, 0, 0), (123_456_789, 987_654, 1)):
        with localcontext(MONEY_CONTEXT):
            want = sum((r * n for r, n in zip(rates, tokens, strict=True)), Decimal(0) * rates[0])
        got = Decimal(sum(k * n for k, n in zip(ks, tokens, strict=True))).scaleb(exp, MONEY_CONTEXT)
        assert (str(got), got.as_tuple()) == (str(want), want.as_tuple())
    assert _integer_rates(Decimal("1"), Decimal("NaN")) is None
    a, _ = admission()
    a.apply_state(state("0.10"))
    d = a.reserve(request_id="w-1", **REQ)
    card = a.price_card_at(NOW)
    pricing = card.pricing("openai", "o4-mini", False, "") if card is not None else None
    assert pricing is not None and d.reservation is not None
    p_in, p_out, p_re = pricing.base.filled[:3]
    with localcontext(MONEY_CONTEXT):
        want = p_in * 1000 + p_out * 500 + p_re * 1000  # as the client computed it before the integer shortcut
    assert (str(d.reservation.amount_usd), d.reservation.amount_usd.as_tuple()) == (str(want), want.as_tuple())


def test_money_text_without_an_exponent() -> None:
    for value, text in (("0.0077000", "0.0077"), ("1E-7", "0.0000001"), ("1E+2", "100"), ("-0.50", "-0.5"),
                        ("0E-9", "0"), ("12.000", "12"), ("7", "7")):
        assert _usd(Decimal(value)) == text


def test_reservations_and_settlements_move_what_remains_exactly() -> None:
    a, _ = admission(policy("p1", T - 3600, on_breach="deny"))
    a.apply_state(state("0.90"))

    def remaining() -> Decimal:
        (b,) = a._budgets("search_answer", "", T)
        return b.remaining_usd

    assert remaining() == Decimal("0.10")
    first = a.reserve(request_id="m-1", **REQ)
    second = a.reserve(request_id="m-2", **REQ)
    assert remaining() == Decimal("0.10") - 2 * WORST
    assert first.reservation is not None and second.reservation is not None
    first.reservation.settle(Decimal("0.0031"))
    assert remaining() == Decimal("0.10") - WORST - Decimal("0.0031")
    second.reservation.settle(Decimal("0.00000001"))
    assert remaining() == Decimal("0.10") - Decimal("0.0031") - Decimal("0.00000001")
    # a state computed settle_lag_s after both settlements counts them in spent: only the state then
    a.apply_state(state("0.90310001", computed=T + 31))
    assert remaining() == Decimal("0.09689999")
    # a new state replaces the old one's figures at the next decision
    a.apply_state(state("0.99", computed=T + 32))
    assert remaining() == Decimal("0.01")
    assert a.reserve(request_id="m-3", **REQ).admitted and not a.reserve(request_id="m-4", **REQ).admitted
