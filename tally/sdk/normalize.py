"""Provider usage objects → the disjoint token classes of usage event v1 (never negative, never guessed)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NotRequired, TypedDict

from tally.errors import NormalizationError

#: The token classes of event v1, in schema order. Every normalizer returns a dict with exactly these keys.
USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
)

#: The schema's upper bound for one token count.
MAX_TOKENS = 100_000_000

#: OTel `gen_ai.provider.name` (and older `gen_ai.system`) values whose tally provider name differs.
OTEL_PROVIDERS: Mapping[str, str] = {
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "gemini": "google",
    "vertex_ai": "google",
    "azure.ai.openai": "azure_openai",
    "az.ai.openai": "azure_openai",
    "aws.bedrock": "bedrock",
    "azure.ai.inference": "azure_ai_inference",
    "az.ai.inference": "azure_ai_inference",
}


class OtelCallInfo(TypedDict):
    """What an OTel GenAI span says about the call, named as usage_event's keyword arguments."""

    provider: str
    model_actual: str
    model_requested: NotRequired[str]


#: The schema's bound on usage_note (schemas/usage_event.v1.schema.json).
USAGE_NOTE_MAX = 512


def lenient(normalize: Callable[..., dict[str, int]], usage: Any,
            **options: Any) -> tuple[dict[str, int] | None, str | None]:
    """Run a normalizer; inconsistent usage gives (None, why) instead of raising NormalizationError.

    For a gateway that must not lose the call over a provider's odd usage object: pass both to usage_event
    (`usage=..., usage_note=...`). The event is published with an empty usage, usage_reported false and the note;
    the pipeline stores it as no_usage (cost unknown, never a zero) with the note in pricing_note, where the
    reports' unpriced counts and the rows show it. Consistent usage gives (classes, None), as the strict call does.

        usage, note = lenient(from_anthropic, resp.usage)
        pub.publish(usage_event(..., usage=usage, usage_note=note))
    """
    try:
        return normalize(usage, **options), None
    except NormalizationError as exc:
        text = str(exc) or type(exc).__name__
        return None, text if len(text) <= USAGE_NOTE_MAX else text[:USAGE_NOTE_MAX - 1] + "…"


def _mapping(provider: str, obj: Any, what: str) -> Mapping[str, Any]:
    """Return `obj` as a mapping: a Mapping as is, an SDK (pydantic) model through model_dump()."""
    if isinstance(obj, Mapping):
        return obj
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        dumped = dump()
        if isinstance(dumped, Mapping):
            return dumped
    raise NormalizationError(f"{provider}: {what} must be an object, got {type(obj).__name__}")


def _details(provider: str, usage: Mapping[str, Any], field: str) -> Mapping[str, Any]:
    """Return the nested object `usage[field]`; absent or null is an empty object."""
    value = usage.get(field)
    if value is None:
        return {}
    return _mapping(provider, value, field)


def _count(provider: str, obj: Mapping[str, Any], field: str, *, required: bool = False,
           path: str = "") -> int:
    """Return `obj[field]` if an int (not bool) in 0..MAX_TOKENS; absent or null is 0 unless required."""
    value = obj.get(field)
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    return _bad_count(provider, f"{path}.{field}" if path else field, value, required=required)


def _bad_count(provider: str, name: str, value: Any, *, required: bool) -> int:
    """Return 0 for an absent optional count; raise NormalizationError for any other invalid value."""
    if value is None:
        if required:
            raise NormalizationError(f"{provider}: required usage field {name} is missing")
        return 0
    if type(value) is not int:
        raise NormalizationError(f"{provider}: usage field {name} must be an integer, got {value!r}")
    raise NormalizationError(f"{provider}: usage field {name} = {value} is outside 0..{MAX_TOKENS}")


def _within(provider: str, part: int, part_name: str, whole: int, whole_name: str) -> None:
    if part > whole:
        raise NormalizationError(
            f"{provider}: {part_name} ({part}) exceeds {whole_name} ({whole}), which should include it")


def _usage(inp: int, out: int, *, reasoning: int = 0, read: int = 0, write: int = 0,
           write_1h: int = 0) -> dict[str, int]:
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "reasoning_tokens": reasoning,
        "cache_read_tokens": read,
        "cache_write_tokens": write,
        "cache_write_1h_tokens": write_1h,
    }


def from_openai_chat(usage: Any) -> dict[str, int]:
    """Normalize an OpenAI Chat Completions `usage` object (a mapping or the SDK's model).

    prompt_tokens includes prompt_tokens_details.cached_tokens (cache reads) and
    prompt_tokens_details.cache_write_tokens (written to the prompt cache, billed at the input rate by OpenAI: the
    cache_write class, which a card prices); completion_tokens includes completion_tokens_details.reasoning_tokens.
    Audio tokens (prompt and completion) stay inside input and
    output: event v1 has no audio class, so a price card prices them at the text rate.
    accepted_prediction_tokens and rejected_prediction_tokens are inside completion_tokens and billed as
    output, so they stay in output. Classes sum to prompt_tokens + completion_tokens (= total_tokens).
    Raises NormalizationError when prompt_tokens or completion_tokens is missing, a count is not an int in
    0..MAX_TOKENS, or a detail exceeds its total.
    """
    p = "openai chat"
    u = _mapping(p, usage, "usage")
    prompt = _count(p, u, "prompt_tokens", required=True)
    completion = _count(p, u, "completion_tokens", required=True)
    details = _details(p, u, "prompt_tokens_details")
    cached = _count(p, details, "cached_tokens", path="prompt_tokens_details")
    written = _count(p, details, "cache_write_tokens", path="prompt_tokens_details")
    reasoning = _count(p, _details(p, u, "completion_tokens_details"), "reasoning_tokens",
                       path="completion_tokens_details")
    _within(p, cached + written, "prompt_tokens_details.cached_tokens + prompt_tokens_details.cache_write_tokens",
            prompt, "prompt_tokens")
    _within(p, reasoning, "completion_tokens_details.reasoning_tokens", completion, "completion_tokens")
    return _usage(prompt - cached - written, completion - reasoning, reasoning=reasoning, read=cached,
                  write=written)


def from_openai_responses(usage: Any) -> dict[str, int]:
    """Normalize an OpenAI Responses API `usage` object (a mapping or the SDK's model).

    input_tokens includes input_tokens_details.cached_tokens (cache reads) and input_tokens_details.cache_write_tokens
    (cache writes); output_tokens includes output_tokens_details.reasoning_tokens. Cache writes split by their
    retention when input_tokens_details.cache_write_tokens_details is present (it must then sum to
    cache_write_tokens): 30-minute writes are the cache_write class, 12-hour writes cache_write_1h (the card's rate
    for long-lived writes); without it, all are cache_write. Classes sum to input_tokens + output_tokens
    (= total_tokens).
    Raises NormalizationError when input_tokens or output_tokens is missing, a count is not an int in
    0..MAX_TOKENS, or a detail exceeds its total.
    """
    p = "openai responses"
    u = _mapping(p, usage, "usage")
    inp = _count(p, u, "input_tokens", required=True)
    out = _count(p, u, "output_tokens", required=True)
    details = _details(p, u, "input_tokens_details")
    cached = _count(p, details, "cached_tokens", path="input_tokens_details")
    written = _count(p, details, "cache_write_tokens", path="input_tokens_details")
    short, long = written, 0
    if details.get("cache_write_tokens_details") is not None:
        ttl = _details(p, details, "cache_write_tokens_details")
        where = "input_tokens_details.cache_write_tokens_details"
        short = _count(p, ttl, "ttl_30m_tokens", path=where)
        long = _count(p, ttl, "ttl_12h_tokens", path=where)
        if short + long != written:
            raise NormalizationError(
                f"{p}: {where}.ttl_30m_tokens ({short}) + {where}.ttl_12h_tokens ({long}) != "
                f"input_tokens_details.cache_write_tokens ({written})")
    reasoning = _count(p, _details(p, u, "output_tokens_details"), "reasoning_tokens",
                       path="output_tokens_details")
    _within(p, cached + written, "input_tokens_details.cached_tokens + input_tokens_details.cache_write_tokens",
            inp, "input_tokens")
    _within(p, reasoning, "output_tokens_details.reasoning_tokens", out, "output_tokens")
    return _usage(inp - cached - written, out - reasoning, reasoning=reasoning, read=cached, write=short,
                  write_1h=long)


def from_anthropic(usage: Any, *, thinking_tokens: int | None = None) -> dict[str, int]:
    """Normalize an Anthropic Messages API `usage` object (a mapping or the SDK's model).

    input_tokens excludes cache_read_input_tokens and cache_creation_input_tokens: they map one to one.
    Cache creation is split by cache_creation.ephemeral_5m_input_tokens / ephemeral_1h_input_tokens when that
    breakdown is present (it must then sum to cache_creation_input_tokens); without it, or with a breakdown of two
    zeros beside a non-zero total (some API versions and proxies send that), all creation is 5-minute.
    Extended-thinking tokens are inside output_tokens; output_tokens_details.thinking_tokens (at most output_tokens)
    moves that many from output to reasoning. A caller's `thinking_tokens` (for an older API that does not report
    them) is used when the usage has none, and must agree with it when it has. For a stream, pass the final
    cumulative usage (the last message_delta's counts), not message_start's. Classes sum to input_tokens +
    cache_read_input_tokens + cache_creation_input_tokens + output_tokens. Raises NormalizationError on a
    missing input_tokens/output_tokens, a count that is not an int in 0..MAX_TOKENS, or an inconsistent
    breakdown.
    """
    p = "anthropic"
    u = _mapping(p, usage, "usage")
    inp = _count(p, u, "input_tokens", required=True)
    out = _count(p, u, "output_tokens", required=True)
    read = _count(p, u, "cache_read_input_tokens")
    creation = _count(p, u, "cache_creation_input_tokens")
    breakdown = u.get("cache_creation")
    if breakdown is None:
        write_5m, write_1h = creation, 0
    else:
        b = _mapping(p, breakdown, "cache_creation")
        write_5m = _count(p, b, "ephemeral_5m_input_tokens", path="cache_creation")
        write_1h = _count(p, b, "ephemeral_1h_input_tokens", path="cache_creation")
        if write_5m + write_1h == 0:
            write_5m = creation  # no split reported: 5-minute, as without a breakdown
        elif u.get("cache_creation_input_tokens") is not None and write_5m + write_1h != creation:
            raise NormalizationError(
                f"{p}: cache_creation.ephemeral_5m_input_tokens ({write_5m}) + "
                f"cache_creation.ephemeral_1h_input_tokens ({write_1h}) != "
                f"cache_creation_input_tokens ({creation})")
    reasoning = 0
    reported = u.get("output_tokens_details")
    if reported is not None:
        reasoning = _count(p, _mapping(p, reported, "output_tokens_details"), "thinking_tokens",
                           path="output_tokens_details")
        _within(p, reasoning, "output_tokens_details.thinking_tokens", out, "output_tokens")
    if thinking_tokens is not None:
        if type(thinking_tokens) is not int or not 0 <= thinking_tokens <= MAX_TOKENS:
            _bad_count(p, "thinking_tokens", thinking_tokens, required=True)
        _within(p, thinking_tokens, "thinking_tokens", out, "output_tokens")
        if reported is not None and thinking_tokens != reasoning:
            raise NormalizationError(
                f"{p}: thinking_tokens ({thinking_tokens}) disagrees with output_tokens_details.thinking_tokens "
                f"({reasoning}) reported by the API")
        reasoning = thinking_tokens
    return _usage(inp, out - reasoning, reasoning=reasoning, read=read, write=write_5m, write_1h=write_1h)


class CallInfo(TypedDict, total=False):
    """What a usage object says about the call beyond tokens, named as usage_event's keyword arguments."""

    tool_calls: dict[str, int]
    service_tier: str
    batch: bool


#: Anthropic's server tools (usage.server_tool_use) → the tool_calls names a price card prices per call.
ANTHROPIC_SERVER_TOOLS: Mapping[str, str] = {
    "web_search_requests": "web_search",
    "web_fetch_requests": "web_fetch",
    "code_execution_requests": "code_execution",
}


def anthropic_call_info(usage: Any) -> CallInfo:
    """Server tool calls, service tier and batch from an Anthropic `usage` object (a mapping or the SDK's model).

    usage.server_tool_use's counts become tool_calls (web_search, web_fetch, code_execution; zeros left out);
    usage.service_tier "priority" or "standard" becomes service_tier, and "batch" becomes batch=True. Pass the
    result on as usage_event(**info, ...). Raises NormalizationError on a count that is not an int in
    0..MAX_TOKENS or a tier that is not a string.
    """
    p = "anthropic"
    u = _mapping(p, usage, "usage")
    info = CallInfo()
    tools = _details(p, u, "server_tool_use")
    calls = {name: _count(p, tools, field, path="server_tool_use") for field, name in ANTHROPIC_SERVER_TOOLS.items()}
    calls = {k: v for k, v in calls.items() if v}
    if calls:
        info["tool_calls"] = calls
    tier = u.get("service_tier")
    if tier is not None:
        if not isinstance(tier, str):
            raise NormalizationError(f"{p}: usage field service_tier must be a string, got {tier!r}")
        if tier == "batch":
            info["batch"] = True
        else:
            info["service_tier"] = tier
    return info


def _gemini_count(u: Mapping[str, Any], camel: str, snake: str, *, required: bool = False) -> int:
    """Read a Gemini count under its REST (camelCase) or Python SDK (snake_case) name."""
    return _count("gemini", u, snake if snake in u and camel not in u else camel, required=required)


def from_gemini(usage_metadata: Any) -> dict[str, int]:
    """Normalize a Gemini `usageMetadata` object (REST camelCase, SDK snake_case, or the SDK's model).

    promptTokenCount includes cachedContentTokenCount; thoughtsTokenCount is apart from
    candidatesTokenCount; toolUsePromptTokenCount is extra input, counted as input. Gemini reports no
    per-call cache writes (explicit caches are billed for storage time, not per call). Classes sum to
    promptTokenCount + candidatesTokenCount + thoughtsTokenCount + toolUsePromptTokenCount
    (= totalTokenCount). Raises NormalizationError when promptTokenCount is missing, a count is not an int in
    0..MAX_TOKENS, or cached content exceeds the prompt.
    """
    p = "gemini"
    u = _mapping(p, usage_metadata, "usage_metadata")
    prompt = _gemini_count(u, "promptTokenCount", "prompt_token_count", required=True)
    candidates = _gemini_count(u, "candidatesTokenCount", "candidates_token_count")
    cached = _gemini_count(u, "cachedContentTokenCount", "cached_content_token_count")
    thoughts = _gemini_count(u, "thoughtsTokenCount", "thoughts_token_count")
    tool_prompt = _gemini_count(u, "toolUsePromptTokenCount", "tool_use_prompt_token_count")
    _within(p, cached, "cachedContentTokenCount", prompt, "promptTokenCount")
    uncached = prompt - cached + tool_prompt
    if uncached > MAX_TOKENS:
        raise NormalizationError(f"{p}: uncached input ({uncached}) is outside 0..{MAX_TOKENS}")
    return _usage(uncached, candidates, reasoning=thoughts, read=cached)


def _otel_count(attributes: Mapping[str, Any], name: str, legacy: str | None = None, *,
                required: bool = False) -> int:
    if legacy is not None and name not in attributes and legacy in attributes:
        name = legacy
    return _count("otel gen_ai", attributes, name, required=required)


def from_otel_genai(attributes: Mapping[str, Any]) -> dict[str, int]:
    """Normalize OpenTelemetry GenAI span attributes (values already decoded to Python ints).

    Per the semantic conventions, gen_ai.usage.input_tokens includes both
    gen_ai.usage.cache_read.input_tokens and gen_ai.usage.cache_creation.input_tokens, and
    gen_ai.usage.output_tokens includes gen_ai.usage.reasoning.output_tokens. Cache creation has no TTL
    split there: it is all 5-minute. The older names still in the wild are read when the current ones are absent,
    with the same meaning: gen_ai.usage.prompt_tokens / completion_tokens, cache_read_input_tokens,
    cache_creation_input_tokens and reasoning_tokens. input_tokens is required; output_tokens defaults to 0
    (embedding spans carry none). Classes sum to input_tokens + output_tokens. Raises NormalizationError when
    input_tokens is missing, a count is not an int in 0..MAX_TOKENS (OTLP JSON's string intValue must be decoded
    first), or a detail exceeds its total (typical of an instrumentation that reports input without the cache).
    """
    p = "otel gen_ai"
    a = _mapping(p, attributes, "attributes")
    inp = _otel_count(a, "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", required=True)
    out = _otel_count(a, "gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
    read = _otel_count(a, "gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens")
    write = _otel_count(a, "gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_creation_input_tokens")
    reasoning = _otel_count(a, "gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens")
    _within(p, read + write,
            "gen_ai.usage.cache_read.input_tokens + gen_ai.usage.cache_creation.input_tokens",
            inp, "gen_ai.usage.input_tokens")
    _within(p, reasoning, "gen_ai.usage.reasoning.output_tokens", out, "gen_ai.usage.output_tokens")
    return _usage(inp - read - write, out - reasoning, reasoning=reasoning, read=read, write=write)


def _otel_str(attributes: Mapping[str, Any], name: str) -> str | None:
    value = attributes.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise NormalizationError(f"otel gen_ai: attribute {name} must be a string, got {value!r}")
    return value


def otel_call_info(attributes: Mapping[str, Any]) -> OtelCallInfo:
    """Return provider, model_actual and (when known) model_requested from OTel GenAI span attributes.

    provider: gen_ai.provider.name, else the older gen_ai.system, lower-cased and mapped through
    OTEL_PROVIDERS (gcp.* → google, azure.ai.openai → azure_openai, aws.bedrock → bedrock, …).
    model_actual: gen_ai.response.model, else gen_ai.request.model. model_requested: gen_ai.request.model,
    omitted when absent. The result can be passed on as usage_event(**info, ...). Raises NormalizationError
    when the provider or both models are missing, or one of them is not a string.
    """
    p = "otel gen_ai"
    a = _mapping(p, attributes, "attributes")
    raw = _otel_str(a, "gen_ai.provider.name") or _otel_str(a, "gen_ai.system")
    if raw is None:
        raise NormalizationError(f"{p}: neither gen_ai.provider.name nor gen_ai.system is set")
    provider = raw.strip().lower()
    requested = _otel_str(a, "gen_ai.request.model")
    actual = _otel_str(a, "gen_ai.response.model") or requested
    if actual is None:
        raise NormalizationError(f"{p}: neither gen_ai.response.model nor gen_ai.request.model is set")
    info = OtelCallInfo(provider=OTEL_PROVIDERS.get(provider, provider), model_actual=actual)
    if requested is not None:
        info["model_requested"] = requested
    return info
