"""Build one usage event v1 (a plain dict, ready for orjson) from keyword arguments."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tally.sdk.normalize import USAGE_KEYS

_USAGE_KEYS = frozenset(USAGE_KEYS)
# RFC 3339 date-time with a mandatory offset, as the pipeline's validate stage accepts it.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:[Zz]|[+-]\d\d:\d\d)\Z")


def format_timestamp(ts: datetime) -> str:
    """Return `ts` as RFC 3339 in UTC with milliseconds and 'Z'; raises ValueError for a naive datetime."""
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"timestamp must be timezone-aware, got naive {ts.isoformat()}")
    return ts.astimezone(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _timestamp(ts: datetime | str | None) -> str:
    if ts is None:
        return format_timestamp(datetime.now(UTC))
    if isinstance(ts, datetime):
        return format_timestamp(ts)
    try:
        datetime.fromisoformat(ts)
    except ValueError:
        ok = False
    else:
        ok = _RFC3339.match(ts) is not None
    if not ok:
        raise ValueError(f"timestamp {ts!r} is not an RFC 3339 date-time with an offset")
    return ts


def usage_event(
    *,
    request_id: str,
    provider: str,
    model_actual: str,
    usage: Mapping[str, int] | None,
    tags: Mapping[str, str] | None = None,
    status: str = "ok",
    event_id: str | None = None,
    timestamp: datetime | str | None = None,
    parent_request_id: str | None = None,
    attempt: int | None = None,
    final: bool | None = None,
    model_requested: str | None = None,
    fallback_from: str | None = None,
    error: str | None = None,
    usage_reported: bool | None = None,
    usage_note: str | None = None,
    stream_terminated_at_token_n: int | None = None,
    batch: bool | None = None,
    service_tier: str | None = None,
    tool_calls: Mapping[str, int] | None = None,
    latency_ms: int | None = None,
) -> dict[str, Any]:
    """Return a usage event v1 dict; optional fields appear only when given (not None).

    `usage` is a normalizer result (keys from USAGE_KEYS; unknown keys raise ValueError). `usage=None` means
    the provider returned no usage: the event carries an empty usage object and usage_reported=false (unless
    given). `usage_note` says why there is no usage (a lenient normalizer's error: `normalize.lenient`); the row is
    then no_usage, cost unknown, with the note in its pricing_note. `event_id` defaults to a fresh uuid4;
    `timestamp` defaults to now. A datetime timestamp must be timezone-aware and is written in UTC with
    milliseconds and 'Z'; a string must be RFC 3339 with an offset and is kept as given. Naive or unparsable
    timestamps raise ValueError. Other values are not checked here: the pipeline validates each event against the
    schema and dead-letters what fails.
    """
    if usage is None:
        usage_dict: dict[str, int] = {}
        if usage_reported is None:
            usage_reported = False
    else:
        unknown = usage.keys() - _USAGE_KEYS
        if unknown:
            raise ValueError(f"usage has unknown token classes {sorted(unknown)}; known: {USAGE_KEYS}")
        usage_dict = dict(usage)
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": event_id if event_id is not None else str(uuid.uuid4()),
        "request_id": request_id,
        "timestamp": _timestamp(timestamp),
        "provider": provider,
        "model_actual": model_actual,
        "status": status,
        "usage": usage_dict,
        "tags": dict(tags) if tags is not None else {},
    }
    optional = {
        "parent_request_id": parent_request_id,
        "attempt": attempt,
        "final": final,
        "model_requested": model_requested,
        "fallback_from": fallback_from,
        "error": error,
        "usage_reported": usage_reported,
        "usage_note": usage_note,
        "stream_terminated_at_token_n": stream_terminated_at_token_n,
        "batch": batch,
        "service_tier": service_tier,
        "tool_calls": dict(tool_calls) if tool_calls is not None else None,
        "latency_ms": latency_ms,
    }
    event.update((k, v) for k, v in optional.items() if v is not None)
    return event
