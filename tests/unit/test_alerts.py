"""The alert consumer's pure parts: decide (dedup, renotify, escalation, resolve), record checks, sink bodies."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from ops.alerts import (
    AlertsConfig,
    AlertsStats,
    AlertState,
    AlertStateError,
    DeliveryError,
    Incident,
    MalformedAlert,
    Notification,
    OutboxEntry,
    Pager,
    build_sinks,
    console_text,
    decide,
    decode_line,
    dumps,
    load_incidents,
    load_state,
    pagerduty_event,
    save_state,
    slack_text,
    webhook_body,
)
from tally.errors import ConfigError, TallyError
from tally.failpoints import Failpoints
from tests.factories import ALERT_KEY as KEY
from tests.factories import alert_record

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def test_first_firing_opens_and_triggers_then_duplicates_are_suppressed() -> None:
    incidents: dict[str, Incident] = {}
    notes = decide(alert_record(), incidents, T0)
    assert [(n.action, n.reason, n.severity) for n in notes] == [("trigger", "opened", "warning")]
    assert list(incidents) == [KEY]
    assert incidents[KEY].last_notified_at == T0
    assert decide(alert_record(), incidents, T0 + timedelta(minutes=29)) == []
    assert incidents[KEY].notifications == 1


def test_renotify_once_the_interval_has_passed_since_the_last_notification() -> None:
    incidents: dict[str, Incident] = {}
    decide(alert_record(), incidents, T0, renotify_s=600)
    assert decide(alert_record(), incidents, T0 + timedelta(seconds=599), renotify_s=600) == []
    notes = decide(alert_record(), incidents, T0 + timedelta(seconds=600), renotify_s=600)
    assert [(n.action, n.reason) for n in notes] == [("renotify", "reminder")]
    # The clock restarts at the reminder.
    assert decide(alert_record(), incidents, T0 + timedelta(seconds=900), renotify_s=600) == []
    assert incidents[KEY].notifications == 2


def test_escalation_pages_at_once_and_de_escalation_does_not() -> None:
    incidents: dict[str, Incident] = {}
    decide(alert_record(), incidents, T0)
    notes = decide(alert_record(severity="critical"), incidents, T0 + timedelta(seconds=1))
    assert [(n.action, n.reason, n.severity) for n in notes] == [("trigger", "escalated", "critical")]
    assert decide(alert_record(severity="warning"), incidents, T0 + timedelta(seconds=2)) == []
    assert decide(alert_record(severity="critical"), incidents, T0 + timedelta(seconds=3)) == []
    # A reminder pages with the highest severity seen while open.
    later = decide(alert_record(severity="warning"), incidents, T0 + timedelta(hours=1))
    assert [(n.action, n.severity) for n in later] == [("renotify", "critical")]


def test_resolved_closes_an_open_incident_and_a_new_firing_opens_it_again() -> None:
    incidents: dict[str, Incident] = {}
    decide(alert_record(), incidents, T0)
    notes = decide(alert_record(state="resolved"), incidents, T0 + timedelta(minutes=5))
    assert [(n.action, n.incident_key) for n in notes] == [("resolve", KEY)]
    assert incidents == {}
    again = decide(alert_record(), incidents, T0 + timedelta(minutes=6))
    assert [n.action for n in again] == ["trigger"]


def test_resolved_for_an_unknown_incident_is_ignored() -> None:
    incidents: dict[str, Incident] = {}
    assert decide(alert_record(state="resolved"), incidents, T0) == []
    assert incidents == {}


def test_incidents_are_independent_per_key() -> None:
    incidents: dict[str, Incident] = {}
    decide(alert_record(), incidents, T0)
    other = alert_record(incident_key="anomaly:search_answer:reasoning_share", signal="reasoning_share")
    assert [n.action for n in decide(other, incidents, T0)] == ["trigger"]
    assert len(incidents) == 2


@pytest.mark.parametrize(("overrides", "message"), [
    ({"alert_version": 2}, "alert_version"),
    ({"alert_version": True}, "alert_version"),
    ({"incident_key": ""}, "incident_key must not be empty"),
    ({"incident_key": "x" * 256}, "incident_key is longer"),
    ({"kind": "spike"}, "kind must be one of"),
    ({"state": "open"}, "state must be one of"),
    ({"severity": "info"}, "severity must be one of"),
    ({"feature_id": None}, "feature_id must be a string"),
    ({"feature_id": ""}, "feature_id must not be empty"),
    ({"value": None}, "value must be a finite number or a string"),
    ({"baseline": True}, "baseline must be"),
    ({"score": "high"}, "score must be a finite number"),
    ({"score": float("nan")}, "score must be a finite number"),
    ({"detected_at": "2026-11-23 10:00"}, "detected_at must be an RFC 3339"),
    ({"detected_at": "2026-11-23T10:00:00"}, "detected_at must be an RFC 3339"),
])
def test_malformed_records_raise_and_change_nothing(overrides: dict[str, Any], message: str) -> None:
    incidents: dict[str, Incident] = {}
    decide(alert_record(), incidents, T0)
    before = {k: Incident(**vars(v)) for k, v in incidents.items()}
    with pytest.raises(MalformedAlert, match=message):
        decide(alert_record(**{"state": "resolved", **overrides}), incidents, T0 + timedelta(hours=2))
    assert incidents == before


def test_a_tenant_budget_alert_has_no_feature_and_still_pages() -> None:
    record = alert_record(kind="budget", feature_id="", incident_key="budget:tenant:t-1:2026-11-23:80",
                          signal="budget_day_80pct", dimension="tenant t-1")
    assert [n.action for n in decide(record, {}, T0)] == ["trigger"]


def test_non_objects_and_bad_json_are_malformed() -> None:
    with pytest.raises(MalformedAlert, match="JSON object"):
        decide([1, 2], {}, T0)  # type: ignore[arg-type]
    for line in (b"{not json", b'{"score": NaN}', b"\xff\xfe"):
        with pytest.raises(MalformedAlert, match="not valid JSON"):
            decode_line(line)
    assert issubclass(MalformedAlert, TallyError)


def test_numbers_pass_through_exactly_never_as_floats() -> None:
    line = orjson.dumps(alert_record(value="12.30", baseline=3, score=0)).replace(b'"12.30"', b"12.300000000000000001")
    record = decode_line(line)
    assert record["value"] == Decimal("12.300000000000000001")
    note = decide(record, {}, T0)[0]
    assert b'"value":12.300000000000000001' in dumps(webhook_body(note))
    assert b'"value":12.300000000000000001' in dumps(pagerduty_event(note, "rk"))


def test_pagerduty_event_fields() -> None:
    note = decide(alert_record(severity="critical", explanation="line one\nline two " + "x" * 2000), {}, T0)[0]
    event = pagerduty_event(note, "rk-1")
    assert {k: event[k] for k in ("routing_key", "event_action", "dedup_key")} == {
        "routing_key": "rk-1", "event_action": "trigger", "dedup_key": KEY}
    payload = event["payload"]
    assert payload["source"] == "tally"
    assert payload["severity"] == "critical"
    assert payload["timestamp"] == "2026-11-23T10:00:00Z"
    assert (payload["component"], payload["group"], payload["class"]) == ("search_answer", "search",
                                                                           "cost_per_request")
    assert payload["custom_details"] == {"value": Decimal("0.4213"), "baseline": Decimal("0.1100"),
                                         "score": Decimal("5.2"), "dimension": "model"}
    assert len(payload["summary"]) == 1024
    assert payload["summary"].startswith("line one line two xxx")
    incidents: dict[str, Incident] = {}
    decide(alert_record(), incidents, T0)
    resolve = decide(alert_record(state="resolved"), incidents, T0)[0]
    assert pagerduty_event(resolve, "rk-1") == {"routing_key": "rk-1", "event_action": "resolve", "dedup_key": KEY}


def test_slack_text_is_one_escaped_line() -> None:
    incidents: dict[str, Incident] = {}
    fire = decide(alert_record(explanation="spend <x> & \n more"), incidents, T0)[0]
    text = slack_text(fire)
    assert text.startswith(":rotating_light: [WARNING] anomaly cost_per_request on search_answer (team search)")
    assert "spend &lt;x&gt; &amp; more" in text
    assert "\n" not in text
    assert KEY in text
    escalated = decide(alert_record(severity="critical"), incidents, T0)[0]
    assert slack_text(escalated).startswith(":rotating_light: Escalated: [CRITICAL]")
    reminder = decide(alert_record(), incidents, T0 + timedelta(hours=1))[0]
    assert slack_text(reminder).startswith(":rotating_light: Reminder, still firing: [CRITICAL]")
    resolved = decide(alert_record(state="resolved"), incidents, T0)[0]
    assert slack_text(resolved).startswith(":white_check_mark: Resolved: anomaly cost_per_request on search_answer")


def test_console_text_is_one_short_line_for_a_terminal() -> None:
    incidents: dict[str, Incident] = {}
    fire = decide(alert_record(explanation="median cost rose\n from $0.11 to $0.42"), incidents, T0)[0]
    assert console_text(fire) == (f"PAGE [WARNING] anomaly cost_per_request on search_answer (team search): "
                                  f"median cost rose from $0.11 to $0.42 [{KEY}]")
    resolved = decide(alert_record(state="resolved"), incidents, T0)[0]
    assert console_text(resolved).startswith("RESOLVED anomaly cost_per_request on search_answer (team search)")
    assert build_sinks(AlertsConfig(sinks=("console",)).validated())[0].name == "console"


def test_webhook_body_is_the_record_plus_the_notification() -> None:
    record = alert_record(extra_field="kept")
    note = decide(record, {}, T0)[0]
    assert webhook_body(note) == {**record, "notification": "trigger"}


def test_config_reports_every_problem_without_echoing_secrets() -> None:
    AlertsConfig().validated()
    bad = AlertsConfig(sinks=("pagerduty", "slack", "webhook", "sms"), slack_webhook_url="ftp://hooks/SECRET",
                       renotify_s=0, retry_initial_s=2, retry_max_s=1)
    with pytest.raises(ConfigError) as err:
        bad.validated()
    text = str(err.value)
    for expected in ("pagerduty sink needs --pagerduty-routing-key", "webhook sink needs --webhook-url",
                     "unknown sink 'sms'", "slack_webhook_url must be an http:// or https:// URL",
                     "renotify_s must be positive", "retry_max_s must be at least retry_initial_s"):
        assert expected in text
    assert "SECRET" not in text
    assert "slack sink needs" not in text
    assert isinstance(err.value, TallyError)


def test_config_repr_and_redacted_hide_secrets() -> None:
    config = AlertsConfig(sinks=("pagerduty", "slack"), pagerduty_routing_key="rk-SECRET",
                          slack_webhook_url="https://hooks.example/SECRET")
    assert "SECRET" not in repr(config)
    shown = config.redacted()
    assert "SECRET" not in str(shown)
    assert shown["pagerduty_routing_key"] == "***"
    assert shown["webhook_url"] == ""


# ---------------------------------------------------------------- the table on disk: position and outbox


def _outbox_state(now: datetime) -> AlertState:
    incidents: dict[str, Incident] = {}
    record = decode_line(dumps(alert_record(value="12.30")).replace(b'"12.30"', b"12.300000000000000001"))
    notes = decide(record, incidents, now) + decide(alert_record(state="resolved"), incidents, now)
    decide(alert_record(incident_key="anomaly:other:x", signal="x"), incidents, now)
    return AlertState(incidents, {("llm.cost.alerts.v1", 0): 7, ("llm.cost.alerts.v1", 3): 12},
                      [OutboxEntry.of(n, ("pagerduty", "webhook"), f"llm.cost.alerts.v1[0]@6 line {i}")
                       for i, n in enumerate(notes, start=1)])


def test_the_table_position_and_outbox_round_trip_exactly(tmp_path: Path, now: datetime) -> None:
    state = _outbox_state(now)
    path = tmp_path / "alerts" / "incidents.json"
    save_state(path, state)
    got = load_state(path)
    assert got.incidents == state.incidents
    assert got.positions == state.positions
    assert [e.to_json() for e in got.outbox] == [e.to_json() for e in state.outbox]
    assert got.outbox[0].record["value"] == Decimal("12.300000000000000001")
    assert [(n.action, n.incident_key) for n in (e.notification() for e in got.outbox)] == [
        ("trigger", KEY), ("resolve", KEY)]
    assert b'"value": 12.300000000000000001' in path.read_bytes()
    assert load_incidents(path) == state.incidents
    assert [p.name for p in path.parent.iterdir()] == ["incidents.json"]  # no temp file left


def test_a_version_1_table_still_loads_without_position_or_outbox(tmp_path: Path, now: datetime) -> None:
    incident = _outbox_state(now).incidents["anomaly:other:x"]
    path = tmp_path / "incidents.json"
    path.write_bytes(orjson.dumps({"state_version": 1, "incidents": {incident.incident_key: incident.to_json()}}))
    got = load_state(path)
    assert got.incidents == {incident.incident_key: incident}
    assert (got.positions, got.outbox) == ({}, [])
    save_state(path, got)
    assert orjson.loads(path.read_bytes())["state_version"] == 2


@pytest.mark.parametrize("doc", [
    {"state_version": 3, "incidents": {}},
    {"state_version": 2, "incidents": {}, "positions": {"t": {"0": -1}}, "outbox": []},
    {"state_version": 2, "incidents": {}, "positions": {}, "outbox": [{"action": "page"}]},
    {"state_version": 2, "incidents": {}, "positions": {}, "outbox": [
        {"action": "trigger", "reason": "opened", "severity": "warning", "record": {"alert_version": 1},
         "pending": ["stdout"]}]},
])
def test_a_corrupt_table_is_refused(tmp_path: Path, doc: dict[str, Any]) -> None:
    path = tmp_path / "incidents.json"
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(AlertStateError, match="is corrupt"):
        load_state(path)


class _Sink:
    """Records each send with what the table on disk said at that moment; answers 4xx for the listed indexes."""

    def __init__(self, name: str, path: Path, seen: list[tuple[str, str, str, list[list[str]]]],
                 reject: tuple[int, ...] = ()) -> None:
        self.name, self.path, self.seen, self.reject, self.calls = name, path, seen, reject, 0

    def send(self, note: Notification) -> None:
        on_disk = load_state(self.path)
        self.seen.append((self.name, note.action, note.incident_key, [e.pending for e in on_disk.outbox]))
        self.calls += 1
        if self.calls in self.reject:
            raise DeliveryError("HTTP 400", retryable=False)


def test_each_answer_is_recorded_before_the_next_send(tmp_path: Path, now: datetime) -> None:
    path = tmp_path / "incidents.json"
    state = _outbox_state(now)
    save_state(path, state)
    seen: list[tuple[str, str, str, list[list[str]]]] = []
    sinks = [_Sink("pagerduty", path, seen), _Sink("webhook", path, seen, reject=(1,))]
    stats = AlertsStats()
    pager = Pager(path, state, sinks, AlertsConfig(sinks=("pagerduty", "webhook")), stats, Failpoints())
    assert pager.deliver(threading.Event())
    # Every send finds itself pending on disk and everything before it, for that sink, already answered: a crash
    # re-sends at most the one being sent, and never a trigger after its resolve.
    assert seen == [
        ("pagerduty", "trigger", KEY, [["pagerduty", "webhook"], ["pagerduty", "webhook"]]),
        ("pagerduty", "resolve", KEY, [["webhook"], ["pagerduty", "webhook"]]),
        ("webhook", "trigger", KEY, [["webhook"], ["webhook"]]),
        ("webhook", "resolve", KEY, [["webhook"]]),
    ]
    assert load_state(path).outbox == []
    assert (stats.delivered, stats.rejected, stats.saves) == ({"pagerduty": 2, "webhook": 1}, {"webhook": 1}, 4)
