"""`tally report reprice`: re-rate a window of usage_events with a named price card, as billed beside re-rated."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from ops.reports.output import Chart, Report, Table
from ops.reports.rating import Query, days, money, ts_window_sql
from ops.reports.reconcile import variance_pct
from streams.enrich import Costs, price_event
from streams.pieces import insert_token
from tally.errors import ReportError
from tally.reference import PriceCard
from tally.store import Store

TABLE = "repriced_events"
COLUMNS: tuple[str, ...] = (
    "price_card_version", "event_id", "ts", "provider", "model_actual", "team_id", "product", "feature_id",
    "tenant_id", "cost_center", "billed_price_card_version", "billed_pricing_status", "billed_cost_total_usd",
    "cost_input_usd", "cost_output_usd", "cost_reasoning_usd", "cost_cache_read_usd", "cost_cache_write_usd",
    "cost_tools_usd", "cost_total_usd", "pricing_status", "pricing_note", "repriced_at",
)
_FIELDS = ("event_id", "ts", "provider", "model_actual", "batch", "service_tier", "usage_reported",
           "stream_terminated_at_token_n", "input_tokens", "output_tokens", "reasoning_tokens", "cache_read_tokens",
           "cache_write_tokens", "cache_write_1h_tokens", "tool_calls", "billed_total", "billed_version",
           "billed_status", "team_id", "product", "feature_id", "tenant_id", "cost_center")


def _day_sql(day: date) -> str:
    return f"""
SELECT event_id, toString(ts), provider, model_actual, batch, service_tier, usage_reported,
       stream_terminated_at_token_n, input_tokens, output_tokens, reasoning_tokens, cache_read_tokens,
       cache_write_tokens, cache_write_1h_tokens, tool_calls, toString(cost_total_usd), price_card_version,
       pricing_status, team_id, product, feature_id, tenant_id, cost_center
FROM {{db}}.usage_events_current
WHERE {ts_window_sql(day, date.fromordinal(day.toordinal() + 1))}
ORDER BY event_id"""


def event_of(row: dict[str, Any]) -> dict[str, Any]:
    """Return the usage-event fields the pricer reads, rebuilt from a stored usage_events row.

    The stored token columns are what enrich priced: for an estimated (cut, unreported) attempt output_tokens
    holds the cut point and usage_reported is false, so the pricer takes the same path again.
    """
    return {
        "provider": row["provider"], "model_actual": row["model_actual"], "batch": bool(row["batch"]),
        "service_tier": row["service_tier"], "usage_reported": bool(row["usage_reported"]),
        "stream_terminated_at_token_n": row["stream_terminated_at_token_n"],
        "usage": {k: int(row[k]) for k in ("input_tokens", "output_tokens", "reasoning_tokens", "cache_read_tokens",
                                            "cache_write_tokens", "cache_write_1h_tokens")},
        "tool_calls": {str(k): int(v) for k, v in dict(row["tool_calls"] or {}).items()},
    }


@dataclass
class Totals:
    """Events and exact as-billed / re-rated USD of one group."""

    events: int = 0
    billed: Decimal = Decimal(0)
    rerated: Decimal = Decimal(0)

    def add(self, billed: Decimal, rerated: Decimal) -> None:
        self.events += 1
        self.billed += billed
        self.rerated += rerated


@dataclass
class Repricing:
    """The outcome of re-rating a window: totals per team and per model, status changes, rows (for --apply)."""

    card: str
    start: date
    end: date
    total: Totals = field(default_factory=Totals)
    by_team: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    by_model: dict[tuple[str, str], Totals] = field(default_factory=lambda: defaultdict(Totals))
    status_changes: Counter[tuple[str, str]] = field(default_factory=Counter)
    days: list[tuple[date, list[dict[str, Any]]]] = field(default_factory=list)


def reprice_rows(rows: Sequence[Sequence[Any]], card: PriceCard, out: Repricing, repriced_at: datetime,
                 keep_rows: bool) -> list[dict[str, Any]]:
    """Re-rate stored rows (in _day_sql's column order) with `card`, adding to `out`; returns the new table rows.

    Every row is priced by streams.enrich.price_event (the enrich stage's own pricer) with this one card, whatever
    its effective_at: re-rating applies the named version to the whole window. Exact Decimal throughout.
    """
    new_rows: list[dict[str, Any]] = []
    for cells in rows:
        row = dict(zip(_FIELDS, cells, strict=True))
        costs: Costs = price_event(event_of(row), card)
        billed = money(row["billed_total"])
        out.total.add(billed, costs.total)
        out.by_team[str(row["team_id"])].add(billed, costs.total)
        out.by_model[(str(row["provider"]), str(row["model_actual"]))].add(billed, costs.total)
        if costs.status != row["billed_status"]:
            out.status_changes[(str(row["billed_status"]), costs.status)] += 1
        if keep_rows:
            ts = datetime.fromisoformat(str(row["ts"]))
            new_rows.append({
                "price_card_version": card.version, "event_id": row["event_id"],
                "ts": ts if ts.tzinfo else ts.replace(tzinfo=UTC), "provider": row["provider"],
                "model_actual": row["model_actual"], "team_id": row["team_id"], "product": row["product"],
                "feature_id": row["feature_id"], "tenant_id": row["tenant_id"], "cost_center": row["cost_center"],
                "billed_price_card_version": row["billed_version"], "billed_pricing_status": row["billed_status"],
                "billed_cost_total_usd": billed, "cost_input_usd": costs.input, "cost_output_usd": costs.output,
                "cost_reasoning_usd": costs.reasoning, "cost_cache_read_usd": costs.cache_read,
                "cost_cache_write_usd": costs.cache_write, "cost_tools_usd": costs.tools,
                "cost_total_usd": costs.total, "pricing_status": costs.status, "pricing_note": costs.note,
                "repriced_at": repriced_at})
    return new_rows


def reprice(query: Query, card: PriceCard, start: date, end: date, keep_rows: bool,
            step: Callable[[str], None] = lambda label: None) -> Repricing:
    """Re-rate every usage_events row with ts in the UTC days [start, end); one query per day (`step` each).

    usage_events is only read. With keep_rows the re-rated rows are kept per day for write_repriced.
    """
    if end <= start:
        raise ReportError(f"--to {end} must be after --from {start} (the window is [from, to), in UTC days)")
    out = Repricing(card.version, start, end)
    repriced_at = datetime.now(UTC)
    for day in days(start, end):
        step(day.isoformat())
        _, rows = query(_day_sql(day))
        new_rows = reprice_rows(rows, card, out, repriced_at, keep_rows)
        if new_rows:
            out.days.append((day, new_rows))
    return out


def write_repriced(store: Store, result: Repricing, step: Callable[[str], None] = lambda label: None) -> int:
    """Insert the re-rated rows into repriced_events, one insert per day; returns the rows sent.

    Idempotent: rows are keyed (price_card_version, event_id) in a ReplacingMergeTree, and each day's insert
    carries a deterministic token over (card, event_id, re-rated cost and status), so a rerun with unchanged
    results is absorbed by ClickHouse and a changed one replaces the rows (the newer repriced_at wins on merge).
    Never touches usage_events.
    """
    sent = 0
    for day, rows in result.days:
        step(day.isoformat())
        keys = (f"{r['price_card_version']}#{r['event_id']}#{r['cost_total_usd']}#{r['pricing_status']}#"
                f"{r['cost_input_usd']}#{r['cost_output_usd']}#{r['cost_reasoning_usd']}#{r['cost_cache_read_usd']}#"
                f"{r['cost_cache_write_usd']}#{r['cost_tools_usd']}" for r in rows)
        columns = [[r[c] for r in rows] for c in COLUMNS]
        store.insert_columns(TABLE, columns, COLUMNS, insert_token(TABLE, keys))
        sent += len(rows)
    return sent


def _totals_row(t: Totals) -> tuple[int, Decimal, Decimal, Decimal, Decimal | None]:
    pct = variance_pct(t.billed, t.rerated)  # (billed − re-rated) / billed: the difference below has the other sign
    return (t.events, t.billed, t.rerated, t.rerated - t.billed,
            None if pct is None else (-pct).quantize(Decimal("0.01")))


def build_report(result: Repricing, applied: int | None, source: str) -> Report:
    """Return the repricing as a Report: difference per team and per model, status changes, what was stored."""
    cols = ("events", "billed_usd", "rerated_usd", "difference_usd", "difference_pct")
    teams = sorted(result.by_team.items(), key=lambda kv: (-abs(kv[1].rerated - kv[1].billed), kv[0]))
    models = sorted(result.by_model.items(), key=lambda kv: (-abs(kv[1].rerated - kv[1].billed), kv[0]))
    by_team = Table("by_team", "As billed vs re-rated, per team (difference = re-rated − billed)", ("team_id", *cols),
                    [(team or "(unattributed)", *_totals_row(t)) for team, t in teams],
                    chart=Chart("bar", "team_id", ("billed_usd", "rerated_usd")))
    by_model = Table("by_model", "As billed vs re-rated, per model", ("provider", "model", *cols),
                     [(p, m, *_totals_row(t)) for (p, m), t in models])
    total = Table("total", "Whole window", cols, [_totals_row(result.total)])
    changes = Table("status_changes", "Events whose pricing_status changes", ("billed_status", "rerated_status",
                                                                              "events"),
                    [(a, b, n) for (a, b), n in sorted(result.status_changes.items())])
    if applied is None:
        stored = (f"dry run: nothing stored. Add --apply to store the re-rated rows in {TABLE} (usage_events "
                  "stays as billed).")
    else:
        stored = (f"applied: {applied:,} re-rated rows sent to {TABLE} (price_card_version {result.card}); "
                  "a rerun stores the same rows again, never twice. Read it with FINAL.")
    notes = (f"every event with ts in [{result.start}, {result.end}) UTC re-rated with price card {result.card} "
             f"(from {source}), whatever its effective date, by the enrich stage's pricer", stored)
    return Report("Re-rating with a corrected price card", f"price card {result.card}; window {result.start} … "
                  f"{result.end} (exclusive)", (total, by_team, by_model, changes), notes)
