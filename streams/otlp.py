"""Stage "otlp": OpenTelemetry GenAI spans (OTLP traces, as the Collector's Kafka exporter writes them) → events v1.

The Collector's Kafka exporter writes one OTLP `ExportTraceServiceRequest` (wire-equal to `TracesData`) per message,
`otlp_proto` (protobuf, the default) or `otlp_json` (the OTLP/JSON mapping: hex trace and span ids, 64-bit integers
as strings). `translate_messages` turns a batch of such messages into usage event v1 lines keyed by the llm.usage.v1
partition of their logical request, the spans' dead letters, and counts of what was skipped. From there an event is
an NDJSON event like any other: validated, priced, folded, sunk, deduplicated by event_id.

Which spans (`classify`):
- a provider call: `gen_ai.operation.name` is chat, text_completion, generate_content or embeddings, or (older
  instrumentations, no operation name) the span names a provider (`gen_ai.provider.name`, the older `gen_ai.system`)
  and is not marked an agent, tool or workflow span. It becomes one event.
- agent, tool and workflow spans (invoke_agent, create_agent, execute_tool, …) are skipped and counted: an agent span
  carries the sum of its children's usage, so pricing it too would count every dollar twice.
- spans without any `gen_ai.*` attribute are skipped and counted.

A call span that cannot become an event (no provider or model, token counts that contradict each other, no end time)
is a dead letter, reason `otlp_unmappable`, whose bytes are a one-span OTLP request (its resource, scope and span, in
the encoding it came in): `tally dlq replay` publishes it back to the OTLP topic. A message that is not OTLP at all is
a dead letter `otlp_undecodable` with the message's bytes.

The mapping (docs/otlp.md):
- event_id and request_id: `<trace id>-<span id>` (hex), stable across re-deliveries, so a re-sent batch dedups.
- the logical request (`parent_request_id`), by `OtlpConfig.logical_request`: "parent" (the parent span: the span
  that groups a call's retries and fallbacks; a root span is its own logical request), "trace" (the trace id), or
  "conversation" (`gen_ai.conversation.id`, then `session.id`, on the span or its resource; else as "parent").
- provider, requested and response model, token classes: tally.sdk.normalize's OTel readers (current and
  deprecated attribute names).
- status: span status ERROR, or an `error.type` attribute → "error" (the error is the type, else the status message);
  otherwise "ok". timestamp: the span's end; latency_ms: end - start.
- owner tags: `OtlpConfig.tags`, tag → attribute names, looked up on the span, then on its resource (DEFAULT_TAGS).
- attempt and final: only from `tally.attempt` (int) and `tally.final` (bool), when an instrumentation sets them.
  Spans do not say which attempt of a logical request is the last, and tally does not guess: without `tally.final`
  a request is emitted by the fold's settle rule (fold_settle_s of event time after its last ok attempt).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from streams.records import Rejection, Source, encode_record
from tally.errors import NormalizationError
from tally.sdk.batching import route_event
from tally.sdk.events import usage_event
from tally.sdk.normalize import from_otel_genai, otel_call_info

STAGE_OTLP = "otlp"
# Reason codes of the dead letters this stage writes (docs/events.md lists every reason).
OTLP_UNDECODABLE = "otlp_undecodable"
OTLP_UNMAPPABLE = "otlp_unmappable"

ENCODINGS = ("auto", "otlp_proto", "otlp_json")
LOGICAL_REQUEST_MODES = ("span", "parent", "trace", "conversation")

#: `gen_ai.operation.name` values of one provider call (the current semantic conventions' inference operations).
CALL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings", "completion",
                             "embedding"})
#: Operations that are not a provider call: an agent's or a tool's span. Agent spans sum their children's usage.
NOT_CALL_OPERATIONS = frozenset({"invoke_agent", "create_agent", "execute_tool", "invoke_workflow",
                                 # OpenLIT's framework spans: they wrap calls (and may sum their usage)
                                 "framework", "workflow", "agent", "execute_task", "vectordb", "retrieval"})
#: OpenLLMetry's older span kinds (`traceloop.span.kind`) that group calls rather than make one.
_GROUPING_KINDS = frozenset({"workflow", "task", "agent", "tool"})

#: Owner tags → the span or resource attributes that give them, first found wins (span before resource).
DEFAULT_TAGS: Mapping[str, tuple[str, ...]] = {
    "team_id": ("tally.team_id", "team_id", "service.namespace"),
    "feature_id": ("tally.feature_id", "feature_id", "service.name"),
    "tenant_id": ("tally.tenant_id", "tenant_id", "tenant.id"),
    "api_key_id": ("tally.api_key_id",),
    "endpoint": ("tally.endpoint", "http.route"),
    "environment": ("tally.environment", "deployment.environment.name", "deployment.environment"),
    "deploy_version": ("tally.deploy_version", "service.version"),
    "user_segment": ("tally.user_segment",),
    "product": ("tally.product",),
    "cost_center": ("tally.cost_center",),
    "business_unit": ("tally.business_unit",),
}
#: The span attributes the mapping reads besides owner tags and gen_ai.usage.*: only these are decoded, so the
#: prompts and completions some instrumentations put in attributes are never copied out of the message.
READ_ATTRIBUTES = frozenset({
    "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.system", "gen_ai.request.model", "gen_ai.response.model",
    "gen_ai.agent.name", "gen_ai.conversation.id", "session.id", "error.type", "openai.response.service_tier",
    "gen_ai.openai.response.service_tier", "traceloop.span.kind", "tally.attempt",
    "tally.final"})
_USAGE_PREFIX = "gen_ai.usage."
_GENAI_PREFIXES = ("gen_ai.", "llm.")
# What bad input can raise while it is decoded or mapped (NormalizationError and OtlpDecodeError are ValueErrors;
# orjson's encode error a TypeError): a dead letter, never a stopped worker.
_BAD_INPUT = (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError)
_MAX_ID = 128  # the schema's bound on request ids
# End times a span may have (Unix ns), as the validate stage bounds timestamps: 2000-01-01 to 2100-01-01 UTC.
_MIN_END_NS = 946_684_800 * 1_000_000_000
_MAX_END_NS = 4_102_444_800 * 1_000_000_000
_MAX_TAG = 256
_MAX_ERROR = 256


def parse_tag_mapping(text: str) -> dict[str, tuple[str, ...]]:
    """DEFAULT_TAGS with the overrides of `text`: `tag=attr[,attr...]` entries separated by `;`.

    `team_id=k8s.namespace.name,team` makes team_id come from the first of those attributes; `endpoint=` stops
    filling endpoint; a tag not in the defaults is added (a custom tag on the row's `tags`). Raises ValueError
    naming the entry that is malformed.
    """
    out = dict(DEFAULT_TAGS)
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        tag, sep, attrs = entry.partition("=")
        tag = tag.strip()
        if not sep or not tag or len(tag) > 64:
            raise ValueError(f"otlp_tags entry {entry!r} is not tag=attribute[,attribute...]")
        names = tuple(a.strip() for a in attrs.split(",") if a.strip())
        if names:
            out[tag] = names
        else:
            out.pop(tag, None)
    if len(out) > 32:
        raise ValueError(f"otlp_tags maps {len(out)} tags; an event holds at most 32")
    return out


@dataclass(frozen=True)
class OtlpConfig:
    """How spans become events: the payload encoding, the logical request rule and the owner-tag mapping."""

    encoding: str = "auto"
    logical_request: str = "span"
    tags: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_TAGS))
    # A dead letter's one-span request holds only the attributes the mapping reads (settings.dlq_redact_fields
    # not empty, as by default): prompts that instrumentations put in attributes do not sit in the DLQ.
    redact: bool = True

    @property
    def read(self) -> frozenset[str]:
        """The attribute names decoded from spans and resources (besides gen_ai.usage.*)."""
        return READ_ATTRIBUTES | {name for names in self.tags.values() for name in names}

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"otlp encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.logical_request not in LOGICAL_REQUEST_MODES:
            raise ValueError(f"otlp logical request must be one of {', '.join(LOGICAL_REQUEST_MODES)}, "
                             f"got {self.logical_request!r}")


@dataclass(slots=True)
class Span:
    """One span, whichever encoding it came in: ids in hex, times in Unix nanoseconds, attributes decoded."""

    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    index: int  # its place in the message, counting every span (the dead letter's source_line)
    one_span: Callable[[], bytes]  # a one-span OTLP request holding it, in its message's encoding
    kind: int = 0  # SpanKind: 1 internal, 2 server, 3 client, …
    problem: str = ""  # why a GenAI span's fields could not be read (it is then a dead letter, unmappable)


@dataclass
class OtlpBatch:
    """What a batch of OTLP messages became: event lines and dead letters keyed by partition, and counts."""

    lines: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    spans: int = 0
    events: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # why spans were not calls: not_genai, agent_or_tool
    reasons: list[str] = field(default_factory=list)  # the dead letters' reason codes


# --- decoding ---------------------------------------------------------------------------------------------------

class OtlpDecodeError(ValueError):
    """A message that is not an OTLP traces payload in the expected encoding."""


def encoding_of(value: bytes, configured: str) -> str:
    """The encoding of one message: as configured, or (auto) JSON when it opens with `{`, else protobuf.

    A non-empty protobuf TracesData opens with field 1's tag (0x0a), never with `{` (0x7b): the first byte alone
    tells them apart (stripping whitespace first would not: 0x0a is a newline, and the length after it can be 0x7b).
    """
    if configured != "auto":
        return configured
    return "otlp_json" if value[:1] == b"{" else "otlp_proto"


# A span's size in a Collector message, for bounding work before decoding: the OTLP/protobuf spans of the
# instrumentations' GenAI calls take ~600-700 bytes (tests.bench.otlp: 684), twice that in OTLP/JSON.
SPAN_BYTES = 600


def spans_in(value: bytes | None) -> int:
    """About how many spans a message holds (by size; spans with prompts in attributes count as several)."""
    return max(1, len(value or b"") // SPAN_BYTES)


def decode_spans(value: bytes, encoding: str, read: frozenset[str] | None = None,
                 keep: frozenset[str] | None = None) -> list[Span]:
    """Every span of one OTLP traces message, in order. Raises OtlpDecodeError when it is not one.

    A span without any gen_ai.* or llm.* attribute is returned without its attributes (not a GenAI span). `read`:
    only these attributes (and gen_ai.usage.*) are decoded; None decodes them all. `keep`: a span's one-span
    request (its dead letter's bytes) holds only these attributes (and gen_ai.usage.*), and no span events; None
    holds it whole.
    """
    if encoding_of(value, encoding) == "otlp_json":
        return _json_spans(value, read, keep)
    return _proto_spans(value, read, keep)


def _kept(key: str, read: frozenset[str] | None) -> bool:
    return read is None or key in read or key.startswith(_USAGE_PREFIX)


def _proto_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_proto_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _proto_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def _proto_attrs(kvs: Any, read: frozenset[str] | None) -> dict[str, Any]:
    return {kv.key: _proto_value(kv.value) for kv in kvs if _kept(kv.key, read)}


def _proto_span_attrs(kvs: Any, read: frozenset[str] | None) -> dict[str, Any] | None:
    """The span's attributes as `read` selects them, or None when none of its keys is GenAI's (one pass)."""
    out: dict[str, Any] = {}
    genai = False
    for kv in kvs:
        key = kv.key
        if key.startswith(_GENAI_PREFIXES):
            genai = True
        if read is None or key in read or key.startswith(_USAGE_PREFIX):
            out[key] = _proto_value(kv.value)
    return out if genai else None


def _proto_spans(value: bytes, read: frozenset[str] | None = None, keep: frozenset[str] | None = None) -> list[Span]:
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.trace.v1 import trace_pb2

    try:
        data = trace_pb2.TracesData.FromString(value)
    except DecodeError as exc:
        raise OtlpDecodeError(f"not an OTLP protobuf traces payload: {exc}") from None
    out: list[Span] = []
    for rs in data.resource_spans:
        resource: dict[str, Any] | None = None
        for ss in rs.scope_spans:
            for span in ss.spans:
                index = len(out)
                attrs = _proto_span_attrs(span.attributes, read)
                if attrs is None:
                    out.append(_skipped_span(index))  # not decoded further: most spans of a trace are not GenAI
                    continue
                if resource is None:
                    resource = _proto_attrs(rs.resource.attributes, read)
                status = span.status
                out.append(Span(span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                                span.start_time_unix_nano, span.end_time_unix_nano, status.code, status.message,
                                attrs, resource, index, _proto_one_span(rs, ss, span, keep), span.kind))
    return out


def _proto_one_span(rs: Any, ss: Any, span: Any, keep: frozenset[str] | None) -> Callable[[], bytes]:
    def build() -> bytes:
        from opentelemetry.proto.trace.v1 import trace_pb2

        one = trace_pb2.TracesData()
        r = one.resource_spans.add()
        r.resource.CopyFrom(rs.resource)
        r.schema_url = rs.schema_url
        s = r.scope_spans.add()
        s.scope.CopyFrom(ss.scope)
        s.schema_url = ss.schema_url
        copy = s.spans.add()
        copy.CopyFrom(span)
        if keep is not None:  # redacted: only what the mapping reads (a prompt in an attribute stays out)
            for attrs in (copy.attributes, r.resource.attributes):
                kept = [kv for kv in attrs if _kept(kv.key, keep)]
                del attrs[:]
                attrs.extend(kept)
            del copy.events[:]
        return one.SerializeToString()
    return build


def _skipped_span(index: int) -> Span:
    return Span("", "", "", 0, 0, 0, "", {}, {}, index, lambda: b"")


def _get(obj: Mapping[str, Any], camel: str, snake: str, default: Any = None) -> Any:
    """An OTLP/JSON field by its lowerCamelCase name (what the Collector writes), else its proto field name."""
    value = obj.get(camel)
    return obj.get(snake, default) if value is None else value


def _json_value(v: Any) -> Any:
    if not isinstance(v, dict):
        return None
    for key, snake in (("stringValue", "string_value"), ("boolValue", "bool_value")):
        if key in v or snake in v:
            return _get(v, key, snake)
    raw = _get(v, "intValue", "int_value")
    if raw is not None:  # int64 as a JSON string of digits (or a JSON integer from a lenient writer)
        if isinstance(raw, int) and not isinstance(raw, bool) or isinstance(raw, str) and _INT.fullmatch(raw):
            return int(raw)
        raise ValueError(f"intValue {str(raw)[:40]!r} is not an integer")
    raw = _get(v, "doubleValue", "double_value")
    if raw is not None:
        return float(raw)
    arr = _get(v, "arrayValue", "array_value")
    if arr is not None:
        return [_json_value(x) for x in arr.get("values", [])]
    kvl = _get(v, "kvlistValue", "kvlist_value")
    if kvl is not None:
        return _json_attrs(kvl.get("values", []))
    raw = _get(v, "bytesValue", "bytes_value")
    return raw


def _json_attrs(kvs: Any, read: frozenset[str] | None = None) -> dict[str, Any]:
    if not isinstance(kvs, list):
        raise OtlpDecodeError("attributes must be a list of {key, value}")
    return {kv["key"]: _json_value(kv.get("value")) for kv in kvs
            if isinstance(kv, dict) and isinstance(kv.get("key"), str) and _kept(kv["key"], read)}


_INT = re.compile(r"-?[0-9]+")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def _json_id(raw: Any, name: str) -> str:
    if raw in (None, ""):
        return ""
    if not isinstance(raw, str) or not _HEX.fullmatch(raw):
        raise ValueError(f"{name} {str(raw)[:40]!r} is not hex (OTLP/JSON writes ids in hex)")
    return raw.lower()


def _json_nanos(raw: Any, name: str) -> int:
    if raw in (None, ""):
        return 0
    if isinstance(raw, int) and not isinstance(raw, bool) or isinstance(raw, str) and _INT.fullmatch(raw):
        return int(raw)
    raise ValueError(f"{name} {str(raw)[:40]!r} is not an integer")


_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
_KIND_NAMES = {"SPAN_KIND_UNSPECIFIED": 0, "SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2, "SPAN_KIND_CLIENT": 3,
               "SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5}


def _json_enum(raw: Any, names: Mapping[str, int], name: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if raw in (None, ""):
        return 0
    if isinstance(raw, str) and raw in names:
        return names[raw]
    raise ValueError(f"{name} {str(raw)[:40]!r} is not one of OTLP's values")


def _json_spans(value: bytes, read: frozenset[str] | None = None, keep: frozenset[str] | None = None) -> list[Span]:
    """The spans of an OTLP/JSON message.

    Its structure broken (not an object with resourceSpans, lists that are not lists) makes the message
    undecodable; one span's bad fields make that span a problem span (unmappable).
    """
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise OtlpDecodeError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or _get(data, "resourceSpans", "resource_spans") is None:
        raise OtlpDecodeError("an OTLP/JSON traces payload is an object with resourceSpans (a logs or metrics "
                              "payload, or another document, is not)")
    out: list[Span] = []
    try:
        for rs in _get(data, "resourceSpans", "resource_spans", []):
            res = rs.get("resource") or {}
            resource: dict[str, Any] | None = None
            for ss in _get(rs, "scopeSpans", "scope_spans", []):
                for span in ss.get("spans", []):
                    index = len(out)
                    attrs = span.get("attributes") or []
                    if not any(isinstance(kv, dict) and str(kv.get("key", "")).startswith(_GENAI_PREFIXES)
                               for kv in attrs):
                        out.append(_skipped_span(index))
                        continue
                    if resource is None:
                        resource = _json_attrs(res.get("attributes") or [], read)
                    out.append(_json_span(span, resource, index, _json_one_span(rs, ss, span, keep), read))
    except _BAD_INPUT as exc:
        if isinstance(exc, OtlpDecodeError):
            raise
        raise OtlpDecodeError(f"not an OTLP/JSON traces payload: {type(exc).__name__}: {exc}") from None
    return out


def _json_span(span: Mapping[str, Any], resource: dict[str, Any], index: int, one_span: Callable[[], bytes],
               read: frozenset[str] | None) -> Span:
    """One GenAI span of an OTLP/JSON message; a field that cannot be read makes it a problem span."""
    trace_id = span.get("traceId") if isinstance(span.get("traceId"), str) else ""
    span_id = span.get("spanId") if isinstance(span.get("spanId"), str) else ""
    try:
        status = span.get("status") or {}
        return Span(
            _json_id(_get(span, "traceId", "trace_id"), "traceId"),
            _json_id(_get(span, "spanId", "span_id"), "spanId"),
            _json_id(_get(span, "parentSpanId", "parent_span_id"), "parentSpanId"),
            _json_nanos(_get(span, "startTimeUnixNano", "start_time_unix_nano"), "startTimeUnixNano"),
            _json_nanos(_get(span, "endTimeUnixNano", "end_time_unix_nano"), "endTimeUnixNano"),
            _json_enum(status.get("code"), _STATUS_NAMES, "status.code"), str(status.get("message") or ""),
            _json_attrs(span.get("attributes") or [], read), resource, index, one_span,
            _json_enum(span.get("kind"), _KIND_NAMES, "kind"))
    except _BAD_INPUT as exc:
        return Span(str(trace_id).lower(), str(span_id).lower(), "", 0, 0, 0, "", {}, resource, index, one_span,
                    problem=f"{type(exc).__name__}: {exc}")


def _json_one_span(rs: Mapping[str, Any], ss: Mapping[str, Any], span: Mapping[str, Any],
                   keep: frozenset[str] | None) -> Callable[[], bytes]:
    def build() -> bytes:
        one_rs: dict[str, Any] = {k: v for k, v in rs.items() if k not in ("scopeSpans", "scope_spans")}
        one_ss: dict[str, Any] = {k: v for k, v in ss.items() if k != "spans"}
        one = dict(span)
        if keep is not None:  # redacted: only what the mapping reads (a prompt in an attribute stays out)
            one["attributes"] = _kept_kvs(span.get("attributes"), keep)
            one.pop("events", None)
            if isinstance(one_rs.get("resource"), dict):
                one_rs["resource"] = {**one_rs["resource"],
                                      "attributes": _kept_kvs(one_rs["resource"].get("attributes"), keep)}
        one_ss["spans"] = [one]
        one_rs["scopeSpans"] = [one_ss]
        doc = {"resourceSpans": [one_rs]}
        try:
            return orjson.dumps(doc)
        except TypeError:  # nested deeper than orjson writes (it reads deeper): the standard library's writer
            return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return build


def _kept_kvs(kvs: Any, keep: frozenset[str]) -> Any:
    if not isinstance(kvs, list):
        return kvs
    return [kv for kv in kvs if isinstance(kv, dict) and isinstance(kv.get("key"), str) and _kept(kv["key"], keep)]


# --- mapping ----------------------------------------------------------------------------------------------------

NOT_GENAI = "not_genai"
AGENT_OR_TOOL = "agent_or_tool"
OTHER_OPERATION = "other_operation"
SPAN_KIND_CLIENT = 3


def classify(span: Span) -> str | None:
    """None for a provider call (it becomes an event), else why the span is skipped.

    The reasons: NOT_GENAI, AGENT_OR_TOOL, OTHER_OPERATION (an operation name that is not a call's).
    """
    a = span.attributes
    if span.problem:
        return None  # a GenAI span whose fields could not be read: a dead letter, never skipped
    if not a:
        return NOT_GENAI
    op = a.get("gen_ai.operation.name")
    if op is not None and op != "":
        if op in CALL_OPERATIONS:
            return None
        if op == "invoke_agent" and span.kind == SPAN_KIND_CLIENT and _has_usage(a):
            return None  # a remote agent (the conventions: kind CLIENT): its usage is the only record of its calls
        return AGENT_OR_TOOL if op in NOT_CALL_OPERATIONS else OTHER_OPERATION
    kind = a.get("traceloop.span.kind")
    if isinstance(kind, str) and kind in _GROUPING_KINDS or a.get("gen_ai.agent.name"):
        return AGENT_OR_TOOL
    if a.get("gen_ai.provider.name") or a.get("gen_ai.system"):
        return None
    return NOT_GENAI


def _has_usage(attributes: Mapping[str, Any]) -> bool:
    return any(k.startswith(_USAGE_PREFIX) for k in attributes)


@functools.lru_cache(maxsize=65_536)
def _second(seconds: int) -> str:
    """A whole UTC second as RFC 3339 without the fraction (a batch's spans share few seconds)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _timestamp(ns: int) -> str:
    seconds, frac = divmod(ns, 1_000_000_000)
    return f"{_second(seconds)}.{frac:09d}Z"


def _bounded_id(text: str) -> str:
    """An id within the schema's 128 characters: as is, or a digest of it."""
    if len(text) <= _MAX_ID:
        return text
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _attr(span: Span, name: str) -> Any:
    value = span.attributes.get(name)
    if value is None or value == "":
        value = span.resource.get(name)
    return None if value == "" else value


def _logical_request(span: Span, mode: str) -> str | None:
    if mode == "span":
        return None  # the call is its own logical request
    if mode == "trace":
        return span.trace_id
    if mode == "conversation":
        for name in ("gen_ai.conversation.id", "session.id"):
            value = _attr(span, name)
            if value is not None:
                return _bounded_id(f"conversation:{value}")
    return f"{span.trace_id}-{span.parent_span_id}" if span.parent_span_id else None


def _tags(span: Span, mapping: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Each tag from the first of its attributes set, each looked up on the span, then on its resource."""
    out: dict[str, str] = {}
    attrs, resource = span.attributes, span.resource
    for tag, names in mapping.items():
        for name in names:
            value = attrs.get(name)
            if value is None or value == "":
                value = resource.get(name)
                if value is None or value == "":
                    continue
            if isinstance(value, (dict, list)):
                continue
            out[tag] = (str(value).lower() if isinstance(value, bool) else str(value))[:_MAX_TAG]
            break
    return out


def _usage(span: Span) -> tuple[dict[str, int] | None, str | None]:
    """The span's token classes; (None, why) when it carries none at all."""
    a = span.attributes
    if "gen_ai.usage.input_tokens" not in a and "gen_ai.usage.prompt_tokens" not in a:
        if any(k.startswith("gen_ai.usage.") for k in a):
            raise NormalizationError("otel gen_ai: usage attributes without gen_ai.usage.input_tokens")
        return None, "the span carries no gen_ai.usage attributes"
    return from_otel_genai(a), None


def span_event(span: Span, config: OtlpConfig) -> dict[str, Any]:
    """The usage event v1 of one provider-call span. Raises NormalizationError (or ValueError) when it has none."""
    if span.problem:
        raise NormalizationError(f"the span's fields cannot be read: {span.problem}")
    if len(span.trace_id) != 32 or len(span.span_id) != 16 or len(span.parent_span_id) not in (0, 16):
        raise NormalizationError("the span's trace id must be 16 bytes, its span id (and parent's) 8 bytes: "
                                 f"got {len(span.trace_id) // 2}, {len(span.span_id) // 2} and "
                                 f"{len(span.parent_span_id) // 2}")
    if not _MIN_END_NS < span.end_ns < _MAX_END_NS:
        raise NormalizationError(f"the span's end time {span.end_ns} ns is not between 2000 and 2100"
                                 if span.end_ns else "the span has no end time")
    info = otel_call_info(span.attributes)
    usage, missing = _usage(span)
    a = span.attributes
    error_type = a.get("error.type")
    failed = span.status_code == 2 or bool(error_type)
    error = None
    if failed:
        error = (str(error_type) if error_type else span.status_message or "span status ERROR")[:_MAX_ERROR]
    tier = a.get("openai.response.service_tier") or a.get("gen_ai.openai.response.service_tier")
    attempt, final = a.get("tally.attempt"), a.get("tally.final")
    if attempt is not None and not (isinstance(attempt, int) and not isinstance(attempt, bool) and
                                    0 <= attempt <= 1000):
        raise NormalizationError(f"tally.attempt must be an integer from 0 to 1000, got {attempt!r}")
    ident = f"{span.trace_id}-{span.span_id}"
    latency = (span.end_ns - span.start_ns) // 1_000_000 if 0 < span.start_ns <= span.end_ns else None
    return usage_event(
        request_id=ident, event_id=ident, parent_request_id=_logical_request(span, config.logical_request),
        provider=info["provider"], model_actual=info["model_actual"], model_requested=info.get("model_requested"),
        usage=usage, usage_note=missing if usage is None and not failed else None,
        tags=_tags(span, config.tags), status="error" if failed else "ok", error=error,
        timestamp=_timestamp(span.end_ns), latency_ms=min(latency, 86_400_000) if latency is not None else None,
        service_tier=tier if isinstance(tier, str) and tier else None,
        attempt=attempt,
        final=final if isinstance(final, bool) else None)


_MAX_MESSAGE = 1000  # a dead letter's message quotes values; a huge one is cut (its bytes are the original anyway)


def _rejection(reason: str, message: str, raw: bytes, source: Source, line: int | None,
               event_id: str | None = None) -> Rejection:
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + f"… ({len(message):,} characters)"
    return Rejection(reason, STAGE_OTLP, message, raw, source, line, event_id=event_id)


def translate_messages(batch: Sequence[tuple[bytes | None, Source]], config: OtlpConfig, partitions: int,
                       dlq_partitions: int, now: datetime | None = None) -> OtlpBatch:
    """A batch of OTLP messages → event lines by llm.usage.v1 partition, dead letters, counts. Never raises for input.

    Every GenAI call span becomes exactly one event line or one dead letter; every message that does not decode is
    one dead letter. Lines go to partition_for(their logical request) over `partitions`, as the SDK routes them;
    dead letters to the message's partition modulo `dlq_partitions`.
    """
    out = OtlpBatch()
    rejected_at = now or datetime.now(UTC)
    read = config.read
    keep = read if config.redact else None
    for value, source in batch:
        dlq = source.partition % dlq_partitions
        try:
            spans = decode_spans(value or b"", config.encoding, read, keep)
        except _BAD_INPUT as exc:
            out.dead_letters[dlq].append(encode_record(
                _rejection(OTLP_UNDECODABLE, str(exc), value or b"", source, None).to_record(rejected_at)))
            out.reasons.append(OTLP_UNDECODABLE)
            continue
        for span in spans:
            out.spans += 1
            try:
                why = classify(span)
                if why is not None:
                    out.skipped[why] += 1
                    continue
                event = span_event(span, config)
                line = orjson.dumps(event)
            except _BAD_INPUT as exc:
                ident = f"{span.trace_id}-{span.span_id}" if span.trace_id and span.span_id else None
                try:
                    raw = span.one_span()
                except _BAD_INPUT:  # JSON nested deeper than a writer allows: the message, whole, is the original
                    raw = value or b""
                out.dead_letters[dlq].append(encode_record(_rejection(
                    OTLP_UNMAPPABLE, str(exc), raw, source, span.index, ident).to_record(rejected_at)))
                out.reasons.append(OTLP_UNMAPPABLE)
                continue
            partition, _ = route_event(event, line, partitions)
            out.lines[partition].append(line)
            out.events += 1
    return out
