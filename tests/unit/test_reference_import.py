"""`tally reference import genai-prices`: the mapping rules on genai-prices' own types, the card's
`batch_undiscounted` field, the command, and what `tally run` loads by default."""

from datetime import UTC, date, datetime, time
from decimal import Decimal

import pytest
from click.testing import CliRunner
from genai_prices.types import (
    ClauseEquals,
    ClauseOr,
    ClauseRegex,
    ClauseStartsWith,
    ConditionalPrice,
    ModelInfo,
    ModelPrice,
    PriceVariant,
    Provider,
    StartDateConstraint,
    Tier,
    TieredPrices,
    TimeOfDateConstraint,
)

from ops.cli import _run_reference_files, cli
from ops.reference_import import FIRST_EFFECTIVE, GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH, import_genai_prices
from streams.enrich import PARTIAL, PRICED, UNPRICED, price_event
from tally.errors import ReferenceDataError
from tally.reference import ReferenceDoc, load_reference_files, parse_reference_yaml, snapshot_of

D = Decimal
BATCH_START = date(2026, 10, 14)
REPRICED = date(2026, 3, 1)
LATER = datetime(2026, 11, 15, 12, tzinfo=UTC)


def _model(ident: str, prices: ModelPrice | list[ConditionalPrice], variants: list[PriceVariant] | None = None,
           match: object = None) -> ModelInfo:
    return ModelInfo(id=ident, match=match or ClauseEquals(equals=ident), prices=prices, price_variants=variants)


def _source() -> list[Provider]:
    flagship = _model(
        "flagship",
        [ConditionalPrice(prices=ModelPrice(input_mtok=D("2"), output_mtok=D("10"), cache_read_mtok=D("0.2"))),
         ConditionalPrice(constraint=StartDateConstraint(start_date=REPRICED),
                          prices=ModelPrice(input_mtok=D("1.25"), output_mtok=D("10"), cache_read_mtok=D("0.125"),
                                            web_searches_kcount=D("10"), storage_searches_kcount=D("2.5")))],
        [PriceVariant(when={"service_tier": "default"}, prices=ModelPrice()),
         PriceVariant(when={"service_tier": "priority"}, constraint=StartDateConstraint(start_date=BATCH_START),
                      prices=ModelPrice(input_mtok=D("2.5"), output_mtok=D("20"), cache_read_mtok=D("0.25"))),
         # batch halves input and output; cached input keeps the standard rate
         PriceVariant(when={"processing": "batch"}, constraint=StartDateConstraint(start_date=BATCH_START),
                      prices=ModelPrice(input_mtok=D("0.625"), output_mtok=D("5")))],
        match=ClauseOr(or_=[ClauseEquals(equals="flagship"), ClauseEquals(equals="flagship-latest"),
                            ClauseStartsWith(starts_with="flagship-chat"), ClauseRegex(regex="^flag.*ship$")]))
    tiered = _model("tiered", ModelPrice(
        input_mtok=TieredPrices(base=D("1"), tiers=[Tier(start=200_000, price=D("2"))]), output_mtok=D("4"),
        cache_write_mtok=D("1.25"), cache_write_1h_mtok=D("2"), output_reasoning_mtok=D("6")))
    rounded = _model("rounded", ModelPrice(input_mtok=D("0.15"), output_mtok=D("0.6")),
                     [PriceVariant(when={"service_tier": "priority"},
                                   prices=ModelPrice(input_mtok=D("0.25"), output_mtok=D("1")))])
    per_request = _model("per-request", ModelPrice(input_mtok=D("1"), output_mtok=D("1"), requests_kcount=D("5")))
    peak = _model("peak", [
        ConditionalPrice(prices=ModelPrice(input_mtok=D("0.135"), output_mtok=D("0.55"))),
        ConditionalPrice(constraint=TimeOfDateConstraint(start_time=time(0, 30), end_time=time(16, 30)),
                         prices=ModelPrice(input_mtok=D("0.27"), output_mtok=D("1.1")))])
    embedding = _model("embed", ModelPrice(input_mtok=D("0.02")))
    audio = _model("voice", ModelPrice(input_mtok=D("2.5"), output_mtok=D("10"), input_audio_mtok=D("40")),
                   [PriceVariant(when={"speed": "fast"}, prices=ModelPrice(input_mtok=D("5")))])
    return [
        Provider(id="openai", name="OpenAI", api_pattern="x",
                 models=[flagship, tiered, rounded, per_request, peak, embedding, audio]),
        Provider(id="mistral", name="Mistral", api_pattern="y", models=[_model("small", ModelPrice(
            input_mtok=D("0.1"), output_mtok=D("0.3")))]),
        Provider(id="unmapped", name="Not imported", api_pattern="z", models=[_model("x", ModelPrice(
            input_mtok=D("1"), output_mtok=D("1")))]),
    ]


@pytest.fixture(scope="module")
def result():
    return import_genai_prices(source=_source())


@pytest.fixture(scope="module")
def refs(result):
    return snapshot_of(parse_reference_yaml(result.text, "import"))


def _event(model: str, provider: str = "openai", **fields):
    return {"provider": provider, "model_actual": model, "status": "ok", "batch": False, "service_tier": "",
            **fields}


def test_one_version_per_price_change_stamped_with_the_source(result, refs) -> None:
    stamp = result.package_version
    assert [(v, at) for v, at, _ in result.versions] == [
        (f"genai-prices-{stamp}:initial", FIRST_EFFECTIVE),
        (f"genai-prices-{stamp}:2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)),
        (f"genai-prices-{stamp}:2026-10-14", datetime(2026, 10, 14, tzinfo=UTC))]
    assert f"genai-prices {stamp}" in result.text.splitlines()[0]
    before = refs.price_card_at(datetime(2026, 2, 28, 23, 59, tzinfo=UTC)).find("openai", "flagship")
    after = refs.price_card_at(datetime(2026, 3, 1, tzinfo=UTC)).find("openai", "flagship")
    assert (before.prices.input, after.prices.input) == (D("2"), D("1.25"))
    assert before.batch_discount is None and not before.service_tiers  # batch and tiers start on 2026-10-14


def test_classes_fall_back_to_the_parent_price_as_the_source_bills_them(refs) -> None:
    card = refs.price_card_at(LATER)
    flagship = card.find("openai", "flagship")
    # no cache-write price of its own: billed as input (OpenAI, Google); reasoning defaults to output
    assert flagship.prices[:] == (D("1.25"), D("10"), None, D("0.125"), D("1.25"), D("1.25"))
    tiered = card.find("openai", "tiered")
    assert tiered.prices[:] == (D("1"), D("4"), D("6"), D("1"), D("1.25"), D("2"))
    assert tiered.long_context.above_input_tokens == 200_000
    assert tiered.long_context.prices[:] == (D("2"), D("4"), D("6"), D("2"), D("1.25"), D("2"))


def test_batch_tiers_and_tools(refs) -> None:
    card = refs.price_card_at(LATER)
    flagship = card.find("openai", "flagship")
    assert flagship.batch_discount == D("0.5") and flagship.batch_undiscounted == {"cache_read"}
    assert dict(flagship.service_tiers) == {"priority": D("2")}
    assert dict(flagship.tools) == {"web_search": D("0.01"), "file_search": D("0.0025")}
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000, "cache_read_tokens": 1_000_000}
    batch = price_event(_event("flagship", usage=usage, batch=True), card)
    assert (batch.total, batch.status) == (D("0.625") + D("5") + D("0.125"), PRICED)
    priority = price_event(_event("flagship", usage=usage, service_tier="priority"), card)
    assert (priority.total, priority.status) == (D("22.75"), PRICED)


def test_the_cards_survive_the_reference_topics_json(result) -> None:
    """Workers read the cards as JSON from the compacted topic: batch_undiscounted survives the trip."""
    for doc in parse_reference_yaml(result.text, "import"):
        again = ReferenceDoc.from_json(doc.to_json())
        assert again.parsed.models == doc.parsed.models
    last = ReferenceDoc.from_json(doc.to_json()).parsed.find("openai", "flagship")
    assert last.batch_undiscounted == {"cache_read"}


def test_aliases_from_equals_and_starts_with_clauses(refs, result) -> None:
    card = refs.price_card_at(LATER)
    for name in ("flagship-latest", "flagship-chat", "flagship-chat-2026-01-05"):
        assert card.find("openai", name).model == "flagship", name
    assert card.find("openai", "flagrant-ship") is None  # a regex rule cannot be expressed
    assert any(g.model == "flagship" and "regex" in g.what for g in result.gaps)


def test_provider_names_follow_tally_and_unmapped_providers_stay_out(refs) -> None:
    card = refs.price_card_at(LATER)
    assert card.find("mistral_ai", "small") is not None
    assert card.find("mistral", "small") is None
    assert all(m.provider != "unmapped" for m in card.models)
    with pytest.raises(ValueError, match="unmapped"):
        import_genai_prices(["unmapped"], source=_source())


def test_what_the_card_cannot_express_is_left_out_and_listed(refs, result) -> None:
    card = refs.price_card_at(LATER)
    gaps = {(g.model, g.what.split(" ")[0], g.mapping.split(" ")[0]) for g in result.gaps}
    # never priced short: a per-request fee or peak/off-peak prices leave the model out (unpriced)
    for model in ("per-request", "peak", "embed"):
        assert card.find("openai", model) is None, model
        assert price_event(_event(model, usage={"input_tokens": 1}), card).status == UNPRICED
        assert any(g[0] == model and g[2] == "model" for g in gaps), model
    # a tier whose prices are not one exact multiplier is left out: standard rates, partial
    rounded = card.find("openai", "rounded")
    assert not rounded.service_tiers
    costs = price_event(_event("rounded", usage={"input_tokens": 1_000_000}, service_tier="priority"), card)
    assert (costs.total, costs.status) == (D("0.15"), PARTIAL)
    assert ("rounded", "service_tier=priority", "not") in gaps
    assert card.find("openai", "voice") is not None
    assert {("voice", "price", "not"), ("voice", "price", "not")} <= gaps
    assert any(g.model == "voice" and "speed=fast" in g.what for g in result.gaps)


def test_prices_stay_decimal_never_float() -> None:
    bad = [Provider(id="openai", name="OpenAI", api_pattern="x", models=[
        _model("floaty", ModelPrice(input_mtok=0.1, output_mtok=D("1"))),  # type: ignore[arg-type]
        _model("exact", ModelPrice(input_mtok=D("0.1"), output_mtok=D("1")))])]
    result = import_genai_prices(source=bad)
    assert "floaty" not in result.text and '"exact", input: "0.1"' in result.text
    assert any(g.model == "floaty" and "not a Decimal" in g.what for g in result.gaps)
    with pytest.raises(ValueError, match="could be imported: openai/floaty: input price is a float"):
        import_genai_prices(source=[Provider(id="openai", name="OpenAI", api_pattern="x", models=bad[0].models[:1])])


def test_the_card_refuses_an_unknown_batch_undiscounted_class() -> None:
    text = """kind: price_card
version: "x"
effective_at: "2026-01-01T00:00:00Z"
currency: USD
models:
  - {provider: a, model: m, input: "1", output: "2", batch_discount: "0.5", batch_undiscounted: [cache_reed]}
"""
    with pytest.raises(ReferenceDataError, match="unknown token class 'cache_reed'.*did you mean 'cache_read'"):
        parse_reference_yaml(text, "card")
    with pytest.raises(ReferenceDataError, match="must be a list of token classes"):
        parse_reference_yaml(text.replace("[cache_reed]", "cache_read"), "card")


def test_command_writes_the_card_and_lists_the_gaps(tmp_path) -> None:
    out = tmp_path / "cards" / "genai.yaml"
    run = CliRunner().invoke(cli, ["reference", "import", "genai-prices", "--provider", "anthropic",
                                   "--out", str(out)])
    assert run.exit_code == 0, run.output
    docs = load_reference_files([out])
    assert docs and all(d.version.startswith("genai-prices-") for d in docs)
    assert {m["provider"] for d in docs for m in d.body["models"]} == {"anthropic"}
    assert "things the card cannot express" in run.output
    bad = CliRunner().invoke(cli, ["reference", "import", "genai-prices", "--provider", "nosuch"])
    assert bad.exit_code == 2 and "nosuch" in bad.output


def test_tally_run_loads_the_imported_card_and_the_sample_org() -> None:
    files = _run_reference_files()
    assert files[:2] == [GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH]
    assert all(f.name != "price_cards.yaml" for f in files)
    kinds = {d.kind for d in load_reference_files(files)}
    assert kinds == {"price_card", "model_aliases", "owners", "budgets", "routing_policy"}
