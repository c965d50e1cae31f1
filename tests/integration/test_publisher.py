"""The SDK Publisher against a real broker: partitions, NDJSON messages, keys, and delivery failures."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from tally.config import Settings
from tally.errors import PublishError
from tally.partitioning import logical_id, partition_for, partition_for_bytes
from tally.sdk.events import usage_event
from tally.sdk.normalize import from_openai_chat
from tally.sdk.publisher import Publisher
from tests.conftest import free_ports

pytestmark = pytest.mark.integration

PARTITIONS = 4


def consume_all(bootstrap: str, topic: str, expected_lines: int, timeout: float = 60.0) -> list[Message]:
    """Read every partition of `topic` from the beginning until `expected_lines` NDJSON lines have arrived."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    messages: list[Message] = []
    lines = 0
    deadline = time.monotonic() + timeout
    try:
        while lines < expected_lines and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                assert msg.error() is None, msg.error()
                messages.append(msg)
                value = msg.value()
                assert value is not None
                lines += len(value.split(b"\n"))
    finally:
        consumer.close()
    assert lines == expected_lines
    return messages


def _events(n: int) -> list[dict[str, object]]:
    usage = from_openai_chat({"prompt_tokens": 1200, "completion_tokens": 300,
                              "prompt_tokens_details": {"cached_tokens": 1024}})
    events = []
    for i in range(n):
        parent = f"logical-{i // 3}" if i % 2 else None  # some attempts share a logical request
        events.append(usage_event(request_id=f"req-{i}", parent_request_id=parent, attempt=i % 3,
                                  provider="openai", model_actual="gpt-4.1-mini", usage=usage,
                                  tags={"feature_id": "summarize", "team_id": "inbox"}))
    return events


def test_every_event_lands_on_its_logical_partition(kafka_settings: Settings) -> None:
    topic = kafka_settings.topics.usage
    events = _events(1200)
    with Publisher(kafka_settings.kafka_bootstrap, topic, max_message_events=100) as pub:
        assert pub.partitions == PARTITIONS  # read from the topic's metadata
        for event in events:
            pub.publish(event)
        # One lonely event for a fresh logical request: it forms a single-event message.
        lonely = usage_event(request_id=f"lonely-{uuid.uuid4().hex}", provider="openai",
                             model_actual="gpt-4.1-mini", usage=None)
        pub.flush()
        pub.publish(lonely)
    assert pub.stats.delivered_events == len(events) + 1
    assert pub.stats.failed_events == 0

    messages = consume_all(kafka_settings.kafka_bootstrap, topic, len(events) + 1)
    assert pub.stats.delivered_messages == len(messages)
    seen: dict[str, dict[str, object]] = {}
    multi = 0
    for msg in messages:
        value = msg.value()
        assert value is not None
        assert len(value) <= 512 * 1024
        lines = value.split(b"\n")
        for line in lines:
            event = orjson.loads(line)
            assert partition_for(logical_id(event), PARTITIONS) == msg.partition()
            seen[event["event_id"]] = event
        if len(lines) == 1:
            assert msg.key() == logical_id(orjson.loads(lines[0])).encode()
        else:
            multi += 1
            assert msg.key() is None
            assert len(lines) <= 100
    assert multi > 0
    assert seen == {e["event_id"]: e for e in [*events, lonely]}


def test_order_within_a_logical_request_is_kept(kafka_settings: Settings) -> None:
    topic = kafka_settings.topics.usage
    with Publisher(kafka_settings.kafka_bootstrap, topic, max_message_events=7) as pub:
        for attempt in range(50):
            pub.publish(usage_event(request_id=f"a{attempt}", parent_request_id="one-logical-request",
                                    attempt=attempt, provider="openai", model_actual="m", usage=None))
    messages = consume_all(kafka_settings.kafka_bootstrap, topic, 50)
    attempts = [orjson.loads(line)["attempt"] for m in messages for line in (m.value() or b"").split(b"\n")]
    assert attempts == list(range(50))
    assert {m.partition() for m in messages} == {partition_for("one-logical-request", PARTITIONS)}


def test_raw_lines_and_bad_lines_reach_the_topic(kafka_settings: Settings) -> None:
    topic = kafka_settings.topics.usage
    good = orjson.dumps(_events(1)[0])
    bad = b'{"this is": "not an event"'
    with Publisher(kafka_settings.kafka_bootstrap, topic, partitions=PARTITIONS) as pub:
        pub.publish_line(good + b"\n")
        pub.publish_line(bad + b"\r\n")
    messages = consume_all(kafka_settings.kafka_bootstrap, topic, 2)
    got = {line: m.partition() for m in messages for line in (m.value() or b"").split(b"\n")}
    assert got == {good: partition_for("req-0", PARTITIONS), bad: partition_for_bytes(bad, PARTITIONS)}


def test_partition_for_agrees_with_librdkafka_murmur2(kafka_settings: Settings) -> None:
    """A plain keyed producer (no explicit partition) puts each key where partition_for says."""
    topic = kafka_settings.topics.usage
    keys = [str(uuid.uuid4()) for _ in range(200)] + ["21", "foobar", "abc", "ünïcødé-key"]
    producer = Producer({"bootstrap.servers": kafka_settings.kafka_bootstrap,
                         "partitioner": "murmur2_random"})
    for key in keys:
        producer.produce(topic, key=key.encode(), value=b"{}")
    assert producer.flush(30) == 0
    messages = consume_all(kafka_settings.kafka_bootstrap, topic, len(keys))
    for msg in messages:
        raw_key = msg.key()
        assert isinstance(raw_key, bytes)
        assert msg.partition() == partition_for(raw_key.decode(), PARTITIONS)
    assert len({m.partition() for m in messages}) == PARTITIONS


def test_unknown_topic_fails_at_construction(kafka_settings: Settings) -> None:
    with pytest.raises(PublishError, match="not available"):
        Publisher(kafka_settings.kafka_bootstrap, f"{kafka_settings.topic_prefix}no.such.topic",
                  metadata_timeout_s=10)


def test_delivery_failure_to_a_missing_topic_raises_from_flush(kafka_settings: Settings) -> None:
    pub = Publisher(kafka_settings.kafka_bootstrap, f"{kafka_settings.topic_prefix}no.such.topic",
                    partitions=PARTITIONS, extra_config={"message.timeout.ms": 3000})
    for event in _events(10):
        pub.publish(event)
    with pytest.raises(PublishError, match="not delivered"):
        pub.flush(timeout=30)
    assert pub.stats.failed_events == 10
    assert pub.stats.delivered_events == 0


def test_delivery_failure_with_no_broker_raises_from_close() -> None:
    (port,) = free_ports(1)  # nothing listens there
    pub = Publisher(f"127.0.0.1:{port}", "llm.usage.v1", partitions=PARTITIONS,
                    extra_config={"message.timeout.ms": 1500})
    for event in _events(5):
        pub.publish(event)
    started = time.monotonic()
    with pytest.raises(PublishError, match="not delivered"):
        pub.close(timeout=30)
    assert time.monotonic() - started < 20
    assert pub.stats.failed_events == 5
    with pytest.raises(PublishError, match="closed"):
        pub.publish(_events(1)[0])
