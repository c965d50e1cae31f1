"""The admission client against the project's broker: it follows budget states, cards and the routing policy from
their topics and publishes its decisions to llm.budget.decisions.v1, keyed by budget."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from confluent_kafka import Consumer, Producer

from ops.cli import _load_reference
from tally.sdk.admission import Admission, Follower, KafkaDecisions
from tests.unit.test_admission import CARD, REQ, T, iso, policy, state

pytestmark = pytest.mark.integration


def test_a_gateway_follows_its_topics_and_publishes_every_decision(kafka_settings, tmp_path) -> None:
    s = kafka_settings
    (tmp_path / "card.yaml").write_text(CARD)
    (tmp_path / "policy.yaml").write_text(policy("p1", T - 3600))
    _load_reference(s, [tmp_path / "card.yaml", tmp_path / "policy.yaml"])
    producer = Producer({"bootstrap.servers": s.kafka_bootstrap})
    producer.produce(s.topics.budget_state, key=b"feature:search_answer:day",
                     value=orjson.dumps(state("0.99", computed=T)))
    producer.flush(30)

    sink = KafkaDecisions(s.kafka, s.topics.budget_decisions)
    gateway = Admission("gw-it", publish=sink.publish, clock=lambda: T)
    follower = Follower(gateway, s.kafka, s.topics.budget_state, (s.topics.price_cards, s.topics.policies)).start()
    try:
        admitted = gateway.reserve(request_id="it-1", **REQ)  # 0.01 left: the 0.0077 worst case fits
        assert admitted.action == "admit" and admitted.record["policy_version"] == "p1"
        denied = gateway.reserve(request_id="it-2", **{**REQ, "model": "gpt-4.1-mini", "max_output_tokens": 5000})
        # the spend leaves 0.01 (room for it), the open reservation does not: held, not a genuine breach
        assert (denied.action, denied.reason) == ("deny", "held_by_open_reservations")
        assert admitted.reservation is not None
        admitted.reservation.settle(Decimal("0.004"))
        assert sink.flush() == 0 and not sink.errors
    finally:
        follower.stop()

    reader = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": "it-decisions",
                       "auto.offset.reset": "earliest"})
    reader.subscribe([s.topics.budget_decisions])
    got = []
    for _ in range(60):
        msg = reader.poll(1.0)
        if msg is not None and msg.error() is None:
            got.append((msg.key(), orjson.loads(msg.value())))
        if len(got) == 3:
            break
    reader.close()
    assert [(k, r["action"], r.get("reason")) for k, r in got] == [
        (b"feature:search_answer:day", "admit", "within_budget"),
        (b"feature:search_answer:day", "deny", "held_by_open_reservations"),
        (b"feature:search_answer:day", "settle", None)]
    assert got[1][1]["request_id"] == "it-2" and got[1][1]["budget_windows"]["feature:search_answer:day"][
        "state_computed_at"] == iso(T)


def test_decision_records_land_in_budget_decisions_once(store, now) -> None:
    from streams.decisions import DecisionWriter, decode_decisions
    from streams.records import Source

    records: list[dict] = []
    gateway = Admission("gw-db", publish=records.append, clock=lambda: T)
    from tally.reference import parse_reference_yaml

    gateway.apply_references(parse_reference_yaml(CARD, "card") + parse_reference_yaml(policy("p1", T - 3600), "p"))
    gateway.apply_state(state("0.99", computed=T))
    admitted = gateway.reserve(request_id="db-1", tenant_id="acme", **REQ)
    gateway.reserve(request_id="db-2", **{**REQ, "max_output_tokens": 50_000})
    assert admitted.reservation is not None
    admitted.reservation.settle(Decimal("0.0042"))
    value = b"\n".join(orjson.dumps(r) for r in records) + b"\nnot json\n"
    rows, dead = decode_decisions([(value, Source("llm.budget.decisions.v1", 0, 7))])
    assert len(rows) == 3 and [orjson.loads(line)["reason"] for lines in dead.values() for line in lines] == [
        "bad_decision_row"]
    writer = DecisionWriter(store)
    assert writer.write(rows) == 3
    writer.write(rows)  # a replay: the same keys
    got = store.query("SELECT action, reason, feature_id, toString(requested_usd), toString(cost_usd), "
                      "request_id FROM {db}.budget_decisions FINAL ORDER BY decided_at, action").rows
    assert sorted(tuple(r) for r in got) == sorted([
        ("admit", "within_budget", "search_answer", "0.0077", "0", "db-1"),
        ("deny", "reservation_exceeds_remaining", "search_answer", "0.2255", "0", "db-2"),
        ("settle", "", "", "0", "0.0042", "")])
