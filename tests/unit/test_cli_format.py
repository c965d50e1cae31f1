"""How the CLI shows values to people: money without ClickHouse's trailing zeros, times as ISO 8601."""

from __future__ import annotations

from decimal import Decimal

import orjson

from ops.cli import _cell, _json_cell, _status_value
from tests.factories import clock


def test_money_is_exact_without_trailing_zeros() -> None:
    money = Decimal("14.171089722500000000")  # Decimal(38, 18) as ClickHouse returns it
    assert _cell(money) == "14.1710897225"  # CSV: exact, plain
    assert _cell(money, people=True) == "14.1710897225"
    assert _cell(Decimal("12345.500000000000000000"), people=True) == "12,345.50"
    assert orjson.loads(orjson.dumps({"usd": money}, default=_json_cell)) == {"usd": "14.1710897225"}


def test_times_are_iso() -> None:
    now = clock()
    assert _status_value("started_at", now.timestamp()) == now.isoformat(timespec="seconds").replace("+00:00", "Z")
    assert _status_value("events_accepted", 12) == "12"
    assert _cell(now) == now.isoformat()


def test_the_api_sends_money_exact_without_trailing_zeros() -> None:
    from streams.roles.web import _text

    assert _text(Decimal("14.171089722500000000")) == "14.1710897225"
    big = "12345678901234567890.123456789012345678"  # Decimal(38, 18) at full width: no rounding
    assert _text(Decimal(big)) == big
    assert [_text(Decimal(v)) for v in ("0E-18", "-0.000", "1E+3")] == ["0", "0", "1000"]
