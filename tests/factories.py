"""Factories for test data shared by every test tier: usage events v1 and accepted lines."""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, datetime
from typing import Any

import orjson

from streams.records import Accepted, Source

DEFAULT_SOURCE = Source("llm.usage.v1", 0, 0)
DEFAULT_TIMESTAMP = "2026-11-15T12:00:00.000Z"

_ids = itertools.count(1)

# Pass this (...) as an override to drop the key from the event, e.g. event_factory(tags=...).
DROP = ...


def event_factory(**overrides: Any) -> dict[str, Any]:
    """Return a valid schema-v1 usage event with a fresh event_id/request_id; overrides replace top-level keys.

    Defaults: openai gpt-4.1-mini, status ok, 1200 input / 300 output tokens, and the tags team_id, feature_id,
    tenant_id, environment and endpoint (team inbox, feature summarize_email_v2, as in
    examples/reference/owners.yaml). An override whose value is `...` (DROP) removes that key.
    """
    n = next(_ids)
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"evt-{n:08d}",
        "request_id": f"req-{n:08d}",
        "timestamp": DEFAULT_TIMESTAMP,
        "provider": "openai",
        "model_requested": "gpt-4.1-mini",
        "model_actual": "gpt-4.1-mini",
        "status": "ok",
        "usage": {"input_tokens": 1200, "output_tokens": 300},
        "tags": {
            "team_id": "inbox",
            "feature_id": "summarize_email_v2",
            "tenant_id": "tenant_acme",
            "environment": "prod",
            "endpoint": "/v1/summarize",
        },
    }
    event.update(copy.deepcopy(overrides))
    return {k: v for k, v in event.items() if v is not DROP}


def _ts(text: str) -> datetime:
    ts = datetime.fromisoformat(text)
    if ts.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no offset")
    return ts.astimezone(UTC)


def accepted_factory(event: dict[str, Any] | None = None, *, source: Source = DEFAULT_SOURCE, line: int = 1,
                     **overrides: Any) -> Accepted:
    """Return the Accepted that the validate stage would produce for `event` (or event_factory(**overrides)).

    raw = the event as compact JSON bytes; ts = its timestamp as aware UTC; logical_id = parent_request_id or
    request_id.
    """
    if event is None:
        event = event_factory(**overrides)
    elif overrides:
        raise TypeError("give either an event or overrides, not both")
    logical = event.get("parent_request_id") or event["request_id"]
    return Accepted(event, orjson.dumps(event), source, line, _ts(event["timestamp"]), logical)
