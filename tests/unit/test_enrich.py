from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.enrich import (
    COST_OUT_OF_RANGE,
    ENRICH_FAILED,
    Costs,
    Owner,
    enrich,
    price_event,
    resolve_owner,
)
from streams.records import ATTEMPT_COLUMNS, COST_COLUMNS, STAGE_ENRICH, Source
from tally.config import REPO_ROOT
from tally.reference import (
    ClassPrices,
    ModelPrice,
    PriceCard,
    ReferenceSnapshot,
    Timeline,
    load_reference_files,
    parse_reference_yaml,
    snapshot_of,
)
from tests.factories import DROP, accepted_factory

EXAMPLES = REPO_ROOT / "examples" / "reference"
NOW = datetime(2026, 11, 20, 8, 30, tzinfo=UTC)

TEST_CARD = """\
kind: price_card
version: "t1"
effective_at: "2026-01-01T00:00:00Z"
currency: USD
models:
  - provider: acme
    model: full
    input: "2"
    output: "8"
    reasoning: "16"
    cache_read: "0.5"
    cache_write_5m: "2.5"
    cache_write_1h: "4"
    batch_discount: "0.5"
    service_tiers: {priority: "1.75", flex: "0.5"}
    tools: {web_search: "0.01"}
    long_context: {above_input_tokens: 100000, input: "4", output: "12"}
    same_price_snapshots: true
  - provider: acme
    model: bare
    input: "1"
    output: "3"
---
kind: price_card
version: "t2"
effective_at: "2026-06-01T00:00:00Z"
currency: USD
models:
  - {provider: acme, model: full, input: "3", output: "8"}
"""


@pytest.fixture(scope="module")
def examples() -> ReferenceSnapshot:
    return snapshot_of(load_reference_files([EXAMPLES / "price_cards.yaml", EXAMPLES / "owners.yaml"]))


@pytest.fixture(scope="module")
def test_refs() -> ReferenceSnapshot:
    owners = (EXAMPLES / "owners.yaml").read_text()
    return snapshot_of(parse_reference_yaml(TEST_CARD, "card") + parse_reference_yaml(owners, "owners"))


def one(refs: ReferenceSnapshot, **overrides):
    rows, rejected = enrich([accepted_factory(**overrides)], refs, NOW)
    assert rejected == [] and len(rows) == 1
    return rows[0]


def acme(refs: ReferenceSnapshot, model: str = "full", timestamp: str = "2026-03-01T00:00:00Z", **overrides):
    return one(refs, provider="acme", model_actual=model, model_requested=DROP, timestamp=timestamp, **overrides)


def costs(row) -> tuple[str, ...]:
    return tuple(str(row[c].normalize()) if row[c] else "0" for c in COST_COLUMNS)


# ---- the row --------------------------------------------------------------------------------------------------

def test_row_has_exactly_the_attempt_columns_and_defaults(examples):
    acc = accepted_factory(parent_request_id="lr-1", source=Source("llm.usage.v1", 3, 77), line=5)
    rows, rejected = enrich([acc], examples, NOW)
    assert rejected == []
    row = rows[0]
    assert tuple(row) == ATTEMPT_COLUMNS
    ev = acc.event
    assert row["event_id"] == ev["event_id"] and row["request_id"] == ev["request_id"]
    assert row["logical_request_id"] == "lr-1"
    assert row["ts"] == datetime(2026, 11, 15, 12, tzinfo=UTC) and row["ingested_at"] == NOW
    assert (row["attempt"], row["final"], row["fallback_from"], row["error"], row["service_tier"]) == (
        0, False, "", "", "")
    assert (row["batch"], row["usage_reported"], row["stream_terminated_at_token_n"], row["latency_ms"]) == (
        False, True, None, None)
    assert row["model_requested"] == row["model_actual"] == "gpt-4.1-mini"
    assert (row["input_tokens"], row["output_tokens"], row["reasoning_tokens"], row["cache_read_tokens"],
            row["cache_write_tokens"], row["cache_write_1h_tokens"]) == (1200, 300, 0, 0, 0, 0)
    assert row["tool_calls"] == {} and row["tags"] == ev["tags"]
    assert (row["source_topic"], row["source_partition"], row["source_offset"], row["source_line"]) == (
        "llm.usage.v1", 3, 77, 5)
    assert row["payload"] == acc.raw.decode()
    # gpt-4.1-mini: 1200 × $0.40/M + 300 × $1.60/M
    assert row["cost_input_usd"] == Decimal("0.00048") and row["cost_output_usd"] == Decimal("0.00048")
    assert row["cost_total_usd"] == Decimal("0.00096")
    assert (row["pricing_status"], row["pricing_note"], row["price_card_version"]) == ("priced", "", "2026-11-01")
    assert (row["tenant_id"], row["team_id"], row["feature_id"], row["product"], row["endpoint"],
            row["environment"], row["cost_center"], row["business_unit"]) == (
        "tenant_acme", "inbox", "summarize_email_v2", "mail", "/v1/summarize", "prod", "CC-2100", "consumer")
    assert (row["ownership_version"], row["attribution_status"], row["attribution_reason"],
            row["attribution_conflict"]) == ("2026-02-01", "attributed", "tag", "")
    assert all(type(row[c]) is Decimal for c in COST_COLUMNS)


def test_optional_fields_pass_through(examples):
    row = one(examples, attempt=2, final=True, model_requested="gpt-5", fallback_from="gpt-5", error="rate_limit",
              status="error", latency_ms=812, service_tier="default", tool_calls={"web_search": 0},
              tags={"feature_id": "sql_assistant", "api_key_id": "k9", "deploy_version": "2026.11.3",
                    "user_segment": "enterprise", "region": "eu"})
    assert (row["attempt"], row["final"], row["model_requested"], row["fallback_from"], row["error"]) == (
        2, True, "gpt-5", "gpt-5", "rate_limit")
    assert (row["latency_ms"], row["service_tier"], row["tool_calls"]) == (812, "default", {"web_search": 0})
    assert (row["api_key_id"], row["deploy_version"], row["user_segment"]) == ("k9", "2026.11.3", "enterprise")
    assert row["tags"]["region"] == "eu" and row["pricing_status"] == "priced"


# ---- owners ---------------------------------------------------------------------------------------------------

def owner(row) -> tuple[str, ...]:
    return (row["team_id"], row["product"], row["cost_center"], row["business_unit"], row["attribution_status"],
            row["attribution_reason"], row["attribution_conflict"])


def test_registry_fills_the_gaps_from_the_feature(examples):
    row = one(examples, tags={"feature_id": "summarize_email_v2", "tenant_id": "t1"})
    assert owner(row) == ("inbox", "mail", "CC-2100", "consumer", "attributed", "feature_registry", "")


def test_tags_win_and_the_conflict_is_recorded(examples):
    row = one(examples, tags={"team_id": "search", "feature_id": "summarize_email_v2"})
    # The tagged team owns it, with that team's cost center; the registry's view is kept in the conflict.
    assert owner(row) == ("search", "mail", "CC-1100", "consumer", "attributed", "tag",
                          "team_id: tag=search registry=inbox")
    row = one(examples, tags={"team_id": "inbox", "feature_id": "summarize_email_v2", "product": "mail_pro",
                              "cost_center": "CC-1100"})
    assert owner(row) == ("inbox", "mail_pro", "CC-1100", "consumer", "attributed", "tag",
                          "product: tag=mail_pro registry=mail; cost_center: tag=CC-1100 registry=CC-2100")


def test_feature_cost_center_override(examples):
    row = one(examples, tags={"feature_id": "kb_article_draft"})
    assert owner(row) == ("support", "helpdesk", "CC-3150", "customer_operations", "attributed",
                          "feature_registry", "")


def test_api_key_is_the_fallback(examples):
    row = one(examples, tags={"api_key_id": "key_batch_reports"})
    assert owner(row) == ("data", "analytics", "CC-6100", "engineering", "attributed", "api_key_registry", "")
    # A feature_id the registry does not know is not papered over by the key's team: it is unattributed.
    row = one(examples, tags={"feature_id": "not_registered", "api_key_id": "key_eval_runner"})
    assert owner(row)[4:6] == ("unattributed", "unknown_feature")


def test_team_tag_alone_takes_the_teams_cost_center(examples):
    assert owner(one(examples, tags={"team_id": "platform"})) == (
        "platform", "", "CC-5100", "engineering", "attributed", "tag", "")


def test_a_ghost_team_is_unattributed_not_billed(examples):
    # Issue 11: `team_id: ghost_team` (not in the registry) used to be stored as attributed (reason tag), and the
    # chargeback billed a team with no cost center.
    row = one(examples, tags={"team_id": "ghost_team", "feature_id": "summarize_email_v2", "tenant_id": "t1"})
    assert owner(row) == ("", "", "", "", "unattributed", "unknown_team",
                          "team_id: tag=ghost_team not in registry 2026-02-01")
    assert row["tags"]["team_id"] == "ghost_team"  # the tag's value stays on the row
    assert (row["feature_id"], row["tenant_id"], row["ownership_version"]) == ("summarize_email_v2", "t1",
                                                                               "2026-02-01")


@pytest.mark.parametrize(("tags", "reason", "conflict"), [
    ({"team_id": "inbox", "feature_id": "nope"}, "unknown_feature",
     "feature_id: tag=nope not in registry 2026-02-01"),
    ({"feature_id": "summarize_email_v2", "cost_center": "CC-9"}, "unknown_cost_center",
     "cost_center: tag=CC-9 not in registry 2026-02-01"),
    ({"team_id": "skunkworks", "feature_id": "nope", "cost_center": "CC-9"}, "unknown_team",
     "team_id: tag=skunkworks not in registry 2026-02-01; feature_id: tag=nope not in registry 2026-02-01; "
     "cost_center: tag=CC-9 not in registry 2026-02-01"),
])
def test_a_tag_the_registry_does_not_know_is_unattributed_with_its_value_kept(examples, tags, reason, conflict):
    row = one(examples, tags=tags)
    assert (row["team_id"], row["attribution_status"], row["attribution_reason"], row["attribution_conflict"]) == (
        "", "unattributed", reason, conflict)
    assert row["tags"] == tags and row["cost_center"] == tags.get("cost_center", "")


def test_a_cost_center_any_team_or_entry_names_is_known(examples):
    # CC-3150 is kb_article_draft's override, not a team's: a known cost center all the same.
    row = one(examples, tags={"feature_id": "summarize_email_v2", "cost_center": "CC-3150"})
    assert owner(row)[:6] == ("inbox", "mail", "CC-3150", "consumer", "attributed", "feature_registry")


TENANTS = """kind: owners
version: "t-strict"
effective_at: "2026-11-01T00:00:00Z"
teams: {inbox: {cost_center: CC-2100, business_unit: consumer}}
features: {summarize_email_v2: {team: inbox, product: mail}}
tenants: [tenant_acme, tenant-000]
"""


def test_tenants_are_checked_only_against_a_registry_that_lists_them(examples):
    tags = {"feature_id": "summarize_email_v2", "tenant_id": "tenant_nobody_signed"}
    # Lenient: the example registry lists no tenants (they are open-ended), so any tenant id is accepted.
    assert owner(one(examples, tags=tags))[4:6] == ("attributed", "feature_registry")
    strict = snapshot_of(parse_reference_yaml(TENANTS, "owners"))
    row = one(strict, tags=tags)
    assert owner(row) == ("", "", "", "", "unattributed", "unknown_tenant",
                          "tenant_id: tag=tenant_nobody_signed not in registry t-strict")
    assert row["tenant_id"] == "tenant_nobody_signed"
    assert owner(one(strict, tags={**tags, "tenant_id": "tenant_acme"}))[4:6] == ("attributed", "feature_registry")
    assert owner(one(strict, tags={"feature_id": "summarize_email_v2"}))[4:6] == ("attributed", "feature_registry")


def test_with_no_registry_in_effect_tags_are_not_judged(examples):
    row = one(examples, timestamp="2025-09-30T23:59:59.999Z", tags={"team_id": "ghost_team"})
    assert owner(row)[:6] == ("ghost_team", "", "", "", "attributed", "tag")


@pytest.mark.parametrize(("tags", "reason"), [
    ({"tenant_id": "t1", "product": "mail"}, "no_feature_tag"),
    ({"feature_id": "nope"}, "unknown_feature"),
    ({"feature_id": "nope", "api_key_id": "nope"}, "unknown_feature"),
    ({"api_key_id": "nope"}, "unknown_api_key"),
])
def test_unattributed_reasons(examples, tags, reason):
    row = one(examples, tags=tags)
    assert (row["team_id"], row["attribution_status"], row["attribution_reason"]) == ("", "unattributed", reason)
    assert row["ownership_version"] == "2026-02-01"


def test_no_registry_in_effect(examples):
    row = one(examples, timestamp="2025-09-30T23:59:59.999Z", tags={"feature_id": "smart_reply"})
    assert (row["attribution_status"], row["attribution_reason"], row["ownership_version"]) == (
        "unattributed", "no_registry", "")
    assert (row["pricing_status"], row["price_card_version"], row["cost_total_usd"]) == ("unpriced", "", 0)
    assert row["pricing_note"] == "no price card in effect"


def test_reorg_does_not_rewrite_history(examples):
    before = accepted_factory(timestamp="2026-01-31T23:59:59.999Z", tags={"feature_id": "smart_reply"})
    after = accepted_factory(timestamp="2026-02-01T00:00:00Z", tags={"feature_id": "smart_reply"})
    rows, _ = enrich([after, before, after], examples, NOW)
    assert [(r["team_id"], r["cost_center"], r["ownership_version"]) for r in rows] == [
        ("growth", "CC-4100", "2026-02-01"), ("inbox", "CC-2100", "2025-10-01"), ("growth", "CC-4100", "2026-02-01")]


# ---- prices ---------------------------------------------------------------------------------------------------

ALL_CLASSES = {"input_tokens": 1000, "output_tokens": 100, "reasoning_tokens": 10, "cache_read_tokens": 400,
               "cache_write_tokens": 200, "cache_write_1h_tokens": 100}


def test_every_class_has_its_own_cost_line(test_refs):
    row = acme(test_refs, usage=ALL_CLASSES)
    # input 1000×2, output 100×8, reasoning 10×16, cache read 400×0.5, cache write 200×2.5 + 100×4 (per M)
    assert costs(row) == ("0.002", "0.0008", "0.00016", "0.0002", "0.0009", "0", "0.00406")
    assert (row["pricing_status"], row["pricing_note"], row["price_card_version"]) == ("priced", "", "t1")


def test_reasoning_defaults_to_the_output_price(test_refs):
    row = acme(test_refs, model="bare", usage={"output_tokens": 100, "reasoning_tokens": 1000})
    assert row["cost_reasoning_usd"] == Decimal("0.003") and row["cost_output_usd"] == Decimal("0.0003")


def test_batch_discount_applies_to_every_token_class_not_to_tools(test_refs):
    row = acme(test_refs, usage=ALL_CLASSES, batch=True, tool_calls={"web_search": 2})
    assert costs(row) == ("0.001", "0.0004", "0.00008", "0.0001", "0.00045", "0.02", "0.02203")
    assert row["pricing_status"] == "priced" and row["batch"] is True


def test_batch_without_a_batch_price_is_partial_at_full_price(test_refs):
    row = acme(test_refs, model="bare", usage={"input_tokens": 1000}, batch=True)
    assert row["cost_input_usd"] == Decimal("0.001") and row["pricing_status"] == "partial"
    assert row["pricing_note"] == "no batch price for acme/bare: priced at standard rates"


@pytest.mark.parametrize(("tier", "total", "status"), [
    (DROP, "0.0036", "priced"), ("default", "0.0036", "priced"), ("standard", "0.0036", "priced"),
    ("auto", "0.0036", "priced"), ("priority", "0.0063", "priced"), ("flex", "0.0018", "priced"),
    ("turbo", "0.0036", "partial"),
])
def test_service_tiers(test_refs, tier, total, status):
    row = acme(test_refs, usage={"input_tokens": 1000, "output_tokens": 200}, service_tier=tier)
    assert (str(row["cost_total_usd"].normalize()), row["pricing_status"]) == (total, status)
    if status == "partial":
        assert row["pricing_note"] == "unknown service tier 'turbo' for acme/full: multiplier 1"


def test_batch_and_service_tier_multiply(test_refs):
    row = acme(test_refs, usage={"input_tokens": 1000}, service_tier="priority", batch=True)
    assert row["cost_input_usd"] == Decimal("0.00175")  # 1000 × 2/M × 0.5 × 1.75


def test_long_context_threshold_is_strictly_above(test_refs):
    at = acme(test_refs, usage={"input_tokens": 90000, "cache_read_tokens": 10000, "output_tokens": 1000})
    assert costs(at)[:2] == ("0.18", "0.008") and at["pricing_status"] == "priced"
    above = acme(test_refs, usage={"input_tokens": 100001, "output_tokens": 1000, "reasoning_tokens": 100})
    # The tier's prices apply to the whole request; reasoning defaults to the tier's output price.
    assert costs(above) == ("0.400004", "0.012", "0.0012", "0", "0", "0", "0.413204")
    assert above["pricing_status"] == "priced"
    # A class the tier does not price is never silently priced at the cheaper base price.
    partial = acme(test_refs, usage={"input_tokens": 90000, "cache_read_tokens": 10001})
    assert partial["cost_cache_read_usd"] == 0 and partial["pricing_status"] == "partial"
    assert partial["pricing_note"] == "no cache_read price for acme/full (long context): 10001 tokens unpriced"


def test_long_context_tier_of_the_example_card(examples):
    usage = {"input_tokens": 150000, "cache_read_tokens": 50000, "output_tokens": 1000}
    at = one(examples, provider="anthropic", model_actual="claude-sonnet-4-5-20250929", usage=usage)
    assert costs(at)[:4] == ("0.45", "0.015", "0", "0.015")
    above = one(examples, provider="anthropic", model_actual="claude-sonnet-4-5",
                usage={**usage, "cache_write_1h_tokens": 1})
    assert costs(above) == ("0.9", "0.0225", "0", "0.03", "0.000012", "0", "0.952512")


def test_tools_are_priced_per_call_and_unknown_tools_are_partial(test_refs):
    row = acme(test_refs, usage={"input_tokens": 0},  # explicit zero: an ok call with `usage: {}` is no_usage
               tool_calls={"web_search": 3, "code_interpreter": 2, "file_search": 0})
    assert row["cost_tools_usd"] == Decimal("0.03") and row["cost_total_usd"] == Decimal("0.03")
    assert row["pricing_status"] == "partial"
    assert row["pricing_note"] == "no price for tool 'code_interpreter' of acme/full: 2 calls unpriced"


def test_a_class_without_a_price_is_partial_never_a_silent_zero(test_refs):
    row = acme(test_refs, model="bare", usage={"input_tokens": 10, "cache_read_tokens": 5, "cache_write_1h_tokens": 7})
    assert row["cost_cache_read_usd"] == 0 and row["cost_cache_write_usd"] == 0
    assert row["pricing_status"] == "partial"
    assert row["pricing_note"] == ("no cache_read price for acme/bare: 5 tokens unpriced; "
                                   "no cache_write_1h price for acme/bare: 7 tokens unpriced")
    # No tokens in the unpriced class: nothing is missing.
    assert acme(test_refs, model="bare", usage={"input_tokens": 10})["pricing_status"] == "priced"


def test_unknown_model_is_unpriced_but_kept(test_refs):
    row = acme(test_refs, model="nova-9", usage=ALL_CLASSES, tool_calls={"web_search": 1})
    assert costs(row) == ("0",) * 7
    assert (row["pricing_status"], row["price_card_version"]) == ("unpriced", "t1")
    assert row["pricing_note"] == "acme/nova-9 is not in price card t1"
    assert row["input_tokens"] == 1000


def test_a_dated_snapshot_is_priced_as_its_base_only_where_the_card_says_they_cost_the_same(test_refs):
    row = acme(test_refs, model="full-2026-01-15", usage={"input_tokens": 1})
    assert (row["pricing_status"], row["priced_as"]) == ("priced", "acme/full")
    assert acme(test_refs, model="full-20260115", usage={"input_tokens": 1})["cost_input_usd"] == Decimal("0.000002")
    # `bare` does not say its snapshots cost what it costs: its dated name is unpriced, with the reason, never
    # priced at bare's price (gpt-4o-2024-05-13 lists at twice gpt-4o's)
    row = acme(test_refs, model="bare-2026-01-15", usage={"input_tokens": 1})
    assert (row["pricing_status"], row["priced_as"], costs(row)) == ("unpriced", "", ("0",) * 7)
    assert row["pricing_note"] == ("acme/bare-2026-01-15 is a dated snapshot of acme/bare, and price card t1 neither "
                                   "lists it nor says its snapshots cost the same (same_price_snapshots)")
    assert acme(test_refs, model="bare", usage={"input_tokens": 1})["priced_as"] == "acme/bare"


def test_usage_not_reported_is_no_usage_not_zero(test_refs):
    row = acme(test_refs, usage={"input_tokens": 500}, usage_reported=False, status="error")
    assert costs(row) == ("0",) * 7
    assert (row["pricing_status"], row["usage_reported"]) == ("no_usage", False)
    assert row["pricing_note"] == "usage not reported by the provider: cost unknown, not zero"


def test_an_ok_event_with_an_empty_usage_object_is_no_usage_not_a_priced_zero(examples):
    # Issue 11: `status: ok` with `usage: {}` used to be stored at $0 as priced.
    row = one(examples, usage={})
    assert costs(row) == ("0",) * 7
    assert (row["pricing_status"], row["usage_reported"], row["price_card_version"]) == (
        "no_usage", False, "2026-11-01")
    assert row["pricing_note"] == ("status ok but the usage object is empty (no token count at all): cost unknown, "
                                   "not zero")
    assert [r["pricing_status"] for r in (one(examples, usage={}, tool_calls={"web_search": 2}),
                                          one(examples, usage={}, usage_reported=True))] == ["no_usage"] * 2


def test_an_explicit_zero_from_the_provider_is_a_real_zero(examples):
    for usage in ({"input_tokens": 0, "output_tokens": 0}, {"input_tokens": 0}):
        row = one(examples, usage=usage)
        assert (row["pricing_status"], row["usage_reported"], row["cost_total_usd"]) == ("priced", True, 0)
    for status in ("error", "terminated"):  # a failed call may really have used nothing
        row = one(examples, usage={}, status=status)
        assert (row["pricing_status"], row["usage_reported"], row["cost_total_usd"]) == ("priced", True, 0)


def test_terminated_stream_is_estimated_from_tokens_before_the_cut(test_refs):
    row = acme(test_refs, status="terminated", usage={"input_tokens": 1000, "cache_read_tokens": 200},
               usage_reported=False, stream_terminated_at_token_n=50)
    assert costs(row) == ("0.002", "0.0004", "0", "0.0001", "0", "0", "0.0025")
    assert row["pricing_status"] == "estimated"
    assert row["pricing_note"] == ("estimated: usage not reported; priced input usage plus 50 output tokens "
                                   "generated before the cut")
    # The output tokens counted are the tokens priced (the cut point); the payload keeps the event as sent.
    assert (row["output_tokens"], row["reasoning_tokens"], row["stream_terminated_at_token_n"]) == (50, 0, 50)
    # With usage reported, a terminated stream is priced from its usage.
    reported = acme(test_refs, status="terminated", usage={"input_tokens": 1000, "output_tokens": 7},
                    stream_terminated_at_token_n=50)
    assert reported["pricing_status"] == "priced" and reported["cost_output_usd"] == Decimal("0.000056")


def test_card_version_by_event_time_within_one_batch(test_refs):
    stamps = ["2026-05-31T23:59:59.999Z", "2026-06-01T00:00:00Z", "2026-01-01T00:00:00Z", "2025-12-31T23:59:59Z",
              "2026-06-01T00:00:00.001+00:00", "2026-06-01T01:00:00+02:00"]
    batch = [accepted_factory(provider="acme", model_actual="full", timestamp=t, usage={"input_tokens": 1000})
             for t in stamps]
    rows, _ = enrich(batch, test_refs, NOW)
    assert [(r["price_card_version"], str(r["cost_input_usd"].normalize())) for r in rows] == [
        ("t1", "0.002"), ("t2", "0.003"), ("t1", "0.002"), ("", "0"), ("t2", "0.003"), ("t1", "0.002")]


def test_costs_of_valid_cards_are_never_rounded(examples):
    # The largest token counts with the example card's finest prices: all exact, ≤ 18 decimal places.
    usage = {c: 100_000_000 - i for i, c in enumerate(ALL_CLASSES)}
    for provider, model in (("openai", "gpt-5-nano"), ("openai", "o4-mini"), ("anthropic", "claude-3-5-haiku"),
                            ("google", "gemini-2.5-pro")):
        row = one(examples, provider=provider, model_actual=model, usage=usage, batch=True, service_tier="flex")
        for c in COST_COLUMNS:
            exponent = row[c].as_tuple().exponent
            assert exponent >= -18, (model, c, row[c])


def test_price_event_and_resolve_owner_are_the_functions_enrich_uses(test_refs):
    acc = accepted_factory(provider="acme", model_actual="full", timestamp="2026-03-01T00:00:00Z",
                           usage={"input_tokens": 10, "cache_write_1h_tokens": 5}, batch=True,
                           tags={"feature_id": "smart_reply", "product": "mail_x"})
    (row,), _ = enrich([acc], test_refs, NOW)
    costs_ = price_event(acc.event, test_refs.price_card_at(acc.ts))
    assert costs_ == Costs(Decimal("0.00001"), Decimal(0), Decimal(0), Decimal(0), Decimal("0.00001"), Decimal(0),
                           Decimal("0.00002"), "priced", "", "acme/full")
    assert tuple(costs_)[:7] == tuple(row[c] for c in COST_COLUMNS)
    assert costs_.priced_as == row["priced_as"]
    owner_ = resolve_owner(acc.event["tags"], test_refs.owners_at(acc.ts))
    assert owner_ == Owner("growth", "mail_x", "CC-4100", "go_to_market", "attributed", "feature_registry",
                           "product: tag=mail_x registry=mail")
    assert tuple(owner_) == owner(row)
    assert price_event(acc.event, None).status == "unpriced"
    assert resolve_owner({}, None).reason == "no_feature_tag"


# ---- rejections -----------------------------------------------------------------------------------------------

def test_a_cost_that_does_not_fit_is_rejected_not_rounded():
    eff = datetime(2026, 1, 1, tzinfo=UTC)
    huge = Decimal("1E+30")
    model = ModelPrice("acme", "huge", (), ClassPrices(huge, huge, None, None, None, None), None, None, {}, {})
    card = PriceCard("x", eff, "USD", (model,), {("acme", "huge"): model})
    refs = ReferenceSnapshot(price_cards=Timeline((eff,), (card,)))
    good = accepted_factory(provider="acme", model_actual="nope")
    bad = accepted_factory(provider="acme", model_actual="huge", line=2)
    rows, rejected = enrich([bad, good], refs, NOW)
    assert [r["event_id"] for r in rows] == [good.event["event_id"]]
    (rej,) = rejected
    assert (rej.reason, rej.stage, rej.raw, rej.line, rej.event_id) == (
        COST_OUT_OF_RANGE, STAGE_ENRICH, bad.raw, 2, bad.event["event_id"])


def test_an_unexpected_failure_is_a_rejection_and_the_batch_goes_on(examples):
    broken = accepted_factory()
    broken.event["usage"] = None
    good = accepted_factory()
    rows, rejected = enrich([broken, good], examples, NOW)
    assert len(rows) == 1 and rows[0]["event_id"] == good.event["event_id"]
    assert rejected[0].reason == ENRICH_FAILED and rejected[0].message.startswith("AttributeError")


# ---- property: an independent re-rating agrees to the last digit --------------------------------------------

STANDARD = ("", "default", "standard", "auto")
CLASSES = ("input", "output", "reasoning", "cache_read", "cache_write_5m", "cache_write_1h")


@st.composite
def decimal_text(draw, places: int, maximum: int) -> str:
    k = draw(st.integers(0, places))
    n = draw(st.integers(0, maximum * 10**k))
    return f"{n // 10**k}.{n % 10**k:0{k}d}" if k else str(n)


PRICE = decimal_text(6, 5000)
MULTIPLIER = decimal_text(3, 20)
TOOL_PRICE = decimal_text(9, 50)


@st.composite
def model_entry(draw) -> dict:
    entry = {"provider": "acme", "model": "m", "input": draw(PRICE), "output": draw(PRICE)}
    if draw(st.booleans()):
        entry["same_price_snapshots"] = True
    for cls in CLASSES[2:]:
        if draw(st.booleans()):
            entry[cls] = draw(PRICE)
    if draw(st.booleans()):
        entry["batch_discount"] = draw(MULTIPLIER)
    tiers = draw(st.dictionaries(st.sampled_from(["priority", "flex", "standard"]), MULTIPLIER))
    if tiers:
        entry["service_tiers"] = tiers
    tools = draw(st.dictionaries(st.sampled_from(["web_search", "code_interpreter"]), TOOL_PRICE))
    if tools:
        entry["tools"] = tools
    if draw(st.booleans()):
        tier = {"above_input_tokens": draw(st.integers(0, 300_000)), "input": draw(PRICE), "output": draw(PRICE)}
        for cls in CLASSES[2:]:
            if draw(st.booleans()):
                tier[cls] = draw(PRICE)
        entry["long_context"] = tier
    return entry


BASE = datetime(2026, 1, 1, tzinfo=UTC)
TOKENS = st.one_of(st.just(0), st.integers(0, 300_000), st.integers(0, 100_000_000))


@st.composite
def scenario(draw):
    offsets = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=3, unique=True))
    cards = [(BASE + timedelta(seconds=o), f"v{i}", draw(model_entry())) for i, o in enumerate(offsets)]
    anchor = draw(st.sampled_from(offsets))
    ts = BASE + timedelta(seconds=anchor, microseconds=draw(st.sampled_from([-1000, 0, 1000, 10**9])))
    usage = {f"{c}_tokens" if c not in ("cache_write_5m",) else "cache_write_tokens": draw(TOKENS)
             for c in CLASSES}
    event = {
        "provider": "acme",
        "model_actual": draw(st.sampled_from(["m", "m-2025-08-06", "m-20250806"])),
        "timestamp": ts.isoformat().replace("+00:00", "Z"),
        "usage": {k: v for k, v in usage.items() if v or draw(st.booleans())},
        "batch": draw(st.booleans()),
        "service_tier": draw(st.sampled_from([*STANDARD, "priority", "flex", "turbo"])) or DROP,
        "tool_calls": draw(st.dictionaries(st.sampled_from(["web_search", "code_interpreter", "mystery"]),
                                           st.integers(0, 100_000))),
        "usage_reported": draw(st.sampled_from([True, True, False])),
    }
    if draw(st.booleans()):
        event["stream_terminated_at_token_n"] = draw(TOKENS)
        event["status"] = "terminated"
    return cards, event


def rerate(cards, event) -> dict:
    """An independent pricer over Fractions built from the raw YAML strings."""
    ts = datetime.fromisoformat(event["timestamp"])
    in_effect = [c for c in cards if c[0] <= ts]
    zero = dict.fromkeys(COST_COLUMNS, Fraction(0))
    if not in_effect:
        return {**zero, "status": "unpriced", "version": ""}
    _, version, entry = max(in_effect, key=lambda c: c[0])
    if event["model_actual"] != entry["model"] and not entry.get("same_price_snapshots"):
        return {**zero, "status": "unpriced", "version": version}  # a dated name the card does not price alike
    usage = event["usage"]
    n = {c: usage.get("cache_write_tokens" if c == "cache_write_5m" else f"{c}_tokens", 0) for c in CLASSES}
    status = "priced"
    if not event["usage_reported"] or (not usage and event.get("status", "ok") == "ok"):
        cut = event.get("stream_terminated_at_token_n")
        if cut is None:
            return {**zero, "status": "no_usage", "version": version}
        n["output"], n["reasoning"], status = cut, 0, "estimated"
    prompt = n["input"] + n["cache_read"] + n["cache_write_5m"] + n["cache_write_1h"]
    tier = entry.get("long_context")
    prices = tier if tier is not None and prompt > tier["above_input_tokens"] else entry
    partial = False
    multiplier = Fraction(1)
    if event["batch"]:
        if "batch_discount" in entry:
            multiplier *= Fraction(entry["batch_discount"])
        else:
            partial = True
    service_tier = event.get("service_tier", "")
    service_tier = "" if service_tier is DROP else service_tier
    if service_tier in entry.get("service_tiers", {}):
        multiplier *= Fraction(entry["service_tiers"][service_tier])
    elif service_tier not in STANDARD:
        partial = True
    line = {}
    for cls in CLASSES:
        raw = prices.get(cls, prices.get("output") if cls == "reasoning" else None)
        if n[cls] and raw is None:
            partial = True
        line[cls] = Fraction(raw) / 1_000_000 * multiplier * n[cls] if raw is not None else Fraction(0)
    tools = Fraction(0)
    for name, calls in event["tool_calls"].items():
        if calls and name in entry.get("tools", {}):
            tools += Fraction(entry["tools"][name]) * calls
        elif calls:
            partial = True
    out = {"cost_input_usd": line["input"], "cost_output_usd": line["output"],
           "cost_reasoning_usd": line["reasoning"], "cost_cache_read_usd": line["cache_read"],
           "cost_cache_write_usd": line["cache_write_5m"] + line["cache_write_1h"], "cost_tools_usd": tools}
    out["cost_total_usd"] = sum(out.values(), Fraction(0))
    if status == "priced" and partial:
        status = "partial"
    return {**out, "status": status, "version": version}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_enrich_agrees_with_an_independent_rerating(case):
    cards, overrides = case
    docs = [{"kind": "price_card", "version": v, "effective_at": eff.isoformat(), "currency": "USD",
             "models": [entry]} for eff, v, entry in cards]
    refs = snapshot_of(parse_reference_yaml(yaml.dump_all(docs, Dumper=yaml.CSafeDumper), "generated"))
    rows, rejected = enrich([accepted_factory(**overrides)], refs, NOW)
    assert rejected == []
    row = rows[0]
    expected = rerate(cards, overrides)
    for column in COST_COLUMNS:
        assert Fraction(row[column]) == expected[column], column
        assert row[column].as_tuple().exponent >= -18, column  # exact at ClickHouse Decimal(38, 18)
    assert (row["pricing_status"], row["price_card_version"]) == (expected["status"], expected["version"])
    assert row["priced_as"] == ("" if expected["status"] == "unpriced" else "acme/m")
