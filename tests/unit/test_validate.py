import base64
import copy
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.records import Source
from streams.validate import Validator
from tally.partitioning import partition_for

SRC = Source("llm.usage.v1", 2, 41)
NOW = datetime(2026, 11, 23, 10, 5, tzinfo=UTC)  # the injected ingest time; good() is stamped 5 minutes before


@pytest.fixture(scope="module")
def v() -> Validator:
    return Validator()


def good(**overrides):
    e = {
        "schema_version": 1, "event_id": "ev-1", "request_id": "req-1", "timestamp": "2026-11-23T10:00:00.123Z",
        "provider": "openai", "model_actual": "gpt-5", "status": "ok",
        "usage": {"input_tokens": 100, "output_tokens": 20, "reasoning_tokens": 5},
        "tags": {"team_id": "search", "feature_id": "search_answer"},
    }
    e.update(overrides)
    return {k: val for k, val in e.items() if val is not ...}


def line(e) -> bytes:
    return orjson.dumps(e)


def check_one(v: Validator, raw: bytes, partitions=None):
    ok, bad = v.validate_message(raw, SRC, partitions, now=NOW)
    assert len(ok) + len(bad) == 1
    return (ok[0] if ok else None), (bad[0] if bad else None)


def test_valid_event_is_accepted_with_utc_ts_and_logical_id(v):
    ok, bad = check_one(v, line(good(timestamp="2026-11-23T12:00:00+02:00", parent_request_id="lr-9")))
    assert bad is None
    assert ok.ts == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert ok.logical_id == "lr-9"
    assert ok.source == SRC and ok.line == 1


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_an_event_dated_far_ahead_of_ingest_time_is_dead_lettered_not_priced(v):
    # Issue 11: one event stamped 2099-06-01 used to be accepted and priced, and carried the clocks with it.
    ahead = NOW + timedelta(days=26487, hours=13, minutes=55)  # decades past the injected ingest time
    stamp = ahead.strftime("%Y-%m-%dT%H:%M:%SZ")
    raw = line(good(timestamp=stamp))
    ok, bad = check_one(v, raw)
    assert ok is None
    assert (bad.reason, bad.stage, bad.path, bad.event_id, bad.raw) == (
        "future_timestamp", "validate", "$.timestamp", "ev-1", raw)
    assert bad.message.startswith(f"timestamp '{stamp}' is 26487d 13h 55m ahead")
    assert "ahead of ingest time 2026-11-23T10:05:00Z" in bad.message
    assert "more than the 15m allowed" in bad.message


@pytest.mark.parametrize(("ahead", "accepted"), [
    (timedelta(minutes=15), True),                              # exactly the allowed skew
    (timedelta(minutes=15, milliseconds=1), False),
    (timedelta(days=1), False),
    (-timedelta(days=400), True),                               # old events are late, not wrong
])
def test_the_skew_limit_is_measured_from_the_injected_ingest_time(v, ahead, accepted):
    ok, bad = check_one(v, line(good(timestamp=_iso(NOW + ahead))))
    assert (ok is not None) is accepted, bad and bad.message
    # The same line with ingest time moved on by the same amount is always accepted: only `now` decides.
    later = NOW + max(ahead, timedelta(0))
    got, rejected = v.validate_message(line(good(timestamp=_iso(NOW + ahead))), SRC, now=later)
    assert len(got) == 1 and rejected == []


def test_the_skew_limit_is_configurable():
    strict = Validator(max_future_skew=timedelta(0))
    ok, bad = check_one(strict, line(good(timestamp=_iso(NOW + timedelta(seconds=1)))))
    assert ok is None and bad.reason == "future_timestamp"
    assert "more than the 0.000s allowed" in bad.message


def test_logical_id_defaults_to_request_id(v):
    ok, _ = check_one(v, line(good(parent_request_id=None)))
    assert ok.logical_id == "req-1"


@pytest.mark.parametrize(("raw", "reason", "path"), [
    (b'{"schema_version": 1, "event_id"', "invalid_json", None),
    (b"[1,2]", "not_an_object", None),
    (b'"just a string"', "not_an_object", None),
    (line(good(prompt="secret text")), "unknown_field", "$"),
    (line(good(usage={"input_tokens": -1})), "negative_tokens", "$.usage.input_tokens"),
    (line(good(usage={"output_tokens": 100_000_001})), "token_out_of_range", "$.usage.output_tokens"),
    (line(good(stream_terminated_at_token_n=-3, status="terminated")), "negative_tokens",
     "$.stream_terminated_at_token_n"),
    (line(good(timestamp="yesterday")), "bad_timestamp", "$.timestamp"),
    (line(good(timestamp="2026-11-23T10:00:00")), "bad_timestamp", "$.timestamp"),
    (line(good(timestamp="2026-02-30T10:00:00Z")), "bad_timestamp", "$.timestamp"),
    (line(good(timestamp="1970-01-01T00:00:00Z")), "bad_timestamp", "$.timestamp"),
    (line(good(event_id="has space")), "bad_event_id", "$.event_id"),
    (line(good(event_id="x" * 129)), "bad_event_id", "$.event_id"),
    (line(good(event_id=...)), "missing_field", "$"),
    (line(good(schema_version=2)), "unsupported_schema_version", "$.schema_version"),
    (line(good(status="cancelled")), "schema_violation", "$.status"),
    (line(good(usage={"input_tokens": 1.5})), "schema_violation", "$.usage.input_tokens"),
    (line(good(usage={"input_tokens": True})), "schema_violation", "$.usage.input_tokens"),
    (line(good(usage={"audio_tokens": 3})), "schema_violation", "$.usage"),
    (line(good(tags={"team_id": 7})), "schema_violation", "$.tags.team_id"),
    (line(good(tags={f"k{i}": "v" for i in range(33)})), "schema_violation", "$.tags"),
    (line(good(provider="OpenAI")), "schema_violation", "$.provider"),
])
def test_rejections_carry_precise_reason_and_path(v, raw, reason, path):
    ok, bad = check_one(v, raw)
    assert ok is None
    assert bad.reason == reason, bad.message
    assert bad.stage == "validate"
    assert bad.path == path
    assert bad.message
    # Stored as sent, but for the value of a field event v1 does not have (dlq_redact_fields, default "unknown").
    stored = raw if reason != "unknown_field" else orjson.dumps({**orjson.loads(raw), "prompt": "[redacted]"})
    assert bad.raw == stored
    rec = bad.to_record()
    assert base64.b64decode(rec["original_b64"]) == stored
    assert (rec["source_topic"], rec["source_partition"], rec["source_offset"], rec["source_line"]) == (
        "llm.usage.v1", 2, 41, 1)


def test_oversized_line_and_message():
    v = Validator(max_line_bytes=200, max_message_bytes=1000)
    big = line(good(tags={"team_id": "x" * 250}))
    ok, bad = v.validate_message(big, SRC, now=NOW)
    assert not ok and bad[0].reason == "oversized" and "exceeds the 200-byte limit" in bad[0].message
    ok, bad = v.validate_message(b"\n".join([line(good())] * 10), SRC, now=NOW)
    assert not ok and len(bad) == 1 and bad[0].reason == "oversized" and bad[0].line is None


def test_bad_line_goes_alone_and_good_lines_of_the_message_survive(v):
    msg = b"\n".join([line(good(event_id="a")), b"{nope", line(good(event_id="b")), b"",
                      line(good(event_id="c", usage={"input_tokens": -2}))]) + b"\n"
    ok, bad = v.validate_message(msg, SRC, now=NOW)
    assert [a.event["event_id"] for a in ok] == ["a", "b"]
    assert [a.line for a in ok] == [1, 3]
    assert [(b.reason, b.line) for b in bad] == [("invalid_json", 2), ("negative_tokens", 5)]
    assert bad[1].event_id == "c"


def test_crlf_lines_are_accepted(v):
    ok, bad = v.validate_message(line(good(event_id="a")) + b"\r\n" + line(good(event_id="b")) + b"\r\n", SRC, now=NOW)
    assert len(ok) == 2 and not bad


def test_wrong_partition(v):
    lid = "logical-42"
    right = partition_for(lid, 4)
    ok, bad = v.validate_message(line(good(request_id=lid)), Source("t", right, 0), 4, now=NOW)
    assert ok and not bad
    ok, bad = v.validate_message(line(good(request_id=lid)), Source("t", (right + 1) % 4, 0), 4, now=NOW)
    assert not ok and bad[0].reason == "wrong_partition"
    assert f"partition {right}" in bad[0].message


def test_tombstone_is_rejected_not_raised(v):
    ok, bad = v.validate_message(None, SRC, now=NOW)
    assert not ok and bad[0].reason == "invalid_json"


# -- the fast path is never looser than the JSON Schema (the schema file is the source of truth) --
_mutations = st.sampled_from([
    ("event_id", "ok-id"), ("event_id", ""), ("event_id", "bad id"), ("event_id", 5),
    ("request_id", ""), ("request_id", "r" * 129), ("parent_request_id", None), ("parent_request_id", ""),
    ("parent_request_id", "p1"), ("attempt", 0), ("attempt", -1), ("attempt", 1001), ("attempt", True),
    ("attempt", 2.0), ("final", 1), ("final", False), ("provider", "Bad"), ("provider", ""), ("model_actual", ""),
    ("model_requested", ""), ("model_requested", "m"), ("fallback_from", None), ("fallback_from", ""),
    ("fallback_from", 3), ("status", "ok"), ("status", "weird"), ("error", None), ("error", "x" * 257),
    ("usage", {}), ("usage", {"input_tokens": 0}), ("usage", {"input_tokens": -1}), ("usage", []),
    ("usage", {"cache_write_1h_tokens": 100_000_000}), ("usage", {"cache_write_1h_tokens": 100_000_001}),
    ("usage_reported", "no"), ("usage_reported", False), ("usage_note", "anthropic: bad"), ("usage_note", ""),
    ("usage_note", 3), ("usage_note", "n" * 513), ("stream_terminated_at_token_n", None),
    ("stream_terminated_at_token_n", 10), ("stream_terminated_at_token_n", -1), ("batch", True), ("batch", None),
    ("service_tier", ""), ("service_tier", "flex"), ("service_tier", "x" * 33), ("tool_calls", {}),
    ("tool_calls", {"web_search": 2}), ("tool_calls", {"web_search": -1}), ("tool_calls", {"w" * 65: 1}),
    ("tool_calls", {f"t{i}": 1 for i in range(33)}), ("latency_ms", 0), ("latency_ms", -1),
    ("latency_ms", 86_400_001), ("tags", {}), ("tags", {"": "x"}), ("tags", {"k" * 65: "x"}),
    ("tags", {"k": "v" * 257}), ("tags", {"k": None}), ("tags", []), ("schema_version", 1.0),
    ("schema_version", True), ("extra", 1), ("timestamp", 5),
])


@settings(max_examples=400, deadline=None)
@given(st.lists(_mutations, max_size=4), st.lists(st.sampled_from(["event_id", "usage", "tags", "status"]),
                                                   max_size=1))
def test_fast_path_never_accepts_what_the_schema_rejects(mutations, drops):
    v = Validator()
    e = copy.deepcopy(good())
    for key, value in mutations:
        e[key] = copy.deepcopy(value)
    for key in drops:
        e.pop(key, None)
    schema_ok = v.explain(e) is None
    if v.fast_ok(e):
        assert schema_ok, e
    # and it does not send common valid events to the slow path
    if schema_ok and not any(type(val) is float for val in e.values()):
        assert v.fast_ok(e), e


def test_integral_floats_are_accepted_as_ints(v):
    ok, bad = check_one(v, line(good(attempt=2.0, usage={"input_tokens": 10.0})))
    assert bad is None and type(ok.event["attempt"]) is int and type(ok.event["usage"]["input_tokens"]) is int


def test_redaction_keeps_names_and_can_be_turned_off_or_widened():
    secret = line(good(prompt="the user's secret prompt"))
    _, bad = check_one(Validator(redact=()), secret)
    assert bad.raw == secret and "redacted" not in bad.message
    _, bad = check_one(Validator(), secret)
    assert b"secret" not in bad.raw and orjson.loads(bad.raw)["prompt"] == "[redacted]"
    assert bad.message.endswith("(the stored original has the value of 'prompt' redacted)")
    # A named field is redacted in any refused line, whatever the reason; accepted lines are untouched.
    _, bad = check_one(Validator(redact=("tags",)), line(good(timestamp="yesterday")))
    assert bad.reason == "bad_timestamp" and orjson.loads(bad.raw)["tags"] == "[redacted]"
    ok, _ = check_one(Validator(redact=("tags",)), line(good()))
    assert ok is not None and ok.raw == line(good())
