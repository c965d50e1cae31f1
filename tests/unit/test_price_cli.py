"""`tally price`: one event priced line by line with the card in effect, the same figures enrich gives."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import orjson
import pytest
from click.testing import CliRunner

from ops.cli import cli
from ops.price import PriceInputError, checked, explain
from ops.reference_import import GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH
from streams.enrich import enrich
from streams.records import COST_COLUMNS
from tally.config import REPO_ROOT
from tally.reference import load_reference_files, snapshot_of
from tests.factories import accepted_factory, clock

EXAMPLE_CARDS = REPO_ROOT / "examples" / "reference" / "price_cards.yaml"
CARDS = ["--price-cards", str(GENAI_PRICES_CARD_PATH), "--price-cards", str(MODEL_ALIASES_PATH)]


def at_text(days: int = -7) -> str:
    return (clock() + timedelta(days=days)).isoformat().replace("+00:00", "Z")


def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    return result.exit_code, result.output


def test_the_lines_add_up_to_the_row_enrich_writes_for_the_same_event() -> None:
    refs = snapshot_of(load_reference_files([GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH]))
    usage = {"input_tokens": 250_000, "output_tokens": 800, "reasoning_tokens": 0, "cache_read_tokens": 4_000,
             "cache_write_tokens": 1_000, "cache_write_1h_tokens": 2_000}
    acc = accepted_factory(provider="anthropic", model_actual="claude-sonnet-4-5-20250929", usage=usage, batch=True,
                           timestamp=at_text(), tool_calls={"web_search": 3})
    (row,), rejected = enrich([acc], refs, clock())
    assert not rejected
    x = explain(checked(acc.event), refs)
    assert x.card is not None and x.card.version == row["price_card_version"]
    assert x.priced_as == row["priced_as"] == "anthropic/claude-sonnet-4-5"
    assert x.matched == "dated snapshot of anthropic/claude-sonnet-4-5, which the card prices alike"
    assert (row["pricing_status"], x.costs.status) == ("priced", "priced")
    assert x.long_context.startswith("applies: prompt 257,000 tokens > 200,000")
    assert tuple(getattr(x.costs, f) for f in ("input", "output", "reasoning", "cache_read", "cache_write", "tools",
                                               "total")) == tuple(row[c] for c in COST_COLUMNS)
    assert sum(ln.cost for ln in x.lines if ln.cost is not None) == row["cost_total_usd"]
    by_line = {ln.what: ln for ln in x.lines}
    assert (by_line["cache write 5m"].cost + by_line["cache write 1h"].cost) == row["cost_cache_write_usd"]
    assert by_line["input"].quantity == 250_000 and by_line["tool web_search"].quantity == 3


def test_the_command_reads_an_event_and_prints_its_lines_or_json() -> None:
    event = accepted_factory(provider="google", model_actual="models/gemini-2.5-flash", timestamp=at_text(),
                             usage={"input_tokens": 1_000_000, "output_tokens": 1_000_000}).event
    code, text = run("price", "-", *CARDS, stdin=orjson.dumps(event).decode())
    assert code == 0, text
    assert "matched: alias rule 'gemini-api-resource-name'" in text and "priced as: google/gemini-2.5-flash" in text
    assert "status: priced" in text
    code, out = run("price", "-", *CARDS, "--json", stdin=orjson.dumps(event).decode())
    assert code == 0, out
    got = orjson.loads(out)
    assert got["priced_as"] == "google/gemini-2.5-flash" and got["pricing_status"] == "priced"
    assert got["price_card_version"].startswith("genai-prices-")
    assert Decimal(got["cost_total_usd"]) == sum(Decimal(ln["cost"]) for ln in got["lines"]) == Decimal("2.8")


def test_flags_describe_an_event_and_a_snapshot_the_card_does_not_price_alike_says_why() -> None:
    code, text = run("price", "--price-cards", str(EXAMPLE_CARDS), "--provider", "openai", "--model",
                     "gpt-4o-2024-05-13", "--tokens", "input=1000000", "--at", at_text())
    assert code == 0, text
    assert "matched: exact" in text and "5 per 1M tokens" in text and "total" in text and text.count("5\n") >= 1
    code, text = run("price", "--price-cards", str(EXAMPLE_CARDS), "--provider", "openai", "--model",
                     "gpt-4o-2024-01-01", "--tokens", "input=10", "--at", at_text())
    assert code == 0, text
    assert "not priced: openai/gpt-4o-2024-01-01 is a dated snapshot of openai/gpt-4o" in text
    assert "status: unpriced" in text and "no price" in text


def test_bad_input_is_a_clear_error(capsys) -> None:
    from ops.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["price", *CARDS, "--provider", "openai", "--model", "gpt-5", "--at", "yesterday"])
    assert stop.value.code == 2 and "is not an RFC 3339 date-time" in capsys.readouterr().err
    result = CliRunner().invoke(cli, ["price", "-", *CARDS], input='{"provider": "openai"}')
    assert isinstance(result.exception, PriceInputError)
    assert str(result.exception).startswith("not a usage event (missing_field at $)")
    code, text = run("price", *CARDS, "--provider", "openai", "--model", "gpt-5", "--tokens", "thinking=5")
    assert code != 0 and "'thinking' is not a token class" in text
    code, text = run("price", *CARDS, "--provider", "openai")
    assert code != 0 and "--provider and --model" in text
