"""How the CLI shows values to people: money without ClickHouse's trailing zeros, times as ISO 8601."""

from __future__ import annotations

from decimal import Decimal

import orjson

from ops.cli import _cell, _json_cell, _status_value
from tests.factories import clock


def test_money_is_exact_without_trailing_zeros_and_to_the_cent_for_people() -> None:
    money = Decimal("14.171089722500000000")  # Decimal(38, 18) as ClickHouse returns it
    assert _cell(money) == "14.1710897225"  # CSV: exact, plain
    assert _cell(money, people=True, money=True) == "14.17"  # a table's usd column: to the cent
    assert _cell(money, people=True) == "14.1710897225"  # a table's other decimals: exact
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


def test_query_table_shows_money_to_the_cent_and_csv_exactly(monkeypatch) -> None:
    from click.testing import CliRunner

    import ops.cli

    rows = [["search", Decimal("14.171089722500000000"), Decimal("2.500000000000000000")]]
    monkeypatch.setattr(ops.cli, "run_query", lambda s, sql: (["team_id", "sum(cost_total_usd)", "ratio"], rows))
    runner = CliRunner()
    table = runner.invoke(ops.cli.cli, ["query", "SELECT …"])
    assert table.exit_code == 0, table.output
    assert "14.17 " in table.output and "14.171" not in table.output and "2.50 " in table.output
    assert "--format csv or json gives the exact amounts" in table.output  # stderr: digits were hidden
    as_csv = runner.invoke(ops.cli.cli, ["query", "--format", "csv", "SELECT …"])
    assert as_csv.output.splitlines()[1] == "search,14.1710897225,2.5"
    rows[:] = [["search", "14.1710897225", "2.5"]]  # through the worker's API: decimals arrive as exact text
    sent = runner.invoke(ops.cli.cli, ["query", "SELECT …"])
    assert "14.17 " in sent.output and "14.171" not in sent.output and "2.5 " in sent.output


def test_ctrl_c_asks_to_stop_and_a_second_one_never_cuts_the_shutdown_short() -> None:
    import os
    import signal

    from ops.cli import StopOnSignal

    said: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal(said.append) as stopper:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the command winds down at its next check
        assert stopper.requested.wait(5)
        assert said == []
        os.kill(os.getpid(), signal.SIGTERM)  # during the shutdown: only a word that it is under way
        assert said == ["still stopping: waiting for what runs to shut down"]
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
