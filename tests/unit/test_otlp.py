"""The otlp stage: OTel GenAI spans built with the official SDK, in both Collector encodings, become events v1."""

from __future__ import annotations

import base64
from collections import Counter
from datetime import timedelta
from typing import Any

import orjson
import pytest

from streams.otlp import (
    AGENT_OR_TOOL,
    DEFAULT_TAGS,
    NOT_GENAI,
    OTHER_OPERATION,
    OTLP_UNDECODABLE,
    OTLP_UNMAPPABLE,
    OtlpConfig,
    decode_spans,
    encoding_of,
    parse_tag_mapping,
    translate_messages,
)
from streams.records import Source
from streams.validate import Validator
from tally.config import load_settings
from tests.factories import clock
from tests.otlp_spans import SpanRecorder, ids, ns, otlp_json, otlp_proto

T0 = clock() - timedelta(hours=2)
SOURCE = Source("otlp_spans", 1, 40)
PARTITIONS = 4
RESOURCE = {"service.name": "search_answer", "service.namespace": "search", "service.version": "1.4.2",
            "deployment.environment.name": "prod"}


def at(seconds: float) -> Any:
    return T0 + timedelta(seconds=seconds)


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": model,
            **extra}


def build() -> tuple[SpanRecorder, dict[str, Any]]:
    """One agent trace (a failed call, its retry, a tool, an HTTP call), an older-convention root call, two bad
    call spans. Returns the recorder and the spans by name."""
    rec = SpanRecorder(RESOURCE)
    agent = rec.open("invoke_agent research", at(0), {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "openai", "gen_ai.agent.name": "research",
        "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 300})
    spans: dict[str, Any] = {"agent": agent}
    spans["failed"] = rec.span("chat gpt-4.1", at(1), at(1.5), chat("gpt-4.1", **{"error.type": "429"}),
                               parent=agent, error="Too Many Requests")
    spans["retry"] = rec.span("chat gpt-4.1", at(2), at(4.25), chat(
        "gpt-4.1", **{"gen_ai.response.model": "gpt-4.1", "gen_ai.usage.input_tokens": 1200,
                      "gen_ai.usage.cache_read.input_tokens": 200, "gen_ai.usage.output_tokens": 300,
                      "tally.tenant_id": "acme", "openai.response.service_tier": "default"}), parent=agent)
    spans["tool"] = rec.span("execute_tool web_search", at(4.5), at(5), {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "web_search"}, parent=agent)
    spans["http"] = rec.span("GET /v1/index", at(5), at(5.1), {"http.request.method": "GET"}, parent=agent)
    agent.end(end_time=ns(at(6)))
    spans["legacy"] = rec.span("openai.chat", at(10), at(11), {
        "gen_ai.system": "OpenAI", "llm.request.type": "chat", "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.prompt_tokens": 500, "gen_ai.usage.completion_tokens": 40, "tally.feature_id": "query_rewrite"})
    spans["no_model"] = rec.span("chat", at(12), at(13), {"gen_ai.operation.name": "chat",
                                                          "gen_ai.provider.name": "openai",
                                                          "gen_ai.usage.input_tokens": 10})
    spans["contradicts"] = rec.span("chat gpt-4.1", at(14), at(15), chat(
        "gpt-4.1", **{"gen_ai.usage.input_tokens": 100, "gen_ai.usage.cache_read.input_tokens": 150}))
    return rec, spans


def translate(value: bytes, **config: Any) -> Any:
    return translate_messages([(value, SOURCE)], OtlpConfig(**config), PARTITIONS, PARTITIONS)


def events_of(out: Any) -> dict[str, dict[str, Any]]:
    return {e["event_id"]: e for lines in out.lines.values() for e in map(orjson.loads, lines)}


@pytest.mark.parametrize("encode", [otlp_proto, otlp_json])
def test_call_spans_become_events_with_their_owner_usage_status_and_logical_request(encode) -> None:
    rec, spans = build()
    out = translate(encode(rec.finished()), logical_request="parent")
    events = events_of(out)
    trace_id, agent_id = ids(spans["agent"])
    failed, retry, legacy = (f"{trace_id}-{ids(spans[n])[1]}" if n != "legacy" else "-".join(ids(spans[n]))
                             for n in ("failed", "retry", "legacy"))
    assert set(events) == {failed, retry, legacy}
    tags = {"team_id": "search", "feature_id": "search_answer", "environment": "prod", "deploy_version": "1.4.2"}
    assert events[retry] == {
        "schema_version": 1, "event_id": retry, "request_id": retry, "parent_request_id": f"{trace_id}-{agent_id}",
        "timestamp": f"{at(4.25).strftime('%Y-%m-%dT%H:%M:%S')}.{at(4.25).microsecond * 1000:09d}Z",
        "provider": "openai", "model_requested": "gpt-4.1", "model_actual": "gpt-4.1", "status": "ok",
        "usage": {"input_tokens": 1000, "output_tokens": 300, "reasoning_tokens": 0, "cache_read_tokens": 200,
                  "cache_write_tokens": 0, "cache_write_1h_tokens": 0},
        "tags": {**tags, "tenant_id": "acme"}, "latency_ms": 2250, "service_tier": "default"}
    # the failed attempt: same logical request, status error with its error.type, no usage reported
    assert (events[failed]["status"], events[failed]["error"], events[failed]["usage"],
            events[failed]["usage_reported"]) == ("error", "429", {}, False)
    assert events[failed]["parent_request_id"] == events[retry]["parent_request_id"]
    # the older conventions: gen_ai.system, prompt/completion tokens; a root span is its own logical request
    assert "parent_request_id" not in events[legacy]
    assert (events[legacy]["provider"], events[legacy]["model_actual"], events[legacy]["usage"]["input_tokens"],
            events[legacy]["usage"]["output_tokens"], events[legacy]["tags"]["feature_id"]) == (
        "openai", "gpt-4o-mini", 500, 40, "query_rewrite")
    # agent and tool spans are skipped (an agent's usage is its children's), so is plain HTTP; both bad calls DLQ
    assert out.spans == 8 and out.events == 3
    assert out.skipped == Counter({AGENT_OR_TOOL: 2, NOT_GENAI: 1})
    assert out.reasons == [OTLP_UNMAPPABLE, OTLP_UNMAPPABLE]


def test_both_collector_encodings_give_the_same_lines() -> None:
    rec, _ = build()
    spans = rec.finished()
    proto, json = translate(otlp_proto(spans)), translate(otlp_json(spans))
    assert dict(proto.lines) == dict(json.lines) and proto.lines
    assert (encoding_of(otlp_proto(spans), "auto"), encoding_of(otlp_json(spans), "auto")) == (
        "otlp_proto", "otlp_json")


def test_every_line_is_a_valid_event_on_the_partition_of_its_logical_request() -> None:
    rec, _ = build()
    out = translate(otlp_proto(rec.finished()))
    validator = Validator()
    for partition, lines in out.lines.items():
        for n, line in enumerate(lines, 1):
            ok, bad = validator.validate_line(line, Source("llm.usage.v1", partition, 0), n, PARTITIONS, clock())
            assert bad is None and ok is not None, bad


def test_a_redelivered_batch_gives_the_same_event_ids_and_bytes() -> None:
    rec, _ = build()
    value = otlp_proto(rec.finished())
    assert dict(translate(value).lines) == dict(translate(value).lines)


@pytest.mark.parametrize("encode", [otlp_proto, otlp_json])
def test_an_unmappable_call_span_is_a_dead_letter_holding_that_span_alone(encode) -> None:
    rec, spans = build()
    out = translate(encode(rec.finished()))
    records = [orjson.loads(line) for lines in out.dead_letters.values() for line in lines]
    assert list(out.dead_letters) == [SOURCE.partition % PARTITIONS]
    by_id = {r["event_id"]: r for r in records}
    trace_id, span_id = ids(spans["no_model"])
    missing = by_id[f"{trace_id}-{span_id}"]
    assert (missing["reason"], missing["stage"], missing["source_topic"], missing["source_offset"]) == (
        OTLP_UNMAPPABLE, "otlp", "otlp_spans", 40)
    assert "neither gen_ai.response.model nor gen_ai.request.model" in missing["message"]
    contradicts = by_id["-".join(ids(spans["contradicts"]))]
    assert "exceeds" in contradicts["message"] or "cache" in contradicts["message"]
    # the stored bytes are a one-span request in the message's encoding: the span, its resource, nothing else
    alone = decode_spans(base64.b64decode(missing["original_b64"]), "auto")
    assert [(s.trace_id, s.span_id) for s in alone] == [(trace_id, span_id)]
    assert alone[0].resource["service.name"] == "search_answer"
    assert alone[0].attributes["gen_ai.usage.input_tokens"] == 10


@pytest.mark.parametrize("value", [b"\x0a\xff\xff\xff\xff\x0f", b"{\"resourceSpans\": 3}", b"{not json", b"[]"])
def test_a_message_that_is_not_otlp_is_one_dead_letter_with_its_bytes(value: bytes) -> None:
    out = translate(value)
    (record,) = [orjson.loads(line) for lines in out.dead_letters.values() for line in lines]
    assert (record["reason"], base64.b64decode(record["original_b64"]), record["source_line"]) == (
        OTLP_UNDECODABLE, value, None)
    assert not out.lines and out.reasons == [OTLP_UNDECODABLE]


def test_the_logical_request_can_be_the_trace_or_the_conversation() -> None:
    rec = SpanRecorder(RESOURCE)
    root = rec.open("workflow", at(0), {})
    first = rec.span("chat", at(1), at(2), chat("gpt-4.1-mini", **{"gen_ai.usage.input_tokens": 5,
                                                                   "gen_ai.conversation.id": "conv-7"}), parent=root)
    nested = rec.open("step", at(2), {}, parent=root)
    second = rec.span("chat", at(3), at(4), chat("gpt-4.1-mini", **{"gen_ai.usage.input_tokens": 5}), parent=nested)
    nested.end(end_time=ns(at(5)))
    root.end(end_time=ns(at(5)))
    value = otlp_proto(rec.finished())
    trace_id = ids(root)[0]
    one, two = (f"{trace_id}-{ids(s)[1]}" for s in (first, second))

    def parents(mode: str) -> dict[str, Any]:
        return {k: e.get("parent_request_id") for k, e in events_of(translate(value, logical_request=mode)).items()}

    assert parents("span") == {one: None, two: None}  # the default: each call its own logical request
    assert parents("parent") == {one: f"{trace_id}-{ids(root)[1]}", two: f"{trace_id}-{ids(nested)[1]}"}
    assert parents("trace") == {one: trace_id, two: trace_id}
    assert parents("conversation") == {one: "conversation:conv-7", two: f"{trace_id}-{ids(nested)[1]}"}


def test_owner_tags_follow_the_configured_mapping_span_before_resource() -> None:
    rec = SpanRecorder({**RESOURCE, "k8s.namespace.name": "growth-prod", "app.feature": "campaign_copy"})
    rec.span("chat", at(1), at(2), chat("gpt-4.1-mini", **{"gen_ai.usage.input_tokens": 5,
                                                           "app.feature": "churn_explainer"}))
    mapping = parse_tag_mapping("team_id=k8s.namespace.name; feature_id=app.feature ;environment=; cohort=app.cohort,"
                                "service.version")
    (event,) = events_of(translate(otlp_json(rec.finished()), tags=mapping)).values()
    assert event["tags"] == {"team_id": "growth-prod", "feature_id": "churn_explainer", "deploy_version": "1.4.2",
                             "cohort": "1.4.2"}


def test_tag_mapping_and_settings_are_validated() -> None:
    assert parse_tag_mapping("") == dict(DEFAULT_TAGS)
    with pytest.raises(ValueError, match="not tag=attribute"):
        parse_tag_mapping("team_id")
    problems = load_settings({"TALLY_OTLP_ENCODING": "otlp_avro", "TALLY_OTLP_LOGICAL_REQUEST": "session",
                              "TALLY_OTLP_TAGS": "=x", "TALLY_OTLP_TOPIC": "spans/v1"}).problems()
    assert [p.split(" ")[0] for p in problems] == ["otlp_topic", "otlp_encoding", "otlp_logical_request",
                                                   "otlp_tags"]
    settings = load_settings({"TALLY_TOPIC_PREFIX": "t1.", "TALLY_OTLP_TOPIC": ""})
    assert settings.topics.otlp == "" and "t1.otlp_spans" not in settings.topics.all()
    assert "t1.otlp_spans" in load_settings({"TALLY_TOPIC_PREFIX": "t1."}).topics.all()


def test_the_bench_spans_stand_for_the_bench_events() -> None:
    """tests.bench.otlp's spans carry what the pool's events do: the OTLP bench moves the same work."""
    from tests.bench.common import EventPool
    from tests.bench.otlp import spans_messages

    pool = EventPool(300, PARTITIONS)
    for encoding in ("otlp_proto", "otlp_json"):
        messages = spans_messages(pool, 0, 300, per_message=70, encoding=encoding)
        out = translate_messages([(m, SOURCE) for m in messages], OtlpConfig(), PARTITIONS, PARTITIONS)
        assert (len(messages), out.events, out.reasons) == (5, 300, [])
        got = Counter((e["provider"], e["model_actual"], e["status"] == "ok", orjson.dumps(e["usage"]),
                       e["tags"].get("feature_id")) for e in events_of(out).values())
        want = Counter()
        for line in pool.lines:
            e = orjson.loads(line)
            usage = {k: e["usage"].get(k, 0) for k in ("input_tokens", "output_tokens", "reasoning_tokens",
                                                         "cache_read_tokens", "cache_write_tokens",
                                                         "cache_write_1h_tokens")}
            usage["cache_write_tokens"] += usage.pop("cache_write_1h_tokens")  # OTel has one cache-write count
            usage["cache_write_1h_tokens"] = 0
            want[(e["provider"], e["model_actual"], e["status"] != "error", orjson.dumps(usage if e["usage"] else {}),
                  e["tags"].get("feature_id", "bench-gateway"))] += 1  # else the resource's service.name
        assert got == want


def test_only_the_attributes_the_mapping_reads_are_decoded() -> None:
    """Instrumentations may put prompts and completions in span attributes: they are never copied out."""
    rec = SpanRecorder(RESOURCE)
    rec.span("chat", at(1), at(2), chat("gpt-4.1-mini", **{"gen_ai.usage.input_tokens": 5,
                                                           "gen_ai.prompt.0.content": "a secret prompt",
                                                           "gen_ai.usage.output_tokens": 2}))
    value = otlp_proto(rec.finished())
    config = OtlpConfig()
    (span,) = decode_spans(value, "auto", config.read)
    assert "gen_ai.prompt.0.content" not in span.attributes
    assert {"gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.request.model"} <= set(span.attributes)
    assert set(span.resource) <= config.read and span.resource["service.name"] == "search_answer"
    (line,) = translate(value).lines.values()
    assert b"secret" not in line[0] and orjson.loads(line[0])["usage"]["output_tokens"] == 2


def test_attempt_and_final_come_only_from_tallys_own_attributes() -> None:
    rec = SpanRecorder(RESOURCE)
    rec.span("chat", at(1), at(2), chat("gpt-4.1-mini", **{"gen_ai.usage.input_tokens": 5, "tally.attempt": 1,
                                                           "tally.final": True}))
    rec.span("chat", at(3), at(4), chat("gpt-4.1-mini", **{"gen_ai.usage.input_tokens": 5, "tally.final": "yes",
                                                           "gen_ai.response.finish_reasons": ("stop",)}))
    marked, unmarked = sorted(events_of(translate(otlp_proto(rec.finished()))).values(), key=lambda e: e["timestamp"])
    assert (marked["attempt"], marked["final"]) == (1, True)
    assert "attempt" not in unmarked and "final" not in unmarked  # never guessed from a finish reason


@pytest.mark.parametrize("attrs", [
    {"tally.attempt": 1001},
    {"gen_ai.request.model": {"a": {"b": {"c": [1, 2, {"d": "deep"}]}}}},  # not a string
    {"gen_ai.usage.input_tokens": -5},
    {"gen_ai.usage.input_tokens": True},
])
def test_a_call_span_with_bad_values_is_a_dead_letter_never_a_crash(attrs) -> None:
    rec = SpanRecorder(RESOURCE)
    rec.span("chat", at(1), at(2), chat("gpt-4.1-mini", **{"gen_ai.usage.input_tokens": 5, **attrs}))
    out = translate(otlp_proto(rec.finished()))
    assert (out.events, out.reasons) == (0, [OTLP_UNMAPPABLE])


@pytest.mark.parametrize(("end", "trace_id", "attempt", "why"), [
    ("99999999999999999999", "5b8efff798038103d269b633813fc60c", "1", "not between 2000 and 2100"),
    ("0", "5b8efff798038103d269b633813fc60c", "1", "no end time"),
    (str(ns(T0)), "5b8efff798038103d269b633813fc60c" * 5, "1", "16 bytes"),
    (str(ns(T0)), "5b8efff798038103d269b633813fc60c", str(2**70), "tally.attempt"),  # beyond any JSON int
])
def test_a_json_span_with_an_impossible_time_id_or_count_is_unmappable(end: str, trace_id: str, attempt: str,
                                                                       why: str) -> None:
    span = {"traceId": trace_id, "spanId": "eee19b7ec3c1b174", "name": "chat", "startTimeUnixNano": "1",
            "endTimeUnixNano": end, "attributes": [
                {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                {"key": "gen_ai.provider.name", "value": {"stringValue": "openai"}},
                {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4.1"}},
                {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "12"}},
                {"key": "tally.attempt", "value": {"intValue": attempt}}]}
    value = orjson.dumps({"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": [span]}]}]})
    out = translate(value)
    (record,) = [orjson.loads(line) for lines in out.dead_letters.values() for line in lines]
    assert record["reason"] == OTLP_UNMAPPABLE and why in record["message"], record["message"]


@pytest.mark.parametrize("depth", [200, 2000])
def test_deeply_nested_json_values_are_a_dead_letter_not_a_crash(depth: int) -> None:
    deep = '{"stringValue": "x"}'
    for _ in range(depth):
        deep = '{"kvlistValue": {"values": [{"key": "k", "value": ' + deep + '}]}}'
    value = ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "5b8efff798038103d269b633813fc60c", '
             '"spanId": "eee19b7ec3c1b174", "endTimeUnixNano": "' + str(ns(T0)) + '", "attributes": ['
             '{"key": "gen_ai.provider.name", "value": {"stringValue": "openai"}}, '
             '{"key": "gen_ai.request.model", "value": ' + deep + '}]}]}]}]}').encode()
    out = translate(value)
    assert not out.lines and out.reasons == ([OTLP_UNMAPPABLE] if depth < 250 else [OTLP_UNDECODABLE])
    (record,) = [orjson.loads(line) for lines in out.dead_letters.values() for line in lines]
    if depth < 250:  # the span alone, written back though it nests deeper than orjson writes
        assert decode_spans(base64.b64decode(record["original_b64"]), "auto")[0].span_id == "eee19b7ec3c1b174"
    else:  # deeper than JSON readers go: the message, byte for byte
        assert base64.b64decode(record["original_b64"]) == value


def json_message(*spans: dict[str, Any], resource: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"resourceSpans": [{"resource": resource or {"attributes": []},
                                            "scopeSpans": [{"spans": list(spans)}]}]})


def json_span(span_id: str, *attrs: tuple[str, dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": span_id, "startTimeUnixNano": str(ns(T0)),
            "endTimeUnixNano": str(ns(T0) + 10**9), "attributes": [
                {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                {"key": "gen_ai.provider.name", "value": {"stringValue": "openai"}},
                {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4.1"}},
                *({"key": k, "value": v} for k, v in attrs)], **fields}


def test_one_bad_json_span_is_unmappable_alone_its_neighbours_land() -> None:
    good = json_span("eee19b7ec3c1b174", ("gen_ai.usage.input_tokens", {"intValue": "12"}))
    bad = json_span("aaa19b7ec3c1b174", ("gen_ai.usage.input_tokens", {"intValue": "12.0"}))
    odd_status = json_span("bbb19b7ec3c1b174", status={"code": "ERROR"})
    out = translate(json_message(good, bad, odd_status))
    assert out.events == 1 and out.reasons == [OTLP_UNMAPPABLE, OTLP_UNMAPPABLE]
    records = [orjson.loads(line) for lines in out.dead_letters.values() for line in lines]
    assert [r["source_line"] for r in records] == [1, 2] and "12.0" in records[0]["message"]


@pytest.mark.parametrize("value", [{"arrayValue": {"values": [{"stringValue": "workflow"}]}},
                                   {"kvlistValue": {"values": []}}])
def test_list_or_map_values_where_the_mapping_expects_text_never_crash(value: dict[str, Any]) -> None:
    span = json_span("eee19b7ec3c1b174", ("gen_ai.usage.input_tokens", {"intValue": "12"}))
    span["attributes"] = [kv for kv in span["attributes"] if kv["key"] != "gen_ai.operation.name"]
    for key in ("traceloop.span.kind", "gen_ai.agent.name", "gen_ai.operation.name"):
        one = {**span, "attributes": [*span["attributes"], {"key": key, "value": value}]}
        out = translate(json_message(one))
        assert out.spans == 1 and out.events + len(out.reasons) + sum(out.skipped.values()) == 1


def test_a_protobuf_message_whose_length_byte_reads_as_a_brace_is_still_protobuf() -> None:
    """0x0a (field 1) then a 123-byte ResourceSpans: the second byte is `{`; auto must not take it for JSON."""
    from opentelemetry.proto.trace.v1 import trace_pb2

    for pad in range(200):
        data = trace_pb2.TracesData()
        rs = data.resource_spans.add()
        rs.scope_spans.add().spans.add(name="x" * pad, trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
        if len(rs.SerializeToString()) == 123:
            break
    else:
        raise AssertionError("no padding made a 123-byte ResourceSpans")
    rec = SpanRecorder(RESOURCE)
    rec.span("chat", at(1), at(2), chat("gpt-4.1-mini", **{"gen_ai.usage.input_tokens": 5}))
    data.MergeFrom(trace_pb2.TracesData.FromString(otlp_proto(rec.finished())))
    value = data.SerializeToString()
    assert value[:2] == b"\x0a{"
    out = translate(value)
    assert (out.events, out.reasons, out.skipped) == (1, [], Counter({NOT_GENAI: 1}))


def test_a_remote_agent_is_priced_an_unknown_operation_is_skipped() -> None:
    rec = SpanRecorder(RESOURCE)
    usage = {"gen_ai.usage.input_tokens": 900, "gen_ai.usage.output_tokens": 80}
    rec.span("invoke_agent support", at(1), at(2), {  # SpanRecorder spans are CLIENT: a remote agent
        "gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "aws.bedrock",
        "gen_ai.request.model": "anthropic.claude-3-haiku-20240307-v1:0", **usage})
    rec.span("vectordb query", at(3), at(4), {"gen_ai.operation.name": "vectordb", "gen_ai.system": "openai",
                                             **usage})
    rec.span("rerank", at(5), at(6), {"gen_ai.operation.name": "rerank", "gen_ai.system": "cohere", **usage})
    out = translate(otlp_proto(rec.finished()))
    (event,) = events_of(out).values()
    assert (event["provider"], event["usage"]["input_tokens"]) == ("bedrock", 900)
    assert out.skipped == Counter({AGENT_OR_TOOL: 1, OTHER_OPERATION: 1})


@pytest.mark.parametrize("value", [b"{}", b'{"resourceLogs": []}'])
def test_a_json_document_that_is_not_traces_is_undecodable(value: bytes) -> None:
    assert translate(value).reasons == [OTLP_UNDECODABLE]


@pytest.mark.parametrize("encode", [otlp_proto, otlp_json])
def test_a_dead_letter_holds_only_what_the_mapping_reads_unless_redaction_is_off(encode) -> None:
    rec = SpanRecorder({**RESOURCE, "host.secret": "h"})
    rec.span("chat", at(1), at(2), {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                                    "gen_ai.prompt.0.content": "a secret prompt", "gen_ai.usage.input_tokens": 3})
    value = encode(rec.finished())
    for redact, secret in ((True, False), (False, True)):
        (record,) = [orjson.loads(line) for lines in translate(value, redact=redact).dead_letters.values()
                     for line in lines]
        raw = base64.b64decode(record["original_b64"])
        assert (b"secret prompt" in raw, b"host.secret" in raw) == (secret, secret)
        (span,) = decode_spans(raw, "auto")
        assert span.attributes["gen_ai.usage.input_tokens"] == 3  # what a replay needs is kept
