"""The anomalies table in real ClickHouse (chDB): detector alert records land once, budget alerts pass over."""

import base64
from datetime import UTC, datetime

import orjson
import pytest

from streams.records import Source, encode_record
from streams.sink import AnomalyWriter, decode_anomalies
from tests.factories import alert_record

pytestmark = pytest.mark.integration

SOURCE = Source("llm.cost.alerts.v1", 0, 7)


def anomaly(state: str, detected_at: str) -> dict[str, object]:
    return alert_record(
        incident_key="anomaly:summarize_email_v2:reasoning_share", feature_id="summarize_email_v2", team_id="inbox",
        signal="reasoning_share", state=state, severity="critical", value=0.71, baseline=0.18, score=9.5,
        dimension="model", dimension_value="o4-mini", detected_at=detected_at,
        explanation="reasoning share of output of summarize_email_v2 rose from 18% to 71% since deploy 2026.11.3 "
                    "driven by model o4-mini",
        incident_id="summarize_email_v2:reasoning_share:1795510800", started_at="2026-11-24T09:00:00Z",
        window_start="2026-11-24T09:01:00Z", window_end="2026-11-24T09:02:00Z", requests=42)


def test_anomaly_records_land_once_and_budget_alerts_pass_over(store):
    lines = [anomaly("firing", "2026-11-24T09:03:00Z"), anomaly("resolved", "2026-11-24T09:40:00Z"),
             alert_record(kind="budget", feature_id="", incident_key="budget:tenant:t-1:2026-11-24:80")]
    message = b"\n".join(encode_record(r) for r in lines)
    rows, dead = decode_anomalies([(message, SOURCE)])
    assert dead == {} and [r["state"] for r in rows] == ["firing", "resolved"]
    writer = AnomalyWriter(store)
    assert writer.write(rows) == 2
    again, _ = decode_anomalies([(message, SOURCE)])
    writer.write(again)  # a replayed batch: the same token, absorbed by the dedup window
    res = store.query("SELECT state, detected_at, value, dimension_value, explanation FROM {db}.anomalies "
                      "ORDER BY detected_at")
    assert [(r[0], r[1].replace(tzinfo=UTC), r[2], r[3]) for r in res.rows] == [
        ("firing", datetime(2026, 11, 24, 9, 3, tzinfo=UTC), 0.71, "o4-mini"),
        ("resolved", datetime(2026, 11, 24, 9, 40, tzinfo=UTC), 0.71, "o4-mini")]
    assert "since deploy 2026.11.3" in res.rows[0][4]


def test_a_broken_anomaly_line_is_dead_lettered_with_its_bytes(store):
    good = encode_record(anomaly("firing", "2026-11-24T09:03:00Z"))
    broken = orjson.dumps({**orjson.loads(good), "window_end": None})
    rows, dead = decode_anomalies([(good + b"\n" + broken + b"\n{oops", SOURCE)])
    assert len(rows) == 1
    records = [orjson.loads(x) for x in dead[0]]
    assert [r["reason"] for r in records] == ["bad_alert_row", "bad_alert_row"]
    assert records[0]["source_offset"] == 7 and "anomaly" in records[0]["message"]
    assert base64.b64decode(records[0]["original_b64"]) == broken
