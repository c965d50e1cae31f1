"""The metrics registry and the health verdicts (the live pages: tests/e2e/test_operations.py)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from streams.metrics import Check, Heartbeat, WorkerMetrics, counter, gauge, verdict


def test_sources_are_read_at_scrape_time_and_parse_as_prometheus_text() -> None:
    m = WorkerMetrics("process")
    seen = {"accepted": 0}
    m.add(lambda: [counter("tally_events", "events", [({"outcome": "accepted"}, seen["accepted"]),
                                                      ({"outcome": "rejected"}, 2)], ("outcome",)),
                   gauge("tally_consumer_lag_messages", "lag", [({"partition": "0"}, 5.0)], ("partition",))])
    m.batch_seconds.labels(role="process", stage="process").observe(0.02)
    seen["accepted"] = 41  # moved after registration: the scrape reads the value of now
    body, content_type = m.exposition()
    assert content_type.startswith("text/plain")
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert got[("tally_events_total", (("outcome", "accepted"),))] == 41
    assert got[("tally_events_total", (("outcome", "rejected"),))] == 2
    assert got[("tally_consumer_lag_messages", (("partition", "0"),))] == 5
    assert got[("tally_batch_seconds_count", (("role", "process"), ("stage", "process")))] == 1
    assert got[("tally_batch_seconds_bucket", (("le", "0.025"), ("role", "process"), ("stage", "process")))] == 1


def test_liveness_fails_once_the_loop_has_been_silent_and_readiness_names_the_failing_check() -> None:
    beat = Heartbeat()
    assert beat.silent_for(now=100.0) == 0.0  # not started: starting, not stuck
    beat.beat(now=100.0)
    assert beat.silent_for(now=131.0) == 31.0
    status, body = verdict([Check("event_loop", beat.silent_for(now=131.0) < 30.0, "silent")])
    assert (status, body["ok"]) == (503, False)
    status, body = verdict([Check("reference_data", True, "loaded"), Check("sink_caught_up", False, "9 behind")])
    assert status == 503 and [c["check"] for c in body["checks"] if not c["ok"]] == ["sink_caught_up"]
    assert verdict([Check("partitions_assigned", True, "4")])[0] == 200


def test_the_alert_consumer_serves_its_counters_while_it_runs() -> None:
    import urllib.request

    from ops.alerts import AlertsStats, serve_metrics
    from tests.conftest import free_ports

    stats = AlertsStats()
    port = free_ports(1)[0]
    server = serve_metrics(stats, "127.0.0.1", port)
    try:
        stats.messages, stats.records, stats.malformed = 12, 10, 2
        stats.notifications["trigger"] = 3
        stats.delivered["pagerduty"] = 3
        stats.open_incidents = 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # noqa: S310
            text = resp.read().decode()
    finally:
        server.shutdown()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    assert got[("tally_alerts_messages_total", ())] == 12
    assert got[("tally_alerts_records_total", (("verdict", "malformed"),))] == 2
    assert got[("tally_alerts_notifications_total", (("action", "trigger"),))] == 3
    assert got[("tally_alerts_delivered_total", (("sink", "pagerduty"),))] == 3
    assert got[("tally_alerts_open_incidents", ())] == 1
