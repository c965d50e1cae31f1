"""The sink's budget_decisions stage: gateway admission records (llm.budget.decisions.v1) → ClickHouse.

Records come from tally.sdk.admission: admit, fallback and deny decisions with their auditable payload, attempts
drawn from a reservation, settlements. Each becomes one row of budget_decisions (migration 014) with the record
itself kept whole in `record`. A line that is not such a record is dead-lettered (reason bad_decision_row) with its
bytes, like every other line the pipeline refuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from streams.records import Source
from streams.sink import RecordWriter, decode_records

DECISION_COLUMNS: tuple[str, ...] = (
    "decided_at", "decision_id", "gateway_id", "action", "reason", "request_id", "parent_request_id",
    "logical_request_id", "feature_id", "tenant_id", "tier", "provider", "model", "budgets", "reserve_delta_usd",
    "requested_usd", "cost_usd", "avoided_usd", "policy_version", "price_card_version", "record",
)
_REQUIRED = ("decided_at", "decision_id", "gateway_id", "action")
_MONEY = ("reserve_delta_usd", "requested_usd", "cost_usd", "avoided_usd")
_ACTIONS = frozenset({"admit", "fallback", "deny", "attempt", "settle"})


def _decision_row(record: Any, line: bytes) -> dict[str, Any]:
    if type(record) is not dict or record.get("kind") != "admission":
        raise ValueError("not an admission record (kind admission)")
    missing = [c for c in _REQUIRED if not record.get(c)]
    if missing or record["action"] not in _ACTIONS:
        raise ValueError(f"missing {missing} or an unknown action {record.get('action')!r}")
    row: dict[str, Any] = {c: str(record.get(c) or "") for c in DECISION_COLUMNS}
    row["decided_at"] = datetime.fromisoformat(str(record["decided_at"]).replace("Z", "+00:00"))
    row["budgets"] = [str(b) for b in record.get("budgets") or []]
    for c in _MONEY:
        row[c] = Decimal(str(record.get(c) or "0"))
    row["record"] = line.decode("utf-8")  # the record whole, as the gateway published it
    return row


def decode_decisions(messages: Sequence[tuple[bytes | None, Source]]
                     ) -> tuple[list[dict[str, Any]], dict[int, list[bytes]]]:
    """Decision rows from a batch of llm.budget.decisions.v1 messages, and dead-letter lines keyed by partition."""
    return decode_records(messages, _decision_row, "bad_decision_row", "admission record")


@dataclass
class DecisionWriter(RecordWriter):
    """Writes admission records to budget_decisions (migration 014); the key is the record's decision_id."""

    table: str = "budget_decisions"
    columns: tuple[str, ...] = DECISION_COLUMNS
    time_column: str = "decided_at"

    def key(self, row: dict[str, Any]) -> str:
        return str(row["decision_id"])
