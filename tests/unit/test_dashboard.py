"""Dashboard panels without I/O: macro rendering, filter validation, result shapes, budget burn, Grafana JSON."""

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from streams.dashboard import STATIC_DIR, static_files
from tally.dashboard import grafana
from tally.dashboard.panels import (
    FILTER_COLUMNS,
    FILTER_SQL,
    PANELS,
    PANELS_BY_ID,
    FilterError,
    PanelFilters,
    budget_burn,
    default_range,
    parse_filters,
    quote,
    render,
    shape,
)
from tally.store import QueryResult

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
START = NOW - timedelta(hours=1)
PRESENT = {"team": ["inbox", "search", "o'hare"], "environment": ["prod", "dev"]}


def filters(**selected):
    return PanelFilters(START, NOW, {name: tuple(selected.get(name, ())) for name in FILTER_COLUMNS})


# ---------------------------------------------------------------- macros
def test_render_substitutes_every_macro_as_the_grafana_plugin_does():
    sql = render("SELECT 1 FROM ${database}.t WHERE $__timeFilter(bucket) AND x > $__fromTime AND x < $__toTime "
                 "AND $__timeFilter_ms(ts) AND s = $__interval_s", filters(), "tally")
    lo, hi = int(START.timestamp()), int(NOW.timestamp())
    assert sql == (f"SELECT 1 FROM tally.t WHERE bucket >= toDateTime({lo}) AND bucket <= toDateTime({hi}) AND "
                   f"x > toDateTime({lo}) AND x < toDateTime({hi}) AND ts >= fromUnixTimestamp64Milli({lo}000) AND "
                   f"ts <= fromUnixTimestamp64Milli({hi}000) AND s = 40")


def test_conditional_all_is_1_eq_1_for_all_and_the_quoted_condition_for_a_value():
    sql = "WHERE $__conditionalAll(team_id IN (${team:singlequote}), $team)"
    assert render(sql, filters(), "db") == "WHERE 1=1"
    assert render(sql, filters(team=["search"]), "db") == "WHERE team_id IN ('search')"
    assert render(sql, filters(team=["a", "b"]), "db") == "WHERE team_id IN ('a', 'b')"


@pytest.mark.parametrize("value", ["o'hare", "x') OR 1=1 --", "back\\slash'", "$__toTime"])
def test_values_are_quoted_so_they_stay_one_string_literal(value):
    sql = render("WHERE $__conditionalAll(team_id IN (${team:singlequote}), $team)", filters(team=[value]), "db")
    literal = sql.removeprefix("WHERE team_id IN (").removesuffix(")")
    assert literal == quote(value)
    # The literal parses back to exactly the value: nothing escapes it.
    assert re.fullmatch(r"'(?:[^'\\]|\\.)*'", literal)
    assert re.sub(r"\\(.)", r"\1", literal[1:-1]) == value


@pytest.mark.parametrize("sql", ["SELECT $__unknown", "SELECT ${other:singlequote}", "SELECT $__timeFilter(a; b)",
                                 "SELECT ${team}", "SELECT $__conditionalAll(a, b)"])
def test_unknown_macros_and_variables_are_refused(sql):
    with pytest.raises(ValueError, match="unsupported|unbalanced|must be a variable"):
        render(sql, filters(team=["x"]), "db")


def test_a_database_that_is_not_an_identifier_is_refused():
    with pytest.raises(ValueError, match="identifier"):
        render("SELECT 1 FROM ${database}.t", filters(), "tally; DROP")


def test_every_panel_and_filter_query_renders_to_sql_without_macros():
    for sql in [p.sql for p in PANELS] + list(FILTER_SQL.values()):
        for f in (filters(), filters(team=["inbox"], environment=["prod"])):
            out = render(sql, f, "tally")
            assert "$" not in out and "{" not in out, out


def test_interval_is_the_range_over_the_number_of_points():
    assert PanelFilters(NOW - timedelta(days=7), NOW).interval_s == 7 * 86400 // 90
    assert PanelFilters(NOW - timedelta(seconds=30), NOW).interval_s == 1


# ---------------------------------------------------------------- filters from a request
def test_parse_filters_relative_range_and_values():
    f = parse_filters({"range": "6h", "team": "search", "environment": "all"}, NOW, PRESENT)
    assert (f.start, f.end) == (NOW - timedelta(hours=6), NOW)
    assert f.selected == {"team": ("search",), "environment": ()} and f.filtered
    assert parse_filters({}, NOW, PRESENT).start == NOW - timedelta(hours=1)


def test_parse_filters_absolute_range_is_utc():
    f = parse_filters({"from": "2026-11-20T10:00:00+02:00", "to": "2026-11-20T09:30:00Z"}, NOW, PRESENT)
    assert f.start == datetime(2026, 11, 20, 8, tzinfo=UTC) and f.end == datetime(2026, 11, 20, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(("params", "message"), [
    ({"range": "2h"}, "range must be one of"),
    ({"from": "yesterday", "to": "2026-11-20T09:30:00Z"}, "not an ISO 8601"),
    ({"from": "2026-11-20T09:00:00", "to": "2026-11-20T09:30:00Z"}, "UTC offset"),
    ({"from": "2026-11-20T10:00:00Z", "to": "2026-11-20T09:30:00Z"}, "before"),
    ({"from": "2024-01-01T00:00:00Z", "to": "2026-11-20T09:30:00Z"}, "more than 400 days"),
    ({"from": "2026-11-20T10:00:00Z"}, "not an ISO 8601"),
    ({"team": "nobody"}, "team: no data has the value"),
    ({"environment": "x' OR 1=1"}, "environment: no data"),
])
def test_parse_filters_refuses(params, message):
    with pytest.raises(FilterError, match=message):
        parse_filters(params, NOW, PRESENT)


# ---------------------------------------------------------------- shapes
def test_long_timeseries_is_pivoted_with_zeros_and_biggest_series_first():
    t0, t1 = NOW, NOW + timedelta(minutes=1)
    res = QueryResult(["time", "team", "usd_per_min"], [(t0, "inbox", Decimal("0.5")), (t0, "search", Decimal(2)),
                                                        (t1.replace(tzinfo=None), "inbox", Decimal("0.25"))])
    out = shape(PANELS_BY_ID["spend_by_team"], res)
    ms = int(t0.timestamp() * 1000)
    assert out == {"x": [ms, ms + 60_000], "series": [{"name": "search", "values": [2.0, 0.0]},
                                                      {"name": "inbox", "values": [0.5, 0.25]}]}


def test_wide_timeseries_keeps_column_order_and_gaps():
    panel = PANELS_BY_ID["unattributed_share"]
    out = shape(panel, QueryResult(["time", "unattributed_pct"], [(NOW, 2.5)]))
    assert out["series"] == [{"name": "unattributed_pct", "values": [2.5]}]


def test_bar_and_stat_and_table_shapes():
    bars = shape(PANELS_BY_ID["top_features"], QueryResult(
        ["feature", "team", "spend_usd", "daily_avg_7d_usd"], [("a", "inbox", Decimal("1.5"), Decimal("0.25"))]))
    assert bars == {"labels": ["a"], "series": [{"name": "spend_usd", "values": [1.5]},
                                                {"name": "daily_avg_7d_usd", "values": [0.25]}],
                    "extra": [{"feature": "a", "team": "inbox"}]}
    stat = shape(PANELS_BY_ID["totals"], QueryResult(["spend_usd", "requests"], []))
    assert stat == {"values": {"spend_usd": 0, "requests": 0}}
    table = shape(PANELS_BY_ID["open_anomalies"], QueryResult(["detected_at", "value"], [(NOW, 1.5)]))
    assert table == {"columns": ["detected_at", "value"], "rows": [["2026-11-20T12:00:00Z", 1.5]]}


def test_budget_burn_sets_spend_against_each_budget_exactly():
    cols = ["scope", "id", "spent_today_usd", "spent_month_usd", "burn_usd_per_hour"]
    res = QueryResult(cols, [("feature", "f1", Decimal("25"), Decimal("300"), Decimal("4")),
                             ("tenant", "t1", Decimal("1"), Decimal("2"), None)])
    states = {
        "feature:f1:day": {"scope": "feature", "id": "f1", "period": "day", "budget_usd": "100",
                           "recommendation": "allow", "thresholds": [50, 80, 100]},
        "tenant:t1:month": {"scope": "tenant", "id": "t1", "period": "month", "budget_usd": "3",
                            "recommendation": "degrade", "thresholds": [50, 80, 100]},
        "feature:f2:day": {"scope": "feature", "id": "f2", "period": "day", "budget_usd": "10",
                           "recommendation": "allow", "thresholds": [80]},
    }
    out = budget_burn(res, states, filtered=False)
    assert [(b["id"], b["spent_usd"], b["used_pct"], b["burn_usd_per_hour"]) for b in out["budgets"]] == [
        ("t1", 2.0, 66.67, 0.0), ("f1", 25.0, 25.0, 4.0), ("f2", 0.0, 0.0, 0.0)]
    # With a filter, a budget without spend in the slice may be another team's: left out.
    assert [b["id"] for b in budget_burn(res, states, filtered=True)["budgets"]] == ["t1", "f1"]
    assert budget_burn(res, {}, filtered=False)["spend"]["rows"][0] == ["feature", "f1", 25.0, 300.0, 4.0]


# ---------------------------------------------------------------- Grafana
def test_committed_grafana_dashboard_is_generated_from_the_panels():
    assert grafana.DASHBOARD_PATH.read_text() == grafana.render_json(), "run `make grafana`"
    assert grafana.main(["--check"]) == 0


def test_grafana_dashboard_is_valid():
    d = json.loads(grafana.DASHBOARD_PATH.read_text())
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) == {"datasource", "database", *FILTER_COLUMNS}
    assert variables["datasource"]["query"] == grafana.PLUGIN_TYPE
    for name in FILTER_COLUMNS:
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["query"] == FILTER_SQL[name]
    panels = d["panels"]
    assert [p["title"] for p in panels] == [p.title for p in PANELS]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["type"] in {"stat", "timeseries", "barchart", "table"}
        (target,) = p["targets"]
        assert target["datasource"] == p["datasource"] == {"type": grafana.PLUGIN_TYPE, "uid": "${datasource}"}
        assert target["editorType"] == "sql" and target["format"] in (0, 1)
        assert target["rawSql"] == next(x.sql for x in PANELS if x.title == p["title"])
        used = set(re.findall(r"\$\{(\w+)", target["rawSql"])) | set(re.findall(r"\$(?!__)(\w+)", target["rawSql"]))
        assert used <= set(variables), f"{p['title']} uses undeclared variables {used - set(variables)}"
        # Time series need a time column; long frames are pivoted by Grafana on format 0.
        if p["type"] == "timeseries":
            assert target["format"] == 0 and " AS time" in target["rawSql"]


def test_provisioning_points_at_the_dashboards_and_the_datasource_they_use():
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "tally.yaml").read_text())["datasources"]
    assert ds["type"] == grafana.PLUGIN_TYPE and ds["uid"] == grafana.DATASOURCE_UID
    assert ds["jsonData"]["username"] == "${TALLY_GRAFANA_CLICKHOUSE_USER}"
    assert ds["secureJsonData"]["password"].startswith("${")  # never a literal secret
    assert "tally_dashboard" in (GRAFANA / "provisioning" / "datasources" / "tally.yaml").read_text()
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tally.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    d = json.loads(grafana.DASHBOARD_PATH.read_text())
    assert next(v for v in d["templating"]["list"] if v["name"] == "datasource")["current"]["value"] == ds["uid"]
    users = (REPO / "deploy" / "clickhouse" / "users.sql").read_text()
    assert "CREATE USER IF NOT EXISTS tally_dashboard" in users


# ---------------------------------------------------------------- the page's files
def test_static_files_are_served_from_the_package_and_need_no_network():
    files = static_files()
    assert {"index.html", "app.js", "app.css", "vendor/chart.umd.min.js", "vendor/chart.js.LICENSE.md"} <= set(files)
    assert files["index.html"][1].startswith("text/html")
    for name in ("index.html", "app.js", "app.css"):
        text = files[name][0].decode()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{name} loads something remote"
    html = files["index.html"][0].decode()
    for ref in re.findall(r'(?:src|href)="/dashboard/static/([^"]+)"', html):
        assert ref in files, ref
    assert b"Chart.js v" in files["vendor/chart.umd.min.js"][0][:200]
    assert STATIC_DIR.is_dir()


def test_the_page_opens_on_a_range_its_data_fills():
    assert default_range(None, NOW) == "1h"  # no data yet
    assert default_range(NOW - timedelta(minutes=4), NOW) == "15m"  # a stack started minutes ago
    assert default_range(NOW - timedelta(minutes=15), NOW) == "15m"
    assert default_range(NOW - timedelta(minutes=16), NOW) == "1h"
    assert default_range(NOW - timedelta(days=3), NOW) == "1h"  # never longer than an hour by default


def test_time_series_leave_out_the_unfinished_minute_and_long_ranges_read_coarser_rollups():
    for p in PANELS:
        if p.kind == "timeseries":
            assert "bucket < toStartOfMinute(toDateTime(" in render(p.sql, filters(), "tally"), p.id
    spend = PANELS_BY_ID["totals"].sql
    assert all(f"{{database}}.rollup_{grain} WHERE grain_min" in spend for grain in ("minute", "hour", "day"))


def test_an_empty_result_without_columns_is_an_empty_chart():
    assert shape(PANELS_BY_ID["spend_by_team"], QueryResult([], [])) == {"x": [], "series": []}
    assert shape(PANELS_BY_ID["top_features"], QueryResult([], [])) == {"labels": [], "series": [], "extra": []}
