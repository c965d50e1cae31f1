"""Validate stage: split NDJSON messages into lines and check each against usage event schema v1."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

from streams.records import STAGE_VALIDATE, Accepted, Rejection, Source
from tally.config import SCHEMAS_DIR
from tally.partitioning import partition_for

SCHEMA_PATH = SCHEMAS_DIR / "usage_event.v1.schema.json"

# Reason codes (the DLQ's `reason`). Documented in the README's dead-letter section.
OVERSIZED = "oversized"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
SCHEMA_VIOLATION = "schema_violation"
MISSING_FIELD = "missing_field"
UNKNOWN_FIELD = "unknown_field"
UNSUPPORTED_VERSION = "unsupported_schema_version"
NEGATIVE_TOKENS = "negative_tokens"
TOKEN_OUT_OF_RANGE = "token_out_of_range"  # noqa: S105 - a reason code, not a secret
BAD_TIMESTAMP = "bad_timestamp"
BAD_EVENT_ID = "bad_event_id"
WRONG_PARTITION = "wrong_partition"
FUTURE_TIMESTAMP = "future_timestamp"

_TS_MIN = datetime(2000, 1, 1, tzinfo=UTC)
_TS_MAX = datetime(2100, 1, 1, tzinfo=UTC)
# RFC 3339 date-time with a mandatory offset (Z or ±hh:mm); fractional seconds optional.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:[Zz]|[+-]\d\d:\d\d)\Z")
_TOKEN_FIELDS = ("stream_terminated_at_token_n",)
_MAX_TOKENS = 100_000_000


def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """The event JSON Schema, the single source of truth for what a valid event is."""
    schema: dict[str, Any] = orjson.loads(path.read_bytes())
    return schema


class _Shape:
    """The schema's constraints, read from the schema file, in the form the fast path checks."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        props = schema["properties"]
        self.allowed = frozenset(props)
        self.required = frozenset(schema["required"])
        self.usage_keys = frozenset(props["usage"]["properties"])
        self.event_id_re = re.compile(props["event_id"]["pattern"])
        self.provider_re = re.compile(props["provider"]["pattern"])
        self.statuses = frozenset(props["status"]["enum"])
        self.max_tags = props["tags"]["maxProperties"]
        self.max_tag_key = props["tags"]["propertyNames"]["maxLength"]
        self.max_tag_value = props["tags"]["additionalProperties"]["maxLength"]
        self.max_tools = props["tool_calls"]["maxProperties"]
        self.max_tool_key = props["tool_calls"]["propertyNames"]["maxLength"]
        self.max_tool_calls = props["tool_calls"]["additionalProperties"]["maximum"]
        self.max_attempt = props["attempt"]["maximum"]
        self.max_latency = props["latency_ms"]["maximum"]
        self.max_service_tier = props["service_tier"]["maxLength"]
        self.max_error = props["error"]["maxLength"]
        self.max_usage_note = props["usage_note"]["maxLength"]
        self.max_token = schema["definitions"]["tokens"]["maximum"]


def _is_int(v: object) -> bool:
    return type(v) is int


def _str_len_ok(v: object, lo: int, hi: int) -> bool:
    return type(v) is str and lo <= len(v) <= hi


class Validator:
    """Turns raw llm.usage.v1 message values into accepted events and rejections.

    Contract: every line of the message ends up in exactly one of the two lists. Nothing raises for bad input.
    A valid event is one the JSON Schema accepts and whose timestamp parses as an RFC 3339 instant with an offset
    between 2000 and 2100, at most `max_future_skew` ahead of the ingest time `now` the caller passes (later is
    future_timestamp: one event from a skewed gateway clock would otherwise be priced at a future date and carry
    the event-time clocks downstream with it). When `partitions` is given, an event whose logical request id does
    not hash to the message's partition is rejected as wrong_partition, since splitting a logical request across
    partitions would split its fold state.

    Redaction (`redact`, the dlq_redact_fields setting): a rejected line that parses as an object is stored in the
    dead-letter topic with the values of these top-level fields replaced by "[redacted]" (names kept, so a replay can
    still `--unset` them); "unknown" names every field event v1 does not have (a `prompt` a gateway sent by mistake
    would otherwise sit verbatim in the DLQ for the topic's retention). Empty: originals byte for byte.
    """

    def __init__(self, max_line_bytes: int = 16 * 1024, max_message_bytes: int = 1024 * 1024,
                 schema: Mapping[str, Any] | None = None,
                 max_future_skew: timedelta = timedelta(minutes=15),
                 redact: Sequence[str] = ("unknown",)) -> None:
        schema = dict(schema or load_schema())
        self.known_fields = frozenset(schema.get("properties", {}))
        self.redact_unknown = "unknown" in redact
        self.redact_named = frozenset(f for f in redact if f and f != "unknown")
        self.max_future_skew = max_future_skew
        self.max_line_bytes = max_line_bytes
        self.max_message_bytes = max_message_bytes
        self._full: Callable[[Any], Any] = fastjsonschema.compile(schema)
        self._shape = _Shape(schema)

    # -- the fast path: a hand check that is never looser than the schema (tests/unit/test_validate.py proves it) --
    def fast_ok(self, e: dict[str, Any]) -> bool:
        """True only when `e` certainly satisfies the schema; False means "ask the full validator"."""
        s = self._shape
        keys = e.keys()
        if not (keys <= s.allowed and keys >= s.required):
            return False
        if not (_is_int(e["schema_version"]) and e["schema_version"] == 1):
            return False
        eid = e["event_id"]
        if not (_str_len_ok(eid, 1, 128) and s.event_id_re.match(eid)):
            return False
        if not _str_len_ok(e["request_id"], 1, 128):
            return False
        ts = e["timestamp"]
        if not (type(ts) is str and len(ts) <= 40):
            return False
        prov = e["provider"]
        if not (_str_len_ok(prov, 1, 64) and s.provider_re.match(prov)):
            return False
        if not _str_len_ok(e["model_actual"], 1, 128) or e["status"] not in s.statuses:
            return False
        usage = e["usage"]
        if type(usage) is not dict or not usage.keys() <= s.usage_keys:
            return False
        for v in usage.values():
            if not (_is_int(v) and 0 <= v <= s.max_token):
                return False
        tags = e["tags"]
        if type(tags) is not dict or len(tags) > s.max_tags:
            return False
        for k, v in tags.items():
            if not (0 < len(k) <= s.max_tag_key and type(v) is str and len(v) <= s.max_tag_value):
                return False
        if len(keys) > len(s.required):
            return self._fast_optional(e)
        return True

    def _fast_optional(self, e: dict[str, Any]) -> bool:
        s = self._shape
        get = e.get
        if "parent_request_id" in e:
            v = e["parent_request_id"]
            if v is not None and not _str_len_ok(v, 1, 128):
                return False
        if "attempt" in e and not (_is_int(e["attempt"]) and 0 <= e["attempt"] <= s.max_attempt):
            return False
        for name in ("final", "usage_reported", "batch"):
            if name in e and type(e[name]) is not bool:
                return False
        if "model_requested" in e and not _str_len_ok(e["model_requested"], 1, 128):
            return False
        v = get("fallback_from")
        if v is not None and not _str_len_ok(v, 0, 128):
            return False
        v = get("error")
        if v is not None and not _str_len_ok(v, 0, s.max_error):
            return False
        v = get("stream_terminated_at_token_n")
        if v is not None and not (_is_int(v) and 0 <= v <= s.max_token):
            return False
        if "usage_note" in e and not _str_len_ok(e["usage_note"], 1, s.max_usage_note):
            return False
        if "service_tier" in e and not _str_len_ok(e["service_tier"], 1, s.max_service_tier):
            return False
        if "latency_ms" in e and not (_is_int(e["latency_ms"]) and 0 <= e["latency_ms"] <= s.max_latency):
            return False
        if "tool_calls" in e:
            tools = e["tool_calls"]
            if type(tools) is not dict or len(tools) > s.max_tools:
                return False
            for k, n in tools.items():
                if not (len(k) <= s.max_tool_key and _is_int(n) and 0 <= n <= s.max_tool_calls):
                    return False
        return True

    def redact(self, rejection: Rejection) -> Rejection:
        """The rejection as the DLQ stores it: redacted fields' values replaced in its original, the message saying so.

        Only a line that parses as a JSON object can be redacted; anything else is kept byte for byte.
        """
        if not (self.redact_unknown or self.redact_named) or not rejection.raw.lstrip().startswith(b"{"):
            return rejection
        try:
            event = orjson.loads(rejection.raw)
        except orjson.JSONDecodeError:
            return rejection
        hidden = sorted(k for k in event if (self.redact_unknown and k not in self.known_fields)
                        or k in self.redact_named)
        if not hidden:
            return rejection
        rejection.raw = orjson.dumps({k: "[redacted]" if k in hidden else v for k, v in event.items()})
        rejection.message += f" (the stored original has the value of {', '.join(map(repr, hidden))} redacted)"
        return rejection

    def explain(self, e: Any) -> tuple[str, str, str | None] | None:
        """Run the full JSON Schema validator: None when valid, else (reason, human message, JSON path)."""
        try:
            self._full(e)
        except fastjsonschema.JsonSchemaValueException as exc:
            return _classify(exc)
        return None

    def validate_message(self, value: bytes | None, source: Source, partitions: int | None = None, *,
                         now: datetime) -> tuple[list[Accepted], list[Rejection]]:
        """Split one Kafka message value into accepted events and rejections (one per bad line); `now` = ingest time."""
        accepted: list[Accepted] = []
        rejected: list[Rejection] = []
        if value is None:
            rejected.append(Rejection(INVALID_JSON, STAGE_VALIDATE, "message has no value (tombstone)", b"",
                                      source, None))
            return accepted, rejected
        if len(value) > self.max_message_bytes:
            rejected.append(Rejection(
                OVERSIZED, STAGE_VALIDATE,
                f"message of {len(value)} bytes exceeds the {self.max_message_bytes}-byte limit; "
                "split it into smaller NDJSON messages", value, source, None))
            return accepted, rejected
        for n, raw_line in enumerate(value.split(b"\n"), start=1):
            line = raw_line[:-1] if raw_line.endswith(b"\r") else raw_line
            if not line.strip():
                continue
            ok, bad = self.validate_line(line, source, n, partitions, now)
            if ok is not None:
                accepted.append(ok)
            else:
                assert bad is not None
                rejected.append(bad)
        return accepted, rejected

    def validate_line(self, line: bytes, source: Source, n: int, partitions: int | None, now: datetime
                      ) -> tuple[Accepted | None, Rejection | None]:
        """Validate one NDJSON line; exactly one of the two results is set (a rejection redacted: see `redact`)."""
        ok, bad = self._validate_line(line, source, n, partitions, now)
        return ok, (None if bad is None else self.redact(bad))

    def _validate_line(self, line: bytes, source: Source, n: int, partitions: int | None, now: datetime
                       ) -> tuple[Accepted | None, Rejection | None]:
        if len(line) > self.max_line_bytes:
            return None, Rejection(OVERSIZED, STAGE_VALIDATE,
                                   f"line of {len(line)} bytes exceeds the {self.max_line_bytes}-byte limit",
                                   line, source, n)
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return None, Rejection(INVALID_JSON, STAGE_VALIDATE, f"not valid JSON: {exc}", line, source, n)
        if type(event) is not dict:
            return None, Rejection(NOT_AN_OBJECT, STAGE_VALIDATE,
                                   f"a usage event must be a JSON object, got {_json_type(event)}",
                                   line, source, n)
        if not self.fast_ok(event):
            problem = self.explain(event)
            if problem is not None:
                reason, message, path = problem
                eid = event.get("event_id")
                return None, Rejection(reason, STAGE_VALIDATE, message, line, source, n,
                                       eid if isinstance(eid, str) else None, path)
            _integral_floats_to_int(event)
        ts_text: str = event["timestamp"]
        ts = _parse_ts(ts_text)
        if ts is None:
            return None, Rejection(BAD_TIMESTAMP, STAGE_VALIDATE,
                                   f"timestamp {ts_text!r} is not an RFC 3339 instant with an offset "
                                   "between 2000 and 2100", line, source, n, event["event_id"], "$.timestamp")
        ahead = ts - now
        if ahead > self.max_future_skew:
            return None, Rejection(
                FUTURE_TIMESTAMP, STAGE_VALIDATE,
                f"timestamp {ts_text!r} is {_duration(ahead)} ahead of ingest time "
                f"{now.astimezone(UTC).isoformat(timespec='seconds').replace('+00:00', 'Z')}, more than the "
                f"{_duration(self.max_future_skew)} allowed (max_future_skew_s): fix the gateway's clock, then "
                "replay", line, source, n, event["event_id"], "$.timestamp")
        parent = event.get("parent_request_id")
        logical = parent if parent else event["request_id"]
        if partitions is not None:
            expected = partition_for(logical, partitions)
            if expected != source.partition:
                return None, Rejection(
                    WRONG_PARTITION, STAGE_VALIDATE,
                    f"logical request {logical!r} belongs on partition {expected} of {partitions}, "
                    f"not {source.partition}: key single-event messages by the logical request id with the "
                    "murmur2 partitioner, or use the tally SDK", line, source, n, event["event_id"])
        return Accepted(event, line, source, n, ts, logical), None


def _integral_floats_to_int(e: dict[str, Any]) -> None:
    """JSON Schema counts 2.0 as an integer; downstream columns are integers, so make it one."""
    for name in ("attempt", "latency_ms", "stream_terminated_at_token_n"):
        if type(e.get(name)) is float:
            e[name] = int(e[name])
    for bag in (e.get("usage"), e.get("tool_calls")):
        if isinstance(bag, dict):
            for k, val in bag.items():
                if type(val) is float:
                    bag[k] = int(val)


def _parse_ts(text: str) -> datetime | None:
    if not _RFC3339.match(text):
        return None
    try:
        ts = datetime.fromisoformat(text.upper())
    except ValueError:
        return None
    if ts.tzinfo is None:
        return None
    ts = ts.astimezone(UTC)
    if not _TS_MIN <= ts < _TS_MAX:
        return None
    return ts


def _duration(d: timedelta) -> str:
    """A positive duration, briefly and exactly enough for a rejection message: 2d 3h 4m 5s."""
    total = int(d.total_seconds())
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")) if n]
    return " ".join(parts) or f"{d.total_seconds():.3f}s"


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return type(v).__name__


def _json_path(parts: list[str]) -> str:
    out = "$"
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def _unknown_fields(exc: fastjsonschema.JsonSchemaValueException, message: str) -> str:
    """The message for top-level fields event v1 does not know: their names, and how to send the line again."""
    value, definition = exc.value, exc.definition
    known = definition.get("properties", {}) if isinstance(definition, dict) else {}
    if isinstance(value, dict) and known:
        names = ", ".join(repr(k) for k in sorted(str(k) for k in value if k not in known))
    else:
        names = message.split("contain ", 1)[-1].removesuffix(" properties")
    return (f"unknown top-level field(s) {names}: usage event v1 has no such field (remove it at the gateway, or "
            f"replay with `tally dlq replay --reason unknown_field --unset NAME`)")


def _classify(exc: fastjsonschema.JsonSchemaValueException) -> tuple[str, str, str]:
    """Map the schema's first failing rule to a precise reason code, a human message and a JSON path."""
    path_parts = [str(p) for p in (exc.path or ["data"])]
    path = _json_path(path_parts)
    message = exc.message.replace("data.", "$.", 1).replace("data ", "$ ", 1)
    field = path_parts[1] if len(path_parts) > 1 else ""
    rule = exc.rule
    if rule == "additionalProperties" and len(path_parts) == 1:
        return UNKNOWN_FIELD, _unknown_fields(exc, message), path
    if rule == "required":
        return MISSING_FIELD, f"{message} (required)", path
    if field == "schema_version":
        return UNSUPPORTED_VERSION, f"schema_version must be 1: {message}", path
    if field in ("usage", *_TOKEN_FIELDS) and len(path_parts) >= 2 and rule in ("minimum", "maximum"):
        if rule == "minimum":
            return NEGATIVE_TOKENS, f"token count at {path} is negative", path
        return TOKEN_OUT_OF_RANGE, f"token count at {path} exceeds {_MAX_TOKENS:,}", path
    if field == "event_id":
        return BAD_EVENT_ID, f"event_id must be 1-128 characters of [A-Za-z0-9._:-]: {message}", path
    if field == "timestamp":
        return BAD_TIMESTAMP, f"timestamp must be an RFC 3339 date-time with an offset: {message}", path
    return SCHEMA_VIOLATION, message, path
