"""The alert path on the live stack: an injected incident → detect → llm.cost.alerts.v1 → anomalies and a page."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from ops.kafka_admin import end_offsets
from ops.simulate import Incident, Profile, TrafficGenerator, catalog_from_reference
from ops.stack import api
from tally.reference import load_reference_files
from tests.e2e.conftest import REFERENCE_FILES, Stack

pytestmark = pytest.mark.e2e

FEATURE = "campaign_copy"
KEY = f"anomaly:{FEATURE}:retry_rate"


def firing(stack: Stack) -> list[dict[str, Any]]:
    """The storm's incident: its first firing record (a later one is an escalation to critical)."""
    return stack.query(f"SELECT incident_id, argMin(explanation, detected_at) AS explanation FROM tally.anomalies "
                       f"WHERE incident_key = '{KEY}' AND state = 'firing' GROUP BY incident_id")


def publish_storm(stack: Stack, tmp_path: Any, end: datetime) -> Incident:
    """Ten minutes of traffic ending at `end`, a retry storm in its last three, published in one go and processed."""
    storm = Incident("retry_storm", FEATURE, end - timedelta(minutes=3), end)
    gen = TrafficGenerator(catalog_from_reference(load_reference_files(REFERENCE_FILES)), seed=5,
                           start=end - timedelta(minutes=10), rate=6.0, bad_rate=0.0,
                           profile=Profile(incidents=(storm,)))
    lines = []
    while gen.clock < end:
        lines += [orjson.dumps(e) for e in gen.logical_request()]
    path = tmp_path / "traffic.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stack.tally("publish", str(path))
    stack.tally("wait", "--timeout", "180")
    return storm


def wait_for_page(stack: Stack) -> dict[str, Any]:
    deadline = time.monotonic() + 150  # caught-up, silent partitions' watermarks follow wall time: windows close
    while not firing(stack):
        assert time.monotonic() < deadline, "no retry_rate anomaly for the injected storm"
        time.sleep(1)
    (row,) = firing(stack)
    assert row["explanation"].startswith(f"retry rate of {FEATURE} rose from ")
    assert row["incident_id"].startswith(f"{FEATURE}:retry_rate:")
    return row


def short_windows(stack: Stack) -> Stack:
    """Short windows so that the detectors warm up on ten minutes of event time published at once."""
    return Stack(dataclasses.replace(stack.settings, detect_window_s=10, detect_lateness_s=5,
                                     detect_min_requests=10, detect_warmup_windows=12))


def test_a_storm_in_a_replay_of_old_events_pages_in_event_time(stack, tmp_path, now):
    # Issue 13: during a replay the detectors' clocks jumped to the wall clock, and nothing old paged any more. The
    # clocks are the input partitions' watermarks now: the storm pages as of its own event time, days ago.
    stack = short_windows(stack)
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("reference", "load", *map(str, REFERENCE_FILES))
    storm = publish_storm(stack, tmp_path, now - timedelta(days=3))
    wait_for_page(stack)
    (at,) = stack.query(f"SELECT min(detected_at) AS t FROM tally.anomalies WHERE incident_key = '{KEY}'")
    detected = datetime.fromisoformat(str(at["t"])).replace(tzinfo=UTC)
    assert storm.start <= detected <= storm.end + timedelta(minutes=2)
    status = api(stack.settings, "/api/status")
    assert status["detect_errors"] == 0 and status["detect_requests"] > 0


def test_an_injected_retry_storm_pages_and_lands_in_anomalies(stack, tmp_path):
    stack = short_windows(stack)
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("reference", "load", *map(str, REFERENCE_FILES))
    publish_storm(stack, tmp_path, datetime.now(UTC))
    row = wait_for_page(stack)

    on_topic = sum(end_offsets(stack.settings.kafka_bootstrap, stack.settings.topics.alerts).values())
    out = stack.tally("alerts", "--sink", "stdout", "--max-messages", str(on_topic), timeout=60).stdout.decode()
    pages = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    # One page for the incident, and one more only if it escalated from warning to critical (documented).
    storm_pages = [(p["notification"], p["severity"]) for p in pages if p["incident_key"] == KEY]
    assert storm_pages in ([("trigger", "warning")], [("trigger", "critical")],
                           [("trigger", "warning"), ("trigger", "critical")])

    # The detectors' snapshots are durable: after a restart the open incident is not raised again.
    deadline = time.monotonic() + 60  # snapshots go out with the producer's next flush (Faust's commit)
    while sum(end_offsets(stack.settings.kafka_bootstrap, stack.settings.topics.detect_state).values()) == 0:
        assert time.monotonic() < deadline, "no detector snapshot reached tally.detect.state.changelog"
        time.sleep(1)
    stack.tally("down", timeout=120)
    stack.tally("up", "--role", "all", timeout=180)
    time.sleep(8)
    stack.tally("wait", "--timeout", "120")
    assert firing(stack) == [row]
    assert api(stack.settings, "/api/status")["detect_errors"] == 0
