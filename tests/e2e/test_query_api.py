"""The worker's query API on a live stack, as an attacker and an impatient analyst would use it."""

import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from ops.simulate import TrafficGenerator, catalog_from_reference
from tally.reference import load_reference_files
from tally.sdk.publisher import Publisher
from tests.e2e.conftest import EXAMPLES, REFERENCE_FILES

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token-0f3c9a"  # noqa: S105 - a test's own token


def _post(url: str, sql: str, token: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=orjson.dumps({"sql": sql}), method="POST",
                                 headers={"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - the test's own loopback worker
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_the_query_api_refuses_strangers_and_the_host_and_cuts_a_query_that_would_starve_the_ledger(stack):
    stack.env.update({"TALLY_API_TOKEN": TOKEN, "TALLY_QUERY_MAX_EXECUTION_S": "3"})
    stack.tally("up", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    url = f"{stack.settings.web_url}/api/query"
    gen = TrafficGenerator(catalog_from_reference(load_reference_files(REFERENCE_FILES)), seed=13, bad_rate=0.0,
                           rate=20.0, start=datetime.now(UTC) - timedelta(hours=1))
    events = [orjson.loads(line) for line in gen.lines(6000)]

    def produce() -> None:
        with Publisher(stack.settings.kafka_bootstrap, stack.settings.topics.usage) as pub:
            for i, e in enumerate(events):
                pub.publish(e)
                if i % 1000 == 999:
                    time.sleep(0.5)

    producer = threading.Thread(target=produce)
    producer.start()

    # no token, a wrong token: refused before any SQL is read; the status endpoint too
    assert _post(url, "SELECT 1", None)[0] == 401
    assert _post(url, "SELECT 1", "wrong")[0] == 401
    with pytest.raises(urllib.error.HTTPError) as status:
        urllib.request.urlopen(f"{stack.settings.web_url}/api/status", timeout=10)  # noqa: S310
    assert status.value.code == 401
    # the host's files and network are not tally's data
    for probe in ("SELECT * FROM file('/etc/passwd', 'LineAsString')",
                  "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
                  "SELECT * FROM system.disks", "SELECT 1; DROP TABLE tally.usage_events"):
        code, body = _post(url, probe, TOKEN)
        assert code == 400 and "error" in body, (probe, code, body)
    # queries that would run for minutes are cut at the limit, and a third at once waits its turn (429)
    deadline = time.monotonic() + 120
    while stack.query("SELECT count() AS n FROM tally.usage_events")[0]["n"] < 1000 and time.monotonic() < deadline:
        time.sleep(1)
    heavy = ("SELECT sum(cityHash64(a.event_id, b.event_id, c.event_id)) FROM tally.usage_events AS a "
             "CROSS JOIN tally.usage_events AS b CROSS JOIN tally.usage_events AS c")  # ~10^9+ rows of work
    results: list[tuple[int, dict, float]] = []

    def ask() -> None:
        started = time.monotonic()
        code, body = _post(url, heavy, TOKEN)
        results.append((code, body, time.monotonic() - started))

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(timeout=60)
    codes = sorted(code for code, _, _ in results)
    assert codes in ([400, 400, 400], [400, 400, 429]), results
    assert all(s < 30 for _, _, s in results), results
    cut = [body["error"] for code, body, _ in results if code == 400]
    assert cut and all("imeout" in e or "limit" in e for e in cut), results

    # the ledger went on meanwhile: every event lands, exactly once, with the token-carrying CLI
    producer.join(timeout=120)
    stack.tally("wait", "--timeout", "240", timeout=300)
    stack.assert_matches_ground_truth(events)
    assert stack.query("SELECT count() AS n FROM tally.usage_events")[0]["n"] == len(events)
