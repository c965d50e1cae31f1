"""OpenTelemetry GenAI spans built with the official SDK, encoded as the OTel Collector's Kafka exporter writes them.

otlp_proto: the SDK's own OTLP encoder (opentelemetry-exporter-otlp-proto-common), serialized. otlp_json: the same
request in the OTLP/JSON mapping the Collector's JSON marshaler writes: lowerCamelCase fields, enums as integers,
64-bit integers as strings, and trace and span ids in hex (where protobuf's JSON mapping would write base64).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode


def ns(at: datetime) -> int:
    """An aware datetime as Unix nanoseconds (exact to the microsecond)."""
    return int(at.timestamp()) * 1_000_000_000 + at.microsecond * 1000


class SpanRecorder:
    """A tracer of one service (its resource attributes) that keeps every finished span."""

    def __init__(self, resource: Mapping[str, Any]) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create(dict(resource)))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests.otlp_spans")

    def span(self, name: str, start: datetime, end: datetime, attributes: Mapping[str, Any],
             parent: trace.Span | None = None, error: str | None = None) -> trace.Span:
        """One finished span from `start` to `end`, a child of `parent` (else a new trace's root)."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(name, context=context, start_time=ns(start), attributes=dict(attributes),
                                      kind=trace.SpanKind.CLIENT)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=ns(end))
        return span

    def open(self, name: str, start: datetime, attributes: Mapping[str, Any],
             parent: trace.Span | None = None) -> trace.Span:
        """A span left open (end it with `.end(end_time=ns(...))`): the parent of calls made within it."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        return self.tracer.start_span(name, context=context, start_time=ns(start), attributes=dict(attributes))

    def finished(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.exporter.get_finished_spans())


def ids(span: trace.Span) -> tuple[str, str]:
    """A span's trace and span id in hex, as OTLP/JSON writes them."""
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def otlp_proto(spans: Sequence[ReadableSpan]) -> bytes:
    """The spans as one ExportTraceServiceRequest in protobuf: the Kafka exporter's otlp_proto message."""
    return encode_spans(spans).SerializeToString()


def _hex_ids(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: (base64.b64decode(v).hex() if k in ("traceId", "spanId", "parentSpanId") and v else _hex_ids(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_hex_ids(x) for x in obj]
    return obj


def json_of(request: Message) -> bytes:
    """An OTLP traces request (protobuf) in OTLP/JSON, as the Collector's JSON marshaler writes it."""
    return orjson.dumps(_hex_ids(MessageToDict(request, use_integers_for_enums=True)))


def otlp_json(spans: Sequence[ReadableSpan]) -> bytes:
    """The spans as one request in OTLP/JSON: the Kafka exporter's otlp_json message."""
    return json_of(encode_spans(spans))
