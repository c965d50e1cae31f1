"""Reconcile, FOCUS export and reprice against a real chDB store holding priced events."""

from datetime import UTC, date, datetime
from decimal import Context, Decimal

import pytest

from ops.reports.focus import COLUMNS, build_report, export_focus, parse_period
from ops.reports.focus_spec import validate, validate_csv
from ops.reports.output import render
from ops.reports.reconcile import EXIT_OVER_THRESHOLD, OVER, parse_invoice_text, reconcile
from ops.reports.reprice import reprice, write_repriced
from ops.simulate import TrafficGenerator, catalog_from_reference
from streams.enrich import enrich
from streams.sink import SinkWriter
from tally.reference import snapshot_of
from tests.factories import accepted_factory, in_message

pytestmark = pytest.mark.integration


def q(store):
    def query(sql):
        r = store.query(sql)
        return r.columns, [list(row) for row in r.rows]
    return query


@pytest.fixture
def loaded(store, docs, now):
    """~1,200 simulated attempts over two UTC days of Nov 2026, priced by enrich at `now` and written by the sink."""
    gen = TrafficGenerator(catalog_from_reference(docs), seed=7, bad_rate=0.0, rate=0.02,
                           start=datetime(2026, 11, 20, 20, tzinfo=UTC))
    events = [e for _ in range(900) for e in gen.logical_request()]
    rows, rejected = enrich([accepted_factory(e) for e in events], snapshot_of(docs), now)
    assert not rejected
    SinkWriter(store).write(in_message(rows))
    days = store.query("SELECT count(DISTINCT toDate(ts)) FROM {db}.usage_events").rows[0][0]
    assert days >= 2
    return store


def canonical_invoice(store, plant_on=None, factor=Decimal("1.03")):
    """An invoice built from the stored sums per day × provider × model (the model's total), one line planted."""
    rows = store.query("SELECT toString(toDate(ts)), provider, model_actual, toString(sum(cost_total_usd)) "
                       "FROM {db}.usage_events GROUP BY 1, 2, 3 HAVING sum(cost_total_usd) > 0 ORDER BY 1, 2, 3").rows
    lines = ["date,provider,model,token_class,quantity,cost_usd"]
    for i, (day, provider, model, cost) in enumerate(rows):
        value = Decimal(cost) * factor if i == plant_on else Decimal(cost)
        lines.append(f"{day},{provider},{model},,,{value}")
    return "\n".join(lines) + "\n", rows


def test_reconcile_flags_a_planted_3_percent_discrepancy(loaded):
    text, rows = canonical_invoice(loaded)
    # The biggest line gets +3 %: flagged, and the total moves too.
    sums = [Decimal(r[3]) for r in rows]
    big = sums.index(max(sums))
    text, _ = canonical_invoice(loaded, plant_on=big)
    rec = reconcile(q(loaded), parse_invoice_text(text, "test.csv"), Decimal(1))
    flagged = [ln for ln in rec.lines if ln.flagged]
    assert len(flagged) == 1 and flagged[0].status == OVER
    assert flagged[0].model == rows[big][2] and str(flagged[0].day) == rows[big][0]
    assert flagged[0].variance_usd == sums[big] * Decimal("0.03")
    # Relative to the invoice: 3 / 103 of it.
    assert flagged[0].variance_pct == Context(prec=50).divide(Decimal(300), Decimal(103))
    assert rec.tally_total == sum(sums) and rec.variance_usd == sums[big] * Decimal("0.03")
    # Over the threshold in total when the line weighs enough; a threshold above the total variance passes.
    total_pct = abs(rec.variance_pct)
    assert rec.over == (total_pct > 1)
    assert not reconcile(q(loaded), parse_invoice_text(text, "t.csv"), total_pct + Decimal("0.01")).over
    assert reconcile(q(loaded), parse_invoice_text(text, "t.csv"), total_pct / 2).over


def test_reconcile_cli_exit_code_over_threshold(loaded, tmp_path):
    from click.testing import CliRunner

    from ops import cli

    text, rows = canonical_invoice(loaded)
    sums = [Decimal(r[3]) for r in rows]
    text, _ = canonical_invoice(loaded, plant_on=sums.index(max(sums)))
    invoice = tmp_path / "invoice.csv"
    invoice.write_text(text)
    settings_dir = loaded.settings.data_dir
    loaded.close()  # the CLI opens the store itself (no worker answers on the test's port)
    result = CliRunner().invoke(cli.cli, ["--data-dir", str(settings_dir), "--web-port", "1", "report", "--format",
                                          "json", "reconcile", str(invoice), "--threshold", "0.1"])
    assert result.exit_code == EXIT_OVER_THRESHOLD, result.output
    assert '"over threshold"' in result.output


def test_focus_export_validates_and_sums_exactly(loaded, docs):
    cards = {c.version: c for c in snapshot_of(docs).price_cards.items}
    start, end = parse_period("2026-11")
    export = export_focus(q(loaded), cards, start, end)
    assert export.rows
    assert validate(COLUMNS, export.rows) == []
    total = Decimal(loaded.query("SELECT toString(sum(cost_total_usd)) FROM {db}.usage_events").rows[0][0])
    billed = sum((r[COLUMNS.index("BilledCost")] for r in export.rows), Decimal(0))
    assert billed == total == export.total
    # Per team too (Tags), and every row's arithmetic is exact.
    i_q, i_p, i_c = (COLUMNS.index(c) for c in ("PricingQuantity", "ListUnitPrice", "ListCost"))
    assert all(r[i_q] * r[i_p] == r[i_c] for r in export.rows)
    # The CSV as written validates too, and round-trips every cost exactly.
    import io
    buf = io.StringIO()
    render(build_report(export, start, end, "test"), "csv", buf)
    assert validate_csv(buf.getvalue()) == []
    import csv
    parsed = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert sum((Decimal(r["BilledCost"]) for r in parsed), Decimal(0)) == total


def test_reprice_dry_run_then_apply_twice_is_idempotent(loaded, docs):
    cards = {c.version: c for c in snapshot_of(docs).price_cards.items}
    card = cards["2025-10-01"]  # an older card: Google cache reads cost more
    billed_before = loaded.query("SELECT count(), toString(sum(cost_total_usd)) FROM {db}.usage_events").rows
    dry = reprice(q(loaded), card, date(2026, 11, 20), date(2026, 11, 23), keep_rows=False)
    assert dry.total.events == int(billed_before[0][0])
    assert dry.total.billed == Decimal(billed_before[0][1])
    assert not dry.days  # nothing kept, nothing stored
    assert loaded.query("SELECT count() FROM {db}.repriced_events").rows[0][0] == 0

    first = reprice(q(loaded), card, date(2026, 11, 20), date(2026, 11, 23), keep_rows=True)
    assert first.total.rerated == dry.total.rerated
    write_repriced(loaded, first)
    stored = ("SELECT count(), toString(sum(cost_total_usd)), toString(sum(billed_cost_total_usd)) "
              "FROM {db}.repriced_events")
    once = loaded.query(stored).rows
    assert once[0][0] == dry.total.events and Decimal(once[0][1]) == dry.total.rerated
    again = reprice(q(loaded), card, date(2026, 11, 20), date(2026, 11, 23), keep_rows=True)
    write_repriced(loaded, again)
    assert loaded.query(stored).rows == once  # the rerun's inserts were absorbed: no new rows at all
    assert loaded.query(stored.replace("repriced_events", "repriced_events FINAL")).rows == once
    # usage_events stays as billed.
    assert loaded.query("SELECT count(), toString(sum(cost_total_usd)) FROM {db}.usage_events").rows == billed_before


@pytest.fixture
def folded(store, docs, now):
    """Simulated Nov 2026 traffic through enrich and the fold at `now`: usage_events, logical_requests, rollups."""
    from streams.fold import FoldConfig, Folder
    from streams.sink import RequestWriter
    from tests.integration.test_rollups import run_batch

    gen = TrafficGenerator(catalog_from_reference(docs), seed=11, bad_rate=0.0, rate=0.02,
                           start=datetime(2026, 11, 20, 20, tzinfo=UTC))
    events = [e for _ in range(600) for e in gen.logical_request()]
    attempts, requests = run_batch(events, docs, Folder(FoldConfig(), 4), now)  # ingested after it all happened
    assert len(attempts) == len(events)
    SinkWriter(store).write(attempts)
    RequestWriter(store).write(requests)
    assert store.query("SELECT sum(sign) FROM {db}.logical_requests").rows[0][0] > 0
    return store


def test_focus_with_shared_costs_allocates_exactly_and_validates(folded, docs):
    from ops.reports.chargeback import Period, allocate_items, load_rules
    from ops.reports.chargeback import fetch as fetch_chargeback
    from ops.reports.focus import add_shared_costs
    from tally.config import REPO_ROOT

    cards = {c.version: c for c in snapshot_of(docs).price_cards.items}
    start, end = parse_period("2026-11")
    items = load_rules(REPO_ROOT / "examples" / "reports" / "shared_costs.yaml")
    export = export_focus(q(folded), cards, start, end)
    direct_rows = len(export.rows)
    add_shared_costs(q(folded), items, start, end, export)
    assert validate(COLUMNS, export.rows) == []
    rows = [dict(zip(COLUMNS, r, strict=True)) for r in export.rows]
    usage, shared = rows[:direct_rows], rows[direct_rows:]
    # Direct-cost rows are untouched: Usage, no allocation, and still exactly usage_events.
    total = Decimal(folded.query("SELECT toString(sum(cost_total_usd)) FROM {db}.usage_events").rows[0][0])
    assert all(r["ChargeCategory"] == "Usage" and r["AllocatedMethodId"] is None for r in usage)
    assert sum((r["BilledCost"] for r in usage), Decimal(0)) == total == export.total
    # Every item of the example file is allocated (November lies inside the period), each summing to its amount.
    assert {r["ChargeCategory"] for r in shared} == {"Purchase"}
    for item in items:
        mine = [r for r in shared if r["SkuId"] == f"shared/{item.name}"]
        assert mine and all(r["AllocatedMethodId"] == item.rule for r in mine)
        assert sum((r["BilledCost"] for r in mine), Decimal(0)) == item.amount_usd
        assert sum((r["PricingQuantity"] for r in mine), Decimal(0)) == item.amount_usd
    assert export.allocated_total == sum((i.amount_usd for i in items), Decimal(0))
    # The same amounts as the chargeback report's allocations for this rules file and month.
    nov = Period(start, end, "2026-11")
    allocations, _ = allocate_items(items, fetch_chargeback(q(folded), nov, datetime(2026, 12, 1, tzinfo=UTC)), nov)
    assert {(a.item.name, a.team): a.allocated for a in allocations} == {
        (r["SkuId"].removeprefix("shared/"), r["AllocatedResourceId"]): r["BilledCost"]
        for r in shared}
    # The CSV as written validates too.
    import io
    buf = io.StringIO()
    rep = build_report(export, start, end, "test")
    render(rep, "csv", buf)
    assert validate_csv(buf.getvalue()) == []
    assert any("allocated to teams" in n for n in rep.notes)


def test_focus_cli_with_rules(folded, tmp_path):
    from click.testing import CliRunner

    from ops import cli
    from tally.config import REPO_ROOT

    settings_dir = folded.settings.data_dir
    folded.close()  # the CLI opens the store itself (no worker answers on the test's port)
    out = tmp_path / "focus.csv"
    result = CliRunner().invoke(cli.cli, [
        "--data-dir", str(settings_dir), "--web-port", "1", "report", "--output", str(out), "focus",
        "--period", "2026-11", "--price-cards", str(REPO_ROOT / "examples" / "reference"), "--validate",
        "--rules", str(REPO_ROOT / "examples" / "reports" / "shared_costs.yaml")])
    assert result.exit_code == 0, result.output
    assert "pass the FOCUS column rules" in result.output
    text = out.read_text()
    assert validate_csv(text) == []
    import csv
    import io
    shared = [r for r in csv.DictReader(io.StringIO(text)) if r["ChargeCategory"] == "Purchase"]
    assert sum((Decimal(r["BilledCost"]) for r in shared), Decimal(0)) == Decimal("9200.00")
