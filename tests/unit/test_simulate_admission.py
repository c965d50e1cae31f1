"""Simulated traffic through the admission client (tally simulate --gateways): denied requests are not sent, routed
ones are sent on the fallback model, and every admitted request is settled at its exact cost."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from decimal import Decimal

import orjson

from ops.simulate import SimulatedGateways, TrafficGenerator, catalog_from_reference
from tally.config import REPO_ROOT
from tally.reference import load_reference_files
from tally.sdk.admission import Admission
from tests.factories import clock

EXAMPLES = REPO_ROOT / "examples" / "reference"


def test_a_budget_running_low_routes_to_the_cheaper_model_then_denies() -> None:
    docs = load_reference_files([EXAMPLES / "price_cards.yaml", EXAMPLES / "owners.yaml", EXAMPLES / "policies.yaml"])
    now = clock()
    records: list[dict] = []
    gateway = Admission("sim", publish=records.append, clock=now.timestamp)
    gateway.apply_references(docs)
    gateway.apply_state({"key": "feature:summarize_email_v2:day", "budget_usd": "0.02", "spent_usd": "0",
                         "computed_at": now.isoformat(), "period_end": (now + timedelta(hours=1)).isoformat()})
    sim = SimulatedGateways([gateway])
    gen = TrafficGenerator(catalog_from_reference(docs), seed=1, rate=300, bad_rate=0.0, start=now)
    sent = [orjson.loads(line) for line in sim.lines(gen, 3000)]
    inbox = Counter((r["action"], r["model"]) for r in records if r.get("feature_id") == "summarize_email_v2")
    assert sim.fallbacks > 0 and sim.denied > 0 and sim.admitted > 0
    assert inbox[("fallback", "gpt-5-nano")] == sim.fallbacks  # the policy's cheaper model for summaries
    denied = {r["request_id"] for r in records if r["action"] == "deny"}
    assert not denied & {e["request_id"] for e in sent}  # a denied request never left
    routed = {r["request_id"] for r in records if r["action"] == "fallback"}
    assert {e["model_actual"] for e in sent if e["request_id"] in routed} == {"gpt-5-nano"}
    settled = sum(Decimal(r["cost_usd"]) for r in records
                  if r["action"] == "settle" and r["budgets"] == ["feature:summarize_email_v2:day"])
    assert settled <= Decimal("0.02")  # the budget held: what was spent stayed within it
    assert gateway.open_reservations == 0  # every admitted request was settled
