from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from textwrap import dedent

import pytest

from tally.config import REPO_ROOT
from tally.errors import ReferenceDataError
from tally.reference import (
    OwnerRegistry,
    PriceCard,
    ReferenceDoc,
    ReferenceStore,
    load_reference_files,
    parse_reference_yaml,
    snapshot_of,
)
from tests.factories import clock

EXAMPLES = REPO_ROOT / "examples" / "reference"
EXAMPLE_FILES = [EXAMPLES / "price_cards.yaml", EXAMPLES / "owners.yaml"]

CARD = """\
kind: price_card
version: "v1"
effective_at: "2026-01-01T00:00:00Z"
currency: USD
models:
  - provider: openai
    model: gpt-x
    input: "1.00"
    output: "4.00"
"""

OWNERS = """\
kind: owners
version: "o1"
effective_at: "2026-01-01T00:00:00Z"
teams:
  search: {cost_center: CC-1, business_unit: consumer}
features:
  search_answer: {team: search, product: search}
"""


def problems_of(text: str, origin: str = "f.yaml") -> list[str]:
    with pytest.raises(ReferenceDataError) as err:
        parse_reference_yaml(dedent(text), origin)
    return err.value.problems


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(dedent(text), encoding="utf-8")
    return path


def test_examples_load_two_versions_of_each_kind():
    docs = load_reference_files(EXAMPLE_FILES)
    assert [(d.kind, d.version) for d in docs] == [
        ("price_card", "2025-10-01"), ("price_card", "2026-11-01"), ("owners", "2025-10-01"),
        ("owners", "2026-02-01")]
    card = docs[1].parsed
    assert isinstance(card, PriceCard)
    assert {m.provider for m in card.models} == {"openai", "anthropic", "google"}
    owners = docs[3].parsed
    assert isinstance(owners, OwnerRegistry)
    assert len(owners.teams) == 6 and len(owners.features) == 15
    assert owners.features["smart_reply"].team == "growth"
    assert docs[2].parsed.features["smart_reply"].team == "inbox"


def test_doc_key_and_json_round_trip_exactly():
    for doc in load_reference_files(EXAMPLE_FILES):
        assert doc.key() == f"{doc.kind}:{doc.version}".encode()
        again = ReferenceDoc.from_json(doc.to_json())
        assert again == doc
        assert again.to_json() == doc.to_json()
        assert again.parsed == doc.parsed
    doc = parse_reference_yaml(CARD, "c")[0]
    assert b'"input":"1.00"' in doc.to_json()  # decimals travel as the strings written


def test_from_json_validates():
    with pytest.raises(ReferenceDataError) as err:
        ReferenceDoc.from_json(b'{"kind": "price_card", "version": "x", "effective_at": "2026-01-01T00:00:00",'
                               b' "currency": "USD", "models": [{"provider": "openai", "model": "m",'
                               b' "input": 1.5, "output": "2"}]}')
    text = "\n".join(err.value.problems)
    assert "effective_at" in text and "models[0].input" in text
    with pytest.raises(ReferenceDataError):
        ReferenceDoc.from_json(b"not json")


def test_typo_is_reported_with_line_and_suggestion():
    text = CARD.replace('    output: "4.00"', '    ouptut: "4.00"')
    problems = problems_of(text)
    assert "f.yaml:9: models[0].ouptut: unknown key 'ouptut' (did you mean 'output'?)" in problems
    assert "f.yaml:6: models[0]: missing required key 'output'" in problems


def test_float_price_is_refused_with_a_hint_to_quote_it():
    problems = problems_of(CARD.replace('input: "1.00"', "input: 1.10"))
    assert len(problems) == 1
    assert problems[0].startswith("f.yaml:8: models[0].input: price per million tokens must be a quoted decimal "
                                  'string such as "1.10"')
    # An unquoted integer is refused too: one rule for every price.
    assert "f.yaml:8:" in problems_of(CARD.replace('input: "1.00"', "input: 1"))[0]


@pytest.mark.parametrize(("value", "needle"), [
    ('"-1"', "not a plain non-negative decimal"),
    ('"1e-3"', "not a plain non-negative decimal"),
    ('"abc"', "not a plain non-negative decimal"),
    ('"0.0000001"', "has 7 decimal places; at most 6"),
    ('"1000001"', "above the maximum"),
    ('"' + "9" * 80 + '"', "above the maximum"),
    ('"0.' + "1" * 80 + '"', "has 80 decimal places"),
])
def test_bad_price_strings(value, needle):
    problems = problems_of(CARD.replace('"1.00"', value))
    assert len(problems) == 1 and problems[0].startswith("f.yaml:8: models[0].input:") and needle in problems[0]


def test_trailing_zeros_do_not_count_as_decimal_places():
    card = parse_reference_yaml(CARD.replace('"1.00"', '"1.5000000000"'), "c")[0].parsed
    assert isinstance(card, PriceCard)
    assert card.models[0].prices.input == Decimal("1.5")


def test_multiplier_and_tool_price_limits():
    text = CARD + '    batch_discount: "0.3333"\n    service_tiers: {priority: "1.8", flex: 0.5}\n' \
                  '    tools: {web_search: "0.0000000001"}\n'
    problems = problems_of(text)
    assert any(p.startswith("f.yaml:10: models[0].batch_discount: multiplier '0.3333' has 4 decimal places; "
                            "at most 3") for p in problems)
    assert any(p.startswith("f.yaml:11: models[0].service_tiers.flex: multiplier must be a quoted") for p in problems)
    assert any(p.startswith("f.yaml:12: models[0].tools.web_search: USD per call '0.0000000001' has 10")
               for p in problems)
    assert len(problems) == 3


@pytest.mark.parametrize("value", ['"2026-01-01T00:00:00"', '"2026-01-01"', "2026-01-01 00:00:00",
                                   '"yesterday"'])
def test_naive_or_bad_timestamps_are_refused(value):
    problems = problems_of(CARD.replace('"2026-01-01T00:00:00Z"', value))
    assert len(problems) == 1
    assert problems[0].startswith("f.yaml:3: effective_at: must be an RFC 3339 timestamp with an offset")


def test_timestamp_with_offset_is_converted_to_utc_and_unquoted_values_are_accepted():
    text = CARD.replace('"2026-01-01T00:00:00Z"', "2026-01-01T02:00:00+02:00").replace('"v1"', "2026-01-01")
    doc = parse_reference_yaml(text, "c")[0]
    assert doc.effective_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert doc.version == "2026-01-01"


def test_unknown_team_is_reported_at_its_line_with_suggestion():
    text = OWNERS + "  smart_reply: {team: serch, product: mail}\napi_keys:\n  k1: {team: nobody}\n"
    problems = problems_of(text, "owners.yaml")
    assert problems == [
        "owners.yaml:8: features.smart_reply.team: unknown team 'serch': not a key of teams (did you mean "
        "'search'?)",
        "owners.yaml:10: api_keys.k1.team: unknown team 'nobody': not a key of teams",
    ]


def test_owners_know_their_cost_centers_and_optionally_their_tenants():
    plain = parse_reference_yaml(OWNERS + "  kb: {team: search, product: help, cost_center: CC-7}\n", "o")[0]
    assert isinstance(plain.parsed, OwnerRegistry)
    assert plain.parsed.cost_centers == {"CC-1", "CC-7"} and plain.parsed.tenants is None  # tenants open-ended
    listed = parse_reference_yaml(OWNERS + "tenants: [acme, tenant-000]\n", "o")[0]
    assert isinstance(listed.parsed, OwnerRegistry) and listed.parsed.tenants == {"acme", "tenant-000"}
    again = ReferenceDoc.from_json(listed.to_json()).parsed  # the reference topic carries the list too
    assert isinstance(again, OwnerRegistry) and again.tenants == {"acme", "tenant-000"}


def test_tenant_list_problems():
    assert problems_of(OWNERS + "tenants: acme\n", "o.yaml") == [
        "o.yaml:8: tenants: must be a list of tenant ids, got str 'acme'"]
    assert problems_of(OWNERS + "tenants: [acme, 7, acme]\n", "o.yaml") == [
        "o.yaml:8: tenants[1]: must be a string (quote it), got int 7",
        "o.yaml:8: tenants[2]: duplicate tenant 'acme' (also tenants[0])"]


def test_owner_entry_problems():
    text = OWNERS.replace("{team: search, product: search}", "{team: search}") + \
        "  other: {team: search, product: x, cost_centre: CC-9}\n"
    problems = problems_of(text)
    assert "f.yaml:7: features.search_answer: missing required key 'product'" in problems
    assert any(p.startswith("f.yaml:8: features.other.cost_centre: unknown key 'cost_centre' (did you mean "
                            "'cost_center'?)") for p in problems)


def test_duplicate_models_aliases_and_keys():
    text = CARD + (
        "  - provider: openai\n"
        "    model: gpt-y\n"
        "    aliases: [gpt-x]\n"
        '    input: "1"\n'
        '    output: "1"\n'
        '    input: "2"\n')
    problems = problems_of(text)
    assert "f.yaml:15: models[1].input: duplicate key" in problems
    assert "f.yaml:10: models[1]: duplicate model openai/gpt-x (also models[0])" in problems


def test_every_problem_is_reported_at_once():
    text = dedent("""\
        kind: price_card
        version: "bad version!"
        effective_at: "2026-01-01T00:00:00"
        currency: EUR
        models:
          - provider: OpenAI
            model: gpt-x
            input: 1.0
            output: "1"
            long_context: {above_input_tokens: "200k", input: "1", output: "1"}
    """)
    problems = problems_of(text)
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "6", "8", "10"]


def test_yaml_syntax_error_names_the_line():
    problems = problems_of("kind: price_card\nmodels: [\n  - a: 1\n")
    assert len(problems) == 1 and problems[0].startswith("f.yaml:") and "YAML syntax error" in problems[0]


BUDGETS = """\
kind: budgets
version: "b1"
effective_at: "2026-11-01T00:00:00Z"
thresholds: [50, 90, 100]
budgets:
  - {scope: feature, id: summarize_email_v2, period: day, amount: "25.00"}
  - {scope: tenant, id: tenant-000, period: month, amount: "500", thresholds: [100, 75]}
"""


def test_budgets_parse_with_default_and_own_thresholds():
    [doc] = parse_reference_yaml(BUDGETS, "b.yaml")
    budgets = doc.parsed.budgets
    assert [(b.key, b.amount, b.thresholds) for b in budgets] == [
        ("feature:summarize_email_v2:day", Decimal("25.00"), (50, 90, 100)),
        ("tenant:tenant-000:month", Decimal("500"), (75, 100))]
    assert snapshot_of([doc]).budgets_at(datetime(2026, 11, 2, tzinfo=UTC)) == doc.parsed


def test_budget_problems_are_all_reported():
    text = BUDGETS.replace("scope: tenant", "scope: team").replace('"25.00"', "25") + (
        "  - {scope: feature, id: summarize_email_v2, period: day, amount: \"1\", thresholds: [0]}\n")
    problems = problems_of(text)
    assert any("scope" in p and "must be one of feature, tenant" in p for p in problems)
    assert any("quoted decimal string" in p for p in problems)
    assert any("distinct whole percentages" in p for p in problems)


def test_unknown_kinds_are_refused():
    assert "kind must be one of price_card, owners, budgets" in problems_of("kind: prices\n")[0]
    assert "must be a mapping" in problems_of("- 1\n- 2\n")[0]


def test_merge_keys_are_refused():
    text = "base: &b {input: \"1\", output: \"1\"}\n" + CARD + "    <<: *b\n"
    assert any("merge keys" in p for p in problems_of(text))


def test_files_duplicate_versions_and_ambiguous_effective_at(tmp_path):
    a = write(tmp_path, "a.yaml", CARD)
    b = write(tmp_path, "b.yaml", CARD + "---\n" + CARD.replace('"v1"', '"v2"'))
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ReferenceDataError) as err:
        load_reference_files([a, b, missing])
    problems = err.value.problems
    assert problems[0] == f"{b}:1: price_card version 'v1' is defined twice (also {a}:1)"
    assert problems[1].startswith(f"{b}:11: price_card version 'v2' has the same effective_at as version 'v1'")
    assert problems[2].startswith(f"{missing}: cannot read")
    assert len(problems) == 3


def test_version_in_effect_by_timestamp():
    snap = snapshot_of(load_reference_files(EXAMPLE_FILES))
    change = datetime(2026, 11, 1, tzinfo=UTC)
    tick = timedelta(microseconds=1)
    assert snap.price_card_at(change - tick).version == "2025-10-01"
    assert snap.price_card_at(change).version == "2026-11-01"
    assert snap.price_card_at(change + tick).version == "2026-11-01"
    first = datetime(2025, 10, 1, tzinfo=UTC)
    assert snap.price_card_at(first - tick) is None
    assert snap.price_card_at(first).version == "2025-10-01"
    reorg = datetime(2026, 2, 1, tzinfo=UTC)
    assert snap.owners_at(reorg - tick).version == "2025-10-01"
    assert snap.owners_at(reorg).version == "2026-02-01"
    card, lo, hi = snap.price_cards.span_at(change - tick)
    assert card is not None and (lo, hi) == (first, change)


def test_store_apply_replace_remove_and_snapshot_isolation(now):
    store = ReferenceStore()
    assert store.describe() == "no reference data" and store.price_card_at(now) is None
    v1 = parse_reference_yaml(CARD, "c")[0]
    store.apply(v1)
    before = store.snapshot()
    v2 = parse_reference_yaml(CARD.replace('"v1"', '"v2"').replace("2026-01-01", "2026-06-01"), "c")[0]
    store.apply(v2)
    store.apply(parse_reference_yaml(OWNERS, "o")[0])
    # The snapshot a batch holds does not change under it.
    assert [v.version for v in before.versions()] == ["v1"]
    assert [(v.kind, v.version) for v in store.versions()] == [("price_card", "v1"), ("price_card", "v2"),
                                                               ("owners", "o1")]
    assert store.describe() == "price_card: v1, v2; owners: o1"
    at = datetime(2026, 7, 1, tzinfo=UTC)
    assert store.price_card_at(at).version == "v2"
    assert store.owners_at(at).version == "o1"
    # Replacing a version (same kind:version) with a new price.
    v2b = parse_reference_yaml(CARD.replace('"v1"', '"v2"').replace("2026-01-01", "2026-06-01")
                               .replace('"4.00"', '"5.00"'), "c")[0]
    store.apply(v2b)
    card = store.price_card_at(at)
    assert card is not None and card.models[0].prices.output == Decimal(5)
    assert store.remove("price_card", "v2") is True
    assert store.remove("price_card", "v2") is False
    assert store.price_card_at(at).version == "v1"


def test_model_matching_exact_alias_and_snapshot_suffix():
    card = snapshot_of(load_reference_files(EXAMPLE_FILES)).price_card_at(datetime(2026, 12, 1, tzinfo=UTC))
    assert card is not None
    assert card.find("openai", "gpt-4o").model == "gpt-4o"
    assert card.find("openai", "gpt-4o-2024-08-06").model == "gpt-4o"  # a card alias: the card lists it
    assert card.find("openai", "gpt-4o-2024-05-13").model == "gpt-4o-2024-05-13"  # its own entry, its own price
    assert card.find("openai", "gpt-4o-2024-01-01") is None  # a snapshot the card does not price alike
    assert card.match("openai", "gpt-4o-2024-01-01").how.startswith(
        "openai/gpt-4o-2024-01-01 is a dated snapshot of openai/gpt-4o, and price card 2026-11-01 neither lists it")
    assert card.find("anthropic", "claude-sonnet-4-5-20250929").model == "claude-sonnet-4-5"  # same_price_snapshots
    assert card.find("anthropic", "claude-3-5-haiku-latest").model == "claude-3-5-haiku"
    assert card.find("openai", "gpt-5-chat-latest").model == "gpt-5"
    assert card.find("openai", "gpt-4o-mini-2024-07-18").model == "gpt-4o-mini"
    assert card.find("anthropic", "gpt-4o") is None  # the provider is part of the key
    assert card.find("openai", "gpt-9") is None
    assert card.find("openai", "gpt-4o-2024") is None


def test_rates_are_exact_per_token_prices_with_multipliers():
    text = CARD + '    batch_discount: "0.5"\n    service_tiers: {priority: "1.75"}\n'
    card = parse_reference_yaml(text, "c")[0].parsed
    assert isinstance(card, PriceCard)
    model = card.models[0]
    rates = model.rates(True, "priority", False)
    p_in, p_out, p_re, p_cr, _, _ = rates.filled
    assert p_in == Decimal("0.000000875") and p_out == Decimal("0.0000035")
    assert p_re == p_out and p_cr == 0 and 3 in rates.missing and rates.notes == ()
    assert model.rates(False, "turbo", False).notes == (
        "unknown service tier 'turbo' for openai/gpt-x: multiplier 1",)
    assert model.rates(True, "standard", False) is model.rates(True, "standard", False)  # memoized


def test_provider_defaults_merge_under_models():
    text = CARD.replace("models:", 'provider_defaults:\n  openai: {batch_discount: "0.5", '
                                   'tools: {web_search: "0.01"}, service_tiers: {flex: "0.5"}}\nmodels:')
    text += '    batch_discount: "0.6"\n    tools: {file_search: "0.0025"}\n'
    model = parse_reference_yaml(text, "c")[0].parsed.models[0]
    assert model.batch_discount == Decimal("0.6")
    assert dict(model.tools) == {"web_search": Decimal("0.01"), "file_search": Decimal("0.0025")}
    assert dict(model.service_tiers) == {"flex": Decimal("0.5")}


# The alias table takes effect a month before the suite's clock; the card it binds to, half a year before that.
ALIASES_FROM = clock() - timedelta(days=30)


def rfc3339(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


ALIASES = """\
kind: model_aliases
version: "a1"
effective_at: "ALIASES_FROM"
rules:
  - {name: gemini-resource, provider: google, pattern: 'models/(?P<model>[^/]+)', model: '{model}'}
  - {name: vertex-pin, provider: [google, vertex], pattern: '(?P<model>claude-[a-z0-9-]+)@(?P<v>\\d{8})',
     model: '{model}-{v}'}
  - {name: support-bot, provider: azure_openai, equals: support-bot-prod, model: gpt-x, price_as: openai}
  - {name: regional, provider: bedrock, pattern: '(?:us|eu)\\.(?P<id>.+)', model: 'regional.{id}'}
  - {name: in-region, provider: bedrock, pattern: '(?:us|eu)\\.(?P<id>.+)', model: '{id}'}
""".replace("ALIASES_FROM", rfc3339(ALIASES_FROM))

ALIAS_CARD = """\
kind: price_card
version: "c1"
effective_at: "CARD_FROM"
currency: USD
models:
  - {provider: openai, model: gpt-x, input: "1.00", output: "4.00"}
  - {provider: google, model: gemini-9-flash, input: "0.30", output: "2.50"}
  - {provider: google, model: claude-z-1, input: "3.00", output: "15.00", same_price_snapshots: true}
  - {provider: bedrock, model: "regional.anthropic.claude-z-1-v1:0", input: "3.30", output: "16.50"}
  - {provider: bedrock, model: "amazon.nova-9-v1:0", input: "0.06", output: "0.24"}
""".replace("CARD_FROM", rfc3339(ALIASES_FROM - timedelta(days=200)))


def test_the_model_alias_table_prices_the_names_gateways_send_as_the_cards_entries():
    snap = snapshot_of(parse_reference_yaml(ALIAS_CARD, "card") + parse_reference_yaml(ALIASES, "aliases"))
    card = snap.price_card_at(ALIASES_FROM + timedelta(days=59))
    assert card is not None and card.version == "c1"
    priced = {(p, m): card.find(p, m) for p, m in [
        ("google", "models/gemini-9-flash"), ("google", "claude-z-1@20250929"), ("vertex", "claude-z-1@20250929"),
        ("azure_openai", "support-bot-prod"), ("bedrock", "us.anthropic.claude-z-1-v1:0"),
        ("bedrock", "eu.amazon.nova-9-v1:0")]}
    assert {k: v.priced_as if v else None for k, v in priced.items()} == {
        ("google", "models/gemini-9-flash"): "google/gemini-9-flash",
        ("google", "claude-z-1@20250929"): "google/claude-z-1",  # renamed, then its date suffix, priced alike
        ("vertex", "claude-z-1@20250929"): None,  # renamed to vertex/claude-z-1-20250929: the card has no vertex
        ("azure_openai", "support-bot-prod"): "openai/gpt-x",  # one deployment, priced as the provider's model
        ("bedrock", "us.anthropic.claude-z-1-v1:0"): "bedrock/regional.anthropic.claude-z-1-v1:0",
        ("bedrock", "eu.amazon.nova-9-v1:0"): "bedrock/amazon.nova-9-v1:0",  # the first rule's name is not priced
    }
    how = card.match("google", "models/gemini-9-flash").how
    assert how == ("alias rule 'gemini-resource' of model_aliases a1: google/models/gemini-9-flash → "
                   "google/gemini-9-flash")
    missed = card.match("vertex", "claude-z-1@20250929").how
    assert "vertex/claude-z-1@20250929 is not in price card c1" in missed and "'vertex-pin'" in missed
    # before the table's effective_at the card prices names as written only
    earlier = snap.price_card_at(ALIASES_FROM - timedelta(days=1))
    assert earlier is not None and earlier.version == "c1" and earlier.find("google", "models/gemini-9-flash") is None
    assert card.find("google", "gemini-9-flash").priced_as == "google/gemini-9-flash"  # the card's own name first
    assert [v.kind for v in snap.versions()] == ["price_card", "model_aliases"]  # one card, not one per binding


def test_alias_rule_problems_name_the_line():
    bad = ALIASES.replace("model: '{model}-{v}'", "model: '{model}-{version}'").replace(
        "equals: support-bot-prod, ", "").replace("pattern: '(?:us|eu)\\.(?P<id>.+)', model: '{id}'",
                                                  "pattern: '(?P<id>[', model: '{id}'")
    with pytest.raises(ReferenceDataError) as err:
        parse_reference_yaml(bad, "aliases.yaml")
    problems = err.value.problems
    for start in ("aliases.yaml:7: rules[1].model: {version} is not a named group",
                  "aliases.yaml:8: rules[2]: needs exactly one of 'pattern'",
                  "aliases.yaml:10: rules[4].pattern: is not a regular expression"):
        assert any(p.startswith(start) for p in problems), (start, problems)


def test_the_shipped_alias_table_prices_gateway_names_as_genai_prices_does():
    """reference/model_aliases.yaml over the imported card: the names of issue 15, each priced as genai-prices'
    calc_price prices it (or, for a name calc_price does not know, as the name it stands for)."""
    from genai_prices import Usage, calc_price

    from ops.reference_import import GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH
    from streams.enrich import price_event
    from tests.unit.test_genai_prices_grid import AT as at  # the grid's event time: both sides' prices known
    card = snapshot_of(load_reference_files([GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH])).price_card_at(at)
    assert card is not None
    source = {"google": "google", "bedrock": "aws", "anthropic": "anthropic", "azure_openai": "azure",
              "openai": "openai"}
    cases = [  # provider, name sent, the name calc_price is asked for
        ("google", "models/gemini-2.5-flash", "gemini-2.5-flash"),  # the Gemini API's resource name
        ("google", "gemini-2.5-flash-preview-09-2025", None),  # a preview name (a card alias)
        ("google", "claude-sonnet-4-5@20250929", None),  # Vertex AI's version pin
        ("bedrock", "anthropic.claude-sonnet-4-5-20250929-v1:0", None),  # Bedrock in-region id
        ("bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0", None),  # a cross-region inference profile
        ("bedrock", "global.anthropic.claude-sonnet-4-5-20250929-v1:0", None),  # a global profile: its own price
        ("bedrock", "us.amazon.nova-pro-v1:0", None),
        ("bedrock", "us.amazon.nova-2-lite-v1:0", None),
        ("azure_openai", "gpt-5", None),  # Azure at OpenAI's list price
        ("anthropic", "claude-sonnet-4-5-20250929", None),  # a dated snapshot the card prices alike
        ("openai", "gpt-4o-2024-05-13", None),  # a dated snapshot with its own, higher, price
    ]
    event = {"usage": {"input_tokens": 1000, "output_tokens": 1000}, "status": "ok"}
    for provider, sent, asked in cases:
        want = calc_price(Usage(input_tokens=1000, output_tokens=1000), asked or sent, provider_id=source[provider],
                          genai_request_timestamp=at)
        got = price_event({**event, "provider": provider, "model_actual": sent}, card)
        assert (got.status, got.total) == ("priced", want.total_price), (provider, sent, card.match(provider, sent))
        assert got.priced_as.split("/", 1)[1] == want.model.id, (provider, sent)
