"""Every dashboard panel once: its SQL in the Grafana ClickHouse plugin's macro syntax, and how the page runs it."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tally.errors import TallyError
from tally.store import QueryResult

# The filters every panel honours, as Grafana dashboard variables: name → the column it filters. Selecting "All"
# (or nothing, on the live page) makes $__conditionalAll(...) expand to 1=1.
FILTER_COLUMNS: dict[str, str] = {"team": "team_id", "environment": "environment"}
# The values each filter offers: what the rollups hold (Grafana's variable query and the live page's drop-downs).
FILTER_SQL: dict[str, str] = {
    name: f"SELECT DISTINCT {col} FROM ${{database}}.rollup_day WHERE {col} != '' ORDER BY {col}"
    for name, col in FILTER_COLUMNS.items()}


def _filter(name: str) -> str:
    """The panel condition of one filter: its column in the selected values, or 1=1 for All."""
    return f"$__conditionalAll({FILTER_COLUMNS[name]} IN (${{{name}:singlequote}}), ${name})"


_FILTERS = " AND ".join(_filter(name) for name in FILTER_COLUMNS)
_IN_RANGE = f"$__timeFilter(bucket) AND {_FILTERS}"
# The rollup a panel reads, by the range's span: rollup_minute up to two days, rollup_hour up to 60 days (the minute
# grain keeps 14 days by default), rollup_day beyond. The same SQL serves Grafana and the live page: the branches
# of _ROLLUP that the grain rules out read nothing. Time series: buckets of whole grains, about one per
# $__interval_s; values are per minute whatever the bucket.
MINUTE_MAX_SPAN = timedelta(days=2)
HOUR_MAX_SPAN = timedelta(days=60)
_STEP = (f"WITH dateDiff('second', $__fromTime, $__toTime) AS span_s,\n"
         f"     multiIf(span_s <= {int(MINUTE_MAX_SPAN.total_seconds())}, 1, "
         f"span_s <= {int(HOUR_MAX_SPAN.total_seconds())}, 60, 1440) AS grain_min,\n"
         f"     grain_min * greatest(1, intDiv(intDiv($__interval_s, 60) + grain_min - 1, grain_min)) AS step_min\n")
_ROLLUP = """(
    SELECT * FROM ${database}.rollup_minute WHERE grain_min = 1
    UNION ALL SELECT * FROM ${database}.rollup_hour WHERE grain_min = 60
    UNION ALL SELECT * FROM ${database}.rollup_day WHERE grain_min = 1440
)"""
# A time series leaves out the minute still filling at the range's end (drawn, it would dip toward zero as if spend
# were collapsing), and a last bucket of several minutes is a rate over the minutes it has had so far, not its step.
_FINISHED = "bucket < toStartOfMinute($__toTime)"
_MINUTES = "least(step_min, greatest(1, dateDiff('minute', time, toStartOfMinute($__toTime))))"
_UNFINISHED_NOTE = (" The minute still filling is left out; a last bucket not over yet is a rate over its minutes "
                    "so far.")
_BUCKET = "toStartOfInterval(bucket, toIntervalMinute(step_min)) AS time"
_SHARE = "round(100 * toFloat64(sum({part})) / greatest(toFloat64(sum(cost_total_usd)), 1e-12), 2)"
_FEATURE = "if(feature_id = '', '(no feature)', feature_id)"


@dataclass(frozen=True)
class Panel:
    """One panel of the live page and of the Grafana dashboard.

    `sql` is what Grafana runs, macros and variables included; the live page runs the same text after `render`.
    Result shapes by `kind`:
    - stat: one row, one column per figure;
    - timeseries: a `time` column, then either one column per series (wide) or, with `series_column`, one row per
      time and series (long; Grafana pivots it, and so does `shape`);
    - bar: a label column (`label_column`), the bar columns (`bars`) and extra columns shown in tooltips;
    - table: rows as they are;
    - budget: spend per budget scope (feature, tenant) and id; the live page joins the budgets' amounts.
    `units` maps a column to its unit: usd, usd_per_min, usd_per_hour, pct, count (the default unit is `unit`).
    """

    id: str
    title: str
    kind: str
    description: str
    sql: str
    unit: str = "usd"
    units: Mapping[str, str] = field(default_factory=dict)
    series_column: str | None = None
    stacked: bool = False
    apart: tuple[str, ...] = ()  # series drawn on their own, not stacked (reasoning)
    label_column: str | None = None
    bars: tuple[str, ...] = ()
    width: int = 12  # of 24 grid columns (Grafana's grid; the page uses the same proportions)
    height: int = 8

    def unit_of(self, column: str) -> str:
        return self.units.get(column, self.unit)


PANELS: tuple[Panel, ...] = (
    Panel(
        id="totals", title="Spend in range", kind="stat", width=24, height=4,
        description="Spend, logical requests, retry waste and unattributed spend over the time range (USD).",
        units={"requests": "count", "waste_pct": "pct", "unattributed_pct": "pct"},
        sql=f"""{_STEP}SELECT sum(cost_total_usd) AS spend_usd,
       sum(requests) AS requests,
       sum(cost_wasted_usd) AS wasted_usd,
       {_SHARE.format(part='cost_wasted_usd')} AS waste_pct,
       sum(cost_unattributed_usd) AS unattributed_usd,
       {_SHARE.format(part='cost_unattributed_usd')} AS unattributed_pct
FROM {_ROLLUP}
WHERE {_IN_RANGE}"""),
    Panel(
        id="spend_by_team", title="Spend per minute by team", kind="timeseries", unit="usd_per_min",
        series_column="team", stacked=True,
        description="Stacked spend per minute (USD/min) by owning team; unattributed spend has no team."
                    + _UNFINISHED_NOTE,
        sql=f"""{_STEP}SELECT {_BUCKET},
       if(team_id = '', '(unattributed)', team_id) AS team,
       sum(cost_total_usd) / {_MINUTES} AS usd_per_min
FROM {_ROLLUP}
WHERE {_IN_RANGE} AND {_FINISHED}
GROUP BY time, team
ORDER BY time, team"""),
    Panel(
        id="spend_by_cost_class", title="Spend by cost class, reasoning apart", kind="timeseries",
        unit="usd_per_min", stacked=True, apart=("reasoning",),
        description="Spend per minute (USD/min) by token class, stacked; reasoning tokens are drawn apart as a "
                    "line of their own (they are billed as output but are not visible output)." + _UNFINISHED_NOTE,
        sql=f"""{_STEP}SELECT {_BUCKET},
       sum(cost_input_usd) / {_MINUTES} AS input,
       sum(cost_output_usd) / {_MINUTES} AS output,
       sum(cost_cache_read_usd) / {_MINUTES} AS cache_read,
       sum(cost_cache_write_usd) / {_MINUTES} AS cache_write,
       sum(cost_tools_usd) / {_MINUTES} AS tools,
       sum(cost_reasoning_usd) / {_MINUTES} AS reasoning
FROM {_ROLLUP}
WHERE {_IN_RANGE} AND {_FINISHED}
GROUP BY time
ORDER BY time"""),
    Panel(
        id="top_features", title="Top features by spend", kind="bar", label_column="feature",
        bars=("spend_usd", "daily_avg_7d_usd"),
        description="The ten features that spent most in the range (USD), beside their 7-day moving average of "
                    "daily spend as of the end of the range.",
        sql=f"""{_STEP}SELECT r.feature AS feature, r.team AS team, r.spend_usd AS spend_usd,
       w.daily_avg_7d_usd AS daily_avg_7d_usd
FROM
(
    SELECT {_FEATURE} AS feature, if(max(team_id) = '', '(unattributed)', max(team_id)) AS team,
           sum(cost_total_usd) AS spend_usd
    FROM {_ROLLUP}
    WHERE {_IN_RANGE}
    GROUP BY feature
    ORDER BY spend_usd DESC
    LIMIT 10
) AS r
LEFT JOIN
(
    SELECT {_FEATURE} AS feature, sum(cost_total_usd) / 7 AS daily_avg_7d_usd
    FROM ${{database}}.rollup_hour
    WHERE bucket > $__toTime - INTERVAL 7 DAY AND bucket <= $__toTime AND {_FILTERS}
    GROUP BY feature
) AS w ON r.feature = w.feature
ORDER BY spend_usd DESC"""),
    Panel(
        id="reasoning_share", title="Reasoning share by feature", kind="bar", label_column="feature",
        bars=("reasoning_share_pct",), unit="pct", units={"reasoning_usd": "usd", "spend_usd": "usd"},
        description="Share of each feature's spend that paid for reasoning tokens (%), features with the most "
                    "reasoning spend first.",
        sql=f"""{_STEP}SELECT {_FEATURE} AS feature,
       {_SHARE.format(part='cost_reasoning_usd')} AS reasoning_share_pct,
       sum(cost_reasoning_usd) AS reasoning_usd,
       sum(cost_total_usd) AS spend_usd
FROM {_ROLLUP}
WHERE {_IN_RANGE}
GROUP BY feature
HAVING sum(cost_reasoning_usd) > 0
ORDER BY reasoning_usd DESC
LIMIT 12"""),
    Panel(
        id="retry_waste", title="Retry waste per minute by team", kind="timeseries", unit="usd_per_min",
        series_column="team", stacked=True,
        description="Spend on attempts that did not produce the answer (failed tries, retried cut streams, calls "
                    "that fell back), per minute (USD/min), by the request's start." + _UNFINISHED_NOTE,
        sql=f"""{_STEP}SELECT {_BUCKET},
       if(team_id = '', '(unattributed)', team_id) AS team,
       sum(cost_wasted_usd) / {_MINUTES} AS wasted_usd_per_min
FROM {_ROLLUP}
WHERE {_IN_RANGE} AND {_FINISHED}
GROUP BY time, team
ORDER BY time, team"""),
    Panel(
        id="unattributed_share", title="Unattributed spend", kind="timeseries", unit="pct",
        description="Share of spend with no owner (%): no feature tag, an unknown feature, no registry entry."
                    + _UNFINISHED_NOTE,
        sql=f"""{_STEP}SELECT {_BUCKET},
       {_SHARE.format(part='cost_unattributed_usd')} AS unattributed_pct
FROM {_ROLLUP}
WHERE {_IN_RANGE} AND {_FINISHED}
GROUP BY time
ORDER BY time"""),
    Panel(
        id="open_anomalies", title="Open anomalies", kind="table", unit="",
        description="Anomalies still firing at the end of the range: the latest state of each feature and signal. "
                    "Detectors watch features across environments: the environment filter does not apply.",
        sql=f"""SELECT started_at, detected_at, feature_id, team_id, signal, severity, value, baseline, score,
       dimension, dimension_value, explanation
FROM
(
    SELECT *
    FROM ${{database}}.anomalies
    WHERE detected_at <= $__toTime
    ORDER BY detected_at DESC, inserted_at DESC
    LIMIT 1 BY feature_id, signal
)
WHERE state = 'firing' AND {_filter("team")}
ORDER BY severity = 'critical' DESC, detected_at DESC
LIMIT 50"""),
    Panel(
        id="admission", title="Gateway admission: denials and fallbacks", kind="table",
        units={"decisions": "count"},
        description="What the gateways' admission clients refused or routed to a cheaper model in the range, by "
                    "feature and reason, and the cost it kept from being spent at worst (USD: a denial's whole "
                    "request, a fallback's difference). Decisions carry no team or environment: those filters do "
                    "not apply.",
        sql="""SELECT feature_id, action, reason, count() AS decisions, sum(avoided_usd) AS avoided_usd,
       max(decided_at) AS last_at
FROM ${database}.budget_decisions FINAL
WHERE $__timeFilter(decided_at) AND action IN ('deny', 'fallback')
GROUP BY feature_id, action, reason
ORDER BY avoided_usd DESC, decisions DESC
LIMIT 50"""),
    Panel(
        id="budget_burn", title="Budget burn", kind="budget",
        units={"burn_usd_per_hour": "usd_per_hour"},
        description="Spend so far in the UTC day and month of the range's end, per feature and tenant, and the "
                    "burn rate of the last 15 minutes (USD/h). The live page sets them against the budgets "
                    "(llm.budget.state.v1). With a team or environment filter, spend is that slice's.",
        sql=f"""SELECT p.scope AS scope, p.id AS id, p.spent_today_usd AS spent_today_usd,
       p.spent_month_usd AS spent_month_usd, r.last_15m_usd * 4 AS burn_usd_per_hour
FROM
(
    SELECT k.1 AS scope, k.2 AS id,
           sumIf(cost_total_usd, bucket >= toStartOfDay($__toTime, 'UTC')) AS spent_today_usd,
           sum(cost_total_usd) AS spent_month_usd
    FROM ${{database}}.rollup_hour
    ARRAY JOIN [('feature', feature_id), ('tenant', tenant_id)] AS k
    WHERE bucket >= toDateTime(toStartOfMonth($__toTime, 'UTC'), 'UTC') AND bucket <= $__toTime
      AND k.2 != '' AND {_FILTERS}
    GROUP BY scope, id
) AS p
LEFT JOIN
(
    SELECT k.1 AS scope, k.2 AS id, sum(cost_total_usd) AS last_15m_usd
    FROM ${{database}}.rollup_minute
    ARRAY JOIN [('feature', feature_id), ('tenant', tenant_id)] AS k
    WHERE bucket > $__toTime - INTERVAL 15 MINUTE AND bucket <= $__toTime AND k.2 != '' AND {_FILTERS}
    GROUP BY scope, id
) AS r ON p.scope = r.scope AND p.id = r.id
ORDER BY spent_month_usd DESC
LIMIT 50"""),
)
PANELS_BY_ID: dict[str, Panel] = {p.id: p for p in PANELS}

# Relative time ranges the live page offers (seconds back from now).
RANGES: dict[str, int] = {"15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400,
                          "30d": 30 * 86400}
DEFAULT_RANGE = "1h"  # the longest range the page opens on; a younger stack opens on a range its data fills
MAX_SPAN = timedelta(days=400)  # the hour rollup's default retention
MAX_POINTS = 90  # points per time series, as Grafana's maxDataPoints


class FilterError(TallyError):
    """A filter of a panel request is invalid: unknown range, bad datetime, a value not present in the data."""


@dataclass(frozen=True)
class PanelFilters:
    """Validated filters: a UTC time range and, per filter variable, the selected values (empty: all)."""

    start: datetime
    end: datetime
    selected: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_points: int = MAX_POINTS

    @property
    def interval_s(self) -> int:
        """Grafana's $__interval_s: the range over the number of points, at least 1 s."""
        return max(1, int((self.end - self.start).total_seconds()) // self.max_points)

    @property
    def filtered(self) -> bool:
        return any(self.selected.values())


def _aware(text: str, name: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(f"{name}: not an ISO 8601 datetime: {text[:64]!r}") from None
    if ts.tzinfo is None:
        raise FilterError(f"{name}: give a UTC offset (e.g. 2026-11-20T12:00:00Z)")
    return ts.astimezone(UTC)


def parse_filters(params: Mapping[str, str], now: datetime, present: Mapping[str, Collection[str]]) -> PanelFilters:
    """Filters from a live-page request; raises FilterError naming the first bad parameter.

    Time: `range` (one of RANGES, default 1h, ending now) or both `from` and `to` as ISO 8601 datetimes with an
    offset (from < to, at most 400 days apart). Each filter variable (`team`, `environment`): empty or `all`
    for every value, otherwise one value that `present[name]` holds (the values in the data).
    """
    if params.get("from") or params.get("to"):
        start, end = _aware(params.get("from", ""), "from"), _aware(params.get("to", ""), "to")
        if not start < end:
            raise FilterError("from must be before to")
        if end - start > MAX_SPAN:
            raise FilterError(f"the range spans more than {MAX_SPAN.days} days")
    else:
        name = params.get("range") or DEFAULT_RANGE
        if name not in RANGES:
            raise FilterError(f"range must be one of {', '.join(RANGES)}")
        end = now.astimezone(UTC)
        start = end - timedelta(seconds=RANGES[name])
    selected: dict[str, tuple[str, ...]] = {}
    for var in FILTER_COLUMNS:
        value = params.get(var, "")
        if value in ("", "all"):
            selected[var] = ()
        elif value in present.get(var, ()):
            selected[var] = (value,)
        else:
            raise FilterError(f"{var}: no data has the value {value[:64]!r}")
    return PanelFilters(start, end, selected)


# ---------------------------------------------------------------- macros and variables
_MACRO = re.compile(r"\$__(\w+)")
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def quote(value: str) -> str:
    """A ClickHouse string literal (backslash and quote escaped), as Grafana's singlequote format writes it."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _macro_args(sql: str, open_at: int) -> tuple[list[str], int]:
    """The comma-separated arguments of a macro call whose '(' is at `open_at`, and the index after its ')'."""
    depth, quoted, args, start = 0, "", [], open_at + 1
    i = open_at
    while i < len(sql):
        c = sql[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == quoted:
                quoted = ""
        elif c in "'`":
            quoted = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[start:i].strip())
                return args, i + 1
        elif c == "," and depth == 1:
            args.append(sql[start:i].strip())
            start = i + 1
        i += 1
    raise ValueError(f"unbalanced macro call: {sql[open_at - 20:open_at + 40]!r}")


def _datetime(ts: datetime) -> str:
    return f"toDateTime({int(ts.timestamp())})"


def _expand_macro(name: str, args: list[str] | None, f: PanelFilters) -> str:
    """One macro as the Grafana ClickHouse plugin expands it (pkg/macros/macros.go of grafana-clickhouse-datasource)."""
    if name == "conditionalAll" and args is not None and len(args) == 2:
        var = _VARIABLE.fullmatch(args[1])
        if var is None:
            raise ValueError(f"$__conditionalAll: the second argument must be a variable, got {args[1]!r}")
        return args[0] if f.selected.get(var.group(1) or var.group(3)) else "1=1"
    if name in ("timeFilter", "timeFilter_ms") and args is not None and len(args) == 1 and _COLUMN.match(args[0]):
        if name == "timeFilter":
            lo, hi = _datetime(f.start), _datetime(f.end)
        else:
            lo, hi = (f"fromUnixTimestamp64Milli({int(t.timestamp() * 1000)})" for t in (f.start, f.end))
        return f"{args[0]} >= {lo} AND {args[0]} <= {hi}"
    if args is None and name in ("fromTime", "toTime", "interval_s"):
        return {"fromTime": _datetime(f.start), "toTime": _datetime(f.end), "interval_s": str(f.interval_s)}[name]
    raise ValueError(f"unsupported macro ${'__' + name}{'' if args is None else '(…)'}")


def render(sql: str, f: PanelFilters, database: str) -> str:
    """A panel's SQL with every macro and variable substituted, ready to run; no user text reaches it unquoted.

    Macros: $__conditionalAll(cond, $var), $__timeFilter(col), $__timeFilter_ms(col), $__fromTime, $__toTime,
    $__interval_s. Variables: ${database} (an identifier) and ${<filter>:singlequote} (quoted values). Anything
    else starting with `$` is refused (ValueError): a panel must not ship SQL the live page cannot run.
    """
    if not database.isidentifier():
        raise ValueError(f"database must be an identifier, got {database!r}")
    out, i = [], 0
    while (m := _MACRO.search(sql, i)) is not None:
        out.append(sql[i:m.start()])
        args, i = (_macro_args(sql, m.end()) if sql.startswith("(", m.end()) else (None, m.end()))
        out.append(_expand_macro(m.group(1), args, f))
    out.append(sql[i:])

    def variable(m: re.Match[str]) -> str:
        name, fmt = m.group(1) or m.group(3), m.group(2)
        if name == "database" and fmt is None:
            return database
        if name in FILTER_COLUMNS and fmt == "singlequote" and f.selected.get(name):
            return ", ".join(quote(v) for v in f.selected[name])
        raise ValueError(f"unsupported variable {m.group(0)}")

    return _VARIABLE.sub(variable, "".join(out))


# ---------------------------------------------------------------- results for the live page
def _display(value: Any) -> Any:
    """JSON for the page: exact decimals become numbers (display only), datetimes RFC 3339 strings."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        ts = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return value


def _epoch_ms(value: Any) -> int:
    ts = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return int(ts.timestamp() * 1000)


def shape(panel: Panel, res: QueryResult) -> dict[str, Any]:
    """A query result in the form the page's chart for `panel.kind` draws (budget panels: see `budget_burn`)."""
    cols = res.columns
    if panel.kind == "stat":
        row = res.rows[0] if res.rows else (0,) * len(cols)
        return {"values": {c: _display(v) for c, v in zip(cols, row, strict=True)}}
    if not res.rows and panel.kind in ("timeseries", "bar"):  # an empty result may come without its columns
        return {"x": [], "series": []} if panel.kind == "timeseries" else {"labels": [], "series": [], "extra": []}
    if panel.kind == "timeseries":
        times = sorted({_epoch_ms(r[0]) for r in res.rows})
        at = {t: i for i, t in enumerate(times)}
        series: dict[str, list[Any]] = {}
        if panel.series_column is not None:
            name_i, value_i = cols.index(panel.series_column), len(cols) - 1
            for r in res.rows:
                series.setdefault(str(r[name_i]), [0.0] * len(times))[at[_epoch_ms(r[0])]] = _display(r[value_i])
            order = sorted(series, key=lambda s: -sum(series[s]))
        else:
            order = cols[1:]
            for j, name in enumerate(order, start=1):
                values: list[Any] = [None] * len(times)
                for r in res.rows:
                    values[at[_epoch_ms(r[0])]] = _display(r[j])
                series[name] = values
        return {"x": times, "series": [{"name": s, "values": series[s]} for s in order]}
    if panel.kind == "bar":
        label_i = cols.index(panel.label_column or cols[0])
        return {"labels": [str(r[label_i]) for r in res.rows],
                "series": [{"name": b, "values": [_display(r[cols.index(b)]) for r in res.rows]} for b in panel.bars],
                "extra": [{c: _display(v) for c, v in zip(cols, r, strict=True) if c not in panel.bars}
                          for r in res.rows]}
    return {"columns": cols, "rows": [[_display(v) for v in r] for r in res.rows]}


def budget_burn(res: QueryResult, states: Mapping[str, Mapping[str, Any]], filtered: bool) -> dict[str, Any]:
    """Each budget's spend so far against its amount, highest share first; the top spenders when none is loaded.

    `states`: the budget states by key (llm.budget.state.v1 records: scope, id, period, budget_usd,
    recommendation). Spend is the panel's (fresh, filtered); used_pct is exact (Decimal) and rounded to 0.01 for
    display. With a filter, a budget whose scope has no spend in the filtered slice is left out (it may belong to
    another team).
    """
    spend = {(str(r[0]), str(r[1])): r for r in res.rows}
    budgets = []
    for state in states.values():
        scope, ident, period = str(state.get("scope")), str(state.get("id")), str(state.get("period"))
        row = spend.get((scope, ident))
        if row is None and filtered:
            continue
        spent = Decimal(0) if row is None else Decimal(row[2] if period == "day" else row[3])
        burn = Decimal(0) if row is None or row[4] is None else Decimal(row[4])
        amount = Decimal(str(state.get("budget_usd", "0")))
        used = (spent * 100 / amount).quantize(Decimal("0.01")) if amount > 0 else None
        budgets.append({"scope": scope, "id": ident, "period": period, "budget_usd": float(amount),
                        "spent_usd": float(spent), "used_pct": None if used is None else float(used),
                        "burn_usd_per_hour": float(burn), "recommendation": state.get("recommendation", ""),
                        "thresholds": list(state.get("thresholds", ()))})
    budgets.sort(key=lambda b: (b["used_pct"] is None, -(b["used_pct"] or 0.0), b["scope"], b["id"]))
    return {"budgets": budgets, "spend": shape(PANELS_BY_ID["budget_burn"], QueryResult(res.columns, res.rows[:10]))}


def run_panel(panel: Panel, query: Callable[[str], QueryResult], f: PanelFilters, database: str,
              budget_states: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Render, run and shape one panel: what GET /api/panels/<id> returns. Raises StoreError if the query fails."""
    res = query(render(panel.sql, f, database))
    data = budget_burn(res, budget_states or {}, f.filtered) if panel.kind == "budget" else shape(panel, res)
    return {"id": panel.id, "from": _display(f.start), "to": _display(f.end), "interval_s": f.interval_s,
            "data": data}


def filter_values(query: Callable[[str], QueryResult], database: str) -> dict[str, list[str]]:
    """The values each filter offers: those the rollups hold (the live page's drop-downs and its validation)."""
    everything = PanelFilters(datetime.fromtimestamp(0, UTC), datetime.fromtimestamp(1, UTC))
    return {name: [str(r[0]) for r in query(render(sql, everything, database)).rows]
            for name, sql in FILTER_SQL.items()}


def first_data(query: Callable[[str], QueryResult], database: str, now: datetime) -> datetime | None:
    """The first minute with spend within DEFAULT_RANGE before `now` (None: none), for `default_range`."""
    f = PanelFilters(now - timedelta(seconds=RANGES[DEFAULT_RANGE]), now)
    rows = query(render("SELECT minOrNull(bucket) FROM ${database}.rollup_minute WHERE $__timeFilter(bucket)", f,
                        database)).rows
    first = rows[0][0] if rows else None
    return None if first is None else (first if first.tzinfo is not None else first.replace(tzinfo=UTC))


def default_range(first: datetime | None, now: datetime) -> str:
    """The range the live page opens on: the shortest that holds every minute of data, at most DEFAULT_RANGE.

    A stack started five minutes ago opens on the last 15 minutes, not squeezed into the right edge of an hour.
    """
    if first is None:
        return DEFAULT_RANGE
    age = (now - first).total_seconds()
    fitting = [name for name, span in RANGES.items() if span >= age and span <= RANGES[DEFAULT_RANGE]]
    return min(fitting, key=RANGES.__getitem__, default=DEFAULT_RANGE)


def panel_meta(panels: Sequence[Panel] = PANELS) -> list[dict[str, Any]]:
    """What the page needs to lay out the panels: no SQL."""
    return [{"id": p.id, "title": p.title, "kind": p.kind, "description": p.description, "unit": p.unit,
             "units": dict(p.units), "stacked": p.stacked, "apart": list(p.apart), "bars": list(p.bars),
             "label_column": p.label_column, "width": p.width} for p in panels]
