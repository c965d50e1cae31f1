"""usage_event builds schema-v1 events: defaults, optional fields, timestamps, schema conformance."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import fastjsonschema
import orjson
import pytest

from tally.config import SCHEMAS_DIR
from tally.sdk.events import format_timestamp, usage_event
from tally.sdk.normalize import from_anthropic, from_openai_chat, from_otel_genai, otel_call_info

SCHEMA = orjson.loads((SCHEMAS_DIR / "usage_event.v1.schema.json").read_bytes())
validate_schema = fastjsonschema.compile(SCHEMA)

USAGE = from_openai_chat({"prompt_tokens": 120, "completion_tokens": 30,
                          "prompt_tokens_details": {"cached_tokens": 100}})
TS = datetime(2025, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)


def _minimal(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"request_id": "req-1", "provider": "openai", "model_actual": "gpt-4o-2024-08-06",
                            "usage": USAGE}
    args.update(overrides)
    return usage_event(**args)


def test_minimal_event_has_required_fields_only() -> None:
    event = _minimal(timestamp=TS, event_id="evt-1")
    assert event == {
        "schema_version": 1,
        "event_id": "evt-1",
        "request_id": "req-1",
        "timestamp": "2025-03-04T05:06:07.891Z",
        "provider": "openai",
        "model_actual": "gpt-4o-2024-08-06",
        "status": "ok",
        "usage": USAGE,
        "tags": {},
    }
    validate_schema(event)


def test_event_id_defaults_to_a_fresh_uuid4() -> None:
    a, b = _minimal()["event_id"], _minimal()["event_id"]
    assert a != b
    assert uuid.UUID(a).version == 4
    assert str(uuid.UUID(a)) == a


def test_timestamp_defaults_to_now_utc_with_millis() -> None:
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    ts = _minimal()["timestamp"]
    after = datetime.now(UTC)
    assert ts.endswith("Z")
    assert len(ts) == len("2025-03-04T05:06:07.891Z")
    assert before <= datetime.fromisoformat(ts) <= after


def test_aware_datetime_is_converted_to_utc() -> None:
    local = datetime(2025, 3, 4, 7, 6, 7, 5000, tzinfo=timezone(timedelta(hours=2)))
    assert _minimal(timestamp=local)["timestamp"] == "2025-03-04T05:06:07.005Z"
    assert format_timestamp(local) == "2025-03-04T05:06:07.005Z"


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _minimal(timestamp=datetime(2025, 3, 4, 5, 6, 7))


@pytest.mark.parametrize("text", ["2025-03-04T05:06:07Z", "2025-03-04T05:06:07.123456+05:30",
                                  "2025-03-04T05:06:07.1-08:00"])
def test_string_timestamp_is_kept_as_given(text: str) -> None:
    event = _minimal(timestamp=text)
    assert event["timestamp"] == text
    validate_schema(event)


@pytest.mark.parametrize("text", ["2025-03-04T05:06:07", "2025-03-04 05:06:07Z", "yesterday",
                                  "2025-02-30T05:06:07Z", "2025-03-04T05:06:07+0100", ""])
def test_bad_string_timestamp_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        _minimal(timestamp=text)


def test_optional_fields_appear_only_when_set() -> None:
    event = _minimal(
        parent_request_id="logical-9", attempt=2, final=True, model_requested="gpt-4o",
        fallback_from="gpt-4.1", status="error", error="rate_limited", usage_reported=True,
        stream_terminated_at_token_n=None, batch=False, service_tier="flex", tool_calls={"web_search": 2},
        latency_ms=812, tags={"team_id": "search", "feature_id": "answers"}, timestamp=TS,
    )
    assert event["parent_request_id"] == "logical-9"
    assert event["attempt"] == 2
    assert event["final"] is True
    assert event["batch"] is False  # False is set, not absent
    assert event["tool_calls"] == {"web_search": 2}
    assert event["tags"] == {"team_id": "search", "feature_id": "answers"}
    assert "stream_terminated_at_token_n" not in event
    validate_schema(event)


def test_terminated_stream_event() -> None:
    event = _minimal(status="terminated", stream_terminated_at_token_n=512, timestamp=TS)
    assert event["stream_terminated_at_token_n"] == 512
    validate_schema(event)


def test_no_usage_means_usage_not_reported() -> None:
    event = _minimal(usage=None, status="terminated")
    assert event["usage"] == {}
    assert event["usage_reported"] is False
    validate_schema(event)
    assert _minimal(usage=None, usage_reported=True)["usage_reported"] is True


def test_unknown_usage_key_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown token classes"):
        _minimal(usage={"input_tokens": 1, "audio_tokens": 2})


def test_inputs_are_copied_not_aliased() -> None:
    tags = {"team_id": "a"}
    usage = dict(USAGE)
    event = _minimal(tags=tags, usage=usage)
    tags["team_id"] = "b"
    usage["input_tokens"] = 99
    assert event["tags"] == {"team_id": "a"}
    assert event["usage"] == USAGE


def test_event_from_otel_attributes() -> None:
    attrs = {"gen_ai.provider.name": "gcp.vertex_ai", "gen_ai.request.model": "gemini-2.5-flash",
             "gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 7}
    event = usage_event(request_id="r", usage=from_otel_genai(attrs), **otel_call_info(attrs))
    assert event["provider"] == "google"
    assert event["model_requested"] == event["model_actual"] == "gemini-2.5-flash"
    validate_schema(event)


def test_event_serializes_to_one_ndjson_line() -> None:
    usage = from_anthropic({"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 5})
    line = orjson.dumps(_minimal(usage=usage, tags={"note": "line1\nline2"}))
    assert b"\n" not in line
    assert orjson.loads(line)["tags"]["note"] == "line1\nline2"
