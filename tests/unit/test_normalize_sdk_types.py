"""The normalizers against the official SDKs' own typed usage objects (openai, anthropic, google-genai)."""

from __future__ import annotations

import orjson
import pytest
from anthropic.types import Usage as AnthropicUsage
from google.genai import types as genai
from openai.types import CompletionUsage
from openai.types.responses import ResponseUsage

from tally.config import REPO_ROOT
from tally.errors import NormalizationError
from tally.sdk.events import usage_event
from tally.sdk.normalize import (
    anthropic_call_info,
    from_anthropic,
    from_gemini,
    from_openai_chat,
    from_openai_responses,
)
from tests.factories import clock


def classes(inp: int = 0, out: int = 0, reasoning: int = 0, read: int = 0, write: int = 0,
            write_1h: int = 0) -> dict[str, int]:
    return {"input_tokens": inp, "output_tokens": out, "reasoning_tokens": reasoning, "cache_read_tokens": read,
            "cache_write_tokens": write, "cache_write_1h_tokens": write_1h}


def test_openai_chat_cache_writes_are_their_own_class() -> None:
    usage = CompletionUsage.model_validate({
        "prompt_tokens": 5000, "completion_tokens": 900, "total_tokens": 5900,
        "prompt_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 2048, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 640, "accepted_prediction_tokens": 0}})
    got = from_openai_chat(usage)
    assert got == classes(inp=5000 - 1024 - 2048, out=900 - 640, reasoning=640, read=1024, write=2048)
    assert sum(got.values()) == usage.total_tokens


def test_openai_chat_cache_reads_and_writes_above_the_prompt_raise() -> None:
    usage = CompletionUsage.model_validate({
        "prompt_tokens": 1000, "completion_tokens": 1, "total_tokens": 1001,
        "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 500}})
    with pytest.raises(NormalizationError, match=r"cache_write_tokens \(1100\) exceeds prompt_tokens \(1000\)"):
        from_openai_chat(usage)


def test_openai_responses_cache_writes_split_by_retention() -> None:
    usage = ResponseUsage.model_validate({
        "input_tokens": 12_000, "output_tokens": 1500, "total_tokens": 13_500,
        "input_tokens_details": {"cached_tokens": 4096, "cache_write_tokens": 3000,
                                 "cache_write_tokens_details": {"ttl_30m_tokens": 1000, "ttl_12h_tokens": 2000}},
        "output_tokens_details": {"reasoning_tokens": 1200}})
    got = from_openai_responses(usage)
    assert got == classes(inp=12_000 - 4096 - 3000, out=300, reasoning=1200, read=4096, write=1000, write_1h=2000)
    assert sum(got.values()) == usage.total_tokens


def test_openai_responses_cache_writes_without_retention_are_short_lived() -> None:
    usage = ResponseUsage.model_validate({
        "input_tokens": 100, "output_tokens": 10, "total_tokens": 110,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 64},
        "output_tokens_details": {"reasoning_tokens": 0}})
    assert from_openai_responses(usage) == classes(inp=36, out=10, write=64)


def test_openai_responses_retention_that_does_not_add_up_raises() -> None:
    usage = ResponseUsage.model_validate({
        "input_tokens": 100, "output_tokens": 10, "total_tokens": 110,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 64,
                                 "cache_write_tokens_details": {"ttl_30m_tokens": 60, "ttl_12h_tokens": 0}},
        "output_tokens_details": {"reasoning_tokens": 0}})
    with pytest.raises(NormalizationError, match=r"ttl_30m_tokens \(60\) \+ .*ttl_12h_tokens \(0\) != "
                                                 r"input_tokens_details.cache_write_tokens \(64\)"):
        from_openai_responses(usage)


def anthropic_usage(**extra: object) -> AnthropicUsage:
    return AnthropicUsage.model_validate({
        "input_tokens": 21, "output_tokens": 2393, "cache_read_input_tokens": 13_056,
        "cache_creation_input_tokens": 2188,
        "cache_creation": {"ephemeral_5m_input_tokens": 188, "ephemeral_1h_input_tokens": 2000}, **extra})


def test_anthropic_thinking_tokens_reported_by_the_api_are_reasoning() -> None:
    usage = anthropic_usage(output_tokens_details={"thinking_tokens": 2000})
    got = from_anthropic(usage)
    assert got == classes(inp=21, out=393, reasoning=2000, read=13_056, write=188, write_1h=2000)
    assert sum(got.values()) == 21 + 2393 + 13_056 + 2188
    assert from_anthropic(usage, thinking_tokens=2000) == got  # a caller's count that agrees changes nothing


def test_anthropic_a_caller_count_that_disagrees_with_the_api_raises() -> None:
    usage = anthropic_usage(output_tokens_details={"thinking_tokens": 2000})
    with pytest.raises(NormalizationError, match=r"thinking_tokens \(1500\) disagrees with "
                                                 r"output_tokens_details.thinking_tokens \(2000\)"):
        from_anthropic(usage, thinking_tokens=1500)


def test_anthropic_thinking_above_output_raises() -> None:
    with pytest.raises(NormalizationError, match=r"output_tokens_details.thinking_tokens \(2394\) exceeds"):
        from_anthropic(anthropic_usage(output_tokens_details={"thinking_tokens": 2394}))


def test_anthropic_a_zero_breakdown_beside_cache_creation_is_five_minute() -> None:
    # Some API versions and proxies send the TTL object with two zeros: the gateway used to lose the event.
    usage = AnthropicUsage.model_validate({
        "input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 700,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}})
    assert from_anthropic(usage) == classes(inp=10, out=5, write=700)


def test_anthropic_server_tools_tier_and_batch_go_on_the_event() -> None:
    usage = anthropic_usage(server_tool_use={"web_search_requests": 3, "web_fetch_requests": 0},
                            service_tier="priority")
    info = anthropic_call_info(usage)
    assert info == {"tool_calls": {"web_search": 3}, "service_tier": "priority"}
    event = usage_event(request_id="r-1", provider="anthropic", model_actual="claude-sonnet-4-5",
                        usage=from_anthropic(usage), timestamp=clock(), **info)
    assert event["tool_calls"] == {"web_search": 3} and event["service_tier"] == "priority"
    assert anthropic_call_info(anthropic_usage(service_tier="batch")) == {"batch": True}
    assert anthropic_call_info(anthropic_usage()) == {}


def test_gemini_sdk_usage_metadata() -> None:
    meta = genai.GenerateContentResponseUsageMetadata(
        prompt_token_count=4235, candidates_token_count=312, cached_content_token_count=4096,
        thoughts_token_count=573, tool_use_prompt_token_count=800, total_token_count=4235 + 312 + 573 + 800)
    got = from_gemini(meta)
    assert got == classes(inp=4235 - 4096 + 800, out=312, reasoning=573, read=4096)
    assert sum(got.values()) == meta.total_token_count


def test_lenient_mode_publishes_inconsistent_usage_as_no_usage_with_the_reason() -> None:
    """Inconsistent usage stays an error, but a gateway that must not lose the call publishes it: the event passes
    validation and lands as no_usage (cost unknown, not zero) with the normalizer's words in its pricing note."""
    from streams.enrich import enrich
    from streams.records import Source
    from streams.validate import Validator
    from tally.reference import load_reference_files, snapshot_of
    from tally.sdk.normalize import lenient

    bad = anthropic_usage(output_tokens_details={"thinking_tokens": 2394})
    usage, note = lenient(from_anthropic, bad)
    assert usage is None and note is not None and "output_tokens_details.thinking_tokens (2394) exceeds" in note
    good, none = lenient(from_anthropic, anthropic_usage())
    assert none is None and good == from_anthropic(anthropic_usage())  # consistent usage: the strict result
    event = usage_event(request_id="r-1", provider="anthropic", model_actual="claude-sonnet-4-5", usage=usage,
                        usage_note=note, tags={"feature_id": "summarize_email_v2"}, timestamp=clock())
    assert event["usage"] == {} and event["usage_reported"] is False and event["usage_note"] == note
    accepted, rejected = Validator().validate_message(orjson.dumps(event), Source("llm.usage.v1", 0, 0), now=clock())
    assert not rejected
    refs = snapshot_of(load_reference_files(sorted((REPO_ROOT / "examples" / "reference").glob("*.yaml"))))
    (row,), _ = enrich(accepted, refs, clock())
    assert (row["pricing_status"], row["cost_total_usd"], row["usage_reported"]) == ("no_usage", 0, False)
    assert row["pricing_note"] == (f"usage not reported: the gateway could not normalize it ({note}): cost unknown, "
                                   "not zero")
    assert lenient(from_anthropic, bad)[1] == note  # the same words every time (a retry publishes the same event)
