"""A crash at every named failpoint of both roles, in turn, while a known stream flows: nothing lost, nothing twice."""

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from ops import stack as stack_ops
from ops.simulate import TrafficGenerator, catalog_from_reference
from tally.failpoints import POINTS
from tally.reference import load_reference_files
from tally.sdk.publisher import Publisher
from tests.e2e.conftest import EXAMPLES, REFERENCE_FILES

pytestmark = pytest.mark.e2e

# The alert consumer's points are exercised by the alert consumer's own tests; these are the worker's.
WORKER_POINTS = {"rebalance": 1, "process.after_decode": 2, "process.before_delivery": 2,
                 "process.after_delivery": 2, "process.mid_state": 2, "sink.after_decode": 2, "sink.after_insert": 2}


def test_the_worker_points_are_the_named_ones():
    alerts = {"alerts.after_save", "alerts.in_flight", "alerts.mid_batch", "alerts.after_delivery"}
    otlp = {"otlp.before_delivery", "otlp.after_delivery"}  # tests/e2e/test_otlp.py crashes there
    assert set(WORKER_POINTS) | alerts | otlp == set(POINTS)


def test_a_crash_at_every_failpoint_loses_nothing(stack):
    docs = load_reference_files(REFERENCE_FILES)
    settings = stack.settings
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    stack.tally("down", timeout=120)
    gen = TrafficGenerator(catalog_from_reference(docs), seed=41, bad_rate=0.0, rate=50.0,
                           start=datetime.now(UTC) - timedelta(hours=3))
    events: list[dict] = []
    bad: Counter[str] = Counter()
    log = stack_ops.log_file(settings, "all")
    for point, nth in WORKER_POINTS.items():
        stack.env["TALLY_FAILPOINT"] = f"{point}:{nth}"
        stack.tally("up", "--role", "all", timeout=180)
        pid = stack.worker_pid()
        fired = f"failpoint {point} fired"
        deadline = time.monotonic() + 120
        while stack_ops.alive(pid, b"ops.cli", b"worker") and time.monotonic() < deadline:
            chunk = list(gen.lines(400))
            events.extend(orjson.loads(line) for line in chunk)
            with Publisher(settings.kafka_bootstrap, settings.topics.usage) as pub:
                for line in chunk:
                    pub.publish_line(line)
                pub.publish_line(b'{"schema_version": 1, "event_id": "cut-%d' % len(events))  # dead-lettered once
            bad["invalid_json"] += 1
            time.sleep(1.0)
        assert fired in log.read_text(), f"{point} did not fire within 120 s"
    del stack.env["TALLY_FAILPOINT"]
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("wait", "--timeout", "300", timeout=360)
    stack.assert_matches_ground_truth(events)
    stack.assert_requests_match_ground_truth(events)
    dlq = orjson.loads(stack.tally("dlq", "show", "--format", "json", "--limit", "1000").stdout)
    assert dlq["by_reason"] == dict(bad)
    stack.tally("verify")  # every rollup grain agrees with usage_events and logical_requests
