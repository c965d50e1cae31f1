"""The price card imported from genai-prices, priced by tally, against genai-prices' own `calc_price`.

Every model of the imported card (both sides know it by construction), on a fixed grid of scenarios at a fixed event
time, through `streams.enrich.price_event` (the pipeline's pricing). A difference fails unless it is listed, with its
values and its reason, in tests/data/genai_prices_allow.yaml; an entry that no longer differs fails too.

`python -m tests.unit.test_genai_prices_grid` prints the grid's counts (the README quotes them).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any

import genai_prices
import pytest
import yaml
from genai_prices.types import Usage

from ops.reference_import import GENAI_PRICES_CARD_PATH, PROVIDERS, import_genai_prices
from streams.enrich import UNPRICED, price_event
from tally.config import REPO_ROOT
from tally.reference import PriceCard, parse_reference_yaml, snapshot_of

#: The grid's event time: fixed, after every batch and service-tier start date of genai-prices 0.2.x's data.
AT = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
ALLOW_FILE = REPO_ROOT / "tests" / "data" / "genai_prices_allow.yaml"
M = 1_000_000
SCENARIOS = ("input", "output", "reasoning", "cache_read", "cache_write_5m", "cache_write_1h", "batch", "priority",
             "flex", "long_context", "web_search")
_TO_SOURCE = {tally: source for source, tally in PROVIDERS.items()}


@dataclass(frozen=True)
class Cell:
    provider: str
    model: str
    scenario: str
    tally: Decimal
    genai_prices: Decimal
    status: str

    @property
    def equal(self) -> bool:
        return self.tally == self.genai_prices and self.status != UNPRICED


@cache
def imported_card() -> PriceCard:
    """The card in effect at AT, from a fresh import of the installed package."""
    card = snapshot_of(parse_reference_yaml(import_genai_prices().text, "import")).price_card_at(AT)
    assert card is not None
    return card


def _source_model(provider: str, model: str) -> Any:
    """The genai-prices model a name resolves to (the name sent, as calc_price resolves it)."""
    from genai_prices.data_snapshot import get_snapshot

    return get_snapshot().find_provider_model(model, None, _TO_SOURCE[provider], None)[1]


def _tier_start(provider: str, model: str, card: PriceCard) -> int | None:
    """The long-context threshold either side defines for the model at AT (the source's first tier start)."""
    entry = card.find(provider, model)
    assert entry is not None
    if entry.long_context is not None:
        return entry.long_context.above_input_tokens
    prices = _source_model(provider, model).get_prices(AT)
    starts = [int(v.tiers[0].start) for k, v in vars(prices).items() if getattr(v, "tiers", None)]
    return min(starts) if starts else None


def _web_tool(provider: str) -> str:
    return "google_search" if provider == "google" else "web_search"


def _scenario(name: str, provider: str, model: str, card: PriceCard) -> dict[str, Any] | None:
    """The event fields of one scenario (usage, batch, service_tier, tool_calls); None where it does not apply."""
    both = {"input_tokens": M, "output_tokens": M, "cache_read_tokens": M}
    simple = {"input": {"input_tokens": M}, "output": {"output_tokens": M}, "reasoning": {"reasoning_tokens": M},
              "cache_read": {"cache_read_tokens": M}, "cache_write_5m": {"cache_write_tokens": M},
              "cache_write_1h": {"cache_write_1h_tokens": M}}
    if name in simple:
        return {"usage": simple[name]}
    if name == "batch":
        return {"usage": both, "batch": True}
    if name in ("priority", "flex"):
        return {"usage": both, "service_tier": name}
    if name == "long_context":
        start = _tier_start(provider, model, card)
        if start is None:
            return None
        # a prompt one token above the threshold, 100k of it cached: both sides count cache in the prompt
        return {"usage": {"input_tokens": start + 1 - 100_000, "cache_read_tokens": 100_000, "output_tokens": M}}
    assert name == "web_search"
    entry = card.find(provider, model)
    assert entry is not None
    source_prices = _source_model(provider, model).get_prices(AT)
    if _web_tool(provider) not in entry.tools and getattr(source_prices, "web_searches_kcount", None) is None:
        return None
    return {"usage": {"input_tokens": 0}, "tool_calls": {_web_tool(provider): 1000}}


def _source_usage(usage: dict[str, int], tool_calls: dict[str, int]) -> Usage:
    """tally's disjoint classes as genai-prices counts them (input includes cache, output includes reasoning)."""
    n_in, n_out, n_re = (usage.get(k, 0) for k in ("input_tokens", "output_tokens", "reasoning_tokens"))
    n_cr, n_cw, n_cw1h = (usage.get(k, 0) for k in ("cache_read_tokens", "cache_write_tokens",
                                                      "cache_write_1h_tokens"))
    counts = {"input_tokens": n_in + n_cr + n_cw + n_cw1h, "output_tokens": n_out + n_re, "cache_read_tokens": n_cr,
              "cache_write_tokens": n_cw + n_cw1h, "cache_write_5m_tokens": n_cw, "cache_write_1h_tokens": n_cw1h,
              "output_reasoning_tokens": n_re, "web_searches": sum(tool_calls.values())}
    return Usage(**{k: v for k, v in counts.items() if v})


def unresolved(card: PriceCard | None = None) -> list[tuple[str, str]]:
    """Models of the card whose own id genai-prices' calc_price does not resolve (its match rule omits it)."""
    out = []
    for entry in (card or imported_card()).models:
        try:
            genai_prices.calc_price(Usage(input_tokens=1), entry.model, provider_id=_TO_SOURCE[entry.provider],
                                    genai_request_timestamp=AT)
        except LookupError:
            out.append((entry.provider, entry.model))
    return out


def grid(card: PriceCard | None = None) -> Iterator[Cell]:
    """Every (model of the card at AT that both sides price by its name) × scenario that applies to it.

    The card is the imported one unless another is given (`--card`: e.g. the hand-written sample, for comparison).
    """
    card = card or imported_card()
    skip = set(unresolved(card))
    for entry in card.models:
        if (entry.provider, entry.model) in skip:
            continue
        for name in SCENARIOS:
            fields = _scenario(name, entry.provider, entry.model, card)
            if fields is None:
                continue
            tool_calls = fields.get("tool_calls", {})
            event = {"provider": entry.provider, "model_actual": entry.model, "status": "ok",
                     "usage": fields["usage"], "batch": fields.get("batch", False),
                     "service_tier": fields.get("service_tier", ""), "tool_calls": tool_calls}
            costs = price_event(event, card)
            context = {"processing": "batch"} if event["batch"] else {}
            if event["service_tier"]:
                context["service_tier"] = event["service_tier"]
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                theirs = genai_prices.calc_price(_source_usage(fields["usage"], tool_calls), entry.model,
                                                 provider_id=_TO_SOURCE[entry.provider], genai_request_timestamp=AT,
                                                 price_context=context or None)
            yield Cell(entry.provider, entry.model, name, costs.total, theirs.total_price, costs.status)


def allow_list() -> dict[tuple[str, str, str], dict[str, Any]]:
    entries = yaml.safe_load(ALLOW_FILE.read_text(encoding="utf-8"))
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in entries:
        assert set(e) == {"provider", "model", "scenario", "tally", "genai_prices", "reason"}, e
        assert isinstance(e["tally"], str) and isinstance(e["genai_prices"], str), f"quote the values: {e}"
        assert e["reason"].strip(), e
        key = (e["provider"], e["model"], e["scenario"])
        assert key not in out, f"listed twice: {key}"
        out[key] = e
    return out


def test_grid_matches_genai_prices_but_for_the_reviewed_allow_list() -> None:
    cells = list(grid())
    allowed = allow_list()
    unexplained: list[str] = []
    stale: list[str] = []
    differing = set()
    for c in cells:
        if c.equal:
            continue
        key = (c.provider, c.model, c.scenario)
        differing.add(key)
        entry = allowed.get(key)
        if entry is None:
            unexplained.append(f"{c.provider}/{c.model} {c.scenario}: tally {c.tally} ({c.status}), "
                               f"genai-prices {c.genai_prices}")
        elif Decimal(entry["tally"]) != c.tally or Decimal(entry["genai_prices"]) != c.genai_prices:
            stale.append(f"{key}: listed tally {entry['tally']} / genai-prices {entry['genai_prices']}, now "
                         f"tally {c.tally} / genai-prices {c.genai_prices}")
    stale += [f"{key}: listed but no longer differs" for key in allowed if key not in differing]
    assert not unexplained, "differences not in the allow-list:\n" + "\n".join(unexplained)
    assert not stale, "allow-list entries out of date:\n" + "\n".join(stale)
    # the grid is the whole imported card, not a sample of it
    both = {(m.provider, m.model) for m in imported_card().models} - set(unresolved())
    assert {(c.provider, c.model) for c in cells} == both
    always = set(SCENARIOS) - {"long_context", "web_search"}
    for model in both:
        assert always <= {c.scenario for c in cells if (c.provider, c.model) == model}, model


def test_the_grid_covers_the_sample_cards_models() -> None:
    """Every model of the hand-written sample card is in the imported card, so `make run`'s traffic is priced."""
    sample = parse_reference_yaml((REPO_ROOT / "examples" / "reference" / "price_cards.yaml").read_text(), "sample")
    card = imported_card()
    for doc in sample:
        for m in doc.body["models"]:
            assert card.find(m["provider"], m["model"]) is not None, (m["provider"], m["model"])


def test_committed_card_is_the_import_of_the_installed_package() -> None:
    """reference/genai_prices.yaml (what `tally run` loads) is what `make reference-prices` writes today."""
    committed = GENAI_PRICES_CARD_PATH.read_text(encoding="utf-8")
    fresh = import_genai_prices()
    stamp = f"from genai-prices {fresh.package_version} "
    if stamp not in committed.splitlines()[0]:
        pytest.fail(f"{GENAI_PRICES_CARD_PATH.name} was generated from another genai-prices version than the "
                    f"installed {fresh.package_version}: run `make reference-prices` and review the diff")
    assert committed == fresh.text, "run `make reference-prices`: the committed card differs from a fresh import"


def summary(card: PriceCard | None = None) -> str:
    cells = list(grid(card))
    allowed = allow_list() if card is None else {}
    models = {(c.provider, c.model) for c in cells}
    equal = sum(c.equal for c in cells)
    listed = sum(1 for c in cells if not c.equal and (c.provider, c.model, c.scenario) in allowed)
    partial = sum(1 for c in cells if c.equal and c.status != "priced")
    return (f"genai-prices {genai_prices.__version__} at {AT:%Y-%m-%dT%H:%M:%SZ}: {len(models)} models "
            f"({len(unresolved(card))} more not resolved by calc_price under their own id), "
            f"{len(SCENARIOS)} scenarios, {len(cells)} cells compared: {equal} equal ({partial} of them flagged "
            f"partial by tally: batch or tier without a price of its own, standard rates on both sides), "
            f"{listed} allow-listed, {len(cells) - equal - listed} unexplained")


if __name__ == "__main__":
    import argparse
    from pathlib import Path

    from tally.reference import load_reference_files

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", type=Path, help="another price-card file to compare (default: the import)")
    parser.add_argument("--cells", action="store_true", help="print every cell that differs")
    args = parser.parse_args()
    other = snapshot_of(load_reference_files([args.card])).price_card_at(AT) if args.card else None
    print(summary(other))
    if args.cells:
        for c in grid(other):
            if not c.equal:
                print(f"  {c.provider}/{c.model} {c.scenario}: tally {c.tally} ({c.status}), "
                      f"genai-prices {c.genai_prices}")
