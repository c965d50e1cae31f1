"""Sample invoices from tally's own sums: every accepted shape, dated on the day asked, reconciling line for line."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import pytest

from ops.reports.reconcile import OK, OVER, compare, parse_invoice_text
from ops.reports.sample_invoices import FILES, sample_invoices
from tally.errors import ReportError
from tests.factories import clock


def cells_of(day):
    return {
        (day, "openai", "gpt-5", "input"): (D("1.505"), 1_204_000),
        (day, "openai", "gpt-5", "output"): (D("2.120000000000000001"), 212_000),
        (day, "openai", "gpt-5", "cache_read"): (D("0.0475"), 380_000),
        (day, "openai", "gpt-4.1-mini", "tools"): (D("0.02"), 2),
        (day, "anthropic", "claude-sonnet-4-5", "input"): (D("1.8"), 600_000),
        (day, "anthropic", "claude-sonnet-4-5", "cache_write"): (D("0.2871"), 76_560),
        (day, "anthropic", "claude-sonnet-4-5", "tools"): (D("0.01"), 1),
        (day, "google", "gemini-2.5-pro", "output"): (D("0.5"), 50_000),
        (day, "google", "gemini-2.5-pro", "input"): (D(0), 0),  # nothing spent: no line
        (day - timedelta(days=1), "openai", "gpt-5", "input"): (D(9), 1),  # another day: not on these invoices
    }


def test_every_shape_reconciles_with_the_sums_it_was_written_from_and_only_the_raised_model_is_flagged():
    day = clock().date()
    cells = cells_of(day)
    texts = sample_invoices(cells, day, D(3))
    assert set(texts) == set(FILES)
    shapes = {}
    for name, text in texts.items():
        invoice = parse_invoice_text(text, name)
        assert {ln.day for ln in invoice.lines} == {day}
        shapes[name] = invoice.shape
        providers = {ln.provider for ln in invoice.lines}  # reconcile reads the invoice's days and providers
        rec = compare(invoice, {k: v for k, v in cells.items() if k[0] == day and k[1] in providers}, D("0.5"))
        flagged = [(ln.provider, ln.model, ln.status) for ln in rec.lines if ln.status != OK]
        if name == "invoice.csv":  # gpt-5 spent most (3.6725…): billed 3 % more
            assert flagged == [("openai", "gpt-5", OVER)]
            gpt5 = next(ln for ln in rec.lines if ln.model == "gpt-5")
            assert gpt5.invoice_usd == D("3.672500000000000001") * D("1.03")
        else:
            assert flagged == [] and rec.variance_usd == 0
    assert shapes == {"invoice.csv": "canonical", "invoice_canonical.csv": "canonical",
                      "invoice_openai_costs.csv": "openai", "invoice_anthropic_cost_report.csv": "anthropic"}
    assert "gemini" not in texts["invoice_openai_costs.csv"] + texts["invoice_anthropic_cost_report.csv"]
    assert len(texts["invoice_canonical.csv"].splitlines()) == 1 + 8  # a line per class with spend


def test_a_day_without_spend_is_a_clear_error():
    day = clock().date()
    with pytest.raises(ReportError, match=f"no spend on {day + timedelta(days=1)}"):
        sample_invoices(cells_of(day), day + timedelta(days=1))
