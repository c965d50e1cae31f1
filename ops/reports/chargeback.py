"""Chargeback and showback per team: direct cost by class, reasoning, waste, week over week, shared costs."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from fractions import Fraction
from math import floor
from pathlib import Path
from typing import Any, Literal

import yaml

from ops.reports.output import Chart, Report, Table, decimal_text, display_decimal
from tally.errors import ReportError
from tally.reference import (
    _LOADER,
    MONEY_CONTEXT,
    _decimal,
    _describe,
    _keys,
    _Problems,
    _string,
    _to_data,
)

Kind = Literal["chargeback", "showback"]
QueryFn = Callable[[str], tuple[Sequence[str], Sequence[Sequence[Any]]]]

UNATTRIBUTED = "(unattributed)"   # label of the rows enrich leaves without a team (team_id '', status unattributed)
UNALLOCATED = "(unallocated)"     # recipient of a shared cost whose basis is empty in its period
# Shared costs are allocated to the cent: item amounts have at most 2 decimal places and the allocated amounts of an
# item sum exactly to it (largest remainder).
ALLOCATION_QUANTUM = Decimal("0.01")
RULES = {
    "proportional_to_requests": "proportional to logical requests",
    "proportional_to_tokens": "proportional to tokens (all six classes)",
    "fixed_split": "fixed split",
}
CLASSES: tuple[tuple[str, str], ...] = (
    ("input", "cost_input_usd"), ("output", "cost_output_usd"), ("reasoning", "cost_reasoning_usd"),
    ("cache_read", "cost_cache_read_usd"), ("cache_write", "cost_cache_write_usd"), ("tools", "cost_tools_usd"),
)
TOKEN_COLUMNS = ("input_tokens", "output_tokens", "reasoning_tokens", "cache_read_tokens", "cache_write_tokens",
                 "cache_write_1h_tokens")
LOOKBACK = timedelta(days=7)     # before the period: the day before a first-day jump, earlier deploy versions
DEFAULT_JUMP_PP = Decimal(5)     # a day-over-day change of the reasoning share at least this big is a jump
_PCT = Decimal("0.01")
_RATIO = Context(prec=60, rounding=ROUND_HALF_EVEN)
_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")
ZERO = Decimal(0)


# ---------------------------------------------------------------- the period
@dataclass(frozen=True)
class Period:
    """A report period in UTC: whole days, `start` inclusive, `end` exclusive."""

    start: date
    end: date
    label: str

    @property
    def start_dt(self) -> datetime:
        return datetime.combine(self.start, time(), UTC)

    @property
    def end_dt(self) -> datetime:
        return datetime.combine(self.end, time(), UTC)

    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days)]

    def contains_month(self, month: str) -> bool:
        first = month_start(month)
        return self.start <= first and next_month(first) <= self.end


def month_start(month: str) -> date:
    """The first day of a `YYYY-MM` month; ReportError when it is not one."""
    m = _MONTH_RE.match(month)
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise ReportError(f"{month!r} is not a month: write YYYY-MM, e.g. 2026-11")
    return date(int(m.group(1)), int(m.group(2)), 1)


def next_month(first: date) -> date:
    """The first day of the month after the one `first` begins."""
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def parse_period(period: str | None, start: date | None, last: date | None, today: date) -> Period:
    """`--period YYYY-MM`, or `--from`/`--to` dates (both inclusive), or else the current UTC month.

    Raises ReportError when both forms are given, when only one of from/to is, or when from is after to.
    """
    if period is not None and (start is not None or last is not None):
        raise ReportError("give either --period or --from/--to, not both")
    if (start is None) != (last is None):
        raise ReportError("--from and --to go together (both dates inclusive)")
    if start is not None and last is not None:
        if start > last:
            raise ReportError(f"--from {start} is after --to {last}")
        return Period(start, last + timedelta(days=1), f"{start.isoformat()} to {last.isoformat()}")
    first = month_start(period) if period is not None else today.replace(day=1)
    return Period(first, next_month(first), f"{first:%Y-%m}")


# ---------------------------------------------------------------- shared costs: the rules file
@dataclass(frozen=True)
class SharedCost:
    """One shared cost item of a rules file: an exact USD amount for a month, and the rule that allocates it."""

    name: str
    amount_usd: Decimal
    period: str
    rule: str
    split: tuple[tuple[str, Decimal], ...] = ()
    description: str = ""


def parse_rules(text: str, origin: str) -> list[SharedCost]:
    """Validate a shared-costs rules file (shape: docs/chargeback.md); ReportError lists every problem with its line.

    Amounts and percentages are quoted decimal strings (YAML numbers are floats); amounts have at most two decimal
    places; a fixed split's percentages sum to exactly 100; names are unique per period.
    """
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ReportError(f"{origin}{f':{mark.line + 1}' if mark else ''}: YAML syntax error: "
                          f"{exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ReportError(f"{origin}: YAML error: {exc}") from None
    if node is None:
        raise ReportError(f"{origin}: the rules file is empty; it needs a `shared_costs:` list")
    lines: dict[tuple[str | int, ...], int] = {(): node.start_mark.line + 1}
    p = _Problems(origin, lines)
    data = _to_data(node, (), lines, p)
    items: list[SharedCost] = []
    if not isinstance(data, dict):
        p.add((), f"must be a mapping with a `shared_costs:` list, got {_describe(data)}")
    else:
        _keys(p, (), data, ("shared_costs",), ("version",))
        if "version" in data and data["version"] != 1:
            p.add(("version",), f"only version 1 is known, got {_describe(data['version'])}")
        raw = data.get("shared_costs")
        if "shared_costs" in data and (not isinstance(raw, list) or not raw):
            p.add(("shared_costs",), f"must be a non-empty list of shared cost items, got {_describe(raw)}")
        elif isinstance(raw, list):
            items = [it for i, entry in enumerate(raw) if (it := _shared_cost(p, ("shared_costs", i), entry))]
            seen: set[tuple[str, str]] = set()
            for i, it in enumerate(items):
                if (it.name, it.period) in seen:
                    p.add(("shared_costs", i, "name"), f"{it.name!r} appears twice for {it.period}")
                seen.add((it.name, it.period))
    if p.items:
        raise ReportError("invalid shared-costs rules:\n" + "\n".join(f"  - {x}" for x in p.items))
    return items


def _shared_cost(p: _Problems, path: tuple[str | int, ...], entry: Any) -> SharedCost | None:
    if not isinstance(entry, dict):
        p.add(path, f"must be a mapping (name, amount_usd, period, rule), got {_describe(entry)}")
        return None
    before = len(p.items)
    _keys(p, path, entry, ("name", "amount_usd", "period", "rule"), ("split", "description"))
    name = _string(p, path + ("name",), entry["name"]) if "name" in entry else None
    amount = _decimal(p, path + ("amount_usd",), entry.get("amount_usd", ""),
                      (2, Decimal("1000000000000"), "amount_usd")) if "amount_usd" in entry else None
    period = entry.get("period")
    if "period" in entry:
        if not isinstance(period, str) or not _MONTH_RE.match(period) or not 1 <= int(period[5:]) <= 12:
            p.add(path + ("period",), f"must be a month written YYYY-MM such as \"2026-11\", got {_describe(period)}")
    rule = entry.get("rule")
    if "rule" in entry and rule not in RULES:
        p.add(path + ("rule",), f"unknown rule {_describe(rule)}; rules: {', '.join(RULES)}")
    split: list[tuple[str, Decimal]] = []
    raw_split = entry.get("split")
    if rule == "fixed_split":
        if not isinstance(raw_split, dict) or not raw_split:
            p.add(path + ("split",), "a fixed_split needs `split:`, a mapping of team → percentage (quoted), "
                                     f"got {_describe(raw_split)}")
        else:
            for team, pct in raw_split.items():
                value = _decimal(p, path + ("split", team), pct, (6, Decimal(100), "percentage"))
                if value is not None and value == 0:
                    p.add(path + ("split", team), "a percentage of 0 allocates nothing: remove the team")
                elif value is not None:
                    split.append((team, value))
            total = sum((v for _, v in split), ZERO)
            if len(split) == len(raw_split) and total != 100:
                p.add(path + ("split",), f"percentages sum to {total}, not 100")
    elif raw_split is not None:
        p.add(path + ("split",), f"`split` belongs to rule fixed_split only (this item's rule is {rule})")
    description = entry.get("description", "")
    if not isinstance(description, str):
        p.add(path + ("description",), f"must be a string, got {_describe(description)}")
    if len(p.items) > before or name is None or amount is None:
        return None
    return SharedCost(name, amount, str(period), str(rule), tuple(split), str(description))


def load_rules(path: Path) -> list[SharedCost]:
    """Read and validate a rules file; ReportError when it cannot be read or is invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot read the rules file {path}: {exc.strerror or exc}") from None
    return parse_rules(text, str(path))


def allocate(amount: Decimal, weights: Mapping[str, int | Decimal],
             quantum: Decimal = ALLOCATION_QUANTUM) -> dict[str, Decimal]:
    """Split `amount` in proportion to `weights`, in whole quanta, summing exactly to `amount` (largest remainder).

    Each key gets the floor of its exact quota (in quanta); the quanta left over go one each to the largest
    fractional remainders, ties to the smaller key. `amount` must be a multiple of `quantum` (a power of ten);
    weights are ≥ 0 with a positive sum. Every key of `weights` is in the result (0 when its weight is 0).
    """
    exponent = quantum.as_tuple().exponent
    if quantum.as_tuple().digits != (1,) or not isinstance(exponent, int):
        raise ValueError(f"quantum {quantum} is not a power of ten")
    units_f = Fraction(amount) / Fraction(quantum)
    if units_f.denominator != 1:
        raise ValueError(f"{amount} is not a multiple of {quantum}")
    if any(w < 0 for w in weights.values()):
        raise ValueError("weights must not be negative")
    total = sum((Fraction(w) for w in weights.values()), Fraction(0))
    if total <= 0:
        raise ValueError("the weights sum to zero: nothing to allocate by")
    units = abs(units_f.numerator)
    quotas = {k: units * Fraction(w) / total for k, w in weights.items()}
    whole = {k: floor(q) for k, q in quotas.items()}
    left = units - sum(whole.values())
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - whole[k]), k))[:left]:
        whole[k] += 1
    sign = "-" if units_f < 0 else ""
    return {k: Decimal(f"{sign}{n}E{exponent}") if n else ZERO for k, n in whole.items()}


# ---------------------------------------------------------------- queries
# Which table each figure comes from:
# - cost per class, tokens, daily reasoning share: rollup_day (exact Decimal sums, filled in the same insert as
#   usage_events, one row per day and key: the cheapest exact source, and ten years of retention).
# - week over week: rollup_hour (the same exact sums; hourly buckets make two equal 7-day windows ending at the
#   current hour, where days would compare a partial today with a whole day).
# - requests, retry waste, the requests basis of an allocation: logical_requests with sum(sign) (each request once,
#   at its latest revision, dated by its first attempt; waste is a property of a request, not of an attempt).
# - reasoning tokens per request p50/p90 per endpoint: logical_requests_current (row level, each request once;
#   exact quantiles: the rollups' t-digest states have no endpoint and weigh revised requests twice).
# - unattributed cost by reason, deploy_version first seen, cost centers: usage_events_current (the only table with
#   those columns per attempt; usage_events without the rows superseded by a later row of the same call).
# Money columns are read with toString (exact through the worker's JSON API too) and summed or divided in Python:
# ClickHouse's division of two Decimal(38, 18) sums overflows silently.
def _dt(d: date | datetime) -> str:
    if not isinstance(d, datetime):
        d = datetime.combine(d, time(), UTC)
    return f"toDateTime('{d:%Y-%m-%d %H:%M:%S}', 'UTC')"


def _dt64(d: date | datetime) -> str:
    if not isinstance(d, datetime):
        d = datetime.combine(d, time(), UTC)
    return f"toDateTime64('{d:%Y-%m-%d %H:%M:%S}', 3, 'UTC')"


def wow_end(period: Period, now: datetime) -> datetime:
    """End of the week-over-week windows: the period's end, or the end of the current hour if that is earlier."""
    hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return min(period.end_dt, hour)


def build_queries(period: Period, wow_to: datetime) -> dict[str, str]:
    """The report's read-only SQL by name; `{db}` is the database (Store.render substitutes it)."""
    lookback = period.start_dt - LOOKBACK
    money = ", ".join(f"toString(sum({col})) AS {name}_usd" for name, col in CLASSES)
    tokens = " + ".join(f"sum({c})" for c in TOKEN_COLUMNS)
    in_period_ts = f"ts >= {_dt64(period.start)} AND ts < {_dt64(period.end)}"
    in_period_first = f"first_ts >= {_dt64(period.start)} AND first_ts < {_dt64(period.end)}"
    w0, w1 = wow_to - 2 * LOOKBACK, wow_to - LOOKBACK
    return {
        "daily": (
            f"SELECT team_id, toString(toDate(bucket)) AS day, {money}, toString(sum(cost_total_usd)) AS total_usd, "
            f"toUInt64({tokens}) AS tokens FROM {{db}}.rollup_day "
            f"WHERE bucket >= {_dt(lookback)} AND bucket < {_dt(period.end)} GROUP BY team_id, day "
            "ORDER BY team_id, day"),
        "weekly": (
            f"SELECT team_id, toString(sumIf(cost_total_usd, bucket >= {_dt(w1)})) AS last_7d_usd, "
            f"toString(sumIf(cost_total_usd, bucket < {_dt(w1)})) AS prior_7d_usd FROM {{db}}.rollup_hour "
            f"WHERE bucket >= {_dt(w0)} AND bucket < {_dt(wow_to)} GROUP BY team_id ORDER BY team_id"),
        "requests": (
            "SELECT team_id, toString(toStartOfMonth(first_ts)) AS month, toInt64(sum(sign)) AS requests, "
            "toString(sum(sign * cost_total_usd)) AS cost_usd, toString(sum(sign * cost_wasted_usd)) AS wasted_usd "
            f"FROM {{db}}.logical_requests WHERE {in_period_first} GROUP BY team_id, month ORDER BY team_id, month"),
        "endpoints": (
            "SELECT team_id, if(endpoint != '', endpoint, feature_id) AS endpoint_key, toInt64(count()) AS requests, "
            "toInt64(countIf(reasoning_tokens > 0)) AS reasoning_requests, "
            "toUInt64(sum(reasoning_tokens)) AS reasoning_sum, toUInt64(sum(output_tokens)) AS output_sum, "
            "toUInt64(quantileExactIf(0.5)(reasoning_tokens, reasoning_tokens > 0)) AS p50, "
            "toUInt64(quantileExactIf(0.9)(reasoning_tokens, reasoning_tokens > 0)) AS p90, "
            "toString(sum(cost_reasoning_usd)) AS reasoning_usd "
            f"FROM {{db}}.logical_requests_current WHERE {in_period_first} GROUP BY team_id, endpoint_key "
            "HAVING reasoning_sum > 0 ORDER BY team_id, endpoint_key"),
        "unattributed": (
            "SELECT attribution_reason, feature_id, toInt64(count()) AS attempts, "
            "toString(sum(cost_total_usd)) AS cost_usd "
            f"FROM {{db}}.usage_events_current WHERE {in_period_ts} AND attribution_status = 'unattributed' "
            "GROUP BY attribution_reason, feature_id ORDER BY attribution_reason, feature_id"),
        "deploys": (
            "SELECT team_id, if(endpoint != '', endpoint, feature_id) AS endpoint_key, deploy_version, "
            "toString(min(ts)) AS first_seen FROM {db}.usage_events_current "
            f"WHERE ts >= {_dt64(lookback)} AND ts < {_dt64(period.end)} AND deploy_version != '' "
            "GROUP BY team_id, endpoint_key, deploy_version ORDER BY team_id, endpoint_key, first_seen"),
        "admission": (
            "SELECT o.team_id, d.feature_id, d.action, d.reason, toInt64(count()) AS decisions, "
            "toString(sum(d.avoided_usd)) AS avoided_usd FROM {db}.budget_decisions AS d FINAL "
            "LEFT JOIN (SELECT feature_id, any(team_id) AS team_id FROM {db}.usage_events_current "
            f"WHERE {in_period_ts} GROUP BY feature_id) AS o ON d.feature_id = o.feature_id "
            f"WHERE d.decided_at >= {_dt64(period.start)} AND d.decided_at < {_dt64(period.end)} "
            "AND d.action IN ('deny', 'fallback') GROUP BY o.team_id, d.feature_id, d.action, d.reason "
            "ORDER BY o.team_id, d.feature_id, d.action, d.reason"),
        "cost_centers": (
            "SELECT team_id, arrayStringConcat(arraySort(groupUniqArray(cost_center)), ', ') AS cost_centers "
            f"FROM {{db}}.usage_events_current WHERE {in_period_ts} AND team_id != '' "
            "GROUP BY team_id ORDER BY team_id"),
    }


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class DayCost:
    """One team's costs on one day (rollup_day)."""

    team: str
    day: date
    classes: tuple[Decimal, ...]   # in CLASSES order
    total: Decimal
    tokens: int


@dataclass(frozen=True)
class TeamRequests:
    """One team's logical requests in one month of the period (logical_requests, sum(sign))."""

    team: str
    month: str
    requests: int
    cost: Decimal
    wasted: Decimal


@dataclass(frozen=True)
class EndpointReasoning:
    """Reasoning of one endpoint's logical requests (p50/p90 over the requests that generated reasoning tokens)."""

    team: str
    endpoint: str
    requests: int
    reasoning_requests: int
    reasoning_tokens: int
    output_tokens: int
    p50: int
    p90: int
    reasoning_usd: Decimal


@dataclass(frozen=True)
class Deploy:
    """The first time a deploy_version was seen on an endpoint (usage_events, period plus the week before)."""

    team: str
    endpoint: str
    version: str
    first_seen: datetime


@dataclass(frozen=True)
class ChargebackData:
    """Every query result the report is built from, parsed into exact types."""

    daily: list[DayCost]
    weekly: dict[str, tuple[Decimal, Decimal]]           # team → (last 7 days, the 7 days before)
    requests: list[TeamRequests]
    endpoints: list[EndpointReasoning]
    unattributed: list[tuple[str, str, int, Decimal]]     # reason, feature_id, attempts, cost
    deploys: list[Deploy]
    cost_centers: dict[str, str]
    wow_to: datetime
    extra_notes: tuple[str, ...] = field(default=())
    # team, feature, action, reason, decisions, cost avoided: the gateways' denials and fallbacks (budget_decisions)
    admission: list[tuple[str, str, str, str, int, Decimal]] = field(default_factory=list)


def _team(raw: Any) -> str:
    return str(raw) or UNATTRIBUTED


def _ts(raw: Any) -> datetime:
    return datetime.fromisoformat(str(raw).replace("T", " ")).replace(tzinfo=UTC)


def parse_results(results: Mapping[str, Sequence[Sequence[Any]]], wow_to: datetime) -> ChargebackData:
    """Turn the rows of each query of build_queries (same names, same column order) into ChargebackData."""
    daily = [DayCost(_team(r[0]), date.fromisoformat(str(r[1])), tuple(Decimal(str(v)) for v in r[2:8]),
                     Decimal(str(r[8])), int(r[9])) for r in results["daily"]]
    weekly = {_team(r[0]): (Decimal(str(r[1])), Decimal(str(r[2]))) for r in results["weekly"]}
    requests = [TeamRequests(_team(r[0]), str(r[1])[:7], int(r[2]), Decimal(str(r[3])), Decimal(str(r[4])))
                for r in results["requests"]]
    endpoints = [EndpointReasoning(_team(r[0]), str(r[1]) or "(none)", int(r[2]), int(r[3]), int(r[4]), int(r[5]),
                                   int(r[6]), int(r[7]), Decimal(str(r[8]))) for r in results["endpoints"]]
    unattributed = [(str(r[0]), str(r[1]), int(r[2]), Decimal(str(r[3]))) for r in results["unattributed"]]
    deploys = [Deploy(_team(r[0]), str(r[1]) or "(none)", str(r[2]), _ts(r[3])) for r in results["deploys"]]
    centers = {_team(r[0]): str(r[1]) for r in results["cost_centers"]}
    admission = [(_team(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), Decimal(str(r[5])))
                 for r in results.get("admission", ())]
    return ChargebackData(daily, weekly, requests, endpoints, unattributed, deploys, centers, wow_to,
                          admission=admission)


def fetch(query: QueryFn, period: Period, now: datetime,
          step: Callable[[str], None] = lambda label: None) -> ChargebackData:
    """Run the report's queries through `query` (run_query, or a Store in tests), calling `step` before each."""
    wow_to = wow_end(period, now)
    results: dict[str, Sequence[Sequence[Any]]] = {}
    for name, sql in build_queries(period, wow_to).items():
        step(name)
        results[name] = query(sql)[1]
    return parse_results(results, wow_to)


# The queries allocation_basis reads: tokens per team and day (rollup_day), logical requests per team and month.
ALLOCATION_QUERIES = ("daily", "requests")


def fetch_allocation_basis(query: QueryFn, period: Period,
                           step: Callable[[str], None] = lambda label: None) -> ChargebackData:
    """Run only the queries that shared-cost allocation reads (ALLOCATION_QUERIES, the same SQL as fetch).

    For reports that allocate shared costs without the rest of the chargeback (the FOCUS export): the result
    holds `daily` and `requests` as fetch would; every other figure is empty.
    """
    queries = build_queries(period, period.end_dt)
    results: dict[str, Sequence[Sequence[Any]]] = {name: [] for name in queries}
    for name in ALLOCATION_QUERIES:
        step(name)
        results[name] = query(queries[name])[1]
    return parse_results(results, period.end_dt)


# ---------------------------------------------------------------- arithmetic
def pct(part: Decimal | int, whole: Decimal | int) -> Decimal | None:
    """100 × part / whole to 0.01 (half even); None when whole is 0. Display only: money stays exact."""
    if not whole:
        return None
    return _RATIO.divide(Decimal(part) * 100, Decimal(whole)).quantize(_PCT, context=_RATIO)


def _sum(values: Iterable[Decimal]) -> Decimal:
    with localcontext(MONEY_CONTEXT):
        return sum(values, ZERO)


@dataclass(frozen=True)
class TeamTotals:
    """A team's direct cost in the period (rollup_day), by class."""

    team: str
    classes: tuple[Decimal, ...]
    total: Decimal

    @property
    def reasoning(self) -> Decimal:
        return self.classes[2]


def team_totals(data: ChargebackData, period: Period) -> list[TeamTotals]:
    """Direct cost per team in the period, largest first, the unattributed bucket last."""
    acc: dict[str, list[Decimal]] = defaultdict(lambda: [ZERO] * (len(CLASSES) + 1))
    with localcontext(MONEY_CONTEXT):
        for d in data.daily:
            if period.start <= d.day < period.end:
                row = acc[d.team]
                for i, v in enumerate((*d.classes, d.total)):
                    row[i] += v
    out = [TeamTotals(team, tuple(v[:-1]), v[-1]) for team, v in acc.items()]
    return sorted(out, key=lambda t: (t.team == UNATTRIBUTED, -t.total, t.team))


def daily_shares(data: ChargebackData) -> dict[str, dict[date, Decimal | None]]:
    """Team → day → reasoning share of the day's cost in % (None on a day without cost), period and lookback."""
    out: dict[str, dict[date, Decimal | None]] = defaultdict(dict)
    for d in data.daily:
        out[d.team][d.day] = pct(d.classes[2], d.total)
    return out


@dataclass(frozen=True)
class Jump:
    """A day whose reasoning share moved by at least the threshold from the team's previous day with cost."""

    team: str
    day: date
    before: Decimal
    share: Decimal
    change_pp: Decimal
    deploys: tuple[Deploy, ...]


def deploy_changes(data: ChargebackData, period: Period) -> list[tuple[Deploy, str]]:
    """Deploys in the period that replaced another version on the same endpoint: (deploy, previous version)."""
    by_endpoint: dict[tuple[str, str], list[Deploy]] = defaultdict(list)
    for d in data.deploys:
        by_endpoint[(d.team, d.endpoint)].append(d)
    out = []
    for seen in by_endpoint.values():
        seen.sort(key=lambda d: (d.first_seen, d.version))
        out += [(cur, prev.version) for prev, cur in zip(seen, seen[1:], strict=False)
                if period.start_dt <= cur.first_seen < period.end_dt]
    return sorted(out, key=lambda x: (x[0].first_seen, x[0].team, x[0].endpoint))


def reasoning_jumps(data: ChargebackData, period: Period, threshold_pp: Decimal) -> list[Jump]:
    """Days in the period whose reasoning share moved ≥ threshold_pp from the team's previous day with cost.

    Each jump lists the deploy changes of the team first seen after that previous day, up to the jump's day.
    """
    changes = deploy_changes(data, period)
    jumps = []
    for team, shares in daily_shares(data).items():
        days = sorted(d for d, s in shares.items() if s is not None)
        for prev, day in zip(days, days[1:], strict=False):
            before, share = shares[prev], shares[day]
            if not period.start <= day < period.end or before is None or share is None:
                continue
            change = share - before
            if abs(change) >= threshold_pp:
                near = tuple(d for d, _ in changes if d.team == team and prev < d.first_seen.date() <= day)
                jumps.append(Jump(team, day, before, share, change, near))
    return sorted(jumps, key=lambda j: (j.day, j.team))


# ---------------------------------------------------------------- allocation
@dataclass(frozen=True)
class Allocation:
    """One team's share of one shared cost item."""

    item: SharedCost
    team: str
    basis: int | Decimal
    allocated: Decimal


def allocation_basis(item: SharedCost, data: ChargebackData) -> dict[str, int | Decimal]:
    """The weights of an item's rule in its month: requests or tokens per team (unattributed included), or the split."""
    if item.rule == "fixed_split":
        return dict(item.split)
    if item.rule == "proportional_to_requests":
        return {r.team: r.requests for r in data.requests if r.month == item.period and r.requests > 0}
    first = month_start(item.period)
    tokens: dict[str, int | Decimal] = defaultdict(int)
    for d in data.daily:
        if first <= d.day < next_month(first) and d.tokens:
            tokens[d.team] += d.tokens
    return dict(tokens)


def allocate_items(items: Sequence[SharedCost], data: ChargebackData, period: Period
                   ) -> tuple[list[Allocation], list[str]]:
    """Allocate the items whose month lies inside the period; notes say which were skipped or left unallocated."""
    out: list[Allocation] = []
    notes: list[str] = []
    for item in items:
        if not period.contains_month(item.period):
            notes.append(f"shared cost {item.name!r} ({item.period}) is not allocated: its month is not wholly "
                         f"inside the report period")
            continue
        basis = allocation_basis(item, data)
        if not basis:
            notes.append(f"shared cost {item.name!r} ({item.period}) is unallocated: no "
                         f"{'requests' if item.rule == 'proportional_to_requests' else 'tokens'} in its month")
            out.append(Allocation(item, UNALLOCATED, 0, item.amount_usd))
            continue
        shares = allocate(item.amount_usd, basis)
        out += [Allocation(item, team, basis[team], shares[team])
                for team in sorted(basis, key=lambda t: (-shares[t], t))]
    return out, notes


# ---------------------------------------------------------------- the report
def build_report(kind: Kind, data: ChargebackData, period: Period, items: Sequence[SharedCost],
                 generated_at: datetime, source: str, jump_pp: Decimal = DEFAULT_JUMP_PP) -> Report:
    """The chargeback (or showback) report of `period` from query results and shared cost items; no I/O.

    Showback shows the same figures as information: allocations are what teams would be charged.
    """
    showback = kind == "showback"
    totals = team_totals(data, period)
    by_team = {t.team: t for t in totals}
    req: dict[str, list[TeamRequests]] = defaultdict(list)
    for r in data.requests:
        req[r.team].append(r)
    allocations, alloc_notes = allocate_items(items, data, period)
    allocated: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for a in allocations:
        allocated[a.team] = _sum((allocated[a.team], a.allocated))
    teams = [t.team for t in totals] + sorted(set(allocated) - set(by_team))
    grand = _sum(t.total for t in totals)
    unattributed = by_team[UNATTRIBUTED].total if UNATTRIBUTED in by_team else ZERO

    charged_col = "would_be_charged_usd" if showback else "charged_usd"
    charges = []
    for team in teams:
        t = by_team.get(team)
        direct = t.total if t else ZERO
        rs = req.get(team, [])
        cost_r, wasted = _sum(r.cost for r in rs), _sum(r.wasted for r in rs)
        last, prior = data.weekly.get(team, (ZERO, ZERO))
        alloc = allocated.get(team, ZERO)
        chargeable = team not in (UNATTRIBUTED, UNALLOCATED)
        charges.append((team, data.cost_centers.get(team, ""), sum(r.requests for r in rs), direct, alloc,
                        _sum((direct, alloc)) if chargeable else None,
                        pct(t.reasoning, t.total) if t else None, pct(wasted, cost_r),
                        pct(_sum((last, -prior)), prior)))
    tables = [Table(
        "charges", ("Showback" if showback else "Chargeback") + " per team",
        ("team", "cost_center", "requests", "direct_usd", "allocated_usd", charged_col, "reasoning_share_pct",
         "retry_waste_pct", "wow_change_pct"),
        charges, Chart("stacked_bar", "team", ("direct_usd", "allocated_usd")),
        (f"direct_usd: the team's own LLM spend (exact); allocated_usd: its share of shared costs (table "
         f"allocations); {charged_col} = direct + allocated."
         + (" Informational: nobody is billed from a showback." if showback else ""),
         "reasoning_share_pct: reasoning cost / direct cost. retry_waste_pct: cost of attempts that did not produce "
         "the final answer / cost of the team's logical requests.",
         f"wow_change_pct: the 7 days before {data.wow_to:%Y-%m-%d %H:%M} UTC vs the 7 days before those; empty "
         "when there was no spend in the earlier week.",
         f"{UNATTRIBUTED}: spend without an owner (see table unattributed); it is charged to nobody."))]

    classes = [(t.team, *t.classes, t.total, pct(t.reasoning, t.total)) for t in totals]
    tables.append(Table(
        "classes", "Direct cost by class",
        ("team", *(f"{name}_usd" for name, _ in CLASSES), "total_usd", "reasoning_share_pct"), classes,
        Chart("stacked_bar", "team", tuple(f"{name}_usd" for name, _ in CLASSES)),
        ("cache_write covers 5-minute and 1-hour cache writes; tools are priced tool calls.",)))

    endpoints = [(e.team, e.endpoint, e.requests, e.reasoning_requests, e.reasoning_tokens, e.p50, e.p90,
                  _RATIO.divide(Decimal(e.reasoning_tokens), Decimal(e.output_tokens)).quantize(_PCT, context=_RATIO)
                  if e.output_tokens else None, e.reasoning_usd)
                 for e in sorted(data.endpoints, key=lambda e: (e.team == UNATTRIBUTED, e.team, -e.reasoning_usd,
                                                                e.endpoint))]
    tables.append(Table(
        "reasoning_endpoints", "Endpoints that generated reasoning tokens",
        ("team", "endpoint", "requests", "reasoning_requests", "reasoning_tokens", "p50_reasoning_per_request",
         "p90_reasoning_per_request", "reasoning_per_output_token", "reasoning_usd"), endpoints,
        Chart("bar", "endpoint", ("p50_reasoning_per_request", "p90_reasoning_per_request")),
        ("Logical requests by their first attempt, each once at its latest revision. p50/p90: reasoning tokens per "
         "request over the requests that generated any (exact quantiles); reasoning_per_output_token: reasoning "
         "tokens per visible output token.",)))

    waste = []
    for team in teams:
        rs = req.get(team, [])
        if rs:
            cost_r, wasted = _sum(r.cost for r in rs), _sum(r.wasted for r in rs)
            waste.append((team, sum(r.requests for r in rs), cost_r, wasted, pct(wasted, cost_r)))
    tables.append(Table(
        "waste", "Retry waste", ("team", "requests", "request_cost_usd", "wasted_usd", "waste_pct"), waste, None,
        ("From logical_requests: failed attempts, retried terminations and the calls that fell back.",)))

    weekly = [(team, last, prior, _sum((last, -prior)), pct(_sum((last, -prior)), prior))
              for team, (last, prior) in sorted(data.weekly.items(), key=lambda kv: (-kv[1][0], kv[0]))]
    w1 = data.wow_to - LOOKBACK
    tables.append(Table(
        "week_over_week", "Week over week",
        ("team", "last_7d_usd", "prior_7d_usd", "change_usd", "change_pct"), weekly,
        Chart("bar", "team", ("prior_7d_usd", "last_7d_usd")),
        (f"last 7 days: {w1:%Y-%m-%d %H:%M} to {data.wow_to:%Y-%m-%d %H:%M} UTC; prior: the 7 days before.",)))

    shares = daily_shares(data)
    share_teams = [t for t in teams if t in shares]
    # Days of the period up to now (wow_to: the period's end, or the end of the current hour): no future empty days.
    last_day = (data.wow_to - timedelta(microseconds=1)).date()
    days = [d for d in period.days() if d <= last_day]
    tables.append(Table(
        "reasoning_daily", "Reasoning share of cost per day (%)", ("day", *share_teams),
        [(d, *(shares[t].get(d) for t in share_teams)) for d in days],
        Chart("line", "day", tuple(share_teams[:10])),
        ("Empty: no cost that day. Jumps and the deploys next to them: tables reasoning_jumps and deploys.",)))

    jumps = reasoning_jumps(data, period, jump_pp)
    tables.append(Table(
        "reasoning_jumps", f"Reasoning share jumps (≥ {decimal_text(jump_pp)} points day over day) and deploys "
                           "next to them",
        ("team", "day", "share_before_pct", "share_pct", "change_pp", "deploys"),
        [(j.team, j.day, j.before, j.share, j.change_pp,
          "; ".join(f"{d.endpoint} {d.version} ({d.first_seen:%Y-%m-%d %H:%M})" for d in j.deploys))
         for j in jumps], None,
        ("share_before_pct: the team's previous day with cost. deploys: deploy_version changes of the team first "
         "seen after that day, up to the jump.",)))

    deploy_rows = []
    for d, prev in deploy_changes(data, period):
        team_shares = shares.get(d.team, {})
        seen = sorted(day for day, s in team_shares.items() if s is not None)
        before = [day for day in seen if day < d.first_seen.date()]
        after = [day for day in seen if day > d.first_seen.date()]
        deploy_rows.append((d.team, d.endpoint, d.version, prev, d.first_seen,
                            team_shares[before[-1]] if before else None, team_shares.get(d.first_seen.date()),
                            team_shares[after[0]] if after else None))
    tables.append(Table(
        "deploys", "Deploy markers: deploy_version changes",
        ("team", "endpoint", "deploy_version", "previous_version", "first_seen", "share_day_before_pct",
         "share_deploy_day_pct", "share_day_after_pct"), deploy_rows, None,
        ("A marker is the first time a deploy_version is seen on an endpoint after another version was (the "
         "period and the week before). Shares: the team's reasoning share on its previous day with cost, the "
         "deploy's day and its next day with cost.",)))

    unattr = [(reason or "(none)", feature or "(none)", n, cost, pct(cost, grand))
              for reason, feature, n, cost in sorted(data.unattributed, key=lambda u: (-u[3], u[0], u[1]))]
    tables.append(Table(
        "unattributed", "Unattributed spend by reason", ("reason", "feature_id", "attempts", "cost_usd",
                                                         "pct_of_total"), unattr, None,
        ("Register these features (or api keys) in the owners registry, or have gateways send team_id.",)))

    tables.append(Table(
        "admission", "Gateway admission: denials and fallbacks",
        ("team", "feature_id", "action", "reason", "decisions", "avoided_usd"),
        [(team, feature or "(none)", action, reason, n, avoided) for team, feature, action, reason, n, avoided
         in sorted(data.admission, key=lambda a: (-a[5], a[0], a[1], a[2], a[3]))], None,
        ("What the gateways' admission clients refused or routed to a cheaper model (docs/admission.md). "
         "avoided_usd: the worst-case cost kept from being spent, a denial's whole request, a fallback's "
         "difference; an upper bound on the real saving, since a request rarely uses its whole worst case.",)))

    verb = "would be allocated" if showback else "allocated"
    tables.append(Table(
        "allocations", "Shared costs " + verb,
        ("item", "rule", "period", "item_usd", "team", "basis", "share_pct", "allocated_usd"),
        [(a.item.name, RULES[a.item.rule], a.item.period, a.item.amount_usd, a.team, a.basis,
          pct(a.allocated, a.item.amount_usd), a.allocated) for a in allocations], None,
        ("Allocated to the cent by largest remainder: the amounts of an item sum exactly to it. basis: logical "
         "requests, tokens or the fixed percentage in the item's month; the unattributed bucket takes its share "
         "too, so no team pays for spend that is not its own.",)))

    total_alloc = _sum(a.allocated for a in allocations)
    notes = [f"Direct LLM cost {display_decimal(grand)} USD; unattributed {display_decimal(unattributed)} USD "
             f"({pct(unattributed, grand) or 0} %); shared costs {verb}: {display_decimal(total_alloc)} USD.",
             *alloc_notes, *data.extra_notes]
    if showback:
        notes.insert(0, "Showback: the chargeback figures as information for the teams; nothing is billed. "
                        "Shared costs show what each team would be charged under the rules file.")
    title = ("Showback" if showback else "Chargeback") + f" {period.label}"
    last_day = period.end - timedelta(days=1)
    subtitle = (f"{period.start.isoformat()} to {last_day.isoformat()} (UTC) · source {source} · generated "
                f"{generated_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC")
    return Report(title, subtitle, tuple(tables), tuple(notes))


def run_report(kind: Kind, query: QueryFn, period: Period, rules: Path | None, now: datetime, source: str,
               step: Callable[[str], None] = lambda label: None, jump_pp: Decimal = DEFAULT_JUMP_PP) -> Report:
    """Load the rules file (first, so a bad one fails before any query), run the queries, build the report."""
    items = load_rules(rules) if rules is not None else []
    data = fetch(query, period, now, step)
    return build_report(kind, data, period, items, now, source, jump_pp)
