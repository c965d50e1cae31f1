"""A gateway's admission decisions through a live worker: published by the SDK's client, stored by the sink in
budget_decisions, every denial with its payload."""

from __future__ import annotations

import time
from decimal import Decimal

import orjson
import pytest

from tally.reference import parse_reference_yaml
from tally.sdk.admission import Admission, KafkaDecisions
from tests.unit.test_admission import CARD, REQ, T, policy, state

pytestmark = pytest.mark.e2e


def test_denials_and_settlements_land_in_clickhouse_with_their_payload(stack) -> None:
    stack.tally("up", "--role", "all", timeout=180)
    sink = KafkaDecisions(stack.settings.kafka, stack.settings.topics.budget_decisions)
    gateway = Admission("gw-e2e", publish=sink.publish, clock=lambda: T)
    gateway.apply_references(parse_reference_yaml(CARD, "card") + parse_reference_yaml(policy("p1", T - 3600), "p"))
    gateway.apply_state(state("0.99", computed=T))
    admitted = gateway.reserve(request_id="e2e-1", tenant_id="acme", **REQ)
    denied = gateway.reserve(request_id="e2e-2", parent_request_id="lr-2", tenant_id="acme",
                             **{**REQ, "max_output_tokens": 50_000})
    assert admitted.reservation is not None and not denied.admitted
    admitted.reservation.settle(Decimal("0.0042"))
    assert sink.flush() == 0 and not sink.errors
    rows: list[dict] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = stack.query("SELECT action, reason, request_id, parent_request_id, toString(requested_usd) AS asked, "
                           "record FROM tally.budget_decisions FINAL ORDER BY decided_at, action")
        if len(rows) == 3:
            break
        time.sleep(1)
    assert [(r["action"], r["reason"]) for r in rows] == [
        ("admit", "within_budget"), ("deny", "reservation_exceeds_remaining"), ("settle", "")]
    deny = next(r for r in rows if r["action"] == "deny")
    assert (deny["request_id"], deny["parent_request_id"], deny["asked"]) == ("e2e-2", "lr-2", "0.2255")
    assert orjson.loads(deny["record"]) == denied.payload()  # the whole payload, as the gateway published it
