"""The live dashboard in a real headless Chromium: it loads, draws every chart with data, refreshes, and filters."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from ops.simulate import TrafficGenerator, catalog_from_reference
from tally.dashboard import PAGE_PATH
from tally.reference import load_reference_files
from tests.e2e.cdp import Chromium, find_chromium
from tests.e2e.conftest import EXAMPLES, REFERENCE_FILES, Stack

pytestmark = pytest.mark.e2e

ARTIFACTS_ENV = "TALLY_TEST_ARTIFACTS"
CHARTS = ("spend_by_team", "spend_by_cost_class", "top_features", "reasoning_share", "retry_waste",
          "unattributed_share")
STATE = "JSON.stringify({updates: tally.updates, key: tally.filterKey, points: tally.points, errors: tally.errors})"
# Per chart: its panel id, the data points Chart.js holds and the canvas pixels actually painted.
PAINTED = """[...document.querySelectorAll('canvas')].map((c) => {
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = 0;
  for (let i = 3; i < px.length; i += 4) if (px[i] > 0) painted += 1;
  const chart = Chart.getChart(c);
  return {panel: c.closest('.card').dataset.panel, area: c.width * c.height, painted,
          points: chart ? chart.data.datasets.reduce((n, d) => n + d.data.length, 0) : 0};
})"""


@pytest.fixture
def chromium(tmp_path: Path):
    executable = find_chromium()
    if executable is None:
        pytest.fail("no Chromium on PATH: install Debian's chromium package (apt-get install chromium; .ci/run "
                    "does it)")
    browser = Chromium(executable, tmp_path / "chromium-profile")
    yield browser
    browser.close()


def keep(path: Path) -> None:
    """Copy a test artifact to $TALLY_TEST_ARTIFACTS when it is set (it stays in the test's tmp dir anyway)."""
    target = os.environ.get(ARTIFACTS_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(target) / path.name)


def spend(stack: Stack, where: str = "1") -> Decimal:
    rows = stack.query(f"SELECT toString(sum(cost_total_usd)) AS s FROM tally.usage_events WHERE {where}")
    return Decimal(rows[0]["s"])


def select(browser: Chromium, name: str, value: str) -> None:
    script = (f"(() => {{ const s = document.getElementById('f-{name}'); s.value = {orjson.dumps(value).decode()}; "
              "s.dispatchEvent(new Event('change')); return s.value; })()")
    assert browser.evaluate(script) == value, f"the {name} filter offers no {value!r}"


def test_live_page_draws_every_chart_and_a_team_filter_changes_the_numbers(stack, chromium, tmp_path):
    stack.tally("up", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    # 25 minutes of traffic ending about 5 minutes ago: all of it inside the page's default range (the last hour).
    gen = TrafficGenerator(catalog_from_reference(load_reference_files(REFERENCE_FILES)), seed=11, bad_rate=0.0,
                           start=datetime.now(UTC) - timedelta(minutes=25), rate=1.0)
    events = [e for _ in range(1200) for e in gen.logical_request()]
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    stack.tally("publish", str(traffic))
    stack.tally("wait", "--timeout", "180", timeout=240)

    chromium.navigate(stack.settings.web_url + PAGE_PATH)
    drawn = " && ".join(f"tally.points.{p} > 0" for p in CHARTS)
    chromium.wait_for(f"window.tally && tally.ready && {drawn} && Object.keys(tally.errors).length === 0 && "
                      "document.querySelectorAll('#panel-budget_burn .budget').length > 0", 120, STATE)
    for chart in chromium.evaluate(PAINTED):
        assert chart["points"] > 0 and chart["painted"] > chart["area"] * 0.01, chart
    assert {c["panel"] for c in chromium.evaluate(PAINTED)} == set(CHARTS)
    # The figures are ClickHouse's: spend in range equals the events' exact total (shown as a float).
    everything = chromium.evaluate("tally.values.totals")
    assert everything["spend_usd"] == pytest.approx(float(spend(stack)), rel=1e-9)
    assert everything["requests"] == 1200
    teams = chromium.evaluate("tally.series.spend_by_team")
    assert "search" in teams and len(teams) > 1
    # Live: the page asks again every few seconds without being told to.
    updates = chromium.evaluate("tally.updates")
    chromium.wait_for(f"tally.updates >= {updates + 2}", 30, STATE)
    # Everything the page loaded came from the worker itself.
    assert chromium.evaluate("performance.getEntriesByType('resource')"
                             ".every((e) => e.name.startsWith(location.origin))")
    shown_before = chromium.evaluate("document.querySelector('[data-kpi=spend_usd] .value').textContent")
    keep(chromium.screenshot(tmp_path / "dashboard.png"))

    select(chromium, "team", "search")
    chromium.wait_for("tally.filterKey.includes('team=search') && tally.ready", 60, STATE)
    search = chromium.evaluate("tally.values.totals")
    assert search["spend_usd"] == pytest.approx(float(spend(stack, "team_id = 'search'")), rel=1e-9)
    assert 0 < search["spend_usd"] < everything["spend_usd"]
    assert chromium.evaluate("tally.series.spend_by_team") == ["search"]
    # The figure on screen moved with it.
    shown = chromium.evaluate("document.querySelector('[data-kpi=spend_usd] .value').textContent")
    assert shown != shown_before and abs(float(shown.lstrip("$").replace(",", "")) - search["spend_usd"]) < 0.01
    assert chromium.evaluate("new URLSearchParams(location.search).get('team')") == "search"
    keep(chromium.screenshot(tmp_path / "dashboard-team-search.png"))
