"""Sample provider cost exports for one UTC day, written from tally's own sums: invoices `reconcile` can match.

The shipped examples (examples/invoices/) show the accepted shapes but are dated on one past day, so against a fresh
stack every line is "invoice only". These are dated on a day the stack has spend for (by default today, by the
clock the other reports use) and hold tally's exact sums, one model raised by a few percent so that reconcile has
something to flag: the file README's reconcile example calls invoice.csv, and one file per accepted shape.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from ops.reports.output import decimal_text
from ops.reports.reconcile import Cell
from tally.errors import ReportError

DEFAULT_RAISE_PCT = Decimal(3)
# File name → what it holds. invoice.csv is README's example: per-model totals, the top model raised.
FILES: dict[str, str] = {
    "invoice.csv": "canonical shape, one line per provider × model, the top model raised",
    "invoice_canonical.csv": "canonical shape, one line per provider × model × class, with quantities",
    "invoice_openai_costs.csv": "OpenAI costs export (openai only), one line per model × class",
    "invoice_anthropic_cost_report.csv": "Anthropic cost report (anthropic only, amounts in cents)",
}
# How each export words tally's comparison classes (reconcile's token_class reads them back).
_OPENAI_WORDING = {"input": "input", "output": "output", "cache_read": "cached input", "cache_write": "cache write",
                   "tools": "tool calls"}
_ANTHROPIC_TOKEN_TYPE = {"input": "uncached_input_tokens", "output": "output_tokens",
                         "cache_read": "cache_read_input_tokens",
                         "cache_write": "cache_creation.ephemeral_5m_input_tokens"}


def _csv(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def sample_invoices(cells: Mapping[Cell, tuple[Decimal, int]], day: date,
                    raise_pct: Decimal = DEFAULT_RAISE_PCT) -> dict[str, str]:
    """The FILES' text for `day` from tally's cells (reconcile.tally_cells); no I/O.

    Amounts are tally's exact sums; in invoice.csv the model with the most spend costs `raise_pct` percent more.
    Raises ReportError when tally holds no spend that day.
    """
    spent = sorted((key, value) for key, value in cells.items() if key[0] == day and (value[0] or value[1]))
    if not spent:
        raise ReportError(f"tally holds no spend on {day}: send traffic first (`tally simulate`, or `tally run`)")
    models: dict[tuple[str, str], Decimal] = {}
    for (_, provider, model, _), (cost, _) in spent:
        models[(provider, model)] = models.get((provider, model), Decimal(0)) + cost
    top = max(models, key=lambda m: (models[m], m))
    factor = 1 + raise_pct / 100
    epoch = int(datetime.combine(day, time(), tzinfo=UTC).timestamp())
    iso = f"{day.isoformat()}T00:00:00Z", f"{(day + timedelta(days=1)).isoformat()}T00:00:00Z"
    by_class = [(provider, model, cls, cost, qty) for (_, provider, model, cls), (cost, qty) in spent]
    return {
        "invoice.csv": _csv(("date", "provider", "model", "token_class", "quantity", "cost_usd"), [
            (day.isoformat(), p, m, "", "", decimal_text(cost * factor if (p, m) == top else cost))
            for (p, m), cost in sorted(models.items())]),
        "invoice_canonical.csv": _csv(("date", "provider", "model", "token_class", "quantity", "cost_usd"), [
            (day.isoformat(), p, m, cls, str(qty), decimal_text(cost)) for p, m, cls, cost, qty in by_class]),
        "invoice_openai_costs.csv": _csv(
            ("start_time", "end_time", "line_item", "project_id", "amount_value", "amount_currency"),
            [(str(epoch), str(epoch + 86400), f"{m}, {_OPENAI_WORDING[cls]}", "proj_sample", decimal_text(cost),
              "usd") for p, m, cls, cost, _ in by_class if p == "openai"]),
        "invoice_anthropic_cost_report.csv": _csv(
            ("starting_at", "ending_at", "workspace_id", "description", "model", "cost_type", "token_type",
             "currency", "amount"),
            [(*iso, "wrkspc_sample", f"{m} {cls}", m, "web_search" if cls == "tools" else "tokens",
              _ANTHROPIC_TOKEN_TYPE.get(cls, ""), "USD", decimal_text(cost.scaleb(2)))
             for p, m, cls, cost, _ in by_class if p == "anthropic"]),
    }
