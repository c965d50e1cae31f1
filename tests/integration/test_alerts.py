"""`run_alerts` against a real broker and local HTTP sinks: one page per incident, retries, restarts, no lost pages."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from ops.alerts import AlertsConfig, AlertsStats, dumps, load_incidents, load_state, run_alerts, state_path
from ops.kafka_admin import committed_offsets, end_offsets
from tally.config import Settings
from tally.failpoints import EXIT_FAILPOINT
from tests.conftest import TEST_PARTITIONS
from tests.factories import ALERT_KEY as KEY
from tests.factories import alert_record

pytestmark = pytest.mark.integration

ROUTING_KEY = "rk-SECRET-0001"
PD, SLACK, HOOK = "/pd", "/slack/T000/SECRET-slack", "/hook/SECRET-hook"
RUN_TIMEOUT_S = 15.0
REPO = Path(__file__).resolve().parents[2]


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
    # The decision, its position and the undelivered trigger are saved: the restart delivers it before consuming.
    saved = load_state(state_path(kafka_settings))
    assert list(saved.incidents) == [KEY]
    assert [(e.action, e.pending) for e in saved.outbox] == [("trigger", ["pagerduty"])]
    assert saved.positions == stored_ends(kafka_settings)

    recorder.fail[PD] = 0
    recorder.on_request = None
    again = run_bounded(kafka_settings, config_for(recorder, "pagerduty"), 0)

    assert (again.recovered, again.messages) == (1, 0)
    assert [r.body["event_action"] for r in recorder.got(PD)] == ["trigger"]
    assert load_state(state_path(kafka_settings)).outbox == []

    publish(kafka_settings, [alert_record(state="resolved")])
    run_bounded(kafka_settings, config_for(recorder, "pagerduty"), 1)
    assert [r.body["event_action"] for r in recorder.got(PD)] == ["trigger", "resolve"]
    assert load_incidents(state_path(kafka_settings)) == {}
    assert_all_committed(kafka_settings)


def stored_ends(settings: Settings) -> dict[tuple[str, int], int]:
    """The end offset of every non-empty partition of the alert topic, keyed as the stored positions are."""
    ends = end_offsets(settings.kafka_bootstrap, settings.topics.alerts)
    return {(settings.topics.alerts, p): end for p, end in ends.items() if end}


def unread(settings: Settings) -> int:
    """Messages of the alert topic past the positions stored in the incident table."""
    positions = load_state(state_path(settings)).positions
    ends = end_offsets(settings.kafka_bootstrap, settings.topics.alerts)
    return sum(end - positions.get((settings.topics.alerts, p), 0) for p, end in ends.items())


def test_the_stored_position_wins_over_a_committed_offset_that_went_back(kafka_settings: Settings,
                                                                         recorder: Recorder) -> None:
    config = config_for(recorder, "pagerduty")
    publish(kafka_settings, [alert_record()], [alert_record(incident_key="budget:tenant:t-1:d:80", kind="budget",
                                                            feature_id="", signal="budget_day_80pct")])
    run_bounded(kafka_settings, config, 2)
    assert load_state(state_path(kafka_settings)).positions == stored_ends(kafka_settings)
    # As if the commit had failed, or the group were reset: Kafka says "start over".
    group = Consumer({"bootstrap.servers": kafka_settings.kafka_bootstrap,
                      "group.id": kafka_settings.group_id("alerts"), "enable.auto.commit": False})
    try:
        group.commit(offsets=[TopicPartition(kafka_settings.topics.alerts, p, 0) for p in range(TEST_PARTITIONS)],
                     asynchronous=False)
    finally:
        group.close()
    assert all(offset == 0 for offset in committed(kafka_settings).values())

    publish(kafka_settings, [alert_record(state="resolved")])
    stats = run_bounded(kafka_settings, config, 1)

    assert (stats.messages, stats.records) == (1, 1)  # only the new message: nothing is read twice
    assert [(r.body["event_action"], r.body["dedup_key"]) for r in recorder.got(PD)] == [
        ("trigger", KEY), ("trigger", "budget:tenant:t-1:d:80"), ("resolve", KEY)]
    assert_all_committed(kafka_settings)


# ---------------------------------------------------------------- crashes at every alerts failpoint

B_KEY, C_KEY = "anomaly:search_answer:reasoning_share", "anomaly:summarize:cost_per_request"
CRASH_MESSAGES: list[list[dict[str, Any] | bytes]] = [
    [alert_record()],  # A opens
    [alert_record(incident_key=B_KEY, signal="reasoning_share"), alert_record(score=7)],  # B opens; A suppressed
    [alert_record(incident_key=C_KEY, feature_id="summarize"),  # C opens and resolves in one batch
     alert_record(incident_key=C_KEY, feature_id="summarize", state="resolved")],
    [alert_record(state="resolved"), alert_record(incident_key=B_KEY, signal="reasoning_share", state="resolved")],
]
# What each sink receives, per message, with no crash; sinks answer in the order pagerduty then webhook per batch.
CRASH_NOTES = [[("trigger", KEY)], [("trigger", B_KEY)], [("trigger", C_KEY), ("resolve", C_KEY)],
               [("resolve", KEY), ("resolve", B_KEY)]]
CRASH_SINKS = ("pagerduty", "webhook")


def _answers() -> list[tuple[str, str, str]]:
    """(sink, action, key) in the order the sinks answer them when each message is a batch of its own."""
    return [(sink, action, key) for notes in CRASH_NOTES for sink in CRASH_SINKS for action, key in notes]


def _crash_then_restart(settings: Settings, recorder: Recorder, failpoint: str, tmp_path: Path) -> AlertsStats:
    """`tally alerts` in a subprocess armed with `failpoint`, fed one message per batch until it crashes; then the
    rest published and a restart (in this process) until the stored position reaches the end."""
    cmd = [sys.executable, "-m", "ops.cli", "alerts", "--max-messages", str(len(CRASH_MESSAGES)),
           "--pagerduty-url", recorder.url(PD), "--pagerduty-routing-key", ROUTING_KEY,
           "--webhook-url", recorder.url(HOOK), *(arg for sink in CRASH_SINKS for arg in ("--sink", sink))]
    env = {**os.environ, **settings.to_env(), "TALLY_FAILPOINT": failpoint}
    answers = list(itertools.accumulate(len(CRASH_SINKS) * len(notes) for notes in CRASH_NOTES))
    with (tmp_path / "crashed.log").open("wb") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        try:
            published = 0
            for message, expect in zip(CRASH_MESSAGES, answers, strict=True):
                if proc.poll() is not None:
                    break
                publish(settings, message)
                published += 1
                deadline = time.monotonic() + 60  # the next message only once this one is a batch of its own
                while len(recorder.requests) < expect and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log_text = (tmp_path / "crashed.log").read_text()
    assert code == EXIT_FAILPOINT, log_text[-2000:]
    assert f"failpoint {failpoint.partition(':')[0]} fired" in log_text
    publish(settings, *CRASH_MESSAGES[published:])
    return run_bounded(settings, config_for(recorder, *CRASH_SINKS), unread(settings))


@pytest.mark.parametrize(("failpoint", "resent"), [
    ("alerts.after_save:1", None),  # the first batch decided and saved, nothing delivered
    ("alerts.after_save:3", None),  # C's trigger and resolve saved in the outbox, neither delivered
    ("alerts.in_flight:1", 1),  # PagerDuty took A's trigger; the answer is not recorded: that one page again
    ("alerts.in_flight:5", 5),  # PagerDuty took C's trigger, not recorded: again, then C's resolve
    ("alerts.in_flight:6", 6),  # PagerDuty took C's resolve, not recorded: the resolve again, never the trigger
    ("alerts.in_flight:8", 8),  # the webhook took C's resolve, not recorded
    ("alerts.mid_batch:3", None),  # C's trigger delivered to PagerDuty and recorded; the rest not
    ("alerts.after_delivery:1", None),  # A's batch delivered and recorded; offsets not committed
    ("alerts.after_delivery:3", None),  # C's trigger and resolve delivered: before, both were sent again
])
def test_a_crash_at_each_alerts_failpoint_pages_once_and_resolves_once(
        failpoint: str, resent: int | None, kafka_settings: Settings, recorder: Recorder, tmp_path: Path) -> None:
    settings = dataclasses.replace(kafka_settings, session_timeout_s=6.0)  # the broker's minimum: a quick rejoin
    stats = _crash_then_restart(settings, recorder, failpoint, tmp_path)

    expected = _answers()
    if resent is not None:  # the one notification in flight at the crash, sent once more right after
        expected.insert(resent, expected[resent - 1])
    got = [("pagerduty", r.body["event_action"], r.body["dedup_key"]) for r in recorder.got(PD)]
    got += [("webhook", r.body["notification"], r.body["incident_key"]) for r in recorder.got(HOOK)]
    for sink in CRASH_SINKS:
        assert [a for a in got if a[0] == sink] == [a for a in expected if a[0] == sink]
    assert len(recorder.requests) == len(expected)
    # PagerDuty's count: a trigger opens an incident unless its dedup_key is open; a resolve closes an open one.
    open_keys: set[str] = set()
    pages: Counter[str] = Counter()
    resolves: Counter[str] = Counter()
    for _, action, key in (a for a in got if a[0] == "pagerduty"):
        if action == "trigger" and key not in open_keys:
            open_keys.add(key)
            pages[key] += 1
        elif action == "resolve" and key in open_keys:
            open_keys.discard(key)
            resolves[key] += 1
    assert pages == resolves == Counter({KEY: 1, B_KEY: 1, C_KEY: 1})
    assert open_keys == set()
    saved = load_state(state_path(settings))
    assert (saved.incidents, saved.outbox) == ({}, [])
    assert saved.positions == stored_ends(settings)
    assert (stats.recovered > 0) == (not failpoint.startswith("alerts.after_delivery"))
