"""Operating a live default stack (the sink and a process worker, each an OS process): /metrics, /livez, /readyz.

The metrics are scraped as Prometheus scrapes them and parsed with the client library's own parser; their values
are checked against what was published.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.simulate import TrafficGenerator, catalog_from_reference
from tally.reference import load_reference_files
from tally.sdk.publisher import Publisher
from tests.conftest import free_ports
from tests.e2e.conftest import EXAMPLES, REFERENCE_FILES

pytestmark = pytest.mark.e2e

TOKEN = "e2e-metrics-token-5b1d"  # noqa: S105 - a test's own token


def get(url: str, token: str | None = TOKEN) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the test's own loopback worker
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, parsed by prometheus_client: (name, sorted labels) → value."""
    status, body, content_type = get(url)
    assert status == 200 and content_type.startswith("text/plain"), (status, body[:200])
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def named(got: dict[tuple[str, tuple[tuple[str, str], ...]], Any], name: str) -> dict[tuple[tuple[str, str], ...], Any]:
    return {labels: v for (n, labels), v in got.items() if n == name}


def test_every_worker_serves_metrics_and_probes_that_match_what_it_did(stack):
    process_port = free_ports(1)[0]
    stack.env.update({"TALLY_API_TOKEN": TOKEN, "TALLY_PROCESS_WEB_PORT": str(process_port)})
    started = time.time()
    stack.tally("up", "--workers", "1", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    sink_url, process_url = stack.settings.web_url, f"http://127.0.0.1:{process_port}"
    gen = TrafficGenerator(catalog_from_reference(load_reference_files(REFERENCE_FILES)), seed=5, bad_rate=0.0,
                           start=datetime.now(UTC) - timedelta(hours=1))
    events = [orjson.loads(line) for line in gen.lines(1500)]
    bad = [{**e, "event_id": f"bad-{i}"} for i, e in enumerate(events[:7])]
    for b in bad:
        del b["usage"]  # missing_field
    with Publisher(stack.settings.kafka_bootstrap, stack.settings.topics.usage) as pub:
        for e in events + bad:
            pub.publish(e)
    stack.tally("wait", "--timeout", "180", timeout=240)

    # the probes answer without a token; both workers are alive and ready once caught up
    for url in (sink_url, process_url):
        status, body, _ = get(f"{url}/livez", token=None)
        assert status == 200 and orjson.loads(body)["ok"] is True
        deadline = time.monotonic() + 60
        while True:
            status, body, _ = get(f"{url}/readyz", token=None)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        ready = orjson.loads(body)
        assert status == 200 and ready["ok"] is True, ready
        assert "partitions_assigned" in {c["check"] for c in ready["checks"]}
    checks = {url: {c["check"] for c in orjson.loads(get(f"{url}/readyz", None)[1])["checks"]}
              for url in (sink_url, process_url)}
    assert checks == {sink_url: {"partitions_assigned", "sink_caught_up"},
                      process_url: {"reference_data", "partitions_assigned"}}
    # only tally's pages: Faust's built-in pages would serve the workers' state (open requests, detector snapshots)
    for url in (sink_url, process_url):
        for page in ("/table/", "/router/", "/graph/", "/stats/"):
            assert get(f"{url}{page}")[0] == 404, (url, page)
    # the metrics need the API's token, as /api/status does
    assert get(f"{sink_url}/metrics", token=None)[0] == 401
    assert get(f"{process_url}/metrics", token="wrong-token-0000000")[0] == 401

    processed = samples(f"{process_url}/metrics")
    assert value(processed, "tally_events_total", role="process", outcome="accepted") == len(events)
    assert value(processed, "tally_events_total", role="process", outcome="rejected") == len(bad)
    assert value(processed, "tally_dead_letters_total", role="process", reason="missing_field") == len(bad)
    assert value(processed, "tally_reference_ready", role="process") == 1
    lags = named(processed, "tally_consumer_lag_messages")
    assert lags and all(v == 0 for v in lags.values())  # caught up (tally wait returned)
    assert {dict(k)["stage"] for k in lags} == {"fold", "detect", "otlp"}
    assert value(processed, "tally_batch_seconds_count", role="process", stage="process") > 0
    assert value(processed, "tally_fold_state_entries") >= 0
    assert value(processed, "tally_detect_requests_total") > 0
    assert value(processed, "tally_event_loop_silent_seconds", role="process") < 5

    sunk = samples(f"{sink_url}/metrics")
    inserted = value(sunk, "tally_sink_rows_inserted_total", table="usage_events")
    assert inserted == len(events) == stack.query("SELECT count() AS n FROM tally.usage_events")[0]["n"]
    requests = stack.query("SELECT count() AS n FROM tally.logical_requests")[0]["n"]
    assert value(sunk, "tally_sink_rows_inserted_total", table="logical_requests") == requests
    assert value(sunk, "tally_sink_insert_seconds_count", table="usage_events") > 0
    assert value(sunk, "tally_sink_last_insert_timestamp_seconds", table="usage_events") >= started
    sink_lags = named(sunk, "tally_consumer_lag_messages")
    assert sink_lags and all(v == 0 for v in sink_lags.values())
    assert not named(sunk, "tally_reference_ready")  # a sink reads no price cards
