"""A gateway's admission decisions through a live worker: published by the SDK's client, stored by the sink in
budget_decisions, every denial with its payload."""

from __future__ import annotations

import re
import time
from decimal import Decimal

import orjson
import pytest

from tally.reference import parse_reference_yaml
from tally.sdk.admission import Admission, KafkaDecisions
from tests.e2e.conftest import EXAMPLES
from tests.unit.test_admission import CARD, REQ, T, iso, policy, state

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


BUDGET = Decimal("0.10")
BUDGETS_YAML = """\
kind: budgets
version: "admission-test"
effective_at: "EFFECTIVE_AT"
budgets:
  - {scope: feature, id: search_answer, period: day, amount: "0.10"}
""".replace("EFFECTIVE_AT", iso(T - 86_400))  # in effect a day before the suite's clock


@pytest.mark.parametrize(("share", "bound"), [("0.3333", Decimal(1)), ("1", Decimal(3))])
def test_three_gateway_processes_against_one_small_budget_hold_within_the_documented_bound(
        stack, tmp_path, share: str, bound: Decimal) -> None:
    """Three gateways, each its own OS process, reserve against a $0.10 daily budget and never settle. Between two
    states (budget_interval_s = 1 s) a gateway sees only its own new holds, so together they can hold at most
    N × share × what was left (docs/admission.md): the budget with share 1/3, three times it with share 1."""
    import subprocess
    import sys

    stack.env["TALLY_BUDGET_INTERVAL_S"] = "1"
    stack.tally("up", "--role", "all", timeout=180)
    (tmp_path / "card.yaml").write_text(CARD)
    (tmp_path / "policy.yaml").write_text(policy("p1", T - 86_400, on_breach="deny"))
    (tmp_path / "budgets.yaml").write_text(BUDGETS_YAML)
    stack.tally("reference", "load", str(tmp_path / "card.yaml"), str(tmp_path / "policy.yaml"),
                str(tmp_path / "budgets.yaml"))
    deadline = time.monotonic() + 60  # the first state of the budget is published
    while not stack.tally("budgets", check=False).stdout.decode().count("search_answer"):
        assert time.monotonic() < deadline, "no budget state within 60 s"
        time.sleep(1)
    gateways = [subprocess.Popen([sys.executable, "-m", "tests.e2e.gateway_process", f"gw-{g}", share, "6"],
                                 env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for g in range(3)]
    results = []
    for proc in gateways:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
        results.append(orjson.loads(out))
    granted = sum(Decimal(r["granted_usd"]) for r in results)
    assert all(r["denied"] > 0 for r in results), results  # each reached the budget's edge (or its share's)
    assert granted <= bound * BUDGET, (granted, results)
    if bound == 1:
        assert granted > BUDGET / 2  # the shares were used, not refused for nothing


def test_simulated_traffic_through_gateways_trips_a_budget_live(stack, tmp_path) -> None:
    """`tally simulate --gateways 2` decides every request through two admission clients following the stack: a
    tiny inbox budget trips, denied requests are never sent, and every decision lands in budget_decisions."""
    stack.env["TALLY_BUDGET_INTERVAL_S"] = "1"
    stack.tally("up", "--role", "all", timeout=180)
    (tmp_path / "budgets.yaml").write_text(BUDGETS_YAML.replace("search_answer", "summarize_email_v2").replace(
        '"0.10"', '"0.02"'))
    stack.tally("reference", "load", str(EXAMPLES / "price_cards.yaml"), str(EXAMPLES / "owners.yaml"),
                str(EXAMPLES / "policies.yaml"), str(tmp_path / "budgets.yaml"))
    deadline = time.monotonic() + 60
    while "summarize_email_v2" not in stack.tally("budgets", check=False).stdout.decode():
        assert time.monotonic() < deadline, "no budget state within 60 s"
        time.sleep(1)
    out = stack.tally("simulate", "--gateways", "2", "--count", "3000", "--rate", "300", "--bad-rate", "0",
                      timeout=240).stderr.decode()
    said = re.search(r"admission through 2 gateways: ([\d,]+) admitted, ([\d,]+) routed to a fallback model, "
                     r"([\d,]+) denied", out)
    assert said, out[-2000:]
    admitted, routed, denied = (int(g.replace(",", "")) for g in said.groups())
    assert admitted > 0 and denied > 0, out[-2000:]  # the budget tripped (fallbacks: test_simulate_admission.py)
    published = int(re.search(r"published ([\d,]+) lines", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    stack.tally("wait", "--timeout", "180", timeout=240)
    events = stack.query("SELECT count() AS n FROM tally.usage_events")[0]["n"]
    assert events == published  # a denied request never left: nothing of it was published
    deadline = time.monotonic() + 90
    while True:
        by_action = {r["action"]: r["n"] for r in stack.query(
            "SELECT action, count() AS n FROM tally.budget_decisions FINAL GROUP BY action")}
        if by_action.get("deny", 0) == denied and by_action.get("fallback", 0) == routed or \
                time.monotonic() > deadline:
            break
        time.sleep(1)
    assert (by_action.get("admit", 0), by_action.get("fallback", 0), by_action.get("deny", 0)) == (
        admitted, routed, denied)
