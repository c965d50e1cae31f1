"""Provider usage normalizers: real-shaped payloads, inconsistent input, and conservation properties."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tally.errors import NormalizationError
from tally.sdk.normalize import (
    MAX_TOKENS,
    USAGE_KEYS,
    from_anthropic,
    from_gemini,
    from_openai_chat,
    from_openai_responses,
    from_otel_genai,
    otel_call_info,
)

# ---------------------------------------------------------------- real-shaped payloads (whole responses)

OPENAI_CHAT_RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "o3-mini-2025-01-31",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "…", "refusal": None,
                                          "annotations": []}, "logprobs": None, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 1046,
        "total_tokens": 2163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 832,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_42bfad963b",
}

OPENAI_RESPONSES_RESPONSE: dict[str, Any] = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "model": "o4-mini-2025-04-16",
    "output": [],
    "reasoning": {"effort": "medium", "summary": None},
    "service_tier": "default",
    "usage": {
        "input_tokens": 2328,
        "input_tokens_details": {"cached_tokens": 2048},
        "output_tokens": 1152,
        "output_tokens_details": {"reasoning_tokens": 960},
        "total_tokens": 3480,
    },
}

ANTHROPIC_RESPONSE: dict[str, Any] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "…"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 21,
        "cache_creation_input_tokens": 2188,
        "cache_read_input_tokens": 13056,
        "cache_creation": {"ephemeral_5m_input_tokens": 188, "ephemeral_1h_input_tokens": 2000},
        "output_tokens": 393,
        "service_tier": "standard",
        "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0},
    },
}

# Before the TTL breakdown existed (and as some proxies still send it): nulls for unused cache fields.
ANTHROPIC_OLD_USAGE: dict[str, Any] = {
    "input_tokens": 1543,
    "cache_creation_input_tokens": 1200,
    "cache_read_input_tokens": None,
    "output_tokens": 87,
}

GEMINI_RESPONSE: dict[str, Any] = {
    "candidates": [{"content": {"parts": [{"text": "…"}], "role": "model"}, "finishReason": "STOP",
                    "index": 0}],
    "usageMetadata": {
        "promptTokenCount": 4235,
        "candidatesTokenCount": 312,
        "totalTokenCount": 5920,
        "cachedContentTokenCount": 4096,
        "thoughtsTokenCount": 573,
        "toolUsePromptTokenCount": 800,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 4235}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 4096}],
        "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 312}],
        "toolUsePromptTokensDetails": [{"modality": "TEXT", "tokenCount": 800}],
        "trafficType": "ON_DEMAND",
    },
    "modelVersion": "gemini-2.5-pro",
    "responseId": "mz6naPy2Lc-Q1MkP-LW9mQ4",
}

# The google-genai Python SDK's model_dump(): snake_case names, absent counts as None.
GEMINI_SDK_DUMP: dict[str, Any] = {
    "cache_tokens_details": None,
    "cached_content_token_count": None,
    "candidates_token_count": 9,
    "candidates_tokens_details": None,
    "prompt_token_count": 11,
    "prompt_tokens_details": [{"modality": "TEXT", "token_count": 11}],
    "thoughts_token_count": 254,
    "tool_use_prompt_token_count": None,
    "tool_use_prompt_tokens_details": None,
    "total_token_count": 274,
    "traffic_type": None,
}

OTEL_SPAN_ATTRIBUTES: dict[str, Any] = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": "gpt-5",
    "gen_ai.request.max_tokens": 4096,
    "gen_ai.request.temperature": 1.0,
    "gen_ai.response.model": "gpt-5-2025-08-07",
    "gen_ai.response.id": "chatcmpl-CEr6RTvUEe2h2ZaoWQ1u2kfLz2F8D",
    "gen_ai.response.finish_reasons": ["stop"],
    "gen_ai.usage.input_tokens": 5200,
    "gen_ai.usage.cache_read.input_tokens": 4992,
    "gen_ai.usage.output_tokens": 1830,
    "gen_ai.usage.reasoning.output_tokens": 1536,
    "server.address": "api.openai.com",
    "server.port": 443,
}

OTEL_ANTHROPIC_ATTRIBUTES: dict[str, Any] = {
    "gen_ai.operation.name": "chat",
    "gen_ai.system": "anthropic",
    "gen_ai.request.model": "claude-opus-4-1",
    "gen_ai.usage.input_tokens": 15265,
    "gen_ai.usage.cache_read.input_tokens": 13056,
    "gen_ai.usage.cache_creation.input_tokens": 2188,
    "gen_ai.usage.output_tokens": 393,
}


def _usage(inp: int = 0, out: int = 0, reasoning: int = 0, read: int = 0, write: int = 0,
           write_1h: int = 0) -> dict[str, int]:
    return dict(zip(USAGE_KEYS, (inp, out, reasoning, read, write, write_1h), strict=True))


class _SdkModel:
    """Stands in for an SDK's pydantic model: only model_dump() is used."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def model_dump(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)


# ---------------------------------------------------------------- OpenAI Chat Completions


def test_openai_chat_real_response() -> None:
    u = OPENAI_CHAT_RESPONSE["usage"]
    got = from_openai_chat(u)
    assert got == _usage(inp=93, out=214, reasoning=832, read=1024)
    assert sum(got.values()) == u["total_tokens"]


def test_openai_chat_minimal_and_null_details() -> None:
    minimal = {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}
    assert from_openai_chat(minimal) == _usage(19, 10)
    assert from_openai_chat({"prompt_tokens": 19, "completion_tokens": 10, "prompt_tokens_details": None,
                             "completion_tokens_details": None}) == _usage(19, 10)


def test_openai_chat_audio_and_prediction_tokens_stay_in_input_and_output() -> None:
    u = {
        "prompt_tokens": 1500, "completion_tokens": 600, "total_tokens": 2100,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 1200},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 400,
                                      "accepted_prediction_tokens": 50, "rejected_prediction_tokens": 30},
    }
    assert from_openai_chat(u) == _usage(inp=1500, out=600)


def test_openai_chat_accepts_an_sdk_model() -> None:
    assert from_openai_chat(_SdkModel(OPENAI_CHAT_RESPONSE["usage"])) == from_openai_chat(
        OPENAI_CHAT_RESPONSE["usage"])


@pytest.mark.parametrize(("patch", "message"), [
    ({"prompt_tokens_details": {"cached_tokens": 1118}},
     r"cached_tokens \+ prompt_tokens_details.cache_write_tokens \(1118\) exceeds prompt_tokens"),
    ({"completion_tokens_details": {"reasoning_tokens": 2000}}, r"reasoning_tokens \(2000\) exceeds"),
    ({"prompt_tokens": -1}, "prompt_tokens = -1 is outside"),
    ({"prompt_tokens": True}, "prompt_tokens must be an integer"),
    ({"completion_tokens": 10.0}, "completion_tokens must be an integer"),
    ({"completion_tokens": "10"}, "completion_tokens must be an integer"),
    ({"prompt_tokens": None}, "required usage field prompt_tokens is missing"),
    ({"prompt_tokens_details": {"cached_tokens": -5}}, r"prompt_tokens_details\.cached_tokens = -5"),
    ({"prompt_tokens_details": [1, 2]}, "prompt_tokens_details must be an object"),
    ({"prompt_tokens": MAX_TOKENS + 1}, "is outside 0..100000000"),
])
def test_openai_chat_inconsistent(patch: dict[str, Any], message: str) -> None:
    u = {**OPENAI_CHAT_RESPONSE["usage"], **patch}
    with pytest.raises(NormalizationError, match=message) as info:
        from_openai_chat(u)
    assert str(info.value).startswith("openai chat:")


def test_openai_chat_missing_completion_tokens() -> None:
    with pytest.raises(NormalizationError, match="completion_tokens is missing"):
        from_openai_chat({"prompt_tokens": 3})


def test_openai_chat_not_an_object() -> None:
    with pytest.raises(NormalizationError, match="openai chat: usage must be an object"):
        from_openai_chat(None)


# ---------------------------------------------------------------- OpenAI Responses


def test_openai_responses_real_response() -> None:
    u = OPENAI_RESPONSES_RESPONSE["usage"]
    got = from_openai_responses(u)
    assert got == _usage(inp=280, out=192, reasoning=960, read=2048)
    assert sum(got.values()) == u["total_tokens"]


def test_openai_responses_without_details() -> None:
    minimal = {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123}
    assert from_openai_responses(minimal) == _usage(36, 87)


@pytest.mark.parametrize(("patch", "message"), [
    ({"input_tokens_details": {"cached_tokens": 2329}}, r"details\.cache_write_tokens \(2329\) exceeds"),
    ({"output_tokens_details": {"reasoning_tokens": 1153}}, r"reasoning_tokens \(1153\) exceeds output"),
    ({"output_tokens": None}, "required usage field output_tokens is missing"),
    ({"input_tokens": False}, "input_tokens must be an integer"),
])
def test_openai_responses_inconsistent(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(NormalizationError, match=message) as info:
        from_openai_responses({**OPENAI_RESPONSES_RESPONSE["usage"], **patch})
    assert str(info.value).startswith("openai responses:")


def test_openai_responses_rejects_chat_shaped_usage() -> None:
    with pytest.raises(NormalizationError, match="input_tokens is missing"):
        from_openai_responses(OPENAI_CHAT_RESPONSE["usage"])


# ---------------------------------------------------------------- Anthropic


def test_anthropic_real_response_with_ttl_breakdown() -> None:
    u = ANTHROPIC_RESPONSE["usage"]
    got = from_anthropic(u)
    assert got == _usage(inp=21, out=393, read=13056, write=188, write_1h=2000)
    assert sum(got.values()) == 21 + 2188 + 13056 + 393


def test_anthropic_without_breakdown_is_all_5m_and_null_is_zero() -> None:
    assert from_anthropic(ANTHROPIC_OLD_USAGE) == _usage(inp=1543, out=87, write=1200)


def test_anthropic_breakdown_without_total() -> None:
    u = {"input_tokens": 5, "output_tokens": 7,
         "cache_creation": {"ephemeral_5m_input_tokens": 3, "ephemeral_1h_input_tokens": 4}}
    assert from_anthropic(u) == _usage(inp=5, out=7, write=3, write_1h=4)


def test_anthropic_thinking_tokens_move_from_output_to_reasoning() -> None:
    got = from_anthropic(ANTHROPIC_RESPONSE["usage"], thinking_tokens=300)
    assert got["output_tokens"] == 93
    assert got["reasoning_tokens"] == 300
    assert sum(got.values()) == sum(from_anthropic(ANTHROPIC_RESPONSE["usage"]).values())


@pytest.mark.parametrize(("patch", "kwargs", "message"), [
    ({"cache_creation": {"ephemeral_5m_input_tokens": 188, "ephemeral_1h_input_tokens": 1999}}, {},
     r"\(188\) \+ .*\(1999\) != cache_creation_input_tokens \(2188\)"),
    ({"cache_read_input_tokens": -3}, {}, "cache_read_input_tokens = -3"),
    ({"input_tokens": None}, {}, "required usage field input_tokens is missing"),
    ({"cache_creation": {"ephemeral_5m_input_tokens": "188"}}, {},
     r"cache_creation\.ephemeral_5m_input_tokens must be an integer"),
    ({"cache_creation": 5}, {}, "cache_creation must be an object"),
    ({}, {"thinking_tokens": 394}, r"thinking_tokens \(394\) exceeds output_tokens \(393\)"),
    ({}, {"thinking_tokens": -1}, "thinking_tokens = -1"),
    ({}, {"thinking_tokens": True}, "thinking_tokens must be an integer"),
])
def test_anthropic_inconsistent(patch: dict[str, Any], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(NormalizationError, match=message) as info:
        from_anthropic({**ANTHROPIC_RESPONSE["usage"], **patch}, **kwargs)
    assert str(info.value).startswith("anthropic:")


# ---------------------------------------------------------------- Gemini


def test_gemini_real_response() -> None:
    um = GEMINI_RESPONSE["usageMetadata"]
    got = from_gemini(um)
    assert got == _usage(inp=4235 - 4096 + 800, out=312, reasoning=573, read=4096)
    assert sum(got.values()) == um["totalTokenCount"]


def test_gemini_sdk_snake_case_dump() -> None:
    got = from_gemini(GEMINI_SDK_DUMP)
    assert got == _usage(inp=11, out=9, reasoning=254)
    assert sum(got.values()) == GEMINI_SDK_DUMP["total_token_count"]
    assert from_gemini(_SdkModel(GEMINI_SDK_DUMP)) == got


def test_gemini_prompt_only() -> None:
    # A response cut by a safety block carries no candidatesTokenCount.
    assert from_gemini({"promptTokenCount": 8, "totalTokenCount": 8}) == _usage(inp=8)


@pytest.mark.parametrize(("patch", "message"), [
    ({"cachedContentTokenCount": 4236}, r"cachedContentTokenCount \(4236\) exceeds promptTokenCount"),
    ({"promptTokenCount": None}, "required usage field promptTokenCount is missing"),
    ({"thoughtsTokenCount": -2}, "thoughtsTokenCount = -2"),
    ({"candidatesTokenCount": 1.5}, "candidatesTokenCount must be an integer"),
])
def test_gemini_inconsistent(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(NormalizationError, match=message) as info:
        from_gemini({**GEMINI_RESPONSE["usageMetadata"], **patch})
    assert str(info.value).startswith("gemini:")


def test_gemini_missing_prompt_names_the_rest_field() -> None:
    with pytest.raises(NormalizationError, match="promptTokenCount is missing"):
        from_gemini({"candidatesTokenCount": 3})


# ---------------------------------------------------------------- OpenTelemetry GenAI


def test_otel_openai_span() -> None:
    got = from_otel_genai(OTEL_SPAN_ATTRIBUTES)
    assert got == _usage(inp=208, out=294, reasoning=1536, read=4992)
    assert sum(got.values()) == 5200 + 1830
    assert otel_call_info(OTEL_SPAN_ATTRIBUTES) == {
        "provider": "openai", "model_actual": "gpt-5-2025-08-07", "model_requested": "gpt-5"}


def test_otel_anthropic_span_with_cache_creation_and_legacy_system() -> None:
    got = from_otel_genai(OTEL_ANTHROPIC_ATTRIBUTES)
    assert got == _usage(inp=21, out=393, read=13056, write=2188)
    assert otel_call_info(OTEL_ANTHROPIC_ATTRIBUTES) == {
        "provider": "anthropic", "model_actual": "claude-opus-4-1", "model_requested": "claude-opus-4-1"}


def test_otel_deprecated_prompt_and_completion_tokens() -> None:
    attrs = {"gen_ai.system": "openai", "gen_ai.usage.prompt_tokens": 12, "gen_ai.usage.completion_tokens": 5}
    assert from_otel_genai(attrs) == _usage(12, 5)


def test_otel_older_cache_and_reasoning_names_when_the_current_ones_are_absent() -> None:
    attrs = {"gen_ai.system": "anthropic", "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 300,
             "gen_ai.usage.cache_read_input_tokens": 600, "gen_ai.usage.cache_creation_input_tokens": 100,
             "gen_ai.usage.reasoning_tokens": 120}
    assert from_otel_genai(attrs) == _usage(inp=300, out=180, reasoning=120, read=600, write=100)
    current = {**attrs, "gen_ai.usage.cache_read.input_tokens": 50}  # the current name wins
    assert from_otel_genai(current)["cache_read_tokens"] == 50


def test_otel_embeddings_span_has_no_output() -> None:
    attrs = {"gen_ai.operation.name": "embeddings", "gen_ai.usage.input_tokens": 9}
    assert from_otel_genai(attrs) == _usage(9)


@pytest.mark.parametrize(("raw", "expected"), [
    ("gcp.vertex_ai", "google"), ("gcp.gemini", "google"), ("aws.bedrock", "bedrock"),
    ("azure.ai.openai", "azure_openai"), ("Mistral_AI", "mistral_ai"), ("x_ai", "x_ai"),
])
def test_otel_provider_mapping(raw: str, expected: str) -> None:
    info = otel_call_info({"gen_ai.provider.name": raw, "gen_ai.response.model": "m"})
    assert info == {"provider": expected, "model_actual": "m"}


def test_otel_provider_name_wins_over_system() -> None:
    attrs = {"gen_ai.provider.name": "aws.bedrock", "gen_ai.system": "anthropic", "gen_ai.request.model": "m"}
    assert otel_call_info(attrs)["provider"] == "bedrock"


@pytest.mark.parametrize(("attrs", "message"), [
    ({"gen_ai.request.model": "m"}, "neither gen_ai.provider.name nor gen_ai.system"),
    ({"gen_ai.provider.name": "openai"}, "neither gen_ai.response.model nor gen_ai.request.model"),
    ({"gen_ai.provider.name": 3, "gen_ai.request.model": "m"}, "gen_ai.provider.name must be a string"),
])
def test_otel_call_info_missing(attrs: dict[str, Any], message: str) -> None:
    with pytest.raises(NormalizationError, match=message):
        otel_call_info(attrs)


@pytest.mark.parametrize(("patch", "message"), [
    # An instrumentation that reports Anthropic's raw input_tokens (cache excluded) breaks the convention.
    ({"gen_ai.usage.input_tokens": 21}, r"cache_creation\.input_tokens \(15244\) exceeds gen_ai\.usage"),
    ({"gen_ai.usage.input_tokens": "15265"}, "gen_ai.usage.input_tokens must be an integer"),
    ({"gen_ai.usage.input_tokens": None}, "required usage field gen_ai.usage.input_tokens is missing"),
    ({"gen_ai.usage.reasoning.output_tokens": 400}, r"reasoning\.output_tokens \(400\) exceeds"),
])
def test_otel_inconsistent(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(NormalizationError, match=message) as info:
        from_otel_genai({**OTEL_ANTHROPIC_ATTRIBUTES, **patch})
    assert str(info.value).startswith("otel gen_ai:")


# ---------------------------------------------------------------- properties: conservation and rejection

counts = st.integers(min_value=0, max_value=MAX_TOKENS)
small = st.integers(min_value=0, max_value=1_000_000)
# How an optional count can be absent: missing key, null, or zero.
ABSENT = ("missing", "null", "zero")


def _put(obj: dict[str, Any], key: str, value: int, absent: str | None) -> None:
    if value:
        obj[key] = value
    elif absent == "null":
        obj[key] = None
    elif absent == "zero":
        obj[key] = 0


def _check(usage: dict[str, int], total: int) -> None:
    assert tuple(usage) == USAGE_KEYS
    assert all(type(v) is int and 0 <= v <= MAX_TOKENS for v in usage.values())
    assert sum(usage.values()) == total


@st.composite
def openai_chat(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    prompt, completion = draw(counts), draw(counts)
    cached = draw(st.integers(0, prompt))
    reasoning = draw(st.integers(0, completion))
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}
    if draw(st.booleans()):
        u["prompt_tokens_details"] = {"audio_tokens": draw(st.integers(0, prompt - cached))}
        _put(u["prompt_tokens_details"], "cached_tokens", cached, draw(st.sampled_from(ABSENT)))
    else:
        assume(cached == 0)
    if draw(st.booleans()):
        u["completion_tokens_details"] = {"audio_tokens": 0, "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}
        _put(u["completion_tokens_details"], "reasoning_tokens", reasoning, draw(st.sampled_from(ABSENT)))
    else:
        assume(reasoning == 0)
    return u, prompt + completion


@given(openai_chat())
def test_openai_chat_conserves_tokens(case: tuple[dict[str, Any], int]) -> None:
    usage, total = case
    got = from_openai_chat(usage)
    _check(got, total)
    assert got["cache_read_tokens"] + got["input_tokens"] == usage["prompt_tokens"]


@st.composite
def openai_responses(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    inp, out = draw(counts), draw(counts)
    u = {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
         "input_tokens_details": {"cached_tokens": draw(st.integers(0, inp))},
         "output_tokens_details": {"reasoning_tokens": draw(st.integers(0, out))}}
    return u, inp + out


@given(openai_responses())
def test_openai_responses_conserves_tokens(case: tuple[dict[str, Any], int]) -> None:
    usage, total = case
    _check(from_openai_responses(usage), total)


@st.composite
def anthropic(draw: st.DrawFn) -> tuple[dict[str, Any], int, int | None]:
    inp, out, read = draw(counts), draw(counts), draw(counts)
    w5, w1h = draw(st.integers(0, MAX_TOKENS // 2)), draw(st.integers(0, MAX_TOKENS // 2))
    u: dict[str, Any] = {"input_tokens": inp, "output_tokens": out, "service_tier": "standard"}
    _put(u, "cache_read_input_tokens", read, draw(st.sampled_from(ABSENT)))
    if draw(st.booleans()):
        u["cache_creation_input_tokens"] = w5 + w1h
        u["cache_creation"] = {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1h}
    else:
        _put(u, "cache_creation_input_tokens", w5 + w1h, draw(st.sampled_from(ABSENT)))
    thinking = draw(st.none() | st.integers(0, out))
    return u, inp + out + read + w5 + w1h, thinking


@given(anthropic())
def test_anthropic_conserves_tokens(case: tuple[dict[str, Any], int, int | None]) -> None:
    usage, total, thinking = case
    got = from_anthropic(usage, thinking_tokens=thinking)
    _check(got, total)
    assert got["reasoning_tokens"] == (thinking or 0)


@st.composite
def gemini(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    prompt, candidates, thoughts = draw(small), draw(small), draw(small)
    tool = draw(small)
    cached = draw(st.integers(0, prompt))
    u: dict[str, Any] = {"promptTokenCount": prompt, "totalTokenCount": prompt + candidates + thoughts + tool,
                         "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
    for key, value in (("candidatesTokenCount", candidates), ("thoughtsTokenCount", thoughts),
                       ("toolUsePromptTokenCount", tool), ("cachedContentTokenCount", cached)):
        _put(u, key, value, draw(st.sampled_from(("missing", "zero"))))
    if draw(st.booleans()):  # the Python SDK's snake_case dump
        snake = {"promptTokenCount": "prompt_token_count", "candidatesTokenCount": "candidates_token_count",
                 "thoughtsTokenCount": "thoughts_token_count", "totalTokenCount": "total_token_count",
                 "toolUsePromptTokenCount": "tool_use_prompt_token_count",
                 "cachedContentTokenCount": "cached_content_token_count",
                 "promptTokensDetails": "prompt_tokens_details"}
        u = {snake[k]: v for k, v in u.items()}
    return u, prompt + candidates + thoughts + tool


@given(gemini())
def test_gemini_conserves_tokens(case: tuple[dict[str, Any], int]) -> None:
    usage, total = case
    _check(from_gemini(usage), total)


@st.composite
def otel(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    inp, out = draw(counts), draw(counts)
    read = draw(st.integers(0, inp))
    write = draw(st.integers(0, inp - read))
    reasoning = draw(st.integers(0, out))
    a: dict[str, Any] = {"gen_ai.provider.name": "openai", "gen_ai.usage.input_tokens": inp,
                         "gen_ai.usage.output_tokens": out}
    _put(a, "gen_ai.usage.cache_read.input_tokens", read, draw(st.sampled_from(ABSENT)))
    _put(a, "gen_ai.usage.cache_creation.input_tokens", write, draw(st.sampled_from(ABSENT)))
    _put(a, "gen_ai.usage.reasoning.output_tokens", reasoning, draw(st.sampled_from(ABSENT)))
    return a, inp + out


@given(otel())
def test_otel_conserves_tokens(case: tuple[dict[str, Any], int]) -> None:
    attrs, total = case
    _check(from_otel_genai(attrs), total)


# Inconsistent payloads: a detail larger than the total it is part of.


@given(st.integers(0, 10**6), st.integers(1, 1000), counts)
def test_openai_chat_cached_above_prompt_raises(prompt: int, excess: int, completion: int) -> None:
    with pytest.raises(NormalizationError):
        from_openai_chat({"prompt_tokens": prompt, "completion_tokens": completion,
                          "prompt_tokens_details": {"cached_tokens": prompt + excess}})


@given(st.integers(0, 10**6), st.integers(1, 1000), counts)
def test_openai_responses_reasoning_above_output_raises(out: int, excess: int, inp: int) -> None:
    with pytest.raises(NormalizationError):
        from_openai_responses({"input_tokens": inp, "output_tokens": out,
                               "output_tokens_details": {"reasoning_tokens": out + excess}})


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 1000))
def test_anthropic_breakdown_mismatch_raises(w5: int, w1h: int, off: int) -> None:
    assume(w5 + w1h > 0)  # two zeros are "no split reported" (see test_normalize_sdk_types)
    with pytest.raises(NormalizationError):
        from_anthropic({"input_tokens": 1, "output_tokens": 1, "cache_creation_input_tokens": w5 + w1h + off,
                        "cache_creation": {"ephemeral_5m_input_tokens": w5,
                                           "ephemeral_1h_input_tokens": w1h}})


@given(st.integers(0, 10**6), st.integers(1, 1000))
def test_gemini_cached_above_prompt_raises(prompt: int, excess: int) -> None:
    with pytest.raises(NormalizationError):
        from_gemini({"promptTokenCount": prompt, "cachedContentTokenCount": prompt + excess})


@given(st.integers(0, 10**6), st.integers(1, 1000), st.data())
def test_otel_cache_above_input_raises(inp: int, excess: int, data: st.DataObject) -> None:
    read = data.draw(st.integers(0, inp + excess))
    with pytest.raises(NormalizationError):
        from_otel_genai({"gen_ai.usage.input_tokens": inp, "gen_ai.usage.cache_read.input_tokens": read,
                         "gen_ai.usage.cache_creation.input_tokens": inp + excess - read})


BAD_VALUES = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=MAX_TOKENS + 1),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)

# (normalizer, a valid payload, paths of its count fields)
CASES: list[tuple[Callable[[Any], dict[str, int]], dict[str, Any], list[tuple[str, ...]]]] = [
    (from_openai_chat, OPENAI_CHAT_RESPONSE["usage"],
     [("prompt_tokens",), ("completion_tokens",), ("prompt_tokens_details", "cached_tokens"),
      ("completion_tokens_details", "reasoning_tokens")]),
    (from_openai_responses, OPENAI_RESPONSES_RESPONSE["usage"],
     [("input_tokens",), ("output_tokens",), ("input_tokens_details", "cached_tokens"),
      ("output_tokens_details", "reasoning_tokens")]),
    (from_anthropic, ANTHROPIC_RESPONSE["usage"],
     [("input_tokens",), ("output_tokens",), ("cache_read_input_tokens",), ("cache_creation_input_tokens",),
      ("cache_creation", "ephemeral_5m_input_tokens"), ("cache_creation", "ephemeral_1h_input_tokens")]),
    (from_gemini, GEMINI_RESPONSE["usageMetadata"],
     [("promptTokenCount",), ("candidatesTokenCount",), ("cachedContentTokenCount",), ("thoughtsTokenCount",),
      ("toolUsePromptTokenCount",)]),
    (from_otel_genai, OTEL_ANTHROPIC_ATTRIBUTES,
     [("gen_ai.usage.input_tokens",), ("gen_ai.usage.output_tokens",),
      ("gen_ai.usage.cache_read.input_tokens",), ("gen_ai.usage.cache_creation.input_tokens",)]),
]


@given(st.sampled_from(range(len(CASES))), st.data(), BAD_VALUES)
def test_any_invalid_count_raises(case: int, data: st.DataObject, bad: Any) -> None:
    normalizer, valid, paths = CASES[case]
    path = data.draw(st.sampled_from(paths))
    payload = copy.deepcopy(valid)
    target = payload
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(NormalizationError) as info:
        normalizer(payload)
    assert path[-1] in str(info.value)


@pytest.mark.parametrize(("normalizer", "valid", "paths"), CASES, ids=[c[0].__name__ for c in CASES])
def test_valid_payloads_are_not_modified(normalizer: Callable[[Any], dict[str, int]], valid: dict[str, Any],
                                         paths: list[tuple[str, ...]]) -> None:
    before = copy.deepcopy(valid)
    normalizer(valid)
    assert valid == before
