"""The report renderer: every format, exact money, self-contained HTML, table selection, progress switch."""

import csv
import io
import re
from datetime import UTC, date, datetime
from decimal import Decimal as D

import orjson
import pytest

from ops.reports.output import (
    ROUNDED_NOTE,
    Chart,
    Destination,
    Report,
    Table,
    decimal_text,
    display_decimal,
    is_money,
    money_cells,
    money_text,
    progress,
    progress_enabled,
    render,
    write_report,
)
from tally.errors import ReportError

BIG = D("12345678901234567890.123456789012345678")  # 38 digits: more than a float, or a default Decimal context, holds


def sample() -> Report:
    teams = Table("teams", "Per team", ("team", "cost_usd", "requests", "share", "day", "at", "note"),
                  [("search", BIG, 1200, 0.25, date(2026, 11, 1), datetime(2026, 11, 2, 3, 4, tzinfo=UTC), None),
                   ("inbox <b>", D("0E-18"), 3, 0.5, date(2026, 11, 2), None, "x,y")],
                  Chart("stacked_bar", "team", ("cost_usd", "requests")), ("a table note",))
    daily = Table("daily", "Per day", ("day", "a", "b"),
                  [(date(2026, 11, d), D(d), None if d == 2 else D("-1.5")) for d in range(1, 5)],
                  Chart("line", "day", ("a", "b")))
    bars = Table("bars", "Bars", ("k", "v"), [("one", D("1.25")), ("two", D(-2))], Chart("bar", "k", ("v",)))
    return Report("Title & co", "Nov 2026 · generated now", (teams, daily, bars), ("report note",))


def rendered(fmt, table=None, report=None) -> str:
    buf = io.StringIO()
    render(report or sample(), fmt, buf, table)
    return buf.getvalue()


def test_decimals_are_written_exactly_in_plain_notation():
    assert decimal_text(BIG) == "12345678901234567890.123456789012345678"
    assert decimal_text(D("1E+3")) == "1000"
    assert decimal_text(D("0E-18")) == "0"
    assert decimal_text(D("-0.500")) == "-0.5"
    assert decimal_text(D("0.000000000000000001")) == "0.000000000000000001"
    assert display_decimal(BIG) == "12,345,678,901,234,567,890.123456789012345678"
    assert display_decimal(D("1234.5")) == "1,234.50"
    assert display_decimal(D("-0.000")) == "0.00"


def test_money_is_what_a_usd_name_labels_shown_to_the_cent():
    assert [is_money(n) for n in ("cost_usd", "sum(cost_total_usd)", "usd_per_min", "USD", "invoice_qty",
                                  "BilledCost", "usda", "share")] == [True, True, True, True, False, False,
                                                                      False, False]
    assert money_text(D("14.171089722500000000")) == "14.17"
    assert money_text(D("0.005")) == "0.01" and money_text(D("-0.004")) == "0.00"
    assert money_text(BIG) == "12,345,678,901,234,567,890.12" and money_text(D(3)) == "3.00"
    summary = Table("summary", "Totals", ("measure", "value"),
                    [("invoice_usd", D("119.14091438125")), ("variance_pct", D("0.8137")), ("lines", 9)])
    assert money_cells(summary) == [[False, True], [False, False], [False, False]]
    text = rendered("table", report=Report("R", "s", (summary,)))
    assert "119.14 " in text and "0.8137" in text and ROUNDED_NOTE in text
    exact = Table("t", "t", ("cost_usd",), [(D("1.50"),)])
    assert ROUNDED_NOTE not in rendered("table", report=Report("R", "s", (exact,)))  # nothing hidden, no note
    assert orjson.loads(rendered("json", report=Report("R", "s", (summary,))))["tables"]["summary"]["rows"][0] == {
        "measure": "invoice_usd", "value": "119.14091438125"}  # JSON: exact


def test_csv_writes_one_table_with_a_header_and_exact_decimals():
    rows = list(csv.reader(io.StringIO(rendered("csv"))))
    assert rows == [["team", "cost_usd", "requests", "share", "day", "at", "note"],
                    ["search", "12345678901234567890.123456789012345678", "1200", "0.25", "2026-11-01",
                     "2026-11-02T03:04:00+00:00", ""],
                    ["inbox <b>", "0", "3", "0.5", "2026-11-02", "", "x,y"]]
    assert list(csv.reader(io.StringIO(rendered("csv", "bars")))) == [["k", "v"], ["one", "1.25"], ["two", "-2"]]


def test_json_keys_tables_by_name_with_decimals_as_strings():
    doc = orjson.loads(rendered("json"))
    assert (doc["title"], doc["subtitle"], doc["notes"]) == ("Title & co", "Nov 2026 · generated now",
                                                             ["report note"])
    assert list(doc["tables"]) == ["teams", "daily", "bars"]
    teams = doc["tables"]["teams"]
    assert (teams["title"], teams["notes"]) == ("Per team", ["a table note"])
    assert teams["rows"][0] == {"team": "search", "cost_usd": "12345678901234567890.123456789012345678",
                                "requests": 1200, "share": 0.25, "day": "2026-11-01",
                                "at": "2026-11-02T03:04:00+00:00", "note": None}
    assert doc["tables"]["daily"]["rows"][1] == {"day": "2026-11-02", "a": "2", "b": None}
    assert list(orjson.loads(rendered("json", "bars"))["tables"]) == ["bars"]


def test_terminal_tables_show_money_to_the_cent_and_other_decimals_exactly():
    text = rendered("table")
    assert "12,345,678,901,234,567,890.12 " in text and "890.1234" not in text  # cost_usd: money, to the cent
    assert ROUNDED_NOTE in text  # digits were hidden: say where the exact amounts are
    assert "1,200" in text and "-1.50" in text and "inbox <b>" in text  # columns a, b: not money, exact
    assert text.index("Per team") < text.index("Per day") < text.index("Bars") < text.index("report note")
    only = rendered("table", "bars")
    assert "Bars" in only and "Per team" not in only


def test_html_is_one_self_contained_file_with_svg_charts():
    page = rendered("html")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # No external asset: nothing loads from a URL, no script at all.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert page.count("<svg") == 3
    assert page.count("<polyline") == 2  # a: one line; b: its empty cell leaves a lone point and a 2-point line
    assert "<rect" in page
    assert "12,345,678,901,234,567,890.12<" in page  # money to the cent in the table and in the tooltip
    assert "890.1234" not in page and ROUNDED_NOTE in page
    assert "inbox &lt;b&gt;" in page and "inbox <b>" not in page
    assert "Title &amp; co" in page


def test_unknown_table_and_bad_input_are_clear_errors():
    with pytest.raises(ReportError, match=r"no table named 'nope'; its tables: teams, daily, bars"):
        rendered("csv", "nope")
    with pytest.raises(ReportError, match="unknown report format"):
        rendered("xml")
    bad = Report("t", "s", (Table("t", "T", ("a", "b"), [(1,)]),))
    with pytest.raises(ReportError, match="does not have 2 cells"):
        rendered("json", report=bad)
    wrong_chart = Report("t", "s", (Table("t", "T", ("a",), [(D(1),)], Chart("bar", "a", ("zz",))),))
    with pytest.raises(ReportError, match="chart column 'zz'"):
        rendered("html", report=wrong_chart)


def test_empty_tables_render_in_every_format():
    empty = Report("t", "s", (Table("none", "Nothing", ("a", "b"), [], Chart("line", "a", ("b",))),))
    assert rendered("csv", report=empty) == "a,b\n"
    assert orjson.loads(rendered("json", report=empty))["tables"]["none"]["rows"] == []
    assert "<svg" not in rendered("html", report=empty)
    assert "Nothing" in rendered("table", report=empty)


def test_write_report_to_a_file_writes_nothing_when_rendering_fails(tmp_path):
    target = tmp_path / "r.csv"
    with pytest.raises(ReportError):
        write_report(sample(), Destination("csv", target, "nope"), io.StringIO())
    assert not target.exists()
    write_report(sample(), Destination("csv", target, "bars"), io.StringIO())
    assert target.read_text() == "k,v\none,1.25\ntwo,-2\n"
    stdout = io.StringIO()
    write_report(sample(), Destination("json", None, "bars"), stdout)
    assert orjson.loads(stdout.getvalue())["tables"]["bars"]["rows"][0] == {"k": "one", "v": "1.25"}


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal_and_never_under_csv_or_json_on_stdout():
    assert progress_enabled("table", to_stdout=True, stream=Tty())
    assert progress_enabled("json", to_stdout=False, stream=Tty())
    assert not progress_enabled("json", to_stdout=True, stream=Tty())
    assert not progress_enabled("csv", to_stdout=True, stream=Tty())
    assert not progress_enabled("table", to_stdout=True, stream=io.StringIO())
    seen = []
    with progress(2, "x", enabled=False) as step:
        step("a")
        seen.append("a")
        step("b")
    assert seen == ["a"]
    with progress(2, "x", enabled=True) as step:  # a real bar on stderr (not a terminal here: rich draws nothing)
        step("a")
        step("b")
