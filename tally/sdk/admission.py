"""The gateway's half of budgets: decide before a call leaves, reserve once per logical request, settle after.

A gateway embeds an `Admission` and asks it before dispatching a provider call:

    decision = admission.reserve(request_id="req-1", feature_id="search_answer", tenant_id="acme",
                                 provider="openai", model="o4-mini", input_tokens=1200, max_output_tokens=800)
    if not decision.admitted:
        return error_response(decision.payload())          # auditable: who, what, which budget, why
    provider, model = decision.provider, decision.model    # the policy may route to a fallback model
    guard = decision.reservation.stream_guard()            # while streaming: stop at the hard ceiling
    ...                                                    # retries and fallbacks draw from the same reservation
    decision.reservation.settle(cost_usd)                  # debit the real cost, release the rest

Answers come from memory in microseconds: the budget states (llm.budget.state.v1), the price cards and the
routing policy in effect are pushed in by `apply_state` / `apply_reference` (a follower thread, or the caller).

How a request is decided (the first that applies):
1. The routing policy's rule for the request (feature over customer tier over default): a reasoning model where
   reasoning is denied goes to the rule's fallback model, or is denied (`policy_reasoning_denied`).
2. The worst case is priced with the card in effect: input tokens known, output bounded by max_output_tokens,
   reasoning by the rule's max_reasoning_tokens (reasoning models only). A model no card prices is admitted with a
   zero reservation or denied (`unpriced_model`), as the policy says.
3. Every budget of the request (its feature's and its tenant's, per day and month) must hold it: remaining =
   budget − spent (the state) − this gateway's open reservations and the costs it settled since that state was
   computed. A state older than the policy's stale_state_s admits (`stale_state`, fail open) or denies (fail
   closed). A spent budget denies (`budget_exhausted`); a reservation larger than what remains falls back (when
   the rule says on_breach: fallback and the fallback fits) or denies (`reservation_exceeds_remaining`).
One reservation per logical request: a retry or a model swap of the same logical request draws from it.
Mid-stream: admit and debit, up to a hard ceiling of policy.stream_ceiling × the reservation (StreamGuard).

Every decision is a record (`Decision.payload`) that a `publish` callback receives, for llm.budget.decisions.v1:
reserve, deny and settle records keyed by budget, so finance can audit a denial without replaying traces.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any

import orjson

from tally.errors import ReferenceDataError
from tally.kafka_auth import KafkaAuth, as_auth
from tally.reference import (
    MONEY_CONTEXT,
    PolicyRule,
    PriceCard,
    ReferenceDoc,
    ReferenceSnapshot,
    ReferenceStore,
    RoutingPolicy,
)

ZERO = Decimal(0)
ADMIT, FALLBACK, DENY = "admit", "fallback", "deny"
# Reason codes: why a request was admitted, routed or denied.
WITHIN_BUDGET = "within_budget"
NO_BUDGET = "no_budget"
STALE_STATE = "stale_state"
BUDGET_EXHAUSTED = "budget_exhausted"
EXCEEDS_REMAINING = "reservation_exceeds_remaining"
HELD_BY_RESERVATIONS = "held_by_open_reservations"  # the spend leaves room, open reservations (maybe stale) do not
REASONING_DENIED = "policy_reasoning_denied"
REASONING_CEILING = "reasoning_ceiling"  # the session's or the feature's daily reasoning tokens would pass the policy's
REASONING_COUNTERS_MAX = 200_000  # session and feature-day counters a client keeps (the oldest go first)
UNPRICED_MODEL = "unpriced_model"
_NO_POLICY_RULE = PolicyRule("allow", 0, None, "deny")  # no routing policy in effect


@dataclass(frozen=True, slots=True)
class _State:
    """A budget state record, parsed once when it arrives (decisions read it thousands of times)."""

    budget_usd: Decimal
    spent_usd: Decimal
    computed_at: float
    computed_text: str
    period_end: float
    period_end_text: str
    others_reserved_usd: Decimal = ZERO  # the other gateways' open reservations, as the budget stage saw them


# what a decision record says of its request: (decided at in Unix µs, request, parent, feature, tenant, tier ids)
_Request = tuple[int, str, str, str, str, str]
# (budget key, its state, spent in the state's period, held (own holds, settled since, others' holds), remaining)
_Standing = tuple[str, _State, Decimal, Decimal, Decimal]


@dataclass(frozen=True, slots=True)
class Budgeted:
    """One budget's standing as this gateway sees it: the last state and its own holds since."""

    key: str
    budget_usd: Decimal
    spent_usd: Decimal
    held_usd: Decimal
    computed_at: float
    period_end: str
    computed_text: str = ""

    @property
    def remaining_usd(self) -> Decimal:
        return self.budget_usd - self.spent_usd - self.held_usd


@dataclass
class Reservation:
    """The hold of one logical request on its budgets; retries and fallbacks draw from it, settle releases it."""

    logical_id: str
    budgets: tuple[str, ...]
    amount_usd: Decimal
    ceiling_usd: Decimal
    output_usd_per_token: Decimal
    _admission: Admission = field(repr=False)
    attempts: int = 1
    used_usd: Decimal = ZERO
    settled: bool = False
    reasoning_tokens: int = 0  # the reasoning this request may use (its ceiling), counted until it settles
    reasoning_keys: tuple[tuple[str, str], ...] = ()  # the session and feature-day counters it counts in

    def attempt(self, provider: str | None = None, model: str | None = None) -> Reservation:
        """A retry or a fallback of the same logical request: it draws from this reservation, never a new one."""
        self.attempts += 1
        self._admission._record("attempt", self, {"provider": provider or "", "model": model or ""})
        return self

    def stream_guard(self) -> StreamGuard:
        """Counts a stream's output tokens; `add` says stop once the cost would pass the hard ceiling."""
        return StreamGuard(self)

    def settle(self, cost_usd: Decimal, reasoning_tokens: int | None = None) -> Decimal:
        """Debit the request's real cost (all its attempts); the rest of the hold is released. Returns the release.

        `reasoning_tokens`: what the request really reasoned (its session's and feature's daily ceilings count
        them; without it, what it reserved counts). Idempotent: a second settle of the same request changes nothing.
        """
        return self._admission._settle(self, Decimal(cost_usd), reasoning_tokens)


@dataclass
class StreamGuard:
    """Admit and debit mid-stream, with a hard ceiling: stop once the output would cost more than it allows."""

    reservation: Reservation
    tokens: int = 0

    def add(self, output_tokens: int) -> bool:
        """Count `output_tokens` more; False = stop the stream now (the hard ceiling is reached)."""
        self.tokens += output_tokens
        r = self.reservation
        return r.used_usd + self.tokens * r.output_usd_per_token <= r.ceiling_usd


@dataclass(frozen=True)
class Decision:
    """admit, fallback (admitted on another model) or deny, with its reason and the auditable record."""

    action: str
    reason: str
    provider: str
    model: str
    reservation: Reservation | None
    record: Mapping[str, Any]

    @property
    def admitted(self) -> bool:
        return self.action != DENY

    def payload(self) -> dict[str, Any]:
        """Return the record finance audits.

        Request, feature, tenant, model and tier, budget windows, reserve delta, reason, and the policy, card and
        state versions it was decided on.
        """
        return dict(self.record)


def _usd(value: Decimal) -> str:
    """Exact money as plain text without padding zeros (0.0077, not 0.0077000 or 7.7E-3)."""
    if not value:
        return "0"
    text = str(value)  # the same digits as format(value, "f") unless it has an exponent (1E-7, 1E+2)
    if "E" in text:
        text = format(value, "f")
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return "0" if text in ("", "-0") else text


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(ts: float) -> int:
    """Unix microseconds of `ts`, rounded as datetime.fromtimestamp rounds it (half to even), without a datetime.

    `_EPOCH + timedelta(microseconds=_micros(ts))` is `datetime.fromtimestamp(ts, UTC)`, so a decision compares and
    stamps times as integers and still agrees with the datetimes the reference data is dated by.
    """
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole, us = whole + 1.0, us - 1_000_000
    elif us < 0:
        whole, us = whole - 1.0, us + 1_000_000
    return int(whole) * 1_000_000 + us


def _as_micros(ts: datetime) -> int:
    return (ts - _EPOCH) // _MICROSECOND


def _integer_rates(*rates: Decimal) -> tuple[int, ...] | None:
    """(exponent, k1, k2, …) with each rate == k × 10**exponent, exponent the smallest of theirs; None if not finite.

    Σ rate × tokens is then Decimal(Σ k × tokens).scaleb(exponent): the exact sum Decimal arithmetic gives (an exact
    sum's exponent is its terms' smallest, a product's the rate's), digits and exponent alike, in integer arithmetic.
    """
    if not all(r.is_finite() for r in rates):
        return None
    exp = min(int(r.as_tuple().exponent) for r in rates)
    return (exp, *(int(r.scaleb(-exp, MONEY_CONTEXT)) for r in rates))


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # a stamp's tail, made once


class _Stamps:
    """`_utc` from Unix µs (`_micros`): the text of a second is made once, then only its milliseconds per call.

    Thread-safe without a lock: the cached second is one tuple, read and replaced whole.
    """

    __slots__ = ("_second",)

    def __init__(self) -> None:
        self._second: tuple[int, str] = (0, _utc(0)[:19])

    def __call__(self, micros: int) -> str:
        second, us = divmod(micros, 1_000_000)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, (_EPOCH + timedelta(seconds=second)).isoformat()[:19])
        return cached[1] + _MILLIS[us // 1000]


def _epoch(text: Any) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class Admission:
    """In-memory admission: reserve() and settle() from the budget states, cards and policy pushed into it.

    Thread-safe (one lock; a decision takes microseconds). `clock` gives "now" (Unix seconds) for staleness and
    the card and policy in effect; `publish` receives every decision record (e.g. a Publisher to
    llm.budget.decisions.v1); `gateway_id` names this gateway in them.
    """

    def __init__(self, gateway_id: str, publish: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time, share: Decimal = Decimal(1),
                 settle_lag_s: float = 30.0) -> None:
        self.gateway_id = gateway_id
        self._publish = publish
        # decision ids: unique per client (a random prefix) and cheap per decision (a counter)
        self._id_prefix = uuid.uuid4().hex + "-"
        self._id_count = itertools.count(1)  # next() on it is atomic: attempt() numbers its record off the lock
        self._clock = clock
        # This gateway may hold at most `share` of what a budget has left (N gateways, share 1/N: together they
        # cannot hold more than is left between two states); a settled cost stays debited here until a state
        # computed `settle_lag_s` after it (the pipeline's time to put it in the rollups) has arrived.
        self.share = Decimal(share)
        self.settle_lag_s = settle_lag_s
        self._lock = threading.Lock()
        self._refs = ReferenceStore()
        self._states: dict[str, _State] = {}  # budget key → its last state record, parsed
        self._open: dict[str, Reservation] = {}  # logical id → open reservation
        self._held: dict[str, Decimal] = {}  # budget key → open reservations' amounts
        # budget key → (when, cost) of what was settled since, as two lists: a settle allocates no object the
        # collector tracks (a (when, cost) tuple per settle was one more for each young-generation pass to visit)
        self._settled: dict[str, tuple[list[float], list[Decimal]]] = {}
        self._settled_usd: dict[str, Decimal] = {}  # budget key → their sum (kept, not summed per decision)
        # reasoning tokens used and held per session and per feature-day (the policy's ceilings), in this gateway
        self._reasoning: dict[tuple[str, str], int] = {}
        self._keys: dict[tuple[str, str], tuple[str, ...]] = {}
        # (snapshot, from, until, (policy, card)): what is in effect from ≤ t < until (Unix µs) in that snapshot
        self._effective: tuple[ReferenceSnapshot, int, int, tuple[RoutingPolicy | None, PriceCard | None]] | None = None
        self._stamp = _Stamps()  # decided_at texts
        self._scaled: dict[int, tuple[Any, tuple[int, ...] | None]] = {}  # id(Rates) → (it, its _integer_rates)

    # -- what it knows ---------------------------------------------------------------------------------------

    def apply_state(self, record: Mapping[str, Any]) -> None:
        """Take a llm.budget.state.v1 record (the latest per budget key wins).

        Settled costs the state has seen are dropped from this gateway's own debits.
        """
        key = str(record.get("key", ""))
        if not key:
            return
        seen = _epoch(record.get("computed_at"))
        by_gateway = record.get("reserved_by_gateway") or {}
        others = Decimal(str(record.get("reserved_usd") or 0)) - Decimal(str(by_gateway.get(self.gateway_id) or 0))
        parsed = _State(Decimal(str(record.get("budget_usd", 0))), Decimal(str(record.get("spent_usd", 0))), seen,
                        str(record.get("computed_at", "")), _epoch(record.get("period_end")),
                        str(record.get("period_end", "")), max(others, ZERO))
        with self._lock:
            self._states[key] = parsed
            times, costs = self._settled.get(key) or ((), ())
            left = [i for i, t in enumerate(times) if t + self.settle_lag_s > seen]
            self._settled[key] = ([times[i] for i in left], [costs[i] for i in left])
            self._settled_usd[key] = sum((costs[i] for i in left), ZERO)

    def apply_reference(self, doc: ReferenceDoc) -> None:
        """A price card, model alias table or routing policy version (as the reference topics carry them)."""
        with self._lock:
            self._refs.apply(doc)

    def apply_references(self, docs: Iterable[ReferenceDoc]) -> None:
        for doc in docs:
            self.apply_reference(doc)

    def price_card_at(self, ts: datetime) -> PriceCard | None:
        """The price card this client prices with at `ts` (to settle a request at its exact cost)."""
        return self._refs.snapshot().price_card_at(ts)

    # -- deciding --------------------------------------------------------------------------------------------

    def reserve(self, *, request_id: str, feature_id: str, provider: str, model: str, input_tokens: int,
                max_output_tokens: int, tenant_id: str = "", tier: str = "", parent_request_id: str = "",
                reasoning: bool | None = None, session_id: str = "") -> Decision:
        """Decide a request before dispatch; reserve its worst case once per logical request.

        `reasoning` overrides whether the call reasons (default: the policy's reasoning_models list says).
        A second reserve() of a logical request that holds a reservation (a retry or fallback arriving through
        reserve) draws from it: no second hold.
        """
        logical = parent_request_id or request_id
        now = self._clock()
        micros = _micros(now)
        with self._lock:
            held = self._open.get(logical)
            request = (micros, request_id, parent_request_id, feature_id, tenant_id, tier)
            if held is not None:
                held.attempts += 1
                return self._decision(ADMIT, "same_logical_request", provider, model, held, request, ZERO, (), None,
                                      None)
            policy, card = self._in_effect(micros)
            rule = policy.rule(feature_id, tier) if policy is not None else _NO_POLICY_RULE
            reasons: bool = reasoning if reasoning is not None else (
                policy is not None and (provider, model) in policy.reasoning_models)
            asked = self._worst_case(card, provider, model, input_tokens, max_output_tokens,
                                     (rule.max_reasoning_tokens or 0) if reasons else 0)
            asked_usd = asked[0] if asked is not None else ZERO  # the cost a denial or a fallback avoids
            capped = reasons and (rule.max_reasoning_tokens_per_session is not None
                                  or rule.max_reasoning_tokens_per_day is not None)
            reasoning_keys = self._reasoning_keys(rule, feature_id, session_id, now) if capped else ()
            over = capped and rule.reasoning != "deny" and self._over_ceiling(rule, reasoning_keys)
            if reasons and (rule.reasoning == "deny" or over):
                why = REASONING_CEILING if over else REASONING_DENIED
                if rule.fallback_model is None or (over and rule.on_breach != "fallback"):
                    return self._decision(DENY, why, provider, model, None, request, asked_usd, (), policy, card)
                provider, model = rule.fallback_model
                reasons = policy is not None and (provider, model) in policy.reasoning_models
                reasoning_keys = ()
                routed = why
            else:
                routed = ""
            worst = asked if not routed else self._worst_case(card, provider, model, input_tokens,
                                                              max_output_tokens,
                                                              (rule.max_reasoning_tokens or 0) if reasons else 0)
            if worst is None:
                if policy is not None and policy.on_unpriced == "deny":
                    return self._decision(DENY, UNPRICED_MODEL, provider, model, None, request, ZERO, (), policy, card)
                worst = (ZERO, ZERO)
            keys = self._budget_keys(feature_id, tenant_id)
            standing = self._standing(keys, now)
            if len(standing) != len(keys):  # a budget without a state does not count
                keys = tuple(s[0] for s in standing)
            stale_s = policy.stale_state_s if policy is not None else 60
            stale = exhausted = short_of = False
            for s in standing:  # one pass: stale, or live and then maybe spent (exhausted) or too short for it
                if now - s[1].computed_at > stale_s:
                    stale = True
                elif s[2] >= s[1].budget_usd:
                    exhausted = True
                elif worst[0] > s[4]:
                    short_of = True
            if stale and (policy is None or policy.on_stale_state == "closed"):
                return self._decision(DENY, STALE_STATE, provider, model, None, request, worst[0], keys, policy, card,
                                      standing)
            if exhausted:
                return self._decision(DENY, BUDGET_EXHAUSTED, provider, model, None, request, worst[0], keys, policy,
                                      card, standing)
            # the rare paths' lists, made only when a budget cannot hold the request
            live = [s for s in standing if now - s[1].computed_at <= stale_s] if short_of and stale else standing
            short = [s for s in live if worst[0] > s[4]] if short_of else []
            if short and rule.on_breach == "fallback" and rule.fallback_model is not None \
                    and rule.fallback_model != (provider, model):
                fp, fm = rule.fallback_model
                cheaper = self._worst_case(card, fp, fm, input_tokens, max_output_tokens, 0)
                if cheaper is not None and all(cheaper[0] <= s[4] for s in live):
                    provider, model, worst, short, routed = fp, fm, cheaper, [], EXCEEDS_REMAINING
            if short:
                # a genuine breach (the spend alone leaves too little) or a budget held by open reservations, which
                # may be stale (a gateway's holds that will be released): finance tells them apart by the reason
                holds_only = all(worst[0] <= s[1].budget_usd - s[2] for s in short)
                return self._decision(DENY, HELD_BY_RESERVATIONS if holds_only else EXCEEDS_REMAINING, provider, model,
                                      None, request, worst[0], keys, policy, card, standing)
            ceiling = worst[0] * (policy.stream_ceiling if policy is not None else Decimal(2))
            reservation = Reservation(logical, keys, worst[0], ceiling, worst[1], self,
                                      reasoning_tokens=(rule.max_reasoning_tokens or 0) if reasons else 0,
                                      reasoning_keys=reasoning_keys)
            for counter in reasoning_keys:  # held against the ceilings until it settles
                self._reasoning[counter] = self._reasoning.get(counter, 0) + reservation.reasoning_tokens
            while len(self._reasoning) > REASONING_COUNTERS_MAX:  # bounded: sessions come and go
                del self._reasoning[next(iter(self._reasoning))]
            self._open[logical] = reservation
            held_usd = self._held
            for key in keys:
                held_usd[key] = held_usd.get(key, ZERO) + worst[0]
            reason = routed or (STALE_STATE if stale else (WITHIN_BUDGET if standing else NO_BUDGET))
            return self._decision(FALLBACK if routed else ADMIT, reason, provider, model, reservation, request,
                                  worst[0], keys, policy, card, standing,
                                  avoided=max(asked_usd - worst[0], ZERO) if routed else ZERO)

    def _in_effect(self, micros: int) -> tuple[RoutingPolicy | None, PriceCard | None]:
        """The routing policy and price card in effect at `micros`, kept with the interval they hold for.

        The same pair answers until the time leaves [from, until) of both timelines or a reference document arrives
        (which swaps the store's snapshot), so a decision neither makes a datetime nor searches the timelines.
        """
        snapshot = self._refs.snapshot()
        cached = self._effective
        if cached is not None and cached[0] is snapshot and cached[1] <= micros < cached[2]:
            return cached[3]
        at = _EPOCH + timedelta(microseconds=micros)  # == datetime.fromtimestamp(now, UTC)
        policy, p_from, p_until = snapshot.routing_policies.span_at(at)
        card, c_from, c_until = snapshot.price_cards.span_at(at)
        pair = (policy, card)
        self._effective = (snapshot, _as_micros(max(p_from, c_from)), _as_micros(min(p_until, c_until)), pair)
        return pair

    def _worst_case(self, card: PriceCard | None, provider: str, model: str, input_tokens: int, output: int,
                    reasoning: int) -> tuple[Decimal, Decimal] | None:
        """(worst-case cost, output USD per token) from the card in effect, or None when no card prices the model."""
        if card is None:
            return None
        pricing = card.pricing(provider, model, False, "")
        if pricing is None:
            return None
        rates = pricing.long if (pricing.above_input_tokens is not None and pricing.long is not None
                                 and input_tokens > pricing.above_input_tokens) else pricing.base
        p_in, p_out, p_re = rates.filled[0], rates.filled[1], rates.filled[2]
        scaled = self._scaled.get(id(rates))
        if scaled is None or scaled[0] is not rates:
            scaled = (rates, _integer_rates(p_in, p_out, p_re))
            if len(self._scaled) >= REASONING_COUNTERS_MAX:  # bounded: a rates object per card, model and tier
                self._scaled.clear()
            self._scaled[id(rates)] = scaled
        ints = scaled[1]
        if ints is not None and type(input_tokens) is int and type(output) is int and type(reasoning) is int:
            exp, k_in, k_out, k_re = ints
            # the same Decimal as the sum below (exponent the smallest of the rates'), in integer arithmetic
            return Decimal(k_in * input_tokens + k_out * output + k_re * reasoning).scaleb(exp, MONEY_CONTEXT), p_out
        with localcontext(MONEY_CONTEXT):
            return p_in * input_tokens + p_out * output + p_re * reasoning, p_out

    def _budget_keys(self, feature_id: str, tenant_id: str) -> tuple[str, ...]:
        """The budget keys a request can count against (its feature's and tenant's, day and month), memoized."""
        found = self._keys.get((feature_id, tenant_id))
        if found is None:
            found = tuple(f"{scope}:{ident}:{period}" for scope, ident in (("feature", feature_id),
                                                                           ("tenant", tenant_id))
                          if ident for period in ("day", "month"))
            if len(self._keys) < REASONING_COUNTERS_MAX:  # bounded: ids come from gateways
                self._keys[(feature_id, tenant_id)] = found
        return found

    def _budgets(self, feature_id: str, tenant_id: str, now: float) -> list[Budgeted]:
        """The standing of each budget of a request that has a state (as Budgeted, for callers and tests)."""
        return [Budgeted(key, state.budget_usd, spent, held, state.computed_at, state.period_end_text,
                         state.computed_text)
                for key, state, spent, held, _ in self._standing(self._budget_keys(feature_id, tenant_id), now)]

    def _standing(self, keys: tuple[str, ...], now: float) -> list[_Standing]:
        """(key, state, spent, held, remaining) of each budget that has a state; held counts the others' holds.

        Plain tuples: a decision reads them a few times and an admission publishes none of them, so no object is
        made per budget (that construction was most of a decision's cost).
        """
        out: list[_Standing] = []
        states, holds, settled = self._states, self._held, self._settled_usd
        share = self.share
        partial = share < 1
        for key in keys:
            state = states.get(key)
            if state is None:
                continue
            # a new period began since this state: nothing spent in it yet
            spent = ZERO if state.period_end and now >= state.period_end else state.spent_usd
            mine = holds.get(key, ZERO) + settled.get(key, ZERO)
            if partial:  # this gateway's part of what is left; the rest is the others' headroom
                left = state.budget_usd - spent - state.others_reserved_usd
                mine += (1 - share) * max(left, ZERO)
            held = mine + state.others_reserved_usd
            out.append((key, state, spent, held, state.budget_usd - spent - held))
        return out

    def _reasoning_keys(self, rule: PolicyRule, feature_id: str, session_id: str,
                        now: float) -> tuple[tuple[str, str], ...]:
        """The reasoning counters a request counts in: its session's and its feature's UTC day, where the rule caps."""
        keys = []
        if rule.max_reasoning_tokens_per_session is not None and session_id:
            keys.append(("session", session_id))
        if rule.max_reasoning_tokens_per_day is not None:
            keys.append(("day", f"{feature_id}@{datetime.fromtimestamp(now, UTC).date().isoformat()}"))
        return tuple(keys)

    def _over_ceiling(self, rule: PolicyRule, keys: tuple[tuple[str, str], ...]) -> bool:
        """Whether this request's reasoning (its per-request ceiling) would pass a session's or a day's ceiling."""
        wanted = rule.max_reasoning_tokens or 0
        for kind, key in keys:
            limit = rule.max_reasoning_tokens_per_session if kind == "session" else rule.max_reasoning_tokens_per_day
            if limit is not None and self._reasoning.get((kind, key), 0) + wanted > limit:
                return True
        return False

    def _settle(self, reservation: Reservation, cost: Decimal, reasoning_tokens: int | None = None) -> Decimal:
        now = self._clock()
        with self._lock:
            if reservation.settled:
                return ZERO
            if reasoning_tokens is not None:  # the real reasoning replaces what was held for it
                for counter in reservation.reasoning_keys:
                    self._reasoning[counter] = max(0, self._reasoning.get(counter, 0) - reservation.reasoning_tokens
                                                   + reasoning_tokens)  # (an evicted counter starts again at 0)
            reservation.settled = True
            reservation.used_usd = cost
            self._open.pop(reservation.logical_id, None)
            for key in reservation.budgets:
                self._held[key] = self._held.get(key, ZERO) - reservation.amount_usd
                # debited here until a state computed after this moment counts it in spent_usd
                since = self._settled.get(key)
                if since is None:
                    since = self._settled[key] = ([], [])
                since[0].append(now)
                since[1].append(cost)
                self._settled_usd[key] = self._settled_usd.get(key, ZERO) + cost
            released = max(reservation.amount_usd - cost, ZERO)
            self._record("settle", reservation, {"cost_usd": _usd(cost), "released_usd": _usd(released),
                                                 "over_reservation": cost > reservation.amount_usd})
            return released

    # -- records ---------------------------------------------------------------------------------------------

    def _decision(self, action: str, reason: str, provider: str, model: str, reservation: Reservation | None,
                  request: _Request, reserve: Decimal, budgets: tuple[str, ...], policy: RoutingPolicy | None,
                  card: PriceCard | None, standing: list[_Standing] | None = None,
                  avoided: Decimal | None = None) -> Decision:
        micros, request_id, parent_request_id, feature_id, tenant_id, tier = request
        # the budget windows as the decision saw them: what a denial or a fallback is audited by
        windows = {key: {"remaining_usd": _usd(remaining), "period_end": state.period_end_text,
                         "state_computed_at": state.computed_text}
                   for key, state, _, _, remaining in standing or ()} if action != ADMIT else {}
        requested = _usd(reserve)
        record = {
            "kind": "admission", "decision_id": f"{self._id_prefix}{next(self._id_count)}",
            "decided_at": self._stamp(micros),
            "gateway_id": self.gateway_id, "action": action, "reason": reason,
            "request_id": request_id, "parent_request_id": parent_request_id,
            "logical_request_id": parent_request_id or request_id,
            "feature_id": feature_id, "tenant_id": tenant_id, "tier": tier,
            "provider": provider, "model": model,
            "budgets": list(budgets), "budget_windows": windows,
            "reserve_delta_usd": requested if action != DENY else "0",
            "requested_usd": requested,
            # what the decision kept from being spent at worst: a denial's whole request, a fallback's difference
            "avoided_usd": requested if action == DENY else _usd(avoided or ZERO),
            "policy_version": policy.version if policy is not None else "",
            "price_card_version": card.version if card is not None else "",
        }
        if self._publish is not None:
            self._publish(record)
        return Decision(action, reason, provider, model, reservation, record)

    def _record(self, action: str, reservation: Reservation, extra: Mapping[str, Any]) -> None:
        if self._publish is None:
            return
        self._publish({"kind": "admission", "decision_id": f"{self._id_prefix}{next(self._id_count)}",
                       "decided_at": self._stamp(_micros(self._clock())),
                       "gateway_id": self.gateway_id, "action": action,
                       "logical_request_id": reservation.logical_id, "budgets": list(reservation.budgets),
                       "reserve_delta_usd": _usd(-reservation.amount_usd if action == "settle" else ZERO),
                       **extra})

    @property
    def open_reservations(self) -> int:
        with self._lock:
            return len(self._open)


# KafkaDecisions serves librdkafka's delivery reports once every this many records (flush serves the rest).
POLL_EVERY = 64


class KafkaDecisions:
    """Publishes decision records to llm.budget.decisions.v1 through an idempotent producer.

    Keyed by the request's first budget, so one budget's decisions stay ordered. Pass `publish` as Admission's
    callback; `flush` before exit. Delivery reports are served every POLL_EVERY records and by `flush`, so a delivery
    error shows in `errors` after one of those.
    """

    def __init__(self, bootstrap: str | KafkaAuth, topic: str,
                 producer_config: Mapping[str, Any] | None = None) -> None:
        """`producer_config`: librdkafka settings over the defaults (linger.ms, log_level, …), for tuning."""
        from confluent_kafka import Producer

        self.topic = topic
        self._producer = Producer({**as_auth(bootstrap).rdkafka(), "enable.idempotence": True, "acks": "all",
                                   "linger.ms": 20, "compression.type": "lz4", **(producer_config or {})})
        self.errors: list[str] = []
        self._unpolled = 0

    def publish(self, record: dict[str, Any]) -> None:
        budgets = record.get("budgets") or [""]
        key = str(budgets[0] or record.get("logical_request_id", "")).encode()
        self._producer.produce(self.topic, key=key, value=orjson.dumps(record), on_delivery=self._delivered)
        self._unpolled += 1
        if self._unpolled >= POLL_EVERY:  # serve delivery reports now and then, not on every decision's path
            self._unpolled = 0
            self._producer.poll(0)

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def flush(self, timeout_s: float = 30.0) -> int:
        """Deliver what is queued; returns the records still undelivered (0 when all are)."""
        return int(self._producer.flush(timeout_s))


class Follower:
    """Keeps an Admission current from Kafka, on a daemon thread.

    Reads the budget states, price cards (with alias tables) and routing policies from the beginning, then follows
    them. `ready` is set once each topic was read to its end at start.
    """

    def __init__(self, admission: Admission, bootstrap: str | KafkaAuth, state_topic: str,
                 reference_topics: Iterable[str]) -> None:
        self.admission = admission
        self.auth = as_auth(bootstrap)
        self.state_topic = state_topic
        self.reference_topics = tuple(reference_topics)
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tally-admission-follower", daemon=True)

    def start(self, timeout_s: float = 30.0) -> Follower:
        """Start following; wait until the topics were read to their ends (TallyError if that takes too long)."""
        from tally.errors import TallyError

        self._thread.start()
        if not self.ready.wait(timeout_s):
            raise TallyError(f"admission: budget state and reference data not read within {timeout_s:.0f} s"
                             + (f": {self.failure}" if self.failure else ""))
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from tally.kafka_auth import metadata, watched

        conf, errors = watched(self.auth, {"group.id": f"tally-admission-{uuid.uuid4().hex[:8]}",
                                           "enable.auto.commit": False, "enable.partition.eof": True})
        consumer = Consumer(conf)
        try:
            topics = (self.state_topic, *self.reference_topics)
            assigned = []
            for topic in topics:
                meta = metadata(consumer, errors, self.auth, 30.0, topic).topics.get(topic)
                if meta is not None and meta.error is None:
                    assigned += [TopicPartition(topic, p, 0) for p in meta.partitions]
            consumer.assign(assigned)
            pending = {(tp.topic, tp.partition) for tp in assigned
                       if consumer.get_watermark_offsets(tp, timeout=30)[1] > 0}
            if not pending:
                self.ready.set()
            while not self._stop.is_set():
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() == -191:  # _PARTITION_EOF: this partition is read to its end
                        pending.discard((msg.topic(), msg.partition()))
                        if not pending:
                            self.ready.set()
                    continue
                self._apply(str(msg.topic()), msg.value())
        except BaseException as exc:  # the gateway's thread must learn why its admissions went stale
            self.failure = exc
        finally:
            consumer.close()

    def _apply(self, topic: str, value: bytes | None) -> None:
        if value is None:
            return  # a tombstone: the state or version stays as last known (a budget removed ends with its period)
        if topic == self.state_topic:
            record = orjson.loads(value)
            if isinstance(record, dict):
                self.admission.apply_state(record)
            return
        try:
            self.admission.apply_reference(ReferenceDoc.from_json(value))
        except ReferenceDataError:
            return  # the workers dead-end the same invalid version; a gateway keeps deciding on the valid ones
