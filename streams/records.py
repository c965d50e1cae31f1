"""The records that travel between stages: accepted lines, rejections (dead letters) and priced attempt rows."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import orjson

# A priced attempt is a flat dict whose keys are exactly these usage_events columns (schemas/migrations/002).
# Costs are Decimal in memory and decimal strings on the wire (llm.cost.attempts.v1); ts/ingested_at are aware UTC
# datetimes in memory and RFC 3339 strings on the wire.
ATTEMPT_COLUMNS: tuple[str, ...] = (
    "event_id", "request_id", "logical_request_id", "attempt", "final", "ts", "ingested_at",
    "provider", "model_requested", "model_actual", "fallback_from", "status", "error", "batch", "service_tier",
    "usage_reported", "stream_terminated_at_token_n", "latency_ms",
    "input_tokens", "output_tokens", "reasoning_tokens", "cache_read_tokens", "cache_write_tokens",
    "cache_write_1h_tokens", "tool_calls",
    "cost_input_usd", "cost_output_usd", "cost_reasoning_usd", "cost_cache_read_usd", "cost_cache_write_usd",
    "cost_tools_usd", "cost_total_usd", "pricing_status", "pricing_note", "price_card_version", "priced_as",
    "tenant_id", "team_id", "feature_id", "product", "endpoint", "environment", "cost_center", "business_unit",
    "api_key_id", "deploy_version", "user_segment", "tags",
    "ownership_version", "attribution_status", "attribution_reason", "attribution_conflict",
    "source_topic", "source_partition", "source_offset", "source_line", "payload",
)
# Columns added to llm.cost.attempts.v1 after its first release, with the value a row written before them reads as
# (a message an older process worker published is taken, not dead-lettered): priced_as (migration 013).
ATTEMPT_COLUMNS_ADDED: dict[str, str] = {"priced_as": ""}
COST_COLUMNS: tuple[str, ...] = tuple(c for c in ATTEMPT_COLUMNS if c.startswith("cost_") and c.endswith("_usd"))
TIME_COLUMNS: tuple[str, ...] = ("ts", "ingested_at")
TOKEN_CLASSES: tuple[str, ...] = (
    "input_tokens", "output_tokens", "reasoning_tokens", "cache_read_tokens", "cache_write_tokens",
    "cache_write_1h_tokens",
)

# Stages that can reject a line; the DLQ record names one of them.
STAGE_VALIDATE = "validate"
STAGE_ENRICH = "enrich"
STAGE_SINK = "sink"


class Source(NamedTuple):
    """Where a Kafka message came from."""

    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class Accepted:
    """A line that passed validation: the parsed event, its original bytes and where it came from."""

    event: dict[str, Any]
    raw: bytes
    source: Source
    line: int
    ts: datetime
    logical_id: str


@dataclass(slots=True)
class Rejection:
    """A dead letter: why a line (or a whole message) was refused, with its original bytes."""

    reason: str
    stage: str
    message: str
    raw: bytes
    source: Source | None
    line: int | None
    event_id: str | None = None
    path: str | None = None

    def to_record(self, rejected_at: datetime | None = None) -> dict[str, Any]:
        """The JSON object published to llm.usage.dlq.v1 (schema documented in the README)."""
        at = rejected_at or datetime.now(UTC)
        return {
            "dlq_version": 1,
            "reason": self.reason,
            "stage": self.stage,
            "message": self.message,
            "path": self.path,
            "event_id": self.event_id,
            "source_topic": self.source.topic if self.source else None,
            "source_partition": self.source.partition if self.source else None,
            "source_offset": self.source.offset if self.source else None,
            "source_line": self.line,
            "original_b64": base64.b64encode(self.raw).decode("ascii"),
            "rejected_at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }


def _json_default(obj: object) -> str:
    if isinstance(obj, Decimal):
        return format(obj, "f")  # plain notation: readers of the public stream get 0.000000125, not 1.25E-7
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def encode_row(row: dict[str, Any]) -> bytes:
    """One priced attempt as a JSON line for llm.cost.attempts.v1 (costs as exact decimal strings)."""
    return orjson.dumps(row, default=_json_default)


def encode_record(record: dict[str, Any]) -> bytes:
    """Any record (dead letter, status) as one JSON line."""
    return orjson.dumps(record, default=_json_default)
