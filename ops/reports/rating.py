"""What the money reports share: the read-only query hook, UTC day windows, and price cards from the stack or files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from tally.config import Settings
from tally.errors import ReferenceDataError, ReportError
from tally.reference import (
    KIND_MODEL_ALIASES,
    KIND_PRICE_CARD,
    PriceCard,
    ReferenceDoc,
    ReferenceSnapshot,
    load_reference_files,
    snapshot_of,
)

# Read-only SQL → (column names, rows). The CLI passes ops.cli.run_query (through the running worker in embedded
# mode); tests pass a Store. Queries use {db} and select money with toString(), so rows read the same either way.
Query = Callable[[str], tuple[list[str], list[list[Any]]]]


def parse_day(text: str, what: str) -> date:
    """Return a YYYY-MM-DD string as a date; ReportError naming `what` otherwise."""
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise ReportError(f"{what}: {text!r} is not a date (YYYY-MM-DD)") from None


def day_start(day: date) -> datetime:
    """Return midnight UTC of a day."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def days(start: date, end: date) -> list[date]:
    """Return the days of the half-open window [start, end)."""
    return [start + timedelta(days=i) for i in range((end - start).days)]


def ts_window_sql(start: date, end: date) -> str:
    """Return a WHERE condition on usage_events.ts for the UTC days [start, end) (dates only: safe to inline)."""
    return (f"ts >= toDateTime64('{start.isoformat()} 00:00:00', 3, 'UTC') "
            f"AND ts < toDateTime64('{end.isoformat()} 00:00:00', 3, 'UTC')")


def money(value: Any) -> Decimal:
    """Return a money cell as Decimal: toString() of a Decimal(38, 18) column, or a Decimal (never a float)."""
    if isinstance(value, float):
        raise ReportError("a money value arrived as a float; select it with toString()")
    return Decimal(str(value))


def price_cards(settings: Settings, paths: Sequence[Path]) -> dict[str, PriceCard]:
    """Return the price cards by version: from reference files/directories when given, else from the stack.

    The stack's cards are what the workers price with: the compacted topic llm.reference.price_cards, read to its
    end (the same records the workers' reference feed applies, model alias tables included: a card is bound to the
    latest table in effect during it). Raises ReportError when there are none, and ReferenceDataError (naming
    file:line) for an invalid file.
    """
    snapshot, _ = pricing_snapshot(settings, paths)
    return {c.version: c for c in snapshot.price_cards.items}


def pricing_snapshot(settings: Settings, paths: Sequence[Path]) -> tuple[ReferenceSnapshot, str]:
    """The price cards and model alias tables (with where they came from) as the workers hold them.

    From reference files/directories when given, else from the stack's compacted price-card topic. Raises
    ReportError when there is no card, and ReferenceDataError (naming file:line) for an invalid file.
    """
    if paths:
        files: list[Path] = []
        for p in paths:
            files.extend(sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) if p.is_dir() else [p])
        docs = load_reference_files(files)
        where = ", ".join(str(p) for p in paths)
    else:
        from streams.app import read_compacted

        values = read_compacted(settings.kafka, settings.topics.price_cards)
        problems: list[str] = []
        docs = []
        for key, value in values.items():
            try:
                docs.append(ReferenceDoc.from_json(orjson.dumps(value)))
            except ReferenceDataError as exc:
                problems += [f"{settings.topics.price_cards} key {key}: {p}" for p in exc.problems]
        if problems:
            raise ReferenceDataError(problems)
        where = f"topic {settings.topics.price_cards} on {settings.kafka_bootstrap}"
    snapshot = snapshot_of(d for d in docs if d.kind in (KIND_PRICE_CARD, KIND_MODEL_ALIASES))
    if not snapshot.price_cards.items:
        raise ReportError(f"no price cards in {where}: load them (`tally reference load`) or pass --price-cards")
    return snapshot, where
