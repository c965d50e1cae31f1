import base64
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import orjson
import pytest

from ops.simulate import TrafficGenerator, catalog_from_reference
from ops.stack import default_workers
from streams.records import Rejection
from streams.validate import Validator
from tally.reference import load_reference_files
from tally.sdk.publisher import Publisher
from tests.e2e.conftest import EXAMPLES, REFERENCE_FILES
from tests.factories import malformed_lines
from tests.rerate import Oracle

pytestmark = pytest.mark.e2e



def test_publish_wait_query_exactly_once_with_exact_costs(stack, tmp_path):
    oracle = Oracle(REFERENCE_FILES)
    docs = load_reference_files(REFERENCE_FILES)
    # ~10k lines spanning the 2026-11-01 price-card change: 9,400 good lines, 3 % duplicated, a spread of bad ones.
    gen = TrafficGenerator(catalog_from_reference(docs), seed=11, bad_rate=0.0, rate=2.0,
                           start=datetime(2026, 10, 31, 22, 45, tzinfo=UTC))
    good = [orjson.loads(line) for line in gen.lines(9400)]
    rng = random.Random(3)
    lines = [orjson.dumps(e) for e in good]
    dupes = rng.sample(lines, len(lines) * 3 // 100)
    bad = [pair for k in range(12) for pair in malformed_lines(good[0], k)]
    all_lines = lines + dupes + [b for b, _ in bad]
    rng.shuffle(all_lines)
    path = tmp_path / "traffic.jsonl"
    path.write_bytes(b"\n".join(all_lines) + b"\n")

    # the default stack: the sink and the process workers, each an OS process of its own
    info = orjson.loads(stack.tally("up", timeout=180).stdout)
    assert [w["role"] for w in info["workers"]] == ["sink"] + ["process"] * default_workers()
    status = stack.tally("status").stdout.decode()
    assert all(f"worker {w['name']}" in status for w in info["workers"])
    stack.tally("reference", "load", str(EXAMPLES))
    out = stack.tally("publish", str(path))
    assert f"published {len(all_lines):,} lines" in out.stderr.decode()
    stack.tally("wait", "--timeout", "240", timeout=300)

    # every good event exactly once, with exactly the independently computed cost
    rows = stack.query("SELECT event_id, toString(cost_total_usd) AS cost, team_id, price_card_version "
                       "FROM tally.usage_events")
    got = {r["event_id"]: r for r in rows}
    assert len(rows) == len(got) == len(good)
    expected_team: dict[str, Fraction] = defaultdict(Fraction)
    versions: Counter[str] = Counter()
    for e in good:
        ts = datetime.fromisoformat(e["timestamp"])
        want = oracle.cost(e, ts)
        row = got[e["event_id"]]
        assert Fraction(Decimal(row["cost"])) == want, (e, row)
        assert row["team_id"] == oracle.team(e, ts), (e, row)
        expected_team[row["team_id"]] += want
        versions["2026-11-01" if ts >= datetime(2026, 11, 1, tzinfo=UTC) else "2025-10-01"] += 1
    assert Counter(r["price_card_version"] for r in rows) == versions
    assert min(versions.values()) > 500  # both card versions really priced something

    by_team = stack.query("SELECT team_id, toString(sum(cost_total_usd)) AS total FROM tally.usage_events "
                          "GROUP BY team_id")
    assert {r["team_id"]: Fraction(Decimal(r["total"])) for r in by_team} == dict(expected_team)

    # every bad line is in the DLQ with the right reason and its original bytes
    dlq = orjson.loads(stack.tally("dlq", "show", "--format", "json", "--limit", "1000").stdout)
    assert dlq["by_reason"] == dict(Counter(reason for _, reason in bad))
    originals = Counter(base64.b64decode(r["original_b64"]) for r in dlq["recent"])
    # byte for byte, but for the values of fields event v1 does not have (dlq_redact_fields, default "unknown")
    stored = Validator().redact
    assert originals == Counter(stored(Rejection(r, "validate", "", b, None, None)).raw for b, r in bad)
    assert not any(b"secret prompt" in o for o in originals)
    assert all(r["source_topic"] == stack.settings.topics.usage and r["source_line"] >= 1 for r in dlq["recent"])
    at = [r["rejected_at"] for r in dlq["recent"]]
    assert at == sorted(at, reverse=True)  # newest first

    # replaying the DLQ after a fix lands the fixed lines once; replaying again changes nothing
    stack.tally("dlq", "replay", "--reason", "unknown_field", "--unset", "prompt")
    stack.tally("wait", "--timeout", "120")
    stack.tally("dlq", "replay", "--reason", "unknown_field", "--unset", "prompt")
    stack.tally("wait", "--timeout", "120")
    n = stack.query("SELECT count() AS n FROM tally.usage_events")[0]["n"]
    assert n == len(good) + 12  # 12 fixed lines landed once each, the second replay changed nothing


def test_kill_9_three_times_while_streaming(stack):
    docs = load_reference_files(REFERENCE_FILES)
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    gen = TrafficGenerator(catalog_from_reference(docs), seed=29, bad_rate=0.0, rate=50.0,
                           start=datetime(2026, 11, 10, tzinfo=UTC))
    events = [orjson.loads(line) for line in gen.lines(100_000)]
    done = threading.Event()

    def produce() -> None:
        with Publisher(stack.settings.kafka_bootstrap, stack.settings.topics.usage) as pub:
            for i, e in enumerate(events):
                pub.publish(e)
                if i % 2000 == 1999:
                    time.sleep(0.05)  # ~40 s of streaming at this machine's pace
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    kills = 0
    deadline = time.monotonic() + 300
    while kills < 3 and time.monotonic() < deadline:
        time.sleep(6)
        os.kill(stack.worker_pid(), signal.SIGKILL)
        kills += 1
        time.sleep(1)
        stack.tally("up", "--role", "all", timeout=180)
    producer.join(timeout=300)
    assert done.is_set() and kills == 3
    stack.tally("wait", "--timeout", "400", timeout=450)
    stack.assert_matches_ground_truth(events)
    stack.assert_requests_match_ground_truth(events)
    stack.tally("verify")


def _commit_to_end(bootstrap: str, group: str, topic: str) -> int:
    """Commit `group`'s offsets of every partition of `topic` at its end, as a commit past unread input would.

    Returns how many messages the commit skips past that the group had not committed before.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        before = {tp.partition: tp.offset for tp in consumer.committed(
            [TopicPartition(topic, p) for p in parts], timeout=30)}
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts}
        consumer.commit(offsets=[TopicPartition(topic, p, end) for p, end in ends.items()], asynchronous=False)
        return sum(end - max(before[p], 0) for p, end in ends.items())
    finally:
        consumer.close()


def test_a_commit_past_unprocessed_input_loses_nothing(stack):
    """Kafka's committed offsets are a lag hint: the worker resumes from the positions it stored with its state."""
    docs = load_reference_files(REFERENCE_FILES)
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    gen = TrafficGenerator(catalog_from_reference(docs), seed=5, bad_rate=0.0, rate=20.0,
                           start=datetime.now(UTC) - timedelta(hours=2))
    events = [orjson.loads(line) for line in gen.lines(6000)]
    settings = stack.settings
    with Publisher(settings.kafka_bootstrap, settings.topics.usage) as pub:
        for e in events[:3000]:
            pub.publish(e)
    stack.tally("wait", "--timeout", "240", timeout=300)
    stack.tally("down", timeout=120)
    with Publisher(settings.kafka_bootstrap, settings.topics.usage) as pub:  # while no worker runs
        for e in events[3000:]:
            pub.publish(e)
    skipped = _commit_to_end(settings.kafka_bootstrap, settings.group_id("all"), settings.topics.usage)
    assert skipped > 0  # the group's committed offsets now claim the unread half is done
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("wait", "--timeout", "240", timeout=300)
    stack.assert_matches_ground_truth(events)
    stack.assert_requests_match_ground_truth(events)
    stack.tally("verify")
