import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import orjson
import pytest

from ops.kafka_admin import end_offsets
from ops.simulate import TrafficGenerator, catalog_from_reference
from tally.reference import load_reference_files
from tally.sdk.publisher import Publisher
from tests.e2e.conftest import EXAMPLES, REFERENCE_FILES, REPO

pytestmark = pytest.mark.e2e



def test_two_process_workers_one_sink_kill_9_and_a_clean_leave(stack, tmp_path):
    """Scale-out on one machine: process workers share the input partitions (and the fold state); one sink owns
    chDB. 50k logical requests stream in; one process worker is killed with SIGKILL mid-stream and restarted, later
    one leaves cleanly (a rebalance). Every event and every logical request lands exactly once."""
    stack.tally("up", "--role", "sink", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))

    def start(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "--role", "process"], env=stack.env,
                                cwd=REPO, stdout=(tmp_path / f"p{i}.log").open("ab"), stderr=subprocess.STDOUT)

    workers = [start(0), start(1)]
    try:
        gen = TrafficGenerator(catalog_from_reference(load_reference_files(REFERENCE_FILES)), seed=41,
                               bad_rate=0.0, rate=40.0, start=datetime(2026, 11, 15, tzinfo=UTC))
        requests = [gen.logical_request() for _ in range(50_000)]
        # In timestamp order, the attempts of a multi-attempt request are spread over many messages and batches,
        # so fold state is in flight when the worker dies.
        events = sorted((e for r in requests for e in r), key=lambda e: e["timestamp"])
        with Publisher(stack.settings.kafka_bootstrap, stack.settings.topics.usage) as pub:
            for i, e in enumerate(events):
                pub.publish(e)
                if i % 2000 == 1999:
                    time.sleep(0.1)
                if i == 20_000:
                    time.sleep(5)  # both workers have joined and are consuming by now
                    workers[0].kill()  # SIGKILL: no commit, no leave; its partitions move after the session timeout
                    workers[0].wait(timeout=30)
                    workers[0] = start(0)
                if i == 45_000:
                    pub.flush()
                    time.sleep(3)
                    workers[1].send_signal(signal.SIGTERM)  # a clean leave: its partitions move over
        assert workers[1].wait(timeout=60) == 0
        stack.tally("wait", "--timeout", "400", timeout=450)
        stack.assert_matches_ground_truth(events)
        stack.assert_requests_match_ground_truth(events)
        multi = stack.query("SELECT toInt64(sum(sign)) AS n FROM tally.logical_requests WHERE attempts > 1")[0]["n"]
        assert multi > 5000
        # the fold really kept state in its changelog (requests open across batches, then expired)
        assert sum(end_offsets(stack.settings.kafka_bootstrap, stack.settings.topics.fold_state).values()) > 1000
        # both process workers did part of the work
        logs = [(tmp_path / f"p{i}.log").read_text(errors="replace") for i in range(2)]
        assert all("llm.usage.v1" in log for log in logs)
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
                w.wait(timeout=60)


def test_a_second_sink_on_the_same_chdb_directory_fails_clearly(stack):
    stack.tally("up", "--role", "sink", timeout=180)
    proc = stack.tally("worker", "--role", "sink", check=False, timeout=120)
    assert proc.returncode == 2
    assert "in use by process" in proc.stderr.decode()


def test_plain_producer_one_event_messages_and_a_wrong_key(stack):
    """Any Kafka producer works: one JSON event per message, keyed by the logical id with murmur2."""
    from confluent_kafka import Producer

    from tally.partitioning import partition_for

    stack.tally("up", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    gen = TrafficGenerator(catalog_from_reference(load_reference_files(REFERENCE_FILES)), seed=5, bad_rate=0.0,
                           start=datetime(2026, 11, 20, tzinfo=UTC))
    events = [orjson.loads(line) for line in gen.lines(2000)]
    p = Producer({"bootstrap.servers": stack.settings.kafka_bootstrap, "partitioner": "murmur2_random"})
    for e in events:
        p.produce(stack.settings.topics.usage, key=(e.get("parent_request_id") or e["request_id"]).encode(),
                  value=orjson.dumps(e))
    stray = {**events[0], "event_id": "stray-1", "request_id": "stray-request", "parent_request_id": None}
    right = partition_for("stray-request", stack.settings.partitions)
    p.produce(stack.settings.topics.usage, value=orjson.dumps(stray), partition=(right + 1) % 4)
    assert p.flush(30) == 0
    stack.tally("wait", "--timeout", "180", timeout=240)
    n = stack.query("SELECT uniqExact(event_id) AS u, count() AS n FROM tally.usage_events")[0]
    assert n == {"u": len(events), "n": len(events)}
    dlq = orjson.loads(stack.tally("dlq", "show", "--format", "json").stdout)
    assert dlq["by_reason"] == {"wrong_partition": 1}
    assert dlq["recent"][0]["event_id"] == "stray-1"
