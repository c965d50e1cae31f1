"""`tally alerts` as an on-call engineer runs it: one page per incident, printed by the stdout sink."""

from __future__ import annotations

import orjson
import pytest
from confluent_kafka import Producer

from ops.alerts import dumps
from tests.e2e.conftest import Stack
from tests.factories import ALERT_KEY, alert_record

pytestmark = pytest.mark.e2e


def test_alerts_command_pages_once_per_incident_and_resolves(stack: Stack):
    producer = Producer({"bootstrap.servers": stack.settings.kafka_bootstrap, "acks": "all"})
    for record in (alert_record(), alert_record(score=7), alert_record(state="resolved")):
        producer.produce(stack.settings.topics.alerts, key=ALERT_KEY.encode(), value=dumps(record))
    assert producer.flush(10) == 0
    out = stack.tally("alerts", "--sink", "stdout", "--max-messages", "3", timeout=60)
    pages = [orjson.loads(line) for line in out.stdout.splitlines() if line.startswith(b"{")]
    assert [p["notification"] for p in pages] == ["trigger", "resolve"]
    assert {p["incident_key"] for p in pages} == {ALERT_KEY}
    assert "3 messages" in out.stderr.decode()
    bad = stack.tally("alerts", "--sink", "pagerduty", check=False)
    assert bad.returncode == 2 and "pagerduty sink needs --pagerduty-routing-key" in bad.stderr.decode()
