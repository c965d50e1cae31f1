"""Budgets on the live stack: spend from the rollups, state for gateways, one alert per threshold per period."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from streams.app import read_compacted
from streams.budget import period_bounds
from tests.e2e.conftest import EXAMPLES, Stack
from tests.factories import event_factory

pytestmark = pytest.mark.e2e

BUDGETS = """\
kind: budgets
version: "t1"
effective_at: "2026-01-01T00:00:00Z"
budgets:
  - {scope: feature, id: summarize_email_v2, period: day, amount: "0.010"}
  - {scope: tenant, id: tenant_acme, period: month, amount: "1000"}
"""
KEY = "feature:summarize_email_v2:day"


def all_messages(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every record on a topic, from the beginning to its current end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-reader", "enable.auto.commit": False})
    out: list[dict[str, Any]] = []
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        ends = {p: e for p, e in ends.items() if e > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + 20
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            out.extend(orjson.loads(line) for line in (msg.value() or b"").split(b"\n") if line)
            if (msg.offset() or 0) + 1 >= ends.get(msg.partition() or 0, 0):
                ends.pop(msg.partition() or 0, None)
    finally:
        consumer.close()
    return out


def wait_for_state(stack: Stack, check: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        states = read_compacted(stack.settings.kafka_bootstrap, stack.settings.topics.budget_state)
        if KEY in states and check(states[KEY]):
            return states
        assert time.monotonic() < deadline, f"budget state never matched: {states.get(KEY)}"
        time.sleep(0.5)


def test_budget_state_and_alerts_once_per_threshold(stack, tmp_path):
    stack = Stack(dataclasses.replace(stack.settings, budget_interval_s=1.0))
    to_midnight = (period_bounds("day", datetime.now(UTC))[1] - datetime.now(UTC)).total_seconds()
    if to_midnight < 120:  # the daily budget's period must not end during the test
        time.sleep(to_midnight + 1)
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(BUDGETS)
    stack.tally("up", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES / "price_cards.yaml"), str(EXAMPLES / "owners.yaml"),
                str(budgets))
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    # Each call: 1200 input + 300 output tokens of gpt-4.1-mini = $0.00096. Six calls: 57.6 % of $0.010.
    events = [event_factory(timestamp=now, final=True) for _ in range(6)]
    path = tmp_path / "calls.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    stack.tally("publish", str(path))
    stack.tally("wait", "--timeout", "120")
    states = wait_for_state(stack, lambda s: s["alerted"] == [50])
    s = states[KEY]
    assert (Decimal(s["spent_usd"]), Decimal(s["budget_usd"])) == (Decimal("0.00576"), Decimal("0.010"))
    # All of it in the last 15 minutes: the burn rate. (Whether the forecast reaches the budget depends on the time
    # left in the day; the unit tests cover the forecast and the advice.)
    assert Decimal(s["burn_rate_usd_per_hour"]) == Decimal("0.02304")
    assert Decimal(s["forecast_usd"]) >= Decimal(s["spent_usd"])
    assert states["tenant:tenant_acme:month"]["spent_usd"] == "0.00576"

    # Five more: 105.6 %; the 80 and 100 % thresholds alert once each, the gateway is told to deny.
    more = [event_factory(timestamp=now, final=True) for _ in range(5)]
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in more) + b"\n")
    stack.tally("publish", str(path))
    stack.tally("wait", "--timeout", "120")
    s = wait_for_state(stack, lambda s: s["alerted"] == [50, 80, 100])[KEY]
    assert s["recommendation"] == "deny" and Decimal(s["remaining_usd"]) == 0
    # What an operator reads: `tally budgets` shows the same state.
    shown = {st["key"]: st for st in orjson.loads(stack.tally("budgets", "--format", "json").stdout)}
    assert shown[KEY]["recommendation"] == "deny" and shown[KEY]["spent_usd"] == s["spent_usd"]
    table = stack.tally("budgets").stdout.decode()
    assert "deny" in table and "0.01 " in table and "0.01056" not in table  # spent 0.01056: to the cent

    # A restart reads the last states back: no threshold alerts twice.
    stack.tally("down", timeout=120)
    stack.tally("up", timeout=180)
    time.sleep(4)  # a few budget ticks
    alerts = [a for a in all_messages(stack.settings.kafka_bootstrap, stack.settings.topics.alerts)
              if a["kind"] == "budget" and a["state"] == "firing" and a["signal"].endswith("pct")]
    assert sorted(a["incident_key"].rsplit(":", 1)[-1] for a in alerts) == ["100", "50", "80"]
    assert all(a["feature_id"] == "summarize_email_v2" for a in alerts)
