"""`tally price`: price one usage event against the card in effect at its time, and show why it costs what it costs.

What a FinOps analyst runs to answer "why did this cost that": the card version and how the model name was matched
(exact, a card alias, a model alias rule, a dated snapshot priced alike), the rates after batch and service-tier
multipliers, whether the long-context tier applied, one line per token class and per tool, and the pipeline's own
status and note. The costs come from `streams.enrich.price_event`, the function the process role prices with, so
the total is the one a row of usage_events carries for the same event and card, to the last digit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import Any

import orjson

from ops.reports.output import decimal_text
from streams.enrich import Costs, price_event
from streams.validate import Validator, _parse_ts
from tally.errors import TallyError
from tally.reference import MONEY_CONTEXT, PriceCard, Pricing, ReferenceSnapshot

#: The token classes as price_event bills them: (label, usage key, index in the rates, cost field).
_CLASSES = (
    ("input", "input_tokens", 0, "input"),
    ("output", "output_tokens", 1, "output"),
    ("reasoning", "reasoning_tokens", 2, "reasoning"),
    ("cache read", "cache_read_tokens", 3, "cache_read"),
    ("cache write 5m", "cache_write_tokens", 4, None),
    ("cache write 1h", "cache_write_1h_tokens", 5, None),
)
_MILLION = Decimal(1_000_000)


class PriceInputError(TallyError):
    """The event given to `tally price` is not a usage event."""


@dataclass(frozen=True)
class Line:
    """One billed line: a token class (rate per million tokens) or a tool (rate per call)."""

    what: str
    quantity: int
    unit: str  # "tokens" or "calls"
    rate: Decimal | None  # USD per million tokens, or per call; None = the card has no price for it
    cost: Decimal | None  # None = not priced (the row is partial)


@dataclass(frozen=True)
class Explanation:
    """Everything `tally price` shows for one event."""

    provider: str
    model: str
    at: datetime
    card: PriceCard | None
    matched: str  # how the model was matched, or why it was not
    priced_as: str
    batch: bool
    service_tier: str
    long_context: str  # "" without a tier, else the tier's verdict in words
    lines: tuple[Line, ...]
    costs: Costs

    def as_json(self) -> dict[str, Any]:
        """The explanation as plain JSON (money as exact decimal strings)."""
        def money(v: Decimal | None) -> str | None:
            return None if v is None else decimal_text(v)

        return {
            "provider": self.provider, "model": self.model,
            "at": self.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "price_card_version": self.card.version if self.card else "",
            "price_card_effective_at": (self.card.effective_at.isoformat().replace("+00:00", "Z")
                                        if self.card else None),
            "matched": self.matched, "priced_as": self.priced_as, "batch": self.batch,
            "service_tier": self.service_tier, "long_context": self.long_context,
            "lines": [{"what": ln.what, "quantity": ln.quantity, "unit": ln.unit, "rate": money(ln.rate),
                       "cost": money(ln.cost)} for ln in self.lines],
            "cost_cache_write_usd": money(self.costs.cache_write), "cost_tools_usd": money(self.costs.tools),
            "cost_total_usd": money(self.costs.total), "pricing_status": self.costs.status,
            "pricing_note": self.costs.note,
        }


def event_from_text(text: str) -> dict[str, Any]:
    """A usage event given as JSON text, checked against the event schema (the validator's words on failure)."""
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise PriceInputError(f"not JSON: {exc}") from None
    return checked(event)


def checked(event: Any) -> dict[str, Any]:
    """The event if the pipeline's schema accepts it, else PriceInputError with the validator's reason and path."""
    if not isinstance(event, dict):
        raise PriceInputError(f"a usage event must be a JSON object, got {type(event).__name__}")
    problem = Validator().explain(event)
    if problem is not None:
        reason, message, path = problem
        raise PriceInputError(f"not a usage event ({reason}{f' at {path}' if path else ''}): {message}")
    if _parse_ts(event["timestamp"]) is None:
        raise PriceInputError(f"timestamp {event['timestamp']!r} is not an RFC 3339 instant with an offset")
    return event


def explain(event: Mapping[str, Any], refs: ReferenceSnapshot) -> Explanation:
    """Price `event` with the card in effect at its timestamp in `refs`, line by line."""
    at = _parse_ts(event["timestamp"])
    assert at is not None  # checked() refuses an event without a valid timestamp
    card = refs.price_card_at(at)
    provider, model = event["provider"], event["model_actual"]
    batch, tier = bool(event.get("batch", False)), str(event.get("service_tier", ""))
    costs = price_event(event, card)
    if card is None:
        return Explanation(provider, model, at, None, "no price card in effect at this time", "", batch, tier, "",
                           (), costs)
    match = card.match(provider, model)
    pricing = card.pricing(provider, model, batch, tier)
    long_text = ""
    if pricing is not None:
        lines, long_text = _lines(event, pricing, costs)
    else:  # what would have been billed, had the card priced the model
        usage = event.get("usage") or {}
        lines = tuple(Line(label, int(usage[key]), "tokens", None, None) for label, key, _, _ in _CLASSES
                      if usage.get(key))
        lines += tuple(Line(f"tool {name}", int(calls), "calls", None, None)
                       for name, calls in sorted((event.get("tool_calls") or {}).items()) if calls)
    return Explanation(provider, model, at, card, match.how, costs.priced_as, batch, tier, long_text, lines, costs)


def _lines(event: Mapping[str, Any], pricing: Pricing, costs: Costs) -> tuple[tuple[Line, ...], str]:
    usage = event.get("usage") or {}
    counts = {key: int(usage.get(key, 0)) for _, key, _, _ in _CLASSES}
    prompt = sum(counts[k] for k in ("input_tokens", "cache_read_tokens", "cache_write_tokens",
                                     "cache_write_1h_tokens"))
    rates = pricing.base
    long_text = ""
    if pricing.above_input_tokens is not None:
        applies = prompt > pricing.above_input_tokens and pricing.long is not None
        if applies:
            assert pricing.long is not None
            rates = pricing.long
        long_text = (f"{'applies' if applies else 'does not apply'}: prompt {prompt:,} tokens "
                     f"{'>' if applies else '≤'} {pricing.above_input_tokens:,}")
    if costs.status == "estimated":  # the cut point stands in for the unreported output (enrich's rule)
        counts["output_tokens"] = int(event.get("stream_terminated_at_token_n") or 0)
        counts["reasoning_tokens"] = 0
    out: list[Line] = []
    with localcontext(MONEY_CONTEXT):  # exact, as enrich prices (any rounding raises)
        for label, key, i, field in _CLASSES:
            missing = i in rates.missing
            rate = None if missing else rates.filled[i] * _MILLION
            # enrich's own line where the row has one; the two cache-write lines (the row holds their sum) as
            # enrich computes each, tokens × rate per token
            cost = None if missing else (getattr(costs, field) if field else rates.filled[i] * counts[key])
            if counts[key]:
                out.append(Line(label, counts[key], "tokens", rate, cost))
        for name, calls in sorted((event.get("tool_calls") or {}).items()):
            if calls:
                price = pricing.entry.tools.get(name)
                out.append(Line(f"tool {name}", int(calls), "calls", price,
                                None if price is None else price * int(calls)))
    return tuple(out), long_text


def render(x: Explanation) -> str:
    """The explanation as text for a terminal."""
    when = x.at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    head = [f"{x.provider}/{x.model} at {when}"]
    if x.card is None:
        head.append("price card: none in effect at this time (the event would be stored unpriced)")
    else:
        effective = x.card.effective_at.isoformat().replace("+00:00", "Z")
        head.append(f"price card: {x.card.version} (effective {effective})")
        if x.priced_as:
            head.append(f"matched: {x.matched}")
            head.append(f"priced as: {x.priced_as}")
        else:
            head.append(f"not priced: {x.matched}")
        head.append(f"batch: {'yes' if x.batch else 'no'}; service tier: {x.service_tier or 'standard'}"
                    + (f"; long-context tier {x.long_context}" if x.long_context else ""))
    rows = [("line", "quantity", "USD rate", "USD cost")]
    for ln in x.lines:
        unit = "per 1M tokens" if ln.unit == "tokens" else "per call"
        rows.append((ln.what, f"{ln.quantity:,} {ln.unit}",
                     "no price" if ln.rate is None else f"{decimal_text(ln.rate)} {unit}",
                     "unpriced" if ln.cost is None else decimal_text(ln.cost)))
    rows.append(("total", "", "", decimal_text(x.costs.total)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             .rstrip() for r in rows]
    tail = [f"status: {x.costs.status}"]
    if x.costs.note and x.costs.note != x.matched:
        tail.append(f"note: {x.costs.note}")
    return "\n".join([*head, "", *table, "", *tail]) + "\n"

