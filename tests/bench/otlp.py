"""The OTLP path (issue 19): the bench's events as OTel GenAI spans, in the Collector's encodings, and their cost.

`spans_messages` turns pool events into OTLP traces messages of `per_message` spans (ops.otlp_traffic: one call span
per event, its parent span the event's logical request, usage and owner tags as span attributes), as the
Collector's Kafka exporter writes them. `measure_translate` times the otlp stage alone (decode + map + route), per
span, in both encodings; tests.bench.pipeline runs the same messages through the stack (`--only split`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer

from ops.otlp_traffic import traces_messages
from streams.otlp import OtlpConfig, translate_messages
from streams.records import Source
from tests.bench.common import EventPool


def spans_messages(pool: EventPool, start: int, count: int, per_message: int = 500,
                   encoding: str = "otlp_proto") -> list[bytes]:
    """Events start..start+count as OTLP traces messages of `per_message` spans (ops.otlp_traffic), as the
    Collector's Kafka exporter writes them in `encoding`."""
    events = (orjson.loads(pool.item(n)[0]) for n in range(start, start + count))
    return [value for value, _ in traces_messages(events, per_message, encoding, service="bench-gateway")]


def publish_otlp(bootstrap: str, topic: str, messages: list[bytes]) -> float:
    """Publish the messages as the Collector's Kafka exporter does (no key, acks from all); returns seconds."""
    failures: list[str] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None and len(failures) < 5:
            failures.append(f"{msg.topic()}[{msg.partition()}]: {err.str()}")

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "compression.type": "lz4", "linger.ms": 10, "message.max.bytes": 2_000_000})
    began = time.perf_counter()
    for value in messages:
        producer.produce(topic, value=value, on_delivery=delivered)
        producer.poll(0)
    remaining = producer.flush(120)
    if remaining or failures:
        raise RuntimeError(f"publishing OTLP messages failed: {remaining} undelivered; {failures}")
    return time.perf_counter() - began


def measure_translate(pool: EventPool, count: int, partitions: int, repeats: int = 3) -> dict[str, Any]:
    """The otlp stage alone, µs per span (best of `repeats`), otlp_proto and otlp_json, 500-span messages."""
    out: dict[str, Any] = {"spans": count}
    for encoding in ("otlp_proto", "otlp_json"):
        messages = spans_messages(pool, 0, count, encoding=encoding)
        batch = [(m, Source("otlp_spans", i % partitions, i)) for i, m in enumerate(messages)]
        best = float("inf")
        events = 0
        for _ in range(repeats):
            began = time.perf_counter()
            result = translate_messages(batch, OtlpConfig(), partitions, partitions)
            best = min(best, time.perf_counter() - began)
            events = result.events
        if events != count:
            raise RuntimeError(f"{encoding}: {events} events from {count} spans")
        out[f"{encoding}_us"] = round(best / count * 1e6, 2)
        out[f"{encoding}_bytes_per_span"] = round(sum(map(len, messages)) / count)
    return out
