"""Factories for test data shared by every test tier: usage events v1 and accepted lines."""

from __future__ import annotations

import copy
import functools
import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from streams.records import ATTEMPT_COLUMNS, COST_COLUMNS, Accepted, Source
from streams.sink import origin_of
from tally.partitioning import partition_for

DEFAULT_SOURCE = Source("llm.usage.v1", 0, 0)
ATTEMPTS_MESSAGE = Source("llm.cost.attempts.v1", 0, 0)
DEFAULT_TIMESTAMP = "2026-11-15T12:00:00.000Z"

_ids = itertools.count(1)


@functools.cache
def clock() -> datetime:
    """The suite's one "now" (aware UTC): the latest noon UTC at or before the wall clock when first asked.

    Every time that a TTL, a retention or dedup window, a budget period or the wall clock meets derives from it,
    so the suite passes on any day. Fixed for the whole session; noon keeps a few hours either side inside one UTC
    day. Tests take it as the `now` fixture (tests/conftest.py); module constants call it directly.
    """
    wall = datetime.now(UTC)
    noon = wall.replace(hour=12, minute=0, second=0, microsecond=0)
    return noon if noon <= wall else noon - timedelta(days=1)

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


def attempt_row_factory(logical_id: str, *, event_id: str | None = None, request_id: str | None = None,
                        attempt: int = 0, final: bool = False, status: str = "ok", ts_ms: int = 1_763_208_000_000,
                        cost: Decimal = Decimal("0.001"), model: str = "gpt-4.1-mini", model_requested: str = "",
                        fallback_from: str = "", usage_reported: bool = True, token_n: int | None = None,
                        partitions: int = 4, feature_id: str = "summarize_email_v2", output_tokens: int = 300,
                        pricing_status: str = "priced") -> dict[str, Any]:
    """A priced attempt row (streams.records.ATTEMPT_COLUMNS) as the enrich stage hands it to the fold.

    The whole cost sits in the output class; the source partition is the logical id's murmur2 partition.
    """
    n = next(_ids)
    row: dict[str, Any] = dict.fromkeys(ATTEMPT_COLUMNS, "")
    row.update(
        event_id=event_id or f"evt-{n:08d}", request_id=request_id or f"req-{n:08d}", logical_request_id=logical_id,
        attempt=attempt, final=final, ts=datetime.fromtimestamp(ts_ms / 1000, UTC), ingested_at=clock(),
        provider="openai", model_requested=model_requested or model, model_actual=model, fallback_from=fallback_from,
        status=status, batch=False, usage_reported=usage_reported, stream_terminated_at_token_n=token_n,
        latency_ms=100, input_tokens=1000, output_tokens=output_tokens, reasoning_tokens=0, cache_read_tokens=0,
        cache_write_tokens=0, cache_write_1h_tokens=0, tool_calls={},
        pricing_status=pricing_status, price_card_version="openai-2026-06", team_id="inbox", feature_id=feature_id,
        tenant_id="tenant_acme", ownership_version="org-2026-10", attribution_status="attributed",
        source_topic="llm.usage.v1", source_partition=partition_for(logical_id, partitions), source_offset=n,
        source_line=1, tags={}, payload="{}")
    for c in COST_COLUMNS:
        row[c] = Decimal(0)
    row["cost_output_usd"] = row["cost_total_usd"] = cost
    return row


def in_message(rows: list[dict[str, Any]], source: Source = ATTEMPTS_MESSAGE) -> list[dict[str, Any]]:
    """The rows as decoded from one llm.cost.attempts.v1 message at `source` (their origin: decode_rows)."""
    for row in rows:
        row["origin"] = origin_of(source)
    return rows


ALERT_KEY = "anomaly:search_answer:cost_per_request"


def alert_record(**overrides: Any) -> dict[str, Any]:
    """A valid alert record (contract v1), firing and warning by default; overrides replace top-level keys."""
    record: dict[str, Any] = {
        "alert_version": 1, "incident_key": ALERT_KEY, "kind": "anomaly", "state": "firing",
        "feature_id": "search_answer", "team_id": "search", "signal": "cost_per_request", "severity": "warning",
        "value": Decimal("0.4213"), "baseline": Decimal("0.1100"), "score": Decimal("5.2"), "dimension": "model",
        "explanation": "cost per request is 3.8x its 7-day baseline", "detected_at": "2026-11-23T10:00:00Z",
    }
    record.update(overrides)
    return record


def request_row(ts: datetime, feature_id: str = "summarize_email_v2", **overrides: Any) -> dict[str, Any]:
    """A logical-request row as the detect stage reads it from llm.cost.requests.v1 (decoded JSON)."""
    row: dict[str, Any] = {
        "logical_request_id": f"lr-{ts.timestamp():.6f}-{feature_id}", "revision": 1, "sign": 1,
        "last_ts": ts.isoformat().replace("+00:00", "Z"), "feature_id": feature_id, "team_id": "inbox",
        "tenant_id": "t-1", "endpoint": f"/v1/mail/{feature_id}", "deploy_version": "2026.11.2",
        "final_model": "gpt-4.1", "cost_total_usd": "0.01", "input_tokens": 1000, "cache_read_tokens": 0,
        "cache_write_tokens": 0, "cache_write_1h_tokens": 0, "output_tokens": 200, "reasoning_tokens": 50,
        "retries": 0, "fallbacks": 0,
    }
    row.update(overrides)
    return row


def malformed_lines(good: dict[str, Any], k: int) -> list[tuple[bytes, str]]:
    """Malformed lines built from a good event, each with the reason the pipeline must give (event ids unique per k).

    Covers every reason the validate stage gives to a line on its own (wrong_partition, conflicting_duplicate and
    the sink's row reasons need a producer or an earlier line: see tests/faults).
    """
    def mutate(**kw: Any) -> bytes:
        e = {**good, "event_id": f"bad-{k}-{len(kw)}-{sorted(kw)[0]}", **kw}
        return orjson.dumps({k: v for k, v in e.items() if v is not ...})

    return [
        (b'{"schema_version": 1, "event_id": "cut', "invalid_json"),
        (b"not json at all", "invalid_json"),
        (b"[1, 2, 3]", "not_an_object"),
        (b"42", "not_an_object"),
        (mutate(prompt="the user's secret prompt"), "unknown_field"),
        (mutate(usage={"input_tokens": -7}), "negative_tokens"),
        (mutate(usage={"reasoning_tokens": 100_000_001}), "token_out_of_range"),
        (mutate(timestamp=clock().strftime("%Y-%m-%d %H:%M")), "bad_timestamp"),  # no T, no zone
        (mutate(timestamp=clock().strftime("%Y-%m-%dT%H:%M:%S")), "bad_timestamp"),  # no zone
        (mutate(timestamp=(clock() + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")),
         "future_timestamp"),  # issue 11: was accepted and priced
        (mutate(event_id="spaces are not allowed"), "bad_event_id"),
        (mutate(model_actual=...), "missing_field"),
        (mutate(status="exploded"), "schema_violation"),
        (mutate(tags={"team_id": "x" * 300}), "schema_violation"),
        (b'{"pad": "' + b"x" * (17 * 1024) + b'"}', "oversized"),
        (mutate(schema_version=2), "unsupported_schema_version"),
    ]
