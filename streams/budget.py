"""Budget stage: spend to date per feature and tenant against their budgets, for alerts and gateway admission.

Pure functions, no Kafka or ClickHouse; the sink role runs them on a timer (streams.roles.budget), reading spend
from the rollups (exact, already deduplicated: the same numbers every report shows) and publishing:
- one state record per budget to the compacted topic llm.budget.state.v1 (key scope:id:period), the contract
  gateways read before dispatch (README, "Budgets");
- alert records (contract v1, kind "budget") to llm.cost.alerts.v1: once per threshold crossing per period, and
  a forecast alert while the end-of-period forecast is at or above 100 %.
Periods are UTC days and UTC calendar months.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tally.reference import Budget, BudgetSet

STATE_VERSION = 1
HUNDRED = Decimal(100)
# The forecast alert resolves once the forecast falls below this share of the budget (no flapping at 100 %).
FORECAST_RESOLVE_BELOW = Decimal("0.95")
# Above the highest threshold under 100 % (default 80 %) a gateway should degrade (cheaper model, shorter output).
DEGRADE_DEFAULT_PCT = 80

_ADJECTIVE = {"day": "daily", "month": "monthly"}
_COLUMN = {"feature": "feature_id", "tenant": "tenant_id"}

SpendKey = tuple[str, str, str]  # scope, id, period
RecentKey = tuple[str, str]  # scope, id


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the UTC day or calendar month holding `now`."""
    now = now.astimezone(UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def _rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _money(d: Decimal) -> str:
    return f"${d.quantize(Decimal('0.01')):,}"


def _pct(part: Decimal, whole: Decimal) -> Decimal:
    return (part * HUNDRED / whole).quantize(Decimal("0.01"))


@dataclass(frozen=True)
class Evaluation:
    """What one budget tick produced: state records (by budget key) and alert records, in publish order."""

    states: dict[str, dict[str, Any]]
    alerts: list[dict[str, Any]]


def recommendation(budget: Budget, spent: Decimal, forecast: Decimal) -> str:
    """The admission advice for a gateway deciding before dispatch: allow, degrade or deny.

    deny: the budget is spent. degrade: the forecast reaches the budget, or spend passed the highest threshold
    below 100 % (80 % by default). allow otherwise.
    """
    if spent >= budget.amount:
        return "deny"
    warn = max((t for t in budget.thresholds if t < 100), default=DEGRADE_DEFAULT_PCT)
    if forecast >= budget.amount or spent * HUNDRED >= budget.amount * warn:
        return "degrade"
    return "allow"


def evaluate(budgets: BudgetSet | None, spend: Mapping[SpendKey, Decimal], recent: Mapping[RecentKey, Decimal],
             window_s: float, now: datetime, previous: Mapping[str, Mapping[str, Any]],
             holds: Mapping[str, Mapping[str, Decimal]] | None = None) -> Evaluation:
    """Budget states and the alerts due now.

    `spend`: spend to date in each budget's current period; `recent`: spend in the last `window_s` seconds (the
    burn rate); `previous`: the last published state per budget key (from llm.budget.state.v1), which remembers
    the thresholds already alerted in its period, so a restart alerts nothing twice; `holds`: the gateways' open
    reservations per budget key and gateway (read_holds), published as reserved_usd and reserved_by_gateway so
    every gateway sees the others' holds within one state interval.
    """
    states: dict[str, dict[str, Any]] = {}
    alerts: list[dict[str, Any]] = []
    for budget in budgets.budgets if budgets is not None else ():
        start, end = period_bounds(budget.period, now)
        prev = previous.get(budget.key)
        same_period = prev is not None and prev.get("period_start") == _rfc3339(start)
        alerted = set(prev.get("alerted", ())) if prev is not None and same_period else set()
        forecast_alerted = bool(prev.get("forecast_alerted")) if prev is not None and same_period else False
        if prev is not None and not same_period:
            # A new period: what fired in the last one is over.
            for t in prev.get("alerted", ()):
                alerts.append(_alert(budget, prev, f"{t}", "resolved", "warning", now,
                                     f"{budget.scope} {budget.ident}: a new {budget.period} began"))
            if prev.get("forecast_alerted"):
                alerts.append(_alert(budget, prev, "forecast", "resolved", "warning", now,
                                     f"{budget.scope} {budget.ident}: a new {budget.period} began"))
        spent = spend.get((budget.scope, budget.ident, budget.period), Decimal(0))
        rate_per_s = recent.get((budget.scope, budget.ident), Decimal(0)) / Decimal(str(window_s))
        left_s = Decimal(str(max((end - now).total_seconds(), 0.0)))
        forecast = spent + rate_per_s * left_s
        state: dict[str, Any] = {
            "state_version": STATE_VERSION, "key": budget.key, "scope": budget.scope, "id": budget.ident,
            "period": budget.period, "period_start": _rfc3339(start), "period_end": _rfc3339(end),
            "budget_usd": budget.amount, "spent_usd": spent, "remaining_usd": max(budget.amount - spent, Decimal(0)),
            "used_pct": _pct(spent, budget.amount),
            "burn_rate_usd_per_hour": (rate_per_s * 3600).quantize(Decimal("0.000001")),
            "forecast_usd": forecast.quantize(Decimal("0.000001")), "forecast_pct": _pct(forecast, budget.amount),
            "recommendation": recommendation(budget, spent, forecast), "thresholds": list(budget.thresholds),
            "budget_version": budgets.version if budgets is not None else "", "computed_at": _rfc3339(now),
        }
        held = (holds or {}).get(budget.key, {})
        state["reserved_usd"] = sum(held.values(), Decimal(0))
        state["reserved_by_gateway"] = dict(sorted(held.items()))
        for t in budget.thresholds:
            if t not in alerted and spent * HUNDRED >= budget.amount * t:
                alerted.add(t)
                alerts.append(_alert(budget, state, f"{t}", "firing", "critical" if t >= 100 else "warning", now,
                                     f"{budget.scope} {budget.ident} has spent {_money(spent)} of its "
                                     f"{_money(budget.amount)} {_ADJECTIVE[budget.period]} budget "
                                     f"({state['used_pct']} %, threshold {t} %)"))
        if not forecast_alerted and forecast >= budget.amount > spent:
            forecast_alerted = True
            alerts.append(_alert(budget, state, "forecast", "firing", "warning", now,
                                 f"{budget.scope} {budget.ident} will spend about {_money(forecast)} this "
                                 f"{budget.period} at its current burn rate "
                                 f"({_money(state['burn_rate_usd_per_hour'])}/h), over its {_money(budget.amount)} "
                                 f"budget"))
        elif forecast_alerted and forecast < budget.amount * FORECAST_RESOLVE_BELOW:
            forecast_alerted = False
            alerts.append(_alert(budget, state, "forecast", "resolved", "warning", now,
                                 f"{budget.scope} {budget.ident}: the forecast is back under its budget"))
        state["alerted"] = sorted(alerted)
        state["forecast_alerted"] = forecast_alerted
        states[budget.key] = state
    return Evaluation(states, alerts)


def _alert(budget: Budget, state: Mapping[str, Any], what: str, firing: str, severity: str, now: datetime,
           explanation: str) -> dict[str, Any]:
    """An alert record (contract v1, README "Paging"); one incident per budget, period and threshold."""
    day = str(state["period_start"])[:10]
    return {
        "alert_version": 1, "incident_key": f"budget:{budget.key}:{day}:{what}", "kind": "budget",
        "state": firing, "feature_id": budget.ident if budget.scope == "feature" else "", "team_id": "",
        "signal": f"budget_{budget.period}_{what}" + ("" if what == "forecast" else "pct"), "severity": severity,
        "value": str(state.get("spent_usd", "")), "baseline": str(budget.amount),
        "score": int(Decimal(str(state.get("used_pct", 0)))), "dimension": f"{budget.scope} {budget.ident}",
        "explanation": explanation, "detected_at": _rfc3339(now),
    }


def read_spend(query: Callable[[str], Any], budgets: BudgetSet | None, now: datetime, window_s: float
               ) -> tuple[dict[SpendKey, Decimal], dict[RecentKey, Decimal]]:
    """Spend per budget, read exactly from the rollups.

    Returns spend to date in each budget's current period (rollup_hour) and spend in the last `window_s` seconds
    (rollup_minute). Both end at the wall clock `now` (bucket ≤ now): spend stamped ahead of it (a skewed gateway
    clock) counts once `now` reaches its bucket, never earlier, so it cannot inflate the burn rate for ever.
    `query(sql)` returns rows of (id, decimal string).
    """
    spend: dict[SpendKey, Decimal] = {}
    recent: dict[RecentKey, Decimal] = {}
    if budgets is None or not budgets.budgets:
        return spend, recent
    since = (now - timedelta(seconds=window_s)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    until = f"bucket <= toDateTime('{now.astimezone(UTC):%Y-%m-%d %H:%M:%S}', 'UTC')"
    for scope in sorted({b.scope for b in budgets.budgets}):
        col = _COLUMN[scope]
        for period in sorted({b.period for b in budgets.budgets if b.scope == scope}):
            start, end = (t.strftime("%Y-%m-%d %H:%M:%S") for t in period_bounds(period, now))
            for ident, total in query(
                    f"SELECT {col}, toString(sum(cost_total_usd)) FROM {{db}}.rollup_hour WHERE bucket >= "
                    f"toDateTime('{start}', 'UTC') AND bucket < toDateTime('{end}', 'UTC') AND {until} "
                    f"GROUP BY {col}"):
                spend[(scope, ident, period)] = Decimal(total)
        for ident, total in query(
                f"SELECT {col}, toString(sum(cost_total_usd)) FROM {{db}}.rollup_minute WHERE bucket >= "
                f"toDateTime('{since}', 'UTC') AND {until} GROUP BY {col}"):
            recent[(scope, ident)] = Decimal(total)
    return spend, recent


def read_holds(query: Callable[[str], Any], budgets: BudgetSet | None, now: datetime, ttl_s: float
               ) -> dict[str, dict[str, Decimal]]:
    """Open reservations per budget key and gateway, from the admission records in budget_decisions.

    A reservation adds its worst case (reserve_delta_usd > 0) and its settlement takes it back (< 0); what is left
    per budget and gateway is still held. Records older than `ttl_s` are left out: a gateway that died holding a
    reservation stops holding it then. `query(sql)` returns rows of (budget key, gateway id, decimal string).
    """
    out: dict[str, dict[str, Decimal]] = {}
    if budgets is None or not budgets.budgets:
        return out
    since = (now - timedelta(seconds=ttl_s)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    for key, gateway, held in query(
            "SELECT b, gateway_id, toString(sum(reserve_delta_usd)) FROM {db}.budget_decisions FINAL "
            f"ARRAY JOIN budgets AS b WHERE decided_at >= toDateTime64('{since}', 3, 'UTC') "
            "GROUP BY b, gateway_id HAVING sum(reserve_delta_usd) > 0"):
        out.setdefault(str(key), {})[str(gateway)] = Decimal(held)
    return out
