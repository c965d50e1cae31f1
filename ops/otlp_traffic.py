"""Events v1 as OpenTelemetry GenAI spans, in the messages the OTel Collector's Kafka exporter writes.

`tally simulate --otlp` publishes its traffic this way (to try the OTLP input without an instrumented app or a
Collector), and `make bench` measures the OTLP path with it. One call span per event: its parent span stands for the
event's logical request (so tally folds the spans as it folds the events), its attributes carry the usage in the
conventions' inclusive form and the owner tags as `tally.*` attributes.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tally.partitioning import logical_id

# tally provider → the name GenAI instrumentations write in gen_ai.provider.name (tally maps them back)
OTEL_NAMES = {"google": "gcp.gemini", "azure_openai": "azure.ai.openai", "bedrock": "aws.bedrock"}
OWNER_TAGS = ("team_id", "feature_id", "tenant_id", "api_key_id", "endpoint", "environment", "deploy_version",
              "user_segment", "product", "cost_center", "business_unit")


def _id(text: str, size: int) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def _kv(key: str, value: Any) -> common_pb2.KeyValue:
    kv = common_pb2.KeyValue(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    else:
        kv.value.string_value = str(value)
    return kv


def event_span(event: dict[str, Any]) -> trace_pb2.Span:
    """The call span of one event v1. Its trace and parent span derive from the logical request id."""
    logical = logical_id(event)
    u = event.get("usage") or {}
    at = datetime.fromisoformat(event["timestamp"])
    end = int(at.timestamp()) * 1_000_000_000 + at.microsecond * 1000
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": OTEL_NAMES.get(event["provider"], event["provider"]),
        "gen_ai.request.model": event.get("model_requested") or event["model_actual"],
        "gen_ai.response.model": event["model_actual"],
    }
    if u:
        write = u.get("cache_write_tokens", 0) + u.get("cache_write_1h_tokens", 0)  # OTel has one cache write
        attrs.update({
            "gen_ai.usage.input_tokens": u.get("input_tokens", 0) + u.get("cache_read_tokens", 0) + write,
            "gen_ai.usage.output_tokens": u.get("output_tokens", 0) + u.get("reasoning_tokens", 0),
            "gen_ai.usage.cache_read.input_tokens": u.get("cache_read_tokens", 0),
            "gen_ai.usage.cache_creation.input_tokens": write,
            "gen_ai.usage.reasoning.output_tokens": u.get("reasoning_tokens", 0)})
    attrs.update({f"tally.{k}": v for k, v in (event.get("tags") or {}).items() if k in OWNER_TAGS})
    for field in ("attempt", "final"):  # what a gateway knows and an instrumentation may say (docs/otlp.md)
        if event.get(field) is not None:
            attrs[f"tally.{field}"] = event[field]
    latency = int(event.get("latency_ms") or 250)
    span = trace_pb2.Span(trace_id=_id(logical, 16), span_id=_id(event["event_id"], 8),
                          parent_span_id=_id("parent:" + logical, 8), name=f"chat {event['model_actual']}",
                          kind=trace_pb2.Span.SPAN_KIND_CLIENT, start_time_unix_nano=end - latency * 1_000_000,
                          end_time_unix_nano=end)
    span.attributes.extend(_kv(k, v) for k, v in attrs.items())
    if event.get("status") == "error":
        span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
        span.attributes.append(_kv("error.type", event.get("error") or "error"))
    return span


def _hex_ids(obj: Any) -> Any:
    """OTLP/JSON writes trace and span ids in hex where protobuf's JSON mapping writes base64."""
    if isinstance(obj, dict):
        return {k: (base64.b64decode(v).hex() if k in ("traceId", "spanId", "parentSpanId") and v else _hex_ids(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_hex_ids(x) for x in obj]
    return obj


def encode(data: trace_pb2.TracesData, encoding: str) -> bytes:
    """One Kafka message value: otlp_proto, or otlp_json (camelCase, enums as numbers, hex ids)."""
    if encoding == "otlp_json":
        return orjson.dumps(_hex_ids(MessageToDict(data, use_integers_for_enums=True)))
    return data.SerializeToString()


def traces_messages(events: Iterable[dict[str, Any]], per_message: int = 500, encoding: str = "otlp_proto",
                    service: str = "tally-simulate") -> Iterator[tuple[bytes, int]]:
    """The events' spans as (message, spans in it): `per_message` spans a message, one resource (`service`)."""
    spans: list[trace_pb2.Span] = []

    def message() -> bytes:
        data = trace_pb2.TracesData()
        rs = data.resource_spans.add()
        rs.resource.attributes.append(_kv("service.name", service))
        rs.scope_spans.add().spans.extend(spans)
        return encode(data, encoding)

    for event in events:
        spans.append(event_span(event))
        if len(spans) == per_message:
            yield message(), len(spans)
            spans.clear()
    if spans:
        yield message(), len(spans)


class SpanPublisher:
    """Publishes event lines as OTLP traces messages, as the Collector's Kafka exporter does (no key, acks all).

    Lines are buffered into messages of `per_message` spans; a message also leaves once its first span has waited
    `linger_s` (a Collector's batch timeout). Use as a context manager: leaving it sends the rest and waits for
    every delivery (TallyError when one failed).
    """

    def __init__(self, auth: Any, topic: str, per_message: int = 500, encoding: str = "otlp_proto",
                 linger_s: float = 1.0) -> None:
        from confluent_kafka import Producer

        self.topic, self.per_message, self.encoding, self.linger_s = topic, per_message, encoding, linger_s
        self._producer = Producer({**auth.rdkafka(), "enable.idempotence": True, "acks": "all",
                                   "compression.type": "lz4", "linger.ms": 10})
        self._events: list[dict[str, Any]] = []
        self._since = 0.0
        self.failures: list[str] = []
        self.spans = 0

    def publish_line(self, line: bytes) -> None:
        """One event v1 line (a line that is not an event object is skipped: it has no span to become)."""
        import time

        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict) or not {"event_id", "timestamp", "provider", "model_actual"} <= event.keys():
            return
        if not self._events:
            self._since = time.monotonic()
        self._events.append(event)
        if len(self._events) >= self.per_message or time.monotonic() - self._since >= self.linger_s:
            self._send()

    def _send(self) -> None:
        for value, n in traces_messages(self._events, self.per_message, self.encoding):
            self._producer.produce(self.topic, value=value, on_delivery=self._delivered)
            self.spans += n
        self._events = []
        self._producer.poll(0)

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None and len(self.failures) < 5:
            self.failures.append(str(err))

    def __enter__(self) -> SpanPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        from tally.errors import TallyError

        if self._events:
            self._send()
        if self._producer.flush(60) or self.failures:
            raise TallyError(f"publishing spans to {self.topic} failed: "
                             f"{self.failures[0] if self.failures else 'not delivered within 60 s'}")
