"""A running stack: a conflicting duplicate goes to the DLQ, and `tally verify` audits through the worker."""

import base64
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from tests.e2e.conftest import EXAMPLES
from tests.factories import event_factory

pytestmark = pytest.mark.e2e


def test_conflicting_duplicate_is_a_dead_letter_and_verify_passes_through_the_worker(stack, tmp_path):
    now = datetime.now(UTC)
    events = [event_factory(final=True, timestamp=(now - timedelta(minutes=90 - i)).isoformat(timespec="milliseconds")
                            .replace("+00:00", "Z")) for i in range(40)]
    first = events[0]
    conflicting = {**first, "model_actual": "gpt-4.1", "usage": {"input_tokens": 2_000_000, "output_tokens": 1_000_000}}
    batch1, batch2 = tmp_path / "events.jsonl", tmp_path / "again.jsonl"
    batch1.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    # Later: an identical copy (silent) and a copy with the same event_id and other content (a dead letter).
    batch2.write_bytes(orjson.dumps(events[1]) + b"\n" + orjson.dumps(conflicting) + b"\n")

    stack.tally("up", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    stack.tally("publish", str(batch1))
    stack.tally("wait", "--timeout", "120", timeout=180)
    stack.tally("publish", str(batch2))
    stack.tally("wait", "--timeout", "120", timeout=180)

    rows = stack.query("SELECT count() AS n, uniqExact(event_id) AS u FROM tally.usage_events")
    assert rows == [{"n": 40, "u": 40}]
    model = stack.query(f"SELECT model_actual FROM tally.usage_events WHERE event_id = '{first['event_id']}'")
    assert model == [{"model_actual": first["model_actual"]}]
    dlq = orjson.loads(stack.tally("dlq", "show", "--format", "json").stdout)
    assert dlq["by_reason"] == {"conflicting_duplicate": 1}
    [record] = dlq["recent"]
    assert record["event_id"] == first["event_id"] and record["stage"] == "sink"
    assert orjson.loads(base64.b64decode(record["original_b64"])) == conflicting
    assert record["message"].count("content hash") == 2

    audit = stack.tally("verify", "--days", "2", "--format", "json")  # the worker holds chDB: through /api/query
    report = orjson.loads(audit.stdout)
    assert report["ok"] is True and report["cells"] > 0 and report["differences"] == []
