"""The OTLP path (issue 19): the bench's events as OTel GenAI spans, in the Collector's encodings, and their cost.

`spans_messages` turns pool events into OTLP traces messages of `per_message` spans (one call span per event, its
parent span the event's logical request, usage and owner tags as span attributes), as the Collector's Kafka
exporter writes them. `measure_translate` times the otlp stage alone (decode + map + route), per span, in both
encodings; tests.bench.pipeline runs the same messages through the stack (`--only split`).
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from streams.otlp import OtlpConfig, translate_messages
from streams.records import Source
from tests.bench.common import EventPool
from tests.otlp_spans import json_of

OTLP_PROVIDERS = {"google": "gcp.gemini"}  # as the instrumentations name them (tally maps them back)


def _id(text: str, size: int) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def _kv(key: str, value: Any) -> common_pb2.KeyValue:
    kv = common_pb2.KeyValue(key=key)
    if isinstance(value, int):
        kv.value.int_value = value
    else:
        kv.value.string_value = str(value)
    return kv


def _span(event: dict[str, Any], logical: str) -> trace_pb2.Span:
    u = event["usage"]
    end = int(event["timestamp_ns"])
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": OTLP_PROVIDERS.get(event["provider"], event["provider"]),
        "gen_ai.request.model": event.get("model_requested") or event["model_actual"],
        "gen_ai.response.model": event["model_actual"],
        "gen_ai.usage.input_tokens": u.get("input_tokens", 0) + u.get("cache_read_tokens", 0)
        + u.get("cache_write_tokens", 0),
        "gen_ai.usage.output_tokens": u.get("output_tokens", 0) + u.get("reasoning_tokens", 0),
        "gen_ai.usage.cache_read.input_tokens": u.get("cache_read_tokens", 0),
        "gen_ai.usage.cache_creation.input_tokens": u.get("cache_write_tokens", 0),
        "gen_ai.usage.reasoning.output_tokens": u.get("reasoning_tokens", 0),
        **{f"tally.{k}": v for k, v in event["tags"].items() if k in ("team_id", "feature_id", "tenant_id")},
    }
    span = trace_pb2.Span(trace_id=_id(logical, 16), span_id=_id(event["event_id"], 8),
                          parent_span_id=_id("parent:" + logical, 8), name="chat",
                          kind=trace_pb2.Span.SPAN_KIND_CLIENT, start_time_unix_nano=end - 250_000_000,
                          end_time_unix_nano=end)
    span.attributes.extend(_kv(k, v) for k, v in attrs.items())
    if event["status"] == "error":
        span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
        span.attributes.append(_kv("error.type", event.get("error") or "error"))
    return span


def spans_messages(pool: EventPool, start: int, count: int, per_message: int = 500,
                   encoding: str = "otlp_proto") -> list[bytes]:
    """Events start..start+count as OTLP traces messages of `per_message` spans (otlp_proto or otlp_json)."""
    out: list[bytes] = []
    spans: list[trace_pb2.Span] = []

    def flush() -> None:
        data = trace_pb2.TracesData()
        rs = data.resource_spans.add()
        rs.resource.attributes.append(_kv("service.name", "bench-gateway"))
        rs.scope_spans.add().spans.extend(spans)
        if encoding == "otlp_json":
            out.append(json_of(data))
        else:
            out.append(data.SerializeToString())
        spans.clear()

    for n in range(start, start + count):
        line, _, logical, _ = pool.item(n)
        event = orjson.loads(line)
        at = datetime.fromisoformat(event["timestamp"])
        event["timestamp_ns"] = int(at.timestamp()) * 1_000_000_000 + at.microsecond * 1000
        spans.append(_span(event, logical))
        if len(spans) == per_message:
            flush()
    if spans:
        flush()
    return out


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
