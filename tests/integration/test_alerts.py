"""`run_alerts` against a real broker and local HTTP sinks: one page per incident, retries, restarts, no lost pages."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from ops.alerts import AlertsConfig, AlertsStats, dumps, load_incidents, run_alerts, state_path
from ops.kafka_admin import committed_offsets, end_offsets
from tally.config import Settings
from tests.factories import ALERT_KEY as KEY
from tests.factories import alert_record

pytestmark = pytest.mark.integration

ROUTING_KEY = "rk-SECRET-0001"
PD, SLACK, HOOK = "/pd", "/slack/T000/SECRET-slack", "/hook/SECRET-hook"
RUN_TIMEOUT_S = 15.0


@dataclass
class Request:
    """One POST the recorder received, and what it answered."""

    path: str
    body: dict[str, Any]
    status: int


@dataclass
class Recorder:
    """A loopback HTTP server that records every POST; told per path to fail with 503 N times or always answer X."""

    fail: dict[str, int] = field(default_factory=dict)
    answer: dict[str, int] = field(default_factory=dict)
    on_request: Callable[[Request], None] | None = None
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with recorder.lock:
                    if recorder.fail.get(self.path, 0) > 0:
                        recorder.fail[self.path] -= 1
                        status = 503
                    else:
                        status = recorder.answer.get(self.path, 202 if self.path == PD else 200)
                    request = Request(self.path, body, status)
                    recorder.requests.append(request)
                if recorder.on_request is not None:
                    recorder.on_request(request)
                reply = b'{"status": "success"}' if status < 300 else b'{"message": "no"}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, name="recorder", daemon=True).start()

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def got(self, path: str, ok_only: bool = True) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path and (r.status < 300 or not ok_only)]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    rec.start()
    yield rec
    assert rec.server is not None
    rec.server.shutdown()
    rec.server.server_close()


def config_for(rec: Recorder, *sinks: str) -> AlertsConfig:
    return AlertsConfig(sinks=sinks, pagerduty_url=rec.url(PD), pagerduty_routing_key=ROUTING_KEY,
                        slack_webhook_url=rec.url(SLACK), webhook_url=rec.url(HOOK), http_timeout_s=5.0,
                        retry_initial_s=0.05, retry_max_s=0.2, poll_timeout_s=0.2)


def publish(settings: Settings, *messages: list[dict[str, Any] | bytes]) -> None:
    """One Kafka message per argument, each an NDJSON batch of records (or raw lines), keyed by the incident."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "enable.idempotence": True})
    for lines in messages:
        value = b"\n".join(line if isinstance(line, bytes) else dumps(line) for line in lines)
        producer.produce(settings.topics.alerts, key=KEY.encode(), value=value)
    assert producer.flush(10) == 0


def run_bounded(settings: Settings, config: AlertsConfig, max_messages: int,
                stop: threading.Event | None = None) -> AlertsStats:
    stop = stop or threading.Event()
    timer = threading.Timer(RUN_TIMEOUT_S, stop.set)
    timer.start()
    try:
        return run_alerts(settings, config, stop, max_messages=max_messages)
    finally:
        timer.cancel()


def committed(settings: Settings) -> dict[int, int]:
    ends = end_offsets(settings.kafka_bootstrap, settings.topics.alerts)
    return committed_offsets(settings.kafka_bootstrap, settings.group_id("alerts"), settings.topics.alerts,
                             list(ends))


def assert_all_committed(settings: Settings) -> None:
    ends = end_offsets(settings.kafka_bootstrap, settings.topics.alerts)
    got = committed(settings)
    assert {p: got[p] for p, end in ends.items() if end} == {p: end for p, end in ends.items() if end}


def test_one_trigger_and_one_resolve_per_sink(kafka_settings: Settings, recorder: Recorder,
                                              capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tally.alerts")
    firing = alert_record(value="0.4213", score=5)
    publish(kafka_settings, [firing], [alert_record(value="0.50", score=6), b'{"alert_version": 1, "oops"'],
            [alert_record(state="resolved", value="0.11", score=0)])

    stats = run_bounded(kafka_settings, config_for(recorder, "stdout", "pagerduty", "slack", "webhook"), 3)

    assert (stats.messages, stats.records, stats.malformed, stats.suppressed) == (3, 4, 1, 1)
    assert stats.delivered == {"stdout": 2, "pagerduty": 2, "slack": 2, "webhook": 2}
    pd = [r.body for r in recorder.got(PD)]
    assert [(e["event_action"], e["dedup_key"], e["routing_key"]) for e in pd] == [
        ("trigger", KEY, ROUTING_KEY), ("resolve", KEY, ROUTING_KEY)]
    assert pd[0]["payload"] == {
        "summary": firing["explanation"], "source": "tally", "severity": "warning",
        "timestamp": firing["detected_at"], "component": "search_answer", "group": "search",
        "class": "cost_per_request",
        "custom_details": {"value": "0.4213", "baseline": 0.11, "score": 5, "dimension": "model"},
    }
    texts = [r.body["text"] for r in recorder.got(SLACK)]
    assert texts[0].startswith(":rotating_light: [WARNING]") and KEY in texts[0]
    assert texts[1].startswith(":white_check_mark: Resolved:") and KEY in texts[1]
    hooks = [r.body for r in recorder.got(HOOK)]
    assert [(h["notification"], h["incident_key"], h["state"]) for h in hooks] == [
        ("trigger", KEY, "firing"), ("resolve", KEY, "resolved")]
    assert hooks[0] == {**orjson.loads(dumps(firing)), "notification": "trigger"}
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["notification"], p["incident_key"]) for p in printed] == [("trigger", KEY), ("resolve", KEY)]
    assert_all_committed(kafka_settings)
    assert load_incidents(state_path(kafka_settings)) == {}
    assert "malformed alert record skipped" in caplog.text
    assert f"{kafka_settings.topics.alerts}[" in caplog.text
    assert "SECRET" not in caplog.text


def test_a_sink_down_is_retried_and_offsets_wait_for_it(kafka_settings: Settings, recorder: Recorder) -> None:
    snapshots: list[dict[int, int]] = []

    def snapshot(request: Request) -> None:
        if request.path == PD and request.status == 503:
            snapshots.append(committed(kafka_settings))

    recorder.fail[PD] = 2
    recorder.on_request = snapshot
    publish(kafka_settings, [alert_record(severity="critical")])

    stats = run_bounded(kafka_settings, config_for(recorder, "pagerduty", "webhook"), 1)

    assert [r.status for r in recorder.got(PD, ok_only=False)] == [503, 503, 202]
    bodies = [r.body for r in recorder.got(PD, ok_only=False)]
    assert bodies[0] == bodies[1] == bodies[2]
    assert bodies[0]["payload"]["severity"] == "critical"
    assert len(recorder.got(HOOK)) == 1  # the healthy sink is not repeated while another one retries
    assert stats.retries == 2
    assert stats.delivered == {"pagerduty": 1, "webhook": 1}
    assert len(snapshots) == 2
    assert all(offset == -1 for snap in snapshots for offset in snap.values())
    assert_all_committed(kafka_settings)


def test_a_permanent_4xx_is_logged_and_skipped(kafka_settings: Settings, recorder: Recorder,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tally.alerts")
    recorder.answer[HOOK] = 400
    publish(kafka_settings, [alert_record()])

    stats = run_bounded(kafka_settings, config_for(recorder, "webhook", "pagerduty"), 1)

    assert len(recorder.got(HOOK, ok_only=False)) == 1
    assert len(recorder.got(PD)) == 1
    assert stats.rejected == {"webhook": 1}
    assert "sink webhook rejected trigger of " + KEY in caplog.text
    assert "HTTP 400" in caplog.text
    assert "SECRET" not in caplog.text
    assert_all_committed(kafka_settings)


def test_restart_mid_incident_neither_repeats_nor_loses_a_page(kafka_settings: Settings,
                                                               recorder: Recorder) -> None:
    config = config_for(recorder, "pagerduty", "slack")
    publish(kafka_settings, [alert_record()])
    run_bounded(kafka_settings, config, 1)
    assert [r.body["event_action"] for r in recorder.got(PD)] == ["trigger"]
    assert list(load_incidents(state_path(kafka_settings))) == [KEY]
    assert_all_committed(kafka_settings)

    publish(kafka_settings, [alert_record()], [alert_record(state="resolved")])
    stats = run_bounded(kafka_settings, config, 2)

    assert stats.suppressed == 1
    assert [(r.body["event_action"], r.body["dedup_key"]) for r in recorder.got(PD)] == [
        ("trigger", KEY), ("resolve", KEY)]
    assert len(recorder.got(SLACK)) == 2
    assert load_incidents(state_path(kafka_settings)) == {}
    assert_all_committed(kafka_settings)


def test_stopped_while_a_sink_is_down_the_page_comes_after_restart(kafka_settings: Settings,
                                                                  recorder: Recorder) -> None:
    stop = threading.Event()

    def stop_after_two_failures(request: Request) -> None:
        if len(recorder.got(PD, ok_only=False)) >= 2:
            stop.set()

    recorder.fail[PD] = 1_000
    recorder.on_request = stop_after_two_failures
    publish(kafka_settings, [alert_record()])
    stats = run_bounded(kafka_settings, config_for(recorder, "pagerduty"), 1, stop=stop)

    assert stats.delivered == {}
    assert recorder.got(PD) == []
    assert all(offset == -1 for offset in committed(kafka_settings).values())
    assert not state_path(kafka_settings).exists()

    recorder.fail[PD] = 0
    recorder.on_request = None
    run_bounded(kafka_settings, config_for(recorder, "pagerduty"), 1)

    assert [r.body["event_action"] for r in recorder.got(PD)] == ["trigger"]
    assert list(load_incidents(state_path(kafka_settings))) == [KEY]
    assert_all_committed(kafka_settings)
