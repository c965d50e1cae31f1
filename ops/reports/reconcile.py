"""`tally report reconcile`: a provider cost export against tally's exact sums per day × provider × model × class."""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal
from pathlib import Path

from ops.reports.output import Report, Table
from ops.reports.rating import Query, days, money, ts_window_sql
from tally.errors import ReportError
from tally.reference import base_model

# `tally report reconcile` exits with this code when the total variance is over the threshold (weekly jobs).
EXIT_OVER_THRESHOLD = 3
DEFAULT_THRESHOLD_PCT = Decimal(1)
MAX_PROBLEMS_SHOWN = 25

# The classes a line is compared in. Reasoning is billed as output by every provider, so "output" is tally's
# output + reasoning; cache writes are one class (5-minute and 1-hour writes share tally's cost_cache_write_usd).
# "" on an invoice line = every class of that model (a per-model total).
CLASSES: tuple[str, ...] = ("input", "output", "cache_read", "cache_write", "tools")
ALL = ""

# Invoice wording → class (lower case; "_", "-" and "." read as spaces; a trailing "(…)" qualifier is dropped).
_CLASS_NAMES: dict[str, str] = {
    **dict.fromkeys(("input", "input tokens", "uncached input", "uncached input tokens", "text input",
                     "text input tokens"), "input"),
    **dict.fromkeys(("cached input", "cached input tokens", "cache read", "cache read tokens",
                     "cache read input tokens", "input cached", "input cached tokens"), "cache_read"),
    **dict.fromkeys(("cache write", "cache write tokens", "cache write 5m", "cache write 1h", "cache creation",
                     "cache creation input tokens", "cache creation ephemeral 5m input tokens",
                     "cache creation ephemeral 1h input tokens"), "cache_write"),
    **dict.fromkeys(("output", "output tokens", "text output", "text output tokens", "reasoning",
                     "reasoning tokens", "completion", "completion tokens"), "output"),
    **dict.fromkeys(("tools", "tool calls", "web search", "web search calls", "web search tool calls",
                     "file search", "file search tool calls", "code interpreter", "code execution"), "tools"),
}
_QUALIFIER_RE = re.compile(r"\s*\([^)]*\)\s*$")
_DECIMAL_RE = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?$")
_PROVIDER_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")
_PCT = Context(prec=50)
_ONE_DAY = timedelta(days=1)


@dataclass(frozen=True)
class InvoiceLine:
    """One line of a provider cost export, normalized: model '' = all models, token_class '' = all classes."""

    line: int
    day: date
    provider: str
    model: str
    token_class: str
    quantity: Decimal | None
    cost: Decimal


@dataclass(frozen=True)
class Invoice:
    """A parsed cost export: its shape (canonical, openai, anthropic) and its lines."""

    origin: str
    shape: str
    lines: tuple[InvoiceLine, ...]


def token_class(text: str) -> str | None:
    """Return the comparison class an invoice names ('' for none given), or None when the wording is unknown."""
    name = _QUALIFIER_RE.sub("", re.sub(r"[_.\-]+", " ", text.strip().lower())).strip()
    if not name:
        return ALL
    return _CLASS_NAMES.get(name)


class _Problems:
    """Problems found while parsing, each "origin:line: message"; raised together."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.items: list[str] = []

    def add(self, line: int, message: str) -> None:
        self.items.append(f"{self.origin}:{line}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            shown = self.items[:MAX_PROBLEMS_SHOWN]
            more = len(self.items) - len(shown)
            raise ReportError("invalid cost export:\n" + "\n".join(f"  - {p}" for p in shown)
                              + (f"\n  … and {more} more" if more else ""))


def _amount(p: _Problems, line: int, what: str, text: str) -> Decimal | None:
    value = text.strip()
    if not _DECIMAL_RE.match(value):
        p.add(line, f"{what} {text!r} is not a plain decimal such as 12.50 (no currency sign, separator or exponent)")
        return None
    return Decimal(value)


def _quantity(p: _Problems, line: int, text: str | None) -> Decimal | None:
    if text is None or not text.strip():
        return None
    if not _QUANTITY_RE.match(text.strip()):
        p.add(line, f"quantity {text!r} is not a non-negative decimal")
        return None
    return Decimal(text.strip())


def _instant(text: str) -> datetime | None:
    """Unix seconds or an ISO 8601 timestamp with an offset, as aware UTC; None when it is neither."""
    value = text.strip()
    if value.isdigit():
        return datetime.fromtimestamp(int(value), UTC)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else None


def _bucket_day(p: _Problems, line: int, start: str, end: str | None) -> date | None:
    """The UTC day of a one-day bucket [start, end); a bucket that is not one whole UTC day is a problem."""
    begins = _instant(start)
    if begins is None:
        p.add(line, f"start {start!r} is neither Unix seconds nor an ISO 8601 timestamp with an offset")
        return None
    if begins.hour or begins.minute or begins.second or begins.microsecond:
        p.add(line, f"bucket starts at {begins.isoformat()}, not at midnight UTC: export daily buckets in UTC")
        return None
    if end is not None and end.strip():
        ends = _instant(end)
        if ends is None or ends - begins != _ONE_DAY:
            p.add(line, f"bucket {start!r} … {end!r} is not one UTC day: export with a 1-day bucket width")
            return None
    return begins.date()


def _provider(p: _Problems, line: int, text: str) -> str | None:
    value = text.strip().lower()
    if not _PROVIDER_RE.match(value):
        p.add(line, f"provider {text!r} is not a provider id such as openai or anthropic")
        return None
    return value


def _class(p: _Problems, line: int, text: str) -> str | None:
    found = token_class(text)
    if found is None:
        known = ", ".join(sorted({*_CLASS_NAMES}))
        p.add(line, f"unknown token class or line item {text!r} (known: {known})")
    return found


def _currency(p: _Problems, line: int, text: str | None) -> bool:
    if text is not None and text.strip() and text.strip().upper() != "USD":
        p.add(line, f"currency {text!r}: only USD exports can be compared (tally prices in USD)")
        return False
    return True


def _canonical(row: Mapping[str, str], line: int, p: _Problems) -> InvoiceLine | None:
    day_text = row["date"].strip()
    try:
        day = date.fromisoformat(day_text)
    except ValueError:
        p.add(line, f"date {day_text!r} is not YYYY-MM-DD")
        day = None
    provider = _provider(p, line, row["provider"])
    model = row["model"].strip()
    cls = _class(p, line, row.get("token_class") or row.get("line_item") or "")
    cost = _amount(p, line, "cost_usd", row["cost_usd"])
    quantity = _quantity(p, line, row.get("quantity"))
    ok = _currency(p, line, row.get("currency"))
    if not model:
        p.add(line, "model is empty")
    if day is None or provider is None or cls is None or cost is None or not model or not ok:
        return None
    return InvoiceLine(line, day, provider, model, cls, quantity, cost)


def _openai(row: Mapping[str, str], line: int, p: _Problems) -> InvoiceLine | None:
    day = _bucket_day(p, line, row["start_time"], row.get("end_time"))
    item = row["line_item"].strip()
    model, sep, wording = item.rpartition(",")
    if not sep:  # no "model, class": a whole line item such as "web search tool calls", or a bare model
        model, wording = ("", item) if token_class(item) not in (None, ALL) else (item, "")
    cls = _class(p, line, wording)
    cost = _amount(p, line, "amount_value", row["amount_value"])
    ok = _currency(p, line, row.get("amount_currency"))
    if not item:
        p.add(line, "line_item is empty: export the costs grouped by line_item")
    if day is None or cls is None or cost is None or not item or not ok:
        return None
    return InvoiceLine(line, day, "openai", model.strip(), cls, _quantity(p, line, row.get("quantity")), cost)


def _anthropic(row: Mapping[str, str], line: int, p: _Problems) -> InvoiceLine | None:
    day = _bucket_day(p, line, row["starting_at"], row.get("ending_at"))
    cost_type = (row.get("cost_type") or "tokens").strip().lower()
    if cost_type in ("", "tokens"):
        cls = _class(p, line, row.get("token_type") or "")
    elif cost_type in ("web_search", "code_execution"):
        cls = "tools"
    else:
        p.add(line, f"unknown cost_type {cost_type!r} (known: tokens, web_search, code_execution)")
        cls = None
    cents = _amount(p, line, "amount", row["amount"])
    ok = _currency(p, line, row.get("currency"))
    if day is None or cls is None or cents is None or not ok:
        return None
    # The cost report states amounts in the lowest currency unit (cents for USD), as decimal strings.
    return InvoiceLine(line, day, "anthropic", (row.get("model") or "").strip(), cls, None, cents.scaleb(-2))


_SHAPES: tuple[tuple[str, frozenset[str], Callable[[Mapping[str, str], int, _Problems], InvoiceLine | None]], ...] = (
    ("openai", frozenset({"start_time", "line_item", "amount_value"}), _openai),
    ("anthropic", frozenset({"starting_at", "amount", "token_type"}), _anthropic),
    ("anthropic", frozenset({"starting_at", "amount", "cost_type"}), _anthropic),
    ("canonical", frozenset({"date", "provider", "model", "cost_usd"}), _canonical),
)


def _header_name(name: str) -> str:
    return name.strip().lstrip("\ufeff").lower().replace(".", "_").replace(" ", "_")


def parse_invoice_text(text: str, origin: str) -> Invoice:
    """Parse a cost export (canonical, OpenAI-style or Anthropic-style; docs/reports.md), detected by its header.

    Contract: costs are exact Decimal USD from the text (never floats); every problem is reported at once as
    "origin:line: message" in a ReportError; a line that names a model or class twice with overlapping scope
    (e.g. a per-model total next to that model's per-class lines on the same day) is refused, since it would be
    counted twice.
    """
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise ReportError(f"{origin}: empty file; expected a CSV header (see docs/reports.md)")
    names = [_header_name(h) for h in header]
    if "amount_value" not in names and "amount_amount_value" in names:
        names = ["amount_value" if n == "amount_amount_value" else n for n in names]
    found = next(((shape, parse) for shape, need, parse in _SHAPES if need <= set(names)), None)
    if found is None:
        raise ReportError(
            f"{origin}:1: unrecognized header {header!r}; expected one of: canonical (date, provider, model, "
            "token_class, quantity, cost_usd), OpenAI costs (start_time, end_time, line_item, amount_value, "
            "amount_currency) or Anthropic cost report (starting_at, ending_at, model, cost_type, token_type, "
            "amount, currency); see docs/reports.md")
    shape, parse = found
    p = _Problems(origin)
    lines: list[InvoiceLine] = []
    for number, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(names):
            p.add(number, f"{len(cells)} fields, the header has {len(names)}")
            continue
        parsed = parse(dict(zip(names, cells, strict=True)), number, p)
        if parsed is not None:
            lines.append(parsed)
    _check_overlaps(lines, p)
    p.raise_if_any()
    if not lines:
        raise ReportError(f"{origin}: no cost lines under the header")
    return Invoice(origin, shape, tuple(lines))


def parse_invoice(path: Path) -> Invoice:
    """Read and parse a cost export file (UTF-8, a BOM allowed); see parse_invoice_text."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from exc
    return parse_invoice_text(text, str(path))


def _overlaps(a: tuple[str, str], b: tuple[str, str]) -> bool:
    return all(x == y or ALL in (x, y) for x, y in zip(a, b, strict=True))


def _check_overlaps(lines: Iterable[InvoiceLine], p: _Problems) -> None:
    scopes: dict[tuple[date, str], dict[tuple[str, str], int]] = defaultdict(dict)
    for ln in lines:
        seen = scopes[(ln.day, ln.provider)]
        scope = (base_model(ln.model), ln.token_class)
        if scope in seen:
            continue  # the same scope again (e.g. per context window or service tier): summed
        for other, first in seen.items():
            if _overlaps(scope, other):
                p.add(ln.line, f"{ln.provider} {ln.model or 'all models'} / {ln.token_class or 'all classes'} on "
                               f"{ln.day} overlaps line {first} ({other[0] or 'all models'} / "
                               f"{other[1] or 'all classes'}): it would be counted twice")
                break
        seen[scope] = ln.line


# ---------------------------------------------------------------- tally's side
Cell = tuple[date, str, str, str]  # day, provider, base model, class


def _tally_sql(day: date) -> str:
    return f"""
SELECT provider, model_actual,
       toString(sum(cost_input_usd)), toString(sum(cost_output_usd) + sum(cost_reasoning_usd)),
       toString(sum(cost_cache_read_usd)), toString(sum(cost_cache_write_usd)), toString(sum(cost_tools_usd)),
       sum(input_tokens), sum(output_tokens) + sum(reasoning_tokens), sum(cache_read_tokens),
       sum(cache_write_tokens) + sum(cache_write_1h_tokens), sum(arraySum(mapValues(tool_calls)))
FROM {{db}}.usage_events_current
WHERE {ts_window_sql(day, day + _ONE_DAY)}
GROUP BY provider, model_actual"""


def tally_cells(query: Query, first: date, last: date, providers: set[str] | None,
                step: Callable[[str], None] = lambda label: None) -> dict[Cell, tuple[Decimal, int]]:
    """Return tally's exact cost and quantity per (UTC day, provider, base model, class), for days first…last.

    Only the `providers` given (None: every provider). One query per day (`step` is called before each, for
    progress). Models are compared by base name (a dated snapshot such as gpt-4o-2024-08-06 counts as gpt-4o), as
    price cards match them.
    """
    cells: dict[Cell, tuple[Decimal, int]] = {}
    for day in days(first, last + _ONE_DAY):
        step(day.isoformat())
        _, rows = query(_tally_sql(day))
        for provider, model, *values in rows:
            if providers is not None and provider not in providers:
                continue
            for i, cls in enumerate(CLASSES):
                key = (day, str(provider), base_model(str(model)), cls)
                cost, qty = cells.get(key, (Decimal(0), 0))
                cells[key] = (cost + money(values[i]), qty + int(values[i + len(CLASSES)]))
    return cells


# ---------------------------------------------------------------- comparison
OK = "ok"
OVER = "over threshold"
INVOICE_ONLY = "invoice only"
TALLY_ONLY = "tally only"


@dataclass(frozen=True)
class Line:
    """One compared line; a side without data is None; variance = invoice − tally; pct relative to the invoice."""

    day: date
    provider: str
    model: str
    token_class: str
    invoice_usd: Decimal | None
    tally_usd: Decimal | None
    invoice_qty: Decimal | None
    tally_qty: int | None
    variance_usd: Decimal
    variance_pct: Decimal | None
    status: str

    @property
    def flagged(self) -> bool:
        return self.status != OK


@dataclass(frozen=True)
class Reconciliation:
    """Every compared line and the totals; `over` = the total variance is over the threshold."""

    lines: tuple[Line, ...]
    invoice_total: Decimal
    tally_total: Decimal
    variance_usd: Decimal
    variance_pct: Decimal | None
    threshold_pct: Decimal
    over: bool


def variance_pct(invoice: Decimal, tally: Decimal) -> Decimal | None:
    """Return (invoice − tally) / invoice in percent, exact to 50 digits; None when the invoice is 0 and tally not."""
    diff = invoice - tally
    if not invoice:
        return Decimal(0) if not diff else None
    return _PCT.divide(diff * 100, invoice)


def _over(pct: Decimal | None, threshold: Decimal) -> bool:
    return pct is None or abs(pct) > threshold


def compare(invoice: Invoice, cells: Mapping[Cell, tuple[Decimal, int]], threshold_pct: Decimal) -> Reconciliation:
    """Compare invoice lines with tally's cells (a line's '' model or class matches all); pure, exact.

    Lines with the same (day, provider, model, class) are summed. A line tally has no data for is "invoice only";
    a tally cell with a non-zero cost that no invoice line covers (within the invoice's days and providers) is
    "tally only"; both are flagged, as is any line whose |variance %| is over the threshold.
    """
    summed: dict[tuple[date, str, str, str], tuple[Decimal, Decimal | None]] = {}
    for ln in invoice.lines:
        key = (ln.day, ln.provider, base_model(ln.model), ln.token_class)
        cost, qty = summed.get(key, (Decimal(0), Decimal(0)))
        summed[key] = (cost + ln.cost, None if qty is None or ln.quantity is None else qty + ln.quantity)
    by_day: dict[tuple[date, str], list[Cell]] = defaultdict(list)
    for c in cells:
        by_day[(c[0], c[1])].append(c)
    covered: set[Cell] = set()
    out: list[Line] = []
    for (day, provider, model, cls), (cost, qty) in summed.items():
        matched = [c for c in by_day[(day, provider)] if model in (ALL, c[2]) and cls in (ALL, c[3])]
        covered.update(matched)
        if not any(cells[c][0] or cells[c][1] for c in matched):
            out.append(Line(day, provider, model, cls, cost, None, qty, None, cost, Decimal(100) if cost else
                            Decimal(0), INVOICE_ONLY))
            continue
        t_cost = sum((cells[c][0] for c in matched), Decimal(0))
        t_qty = sum(cells[c][1] for c in matched)
        pct = variance_pct(cost, t_cost)
        out.append(Line(day, provider, model, cls, cost, t_cost, qty, t_qty, cost - t_cost, pct,
                        OVER if _over(pct, threshold_pct) else OK))
    for cell, (t_cost, t_qty) in cells.items():
        if cell not in covered and t_cost:
            day, provider, model, cls = cell
            out.append(Line(day, provider, model, cls, None, t_cost, None, t_qty, -t_cost, None, TALLY_ONLY))
    out.sort(key=lambda ln: (ln.day, ln.provider, ln.model, CLASSES.index(ln.token_class) + 1 if ln.token_class
                             else 0))
    inv_total = sum((ln.invoice_usd or Decimal(0) for ln in out), Decimal(0))
    tally_total = sum((ln.tally_usd or Decimal(0) for ln in out), Decimal(0))
    pct = variance_pct(inv_total, tally_total)
    return Reconciliation(tuple(out), inv_total, tally_total, inv_total - tally_total, pct, threshold_pct,
                          _over(pct, threshold_pct))


def _pct_cell(pct: Decimal | None) -> Decimal | None:
    return None if pct is None else pct.quantize(Decimal("0.01"), context=_PCT)


def build_report(invoice: Invoice, rec: Reconciliation, subtitle: str) -> Report:
    """Return the reconciliation as a Report: the lines table (flagged lines marked) and a summary table."""
    flagged = [ln for ln in rec.lines if ln.flagged]
    lines = Table(
        "lines", "Invoice lines against tally (variance = invoice − tally; % of the invoice)",
        ("date", "provider", "model", "class", "invoice_usd", "tally_usd", "variance_usd", "variance_pct",
         "invoice_qty", "tally_qty", "status"),
        [(ln.day, ln.provider, ln.model or "(all models)", ln.token_class or "(all classes)", ln.invoice_usd,
          ln.tally_usd, ln.variance_usd, _pct_cell(ln.variance_pct), ln.invoice_qty, ln.tally_qty, ln.status)
         for ln in rec.lines],
        notes=("class output includes reasoning tokens; cache_write includes 5-minute and 1-hour writes",))
    verdict = (f"OVER: total variance beyond ±{rec.threshold_pct} % (exit code {EXIT_OVER_THRESHOLD})" if rec.over
               else f"within ±{rec.threshold_pct} %")
    summary = Table("summary", "Totals", ("measure", "value"), [
        ("invoice_usd", rec.invoice_total), ("tally_usd", rec.tally_total), ("variance_usd", rec.variance_usd),
        ("variance_pct", _pct_cell(rec.variance_pct)), ("threshold_pct", rec.threshold_pct),
        ("lines", len(rec.lines)), ("flagged_lines", len(flagged)), ("verdict", verdict)])
    notes = [f"{len(invoice.lines)} lines read from {invoice.origin} ({invoice.shape} shape); days are UTC."]
    notes += [f"flagged: {ln.day} {ln.provider} {ln.model or '(all models)'} {ln.token_class or '(all classes)'}: "
              f"{ln.status}, variance {ln.variance_usd} USD"
              + (f" ({_pct_cell(ln.variance_pct)} %)" if ln.variance_pct is not None else "")
              for ln in flagged[:10]]
    if len(flagged) > 10:
        notes.append(f"… and {len(flagged) - 10} more flagged lines (see the lines table)")
    return Report("Invoice reconciliation", subtitle, (summary, lines), tuple(notes))


def reconcile(query: Query, invoice: Invoice, threshold_pct: Decimal,
              step: Callable[[str], None] = lambda label: None) -> Reconciliation:
    """Compare a parsed invoice with tally's stored sums over the invoice's days and providers."""
    if threshold_pct < 0:
        raise ReportError(f"--threshold {threshold_pct}: must be a percentage ≥ 0")
    first = min(ln.day for ln in invoice.lines)
    last = max(ln.day for ln in invoice.lines)
    cells = tally_cells(query, first, last, {ln.provider for ln in invoice.lines}, step)
    return compare(invoice, cells, threshold_pct)
