"""The alert consumer: llm.cost.alerts.v1 → deduplicated pages to PagerDuty, Slack, a JSON webhook or stdout.

Input: NDJSON alert records (one or more per Kafka message), keyed by `incident_key` so that the records of one
incident stay in order on one partition. A malformed line is logged with topic[partition]@offset and skipped.

The table, `<data_dir>/alerts/incidents.json`, holds three things written together in one atomic write (temp file,
fsync, os.replace, fsync of the directory): the open incidents, the input position (topic and partition → the next
offset to read) and the outbox (each decided notification with the sinks that have not answered it yet). Kafka's
committed offsets are a lag hint only: a restart reads from the stored position.

Protocol (each sink gets each decided notification once; a crash costs at most the one a sink was answering):
  1. Start: load the table. Deliver what is left in its outbox (step 4) before consuming anything. Subscribe; on
     every assignment, seek each partition to its stored position (none stored: the committed offset, else the
     earliest retained alert).
  2. Decide: each record of the batch goes through `decide` against the table in memory; the notifications go to
     the outbox, each pending for every configured sink.
     Crash here: nothing of the batch was written; a restart reads it again from the stored position and decides it
     against the same table. Nothing was sent, so nothing is sent twice.
  3. Save: the table, the batch's next offsets and the outbox, in one atomic write (failpoint alerts.after_save).
     Crash after it: the restart delivers the whole outbox, then reads past the batch. Nothing is sent twice.
  4. Deliver: each sink gets the outbox in order. After each answer (delivered, or a permanent failure: any 4xx
     but 429, logged and skipped for that sink) the notification is marked for that sink and the table is written
     again: about 10 ms per answer on a small VM disk (two fsyncs), so alerts are fine and 100 notifications to 4
     sinks take ~4 s. A retryable failure (connection error, HTTP 5xx or 429) stops that sink's queue and is
     retried with exponential backoff until it succeeds or `stop` is set (the rest of the outbox stays saved).
     Crash between a sink's answer and its mark (failpoint alerts.in_flight): the restart sends that one
     notification to that sink again, with the same dedup_key (PagerDuty absorbs it; Slack, the webhook and stdout
     show it twice). Crash after a mark (alerts.mid_batch after the batch's first): only the rest is sent. A sink's
     queue is marked in order, so a trigger is never sent again once its resolve was delivered.
  5. Commit the batch's offsets to Kafka, for lag monitoring (failpoint alerts.after_delivery just before it).
     Crash before it, or a failed commit: nothing is sent again; the committed offsets lag until the next batch.
The table is local: run one `tally alerts` process per consumer group. Deleting it forgets the open incidents, the
position and the outbox: the consumer then resumes from its committed offsets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from tally.config import Settings
from tally.errors import ConfigError, TallyError
from tally.failpoints import Failpoints
from tally.kafka_auth import metadata, watched

log = logging.getLogger("tally.alerts")

ALERT_VERSION = 1
STATE_VERSION = 2  # 2 adds the input position and the outbox; a version 1 file still loads
SINKS = ("stdout", "console", "pagerduty", "slack", "webhook")
DEFAULT_PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
DEFAULT_RENOTIFY_S = 1800.0
KINDS = ("anomaly", "budget")
STATES = ("firing", "resolved")
SEVERITY_RANK = {"warning": 1, "critical": 2}
MAX_INCIDENT_KEY = 255  # PagerDuty's dedup_key limit
MAX_SUMMARY = 1024  # PagerDuty's payload.summary limit
MAX_LINE_BYTES = 64 * 1024
_MAX_RESPONSE_BYTES = 64 * 1024
# RFC 3339 date-time with a mandatory offset (Z or ±hh:mm), as streams/validate.py accepts for usage events.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:[Zz]|[+-]\d\d:\d\d)\Z")

Action = Literal["trigger", "renotify", "resolve"]
Reason = Literal["opened", "escalated", "reminder", "resolved"]


class MalformedAlert(TallyError, ValueError):
    """An alert line that does not follow the alert record contract (v1); it is logged and skipped."""


class AlertStateError(TallyError):
    """The incident table on disk cannot be read or written; the consumer stops without committing."""


class DeliveryError(TallyError):
    """A sink did not accept a notification; `retryable` says whether trying again can help."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class AlertsConfig:
    """What `tally alerts` pages, and how. Secrets (the routing key, webhook URLs) are never logged or repr'd."""

    sinks: tuple[str, ...] = ("stdout",)
    pagerduty_url: str = DEFAULT_PAGERDUTY_URL
    pagerduty_routing_key: str = field(default="", repr=False)
    slack_webhook_url: str = field(default="", repr=False)
    webhook_url: str = field(default="", repr=False)
    renotify_s: float = DEFAULT_RENOTIFY_S
    http_timeout_s: float = 10.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    poll_timeout_s: float = 0.5
    batch_messages: int = 100
    group_id: str = ""  # empty: settings.group_id("alerts")

    def problems(self) -> list[str]:
        """Every problem with this configuration, all at once (empty when valid); never echoes a secret."""
        out: list[str] = []
        if not self.sinks:
            out.append(f"alerts need at least one sink (one of {', '.join(SINKS)})")
        for sink in self.sinks:
            if sink not in SINKS:
                out.append(f"unknown sink {sink!r}; choose from {', '.join(SINKS)}")
        if len(set(self.sinks)) != len(self.sinks):
            out.append("each sink may be named once")
        needs = (("pagerduty", "pagerduty_routing_key", "--pagerduty-routing-key"),
                 ("slack", "slack_webhook_url", "--slack-webhook-url"),
                 ("webhook", "webhook_url", "--webhook-url"))
        for sink, name, option in needs:
            if sink in self.sinks and not getattr(self, name).strip():
                out.append(f"{sink} sink needs {option}")
        urls = (("pagerduty", "pagerduty_url"), ("slack", "slack_webhook_url"), ("webhook", "webhook_url"))
        for sink, name in urls:
            value = getattr(self, name).strip()
            if sink in self.sinks and value and not value.lower().startswith(("http://", "https://")):
                out.append(f"{name} must be an http:// or https:// URL")
        if not self.renotify_s > 0:
            out.append(f"renotify_s must be positive, got {self.renotify_s}")
        for name in ("http_timeout_s", "retry_initial_s", "poll_timeout_s"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be positive, got {getattr(self, name)}")
        if not self.retry_max_s >= self.retry_initial_s:
            out.append("retry_max_s must be at least retry_initial_s")
        if self.batch_messages < 1:
            out.append(f"batch_messages must be at least 1, got {self.batch_messages}")
        return out

    def validated(self) -> AlertsConfig:
        """Return self, or raise ConfigError (a TallyError) listing every problem."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def secrets(self) -> tuple[str, ...]:
        """The secret values, to scrub from any text that is logged."""
        values = (self.pagerduty_routing_key, self.slack_webhook_url, self.webhook_url)
        return tuple(v for v in (s.strip() for s in values) if v)

    def redacted(self) -> dict[str, Any]:
        """The configuration for display, with every secret shown as *** (or empty when unset)."""
        out = dataclasses.asdict(self)
        for name in ("pagerduty_routing_key", "slack_webhook_url", "webhook_url"):
            out[name] = "***" if out[name] else ""
        return out


# ---------------------------------------------------------------- records and decisions


@dataclass(frozen=True)
class Alert:
    """One valid alert record (contract v1); `record` is the record as received, unknown fields included."""

    incident_key: str
    kind: str
    state: str
    feature_id: str
    team_id: str
    signal: str
    severity: str
    value: Any  # number or string, display only: kept exactly as given (JSON numbers parse to Decimal)
    baseline: Any
    score: Any
    dimension: str
    explanation: str
    detected_at: str
    record: Mapping[str, Any]


@dataclass
class Incident:
    """An open incident: what was paged for it, and when last."""

    incident_key: str
    kind: str
    feature_id: str
    team_id: str
    signal: str
    severity: str  # the highest severity paged while open
    opened_at: datetime
    last_notified_at: datetime
    notifications: int = 1

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["opened_at"] = self.opened_at.isoformat()
        out["last_notified_at"] = self.last_notified_at.isoformat()
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Incident:
        values = dict(obj)
        for name in ("opened_at", "last_notified_at"):
            ts = datetime.fromisoformat(values[name])
            if ts.tzinfo is None:
                raise ValueError(f"{name} has no offset")
            values[name] = ts
        return cls(**values)


@dataclass(frozen=True)
class Notification:
    """One thing to tell every sink: trigger (new or escalated), renotify (a reminder) or resolve."""

    action: Action
    reason: Reason
    severity: str  # the severity to page with
    alert: Alert

    @property
    def incident_key(self) -> str:
        return self.alert.incident_key


def _is_number(v: object) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, float | Decimal):
        return math.isfinite(v)
    return False


def _is_rfc3339(text: str) -> bool:
    if not _RFC3339.match(text):
        return False
    try:
        return datetime.fromisoformat(text.upper()).tzinfo is not None
    except ValueError:
        return False


def parse_alert(record: Any) -> Alert:
    """Check one decoded alert line against the record contract v1; MalformedAlert names the first problem."""
    if not isinstance(record, Mapping):
        raise MalformedAlert(f"an alert record must be a JSON object, got {type(record).__name__}")
    version = record.get("alert_version")
    if type(version) is not int or version != ALERT_VERSION:
        raise MalformedAlert(f"alert_version must be {ALERT_VERSION}, got {version!r}")
    problems: list[str] = []

    def text(name: str, non_empty: bool = True, limit: int | None = None) -> str:
        v = record.get(name)
        if not isinstance(v, str):
            problems.append(f"{name} must be a string, got {type(v).__name__}")
            return ""
        if non_empty and not v.strip():
            problems.append(f"{name} must not be empty")
        if limit is not None and len(v) > limit:
            problems.append(f"{name} is longer than {limit} characters")
        return v

    def choice(name: str, allowed: Sequence[str]) -> str:
        v = record.get(name)
        if v not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
            return ""
        return str(v)

    key = text("incident_key", limit=MAX_INCIDENT_KEY)
    kind = choice("kind", KINDS)
    state = choice("state", STATES)
    feature_id = text("feature_id", non_empty=kind != "budget")  # a tenant's budget has no feature
    team_id = text("team_id", non_empty=False)
    signal = text("signal")
    severity = choice("severity", tuple(SEVERITY_RANK))
    for name in ("value", "baseline"):
        v = record.get(name)
        if not (_is_number(v) or isinstance(v, str)):
            problems.append(f"{name} must be a finite number or a string, got {v!r}")
    if not _is_number(record.get("score")):
        problems.append(f"score must be a finite number, got {record.get('score')!r}")
    dimension = text("dimension", non_empty=False)
    explanation = text("explanation", non_empty=False)
    detected_at = text("detected_at")
    if detected_at and not _is_rfc3339(detected_at):
        problems.append(f"detected_at must be an RFC 3339 date-time with an offset, got {detected_at!r}")
    if problems:
        raise MalformedAlert("; ".join(problems))
    return Alert(incident_key=key, kind=kind, state=state, feature_id=feature_id, team_id=team_id, signal=signal,
                 severity=severity, value=record["value"], baseline=record["baseline"], score=record["score"],
                 dimension=dimension, explanation=explanation, detected_at=detected_at, record=record)


def decide(record: Mapping[str, Any], incidents: dict[str, Incident], now: datetime,
           renotify_s: float = DEFAULT_RENOTIFY_S) -> list[Notification]:
    """The notifications one alert record causes, given the open incidents at wall-clock time `now`.

    No I/O and no clock: it updates `incidents` in place (opens, escalates, re-stamps, closes) and returns what to
    send. Rules: a firing record for an unknown incident opens it and triggers; for an open one it triggers again
    only on escalation (warning → critical), sends a renotify once `renotify_s` has passed since the last
    notification, and is otherwise suppressed. A resolved record closes an open incident with a resolve; one for an
    unknown incident is ignored. MalformedAlert (before any change) when the record breaks the contract.
    """
    alert = parse_alert(record)
    key = alert.incident_key
    open_incident = incidents.get(key)
    if alert.state == "resolved":
        if open_incident is None:
            log.info("alerts: resolved record for %s, which is not open: ignored", key)
            return []
        del incidents[key]
        return [Notification("resolve", "resolved", open_incident.severity, alert)]
    if open_incident is None:
        incidents[key] = Incident(incident_key=key, kind=alert.kind, feature_id=alert.feature_id,
                                  team_id=alert.team_id, signal=alert.signal, severity=alert.severity,
                                  opened_at=now, last_notified_at=now)
        return [Notification("trigger", "opened", alert.severity, alert)]
    if SEVERITY_RANK[alert.severity] > SEVERITY_RANK[open_incident.severity]:
        open_incident.severity = alert.severity
        open_incident.last_notified_at = now
        open_incident.notifications += 1
        return [Notification("trigger", "escalated", alert.severity, alert)]
    if (now - open_incident.last_notified_at).total_seconds() >= renotify_s:
        open_incident.last_notified_at = now
        open_incident.notifications += 1
        return [Notification("renotify", "reminder", open_incident.severity, alert)]
    log.debug("alerts: %s is already open and was notified at %s: suppressed", key,
              open_incident.last_notified_at.isoformat())
    return []


def decode_line(line: bytes) -> Any:
    """One NDJSON line as Python data; numbers with a fraction or exponent become Decimal, never float."""
    if len(line) > MAX_LINE_BYTES:
        raise MalformedAlert(f"line is longer than {MAX_LINE_BYTES} bytes")
    try:
        return json.loads(line, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise MalformedAlert(f"not valid JSON: {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# ---------------------------------------------------------------- what each sink receives


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return orjson.Fragment(str(obj))  # the number exactly as it was received
    raise TypeError(f"cannot encode {type(obj).__name__}")


def dumps(obj: Any) -> bytes:
    """JSON bytes, with Decimal values written as exact JSON numbers."""
    return orjson.dumps(obj, default=_json_default)


def _summary(alert: Alert) -> str:
    text = " ".join(alert.explanation.split()) or f"{alert.kind} {alert.signal} on {alert.feature_id}"
    return text if len(text) <= MAX_SUMMARY else text[: MAX_SUMMARY - 1] + "…"


def pagerduty_event(note: Notification, routing_key: str) -> dict[str, Any]:
    """The PagerDuty Events API v2 event of a notification (renotify is a trigger with the same dedup_key)."""
    alert = note.alert
    if note.action == "resolve":
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": alert.incident_key}
    payload: dict[str, Any] = {
        "summary": _summary(alert),
        "source": "tally",
        "severity": note.severity,
        "timestamp": alert.detected_at,
        "component": alert.feature_id,
        "class": alert.signal,
        "custom_details": {"value": alert.value, "baseline": alert.baseline, "score": alert.score,
                           "dimension": alert.dimension},
    }
    if alert.team_id:
        payload["group"] = alert.team_id
    return {"routing_key": routing_key, "event_action": "trigger", "dedup_key": alert.incident_key,
            "payload": payload}


def _slack_escape(text: str) -> str:
    return " ".join(text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").split())


def slack_text(note: Notification) -> str:
    """A one-line human message for a Slack-compatible incoming webhook."""
    a = note.alert
    what = _slack_escape(f"{a.kind} {a.signal} on {a.feature_id} (team {a.team_id or 'unknown'})")
    key = _slack_escape(a.incident_key)
    explanation = _slack_escape(_summary(a))
    if note.action == "resolve":
        return f":white_check_mark: Resolved: {what}: {explanation} [{key}]"
    lead = {"opened": "", "escalated": "Escalated: ", "reminder": "Reminder, still firing: "}.get(note.reason, "")
    numbers = _slack_escape(f"value {a.value}, baseline {a.baseline}, score {a.score}"
                            + (f" ({a.dimension})" if a.dimension else ""))
    return f":rotating_light: {lead}[{note.severity.upper()}] {what}: {explanation} ({numbers}) [{key}]"


def console_text(note: Notification) -> str:
    """One short line for a person watching a terminal (`tally run`'s pager): what, where, why, the key."""
    a = note.alert
    what = f"{a.kind} {a.signal} on {a.feature_id or a.dimension} (team {a.team_id or 'unattributed'})"
    if note.action == "resolve":
        return f"RESOLVED {what}: {_summary(a)} [{a.incident_key}]"
    lead = {"escalated": "ESCALATED ", "reminder": "STILL FIRING "}.get(note.reason, "")
    return f"PAGE {lead}[{note.severity.upper()}] {what}: {_summary(a)} [{a.incident_key}]"


def webhook_body(note: Notification) -> dict[str, Any]:
    """The generic JSON webhook body (also the stdout line): the alert record plus `notification`."""
    return {**note.alert.record, "notification": note.action}


# ---------------------------------------------------------------- sinks


class Sink(Protocol):
    """Delivers one notification, or raises DeliveryError."""

    name: str

    def send(self, note: Notification) -> None: ...


class StdoutSink:
    """One JSON line per notification on standard output."""

    name = "stdout"

    def send(self, note: Notification) -> None:
        try:
            sys.stdout.write(dumps(webhook_body(note)).decode() + "\n")
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            raise DeliveryError(f"cannot write to stdout: {exc}", retryable=False) from exc


class ConsoleSink:
    """One human line per notification on standard output (console_text): the JSON record is the stdout sink's."""

    name = "console"

    def send(self, note: Notification) -> None:
        try:
            sys.stdout.write(console_text(note) + "\n")
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            raise DeliveryError(f"cannot write to stdout: {exc}", retryable=False) from exc


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: re-posting a page elsewhere is not ours to decide."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


class HttpSink:
    """POSTs one JSON body per notification (standard library only, with a timeout); 2xx is delivered.

    Connection errors, timeouts, HTTP 5xx and 429 are retryable; any other status is permanent.
    """

    def __init__(self, name: str, url: str, body: Callable[[Notification], Mapping[str, Any]], timeout: float,
                 secrets: Sequence[str]) -> None:
        self.name = name
        self._url = url.strip()
        self._body = body
        self._timeout = timeout
        self._secrets = tuple(secrets)
        self._opener = urllib.request.build_opener(_NoRedirects())

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def send(self, note: Notification) -> None:
        request = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked (http/https) by AlertsConfig
            self._url, data=dumps(self._body(note)), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "tally-alerts"},
        )
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                response.read(_MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            detail = ""
            with contextlib.suppress(Exception):
                detail = exc.read(500).decode("utf-8", "replace").strip()
            message = self._scrub(f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else ""))
            retryable = exc.code == 429 or exc.code >= 500
            retry_after = _retry_after(exc.headers.get("Retry-After")) if exc.headers else None
            raise DeliveryError(message, retryable, retry_after) from None
        except urllib.error.URLError as exc:
            raise DeliveryError(self._scrub(f"cannot connect: {exc.reason}"), retryable=True) from None
        except (OSError, http.client.HTTPException) as exc:
            raise DeliveryError(self._scrub(f"{type(exc).__name__}: {exc}"), retryable=True) from None


def build_sinks(config: AlertsConfig) -> list[Sink]:
    """The configured sinks, in the configured order."""
    secrets = config.secrets()
    sinks: list[Sink] = []
    for name in config.sinks:
        if name == "stdout":
            sinks.append(StdoutSink())
        elif name == "console":
            sinks.append(ConsoleSink())
        elif name == "pagerduty":
            key = config.pagerduty_routing_key.strip()
            sinks.append(HttpSink(name, config.pagerduty_url, functools.partial(pagerduty_event, routing_key=key),
                                  config.http_timeout_s, secrets))
        elif name == "slack":
            sinks.append(HttpSink(name, config.slack_webhook_url, lambda n: {"text": slack_text(n)},
                                  config.http_timeout_s, secrets))
        elif name == "webhook":
            sinks.append(HttpSink(name, config.webhook_url, webhook_body, config.http_timeout_s, secrets))
    return sinks


# ---------------------------------------------------------------- durable incident table, position and outbox


def state_path(settings: Settings) -> Path:
    """Where the open-incident table (with the input position and the outbox) lives."""
    return settings.data_dir / "alerts" / "incidents.json"


@dataclass
class OutboxEntry:
    """A decided notification and the sinks that have not yet answered it (delivered, or rejected for good)."""

    action: Action
    reason: Reason
    severity: str
    record: Mapping[str, Any]  # the alert record as received (numbers as Decimal): the notification is rebuilt
    pending: list[str]  # sink names, in the configured order
    source: str = ""  # topic[partition]@offset line n, for the logs

    @classmethod
    def of(cls, note: Notification, sinks: Sequence[str], source: str = "") -> OutboxEntry:
        return cls(note.action, note.reason, note.severity, note.alert.record, list(sinks), source)

    def notification(self) -> Notification:
        return Notification(self.action, self.reason, self.severity, parse_alert(self.record))

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "severity": self.severity, "record": self.record,
                "pending": list(self.pending), "source": self.source}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> OutboxEntry:
        entry = cls(obj["action"], obj["reason"], obj["severity"], obj["record"],
                    [str(name) for name in obj["pending"]], str(obj.get("source", "")))
        if entry.action not in ("trigger", "renotify", "resolve") or not isinstance(entry.record, Mapping):
            raise ValueError(f"bad outbox entry {entry.action!r}")
        entry.notification()  # the record still parses
        return entry


@dataclass
class AlertState:
    """What `incidents.json` holds, all of it written in one atomic write.

    The open incidents, the input position (topic and partition → the next offset to read) and the outbox (decided
    notifications that some sink has not answered yet).
    """

    incidents: dict[str, Incident] = field(default_factory=dict)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    outbox: list[OutboxEntry] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        positions: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in sorted(self.positions.items()):
            positions.setdefault(topic, {})[str(partition)] = offset
        return {"state_version": STATE_VERSION,
                "incidents": {key: self.incidents[key].to_json() for key in sorted(self.incidents)},
                "positions": positions,
                "outbox": [entry.to_json() for entry in self.outbox if entry.pending]}


def load_state(path: Path) -> AlertState:
    """The state saved at `path` (empty when the file does not exist); AlertStateError if unreadable.

    A version 1 file (incidents only, from before the position and the outbox were stored) loads with neither.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return AlertState()
    except OSError as exc:
        raise AlertStateError(f"cannot read the incident table {path}: {exc}") from exc
    try:
        # Numbers with a fraction become Decimal, as decode_line reads them: an outbox record comes back exact.
        doc = json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
        version = doc.get("state_version")
        if type(version) is not int or version not in (1, STATE_VERSION):
            raise ValueError(f"state_version is {version!r}, expected 1 or {STATE_VERSION}")
        state = AlertState({key: Incident.from_json(value) for key, value in doc["incidents"].items()})
        if version >= 2:
            for topic, offsets in doc["positions"].items():
                for partition, offset in offsets.items():
                    if type(offset) is not int or offset < 0:
                        raise ValueError(f"position {topic}[{partition}] is {offset!r}")
                    state.positions[(topic, int(partition))] = offset
            state.outbox = [OutboxEntry.from_json(entry) for entry in doc["outbox"]]
        return state
    except (ValueError, KeyError, TypeError, AttributeError, MalformedAlert) as exc:
        raise AlertStateError(
            f"the incident table {path} is corrupt ({exc}); fix it, or delete it to forget every open incident, "
            "the input position and any undelivered notification (their resolves will then be ignored, a firing "
            "record pages again, and the consumer resumes from its committed offsets)"
        ) from exc


def load_incidents(path: Path) -> dict[str, Incident]:
    """The open incidents saved at `path` (none when the file does not exist); AlertStateError if unreadable."""
    return load_state(path).incidents


def save_state(path: Path, state: AlertState) -> None:
    """Write the state to `path` atomically: a temp file in the same directory, fsync, os.replace, fsync the dir."""
    tmp_name = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".incidents.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(state.to_json(), default=_json_default, option=orjson.OPT_INDENT_2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = ""
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, TypeError) as exc:
        raise AlertStateError(f"cannot write the incident table {path}: {exc}") from exc
    finally:
        if tmp_name:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


# ---------------------------------------------------------------- the loop


@dataclass
class AlertsStats:
    """What one run of the alert consumer did."""

    messages: int = 0
    records: int = 0
    malformed: int = 0
    suppressed: int = 0  # valid records that caused no notification (duplicates, unknown resolves, …)
    notifications: dict[str, int] = field(default_factory=dict)  # decided, by action
    delivered: dict[str, int] = field(default_factory=dict)  # by sink
    rejected: dict[str, int] = field(default_factory=dict)  # permanent failures, by sink
    retries: int = 0
    commits: int = 0
    recovered: int = 0  # notifications found in the outbox at start (decided by an earlier run, not all delivered)
    saves: int = 0  # atomic writes of the incident table
    save_seconds: float = 0.0  # their total time (write, fsync, rename, fsync of the directory)
    open_incidents: int = 0  # in the saved table when the run ended


def serve_metrics(stats: AlertsStats, host: str, port: int) -> Any:
    """Serve `stats` as Prometheus metrics on host:port (a daemon thread); returns the server (shutdown() stops it).

    The consumer is a plain process, not a Faust worker: prometheus_client's own server answers every path with
    the metrics, so a probe of /metrics doubles as its liveness check.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    from streams.metrics import counter, gauge

    class Collector:
        def collect(self) -> Any:
            yield counter("tally_alerts_messages", "Kafka messages read from llm.cost.alerts.v1",
                          [({}, stats.messages)])
            yield counter("tally_alerts_records", "Alert records read, by verdict",
                          [({"verdict": "valid"}, stats.records), ({"verdict": "malformed"}, stats.malformed),
                           ({"verdict": "suppressed"}, stats.suppressed)], ("verdict",))
            yield counter("tally_alerts_notifications", "Notifications decided, by action",
                          [({"action": a}, n) for a, n in sorted(stats.notifications.items())], ("action",))
            yield counter("tally_alerts_delivered", "Notifications delivered, by sink",
                          [({"sink": k}, n) for k, n in sorted(stats.delivered.items())], ("sink",))
            yield counter("tally_alerts_rejected", "Notifications a sink refused for good, by sink",
                          [({"sink": k}, n) for k, n in sorted(stats.rejected.items())], ("sink",))
            yield counter("tally_alerts_retries", "Delivery attempts retried", [({}, stats.retries)])
            yield gauge("tally_alerts_open_incidents", "Incidents open in the saved incident table",
                        [({}, float(stats.open_incidents))])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


class Pager:
    """The table, its file and the sinks: saves, and delivers the outbox one recorded notification at a time."""

    def __init__(self, path: Path, state: AlertState, sinks: Sequence[Sink], config: AlertsConfig,
                 stats: AlertsStats, crash: Failpoints) -> None:
        self.path, self.state, self.sinks, self.config = path, state, sinks, config
        self.stats, self.crash = stats, crash

    def save(self) -> None:
        started = time.perf_counter()
        self.state.outbox = [entry for entry in self.state.outbox if entry.pending]
        save_state(self.path, self.state)
        self.stats.saves += 1
        self.stats.save_seconds += time.perf_counter() - started
        self.stats.open_incidents = len(self.state.incidents)

    def deliver(self, stop: threading.Event) -> bool:
        """Deliver the outbox to every sink, in order per sink; True when it is empty, False if `stop` came first.

        After each answer (delivered, or rejected for good) the notification is marked for that sink and the table
        written, so that a crash re-sends at most the one notification a sink was answering. A retryable failure
        stops that sink's queue (order is kept) and is retried with exponential backoff, from `retry_initial_s`
        doubling to `retry_max_s` (or the server's Retry-After, within that bound), for as long as it takes; the
        other sinks go on meanwhile. A permanent failure is logged and that notification skipped for that sink.
        """
        pending = {sink.name: [e for e in self.state.outbox if sink.name in e.pending] for sink in self.sinks}
        notes = {id(e): e.notification() for e in self.state.outbox}
        delay = self.config.retry_initial_s
        answered = 0
        while True:
            wait = 0.0
            for sink in self.sinks:
                queue = pending[sink.name]
                while queue:
                    entry = queue[0]
                    note = notes[id(entry)]
                    try:
                        sink.send(note)
                    except DeliveryError as exc:
                        if exc.retryable:
                            self.stats.retries += 1
                            this_wait = min(max(delay, exc.retry_after or 0.0), self.config.retry_max_s)
                            wait = max(wait, this_wait)
                            log.warning("alerts: sink %s: %s of %s failed (%s); retrying in %g s", sink.name,
                                        note.action, note.incident_key, exc, this_wait)
                            break
                        self.stats.rejected[sink.name] = self.stats.rejected.get(sink.name, 0) + 1
                        log.error("alerts: sink %s rejected %s of %s permanently (%s): this notification is "
                                  "dropped for %s", sink.name, note.action, note.incident_key, exc, sink.name)
                    else:
                        self.stats.delivered[sink.name] = self.stats.delivered.get(sink.name, 0) + 1
                        log.info("alerts: sink %s: %s %s (%s)", sink.name, note.action, note.incident_key,
                                 note.severity)
                    self.crash.hit("alerts.in_flight")
                    entry.pending.remove(sink.name)
                    queue.pop(0)
                    self.save()
                    answered += 1
                    if answered == 1:
                        self.crash.hit("alerts.mid_batch")
            if not any(pending.values()):
                return True
            if stop.wait(wait):
                return False
            delay = min(delay * 2, self.config.retry_max_s)


def _decide_message(msg: Message, incidents: dict[str, Incident], config: AlertsConfig,
                    stats: AlertsStats, now: datetime) -> list[OutboxEntry]:
    entries: list[OutboxEntry] = []
    where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
    for n, raw in enumerate((msg.value() or b"").split(b"\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        stats.records += 1
        record: Any = None
        try:
            record = decode_line(line)
            got = decide(record, incidents, now, config.renotify_s)
        except MalformedAlert as exc:
            stats.malformed += 1
            key = record.get("incident_key") if isinstance(record, dict) else None
            log.error("alerts: %s line %d: malformed alert record skipped (incident_key %r): %s", where, n, key,
                      exc)
            continue
        if not got:
            stats.suppressed += 1
        for note in got:
            stats.notifications[note.action] = stats.notifications.get(note.action, 0) + 1
            entries.append(OutboxEntry.of(note, config.sinks, f"{where} line {n}"))
    return entries


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def run_alerts(settings: Settings, config: AlertsConfig, stop: threading.Event | None = None,
               max_messages: int | None = None, clock: Callable[[], datetime] = _wall_clock,
               stats: AlertsStats | None = None) -> AlertsStats:
    """Consume `settings.topics.alerts` and page through the configured sinks until `stop` or `max_messages`.

    `clock` is read once per message: the "now" of `decide` (incidents opened, reminders due after renotify_s).

    First the outbox an earlier run left is delivered (even with `max_messages` 0); then the consumer group
    `config.group_id` (default `settings.group_id("alerts")`) reads from the stored position of each assigned
    partition, else its committed offset, else the earliest retained alert. Each batch follows the module's
    numbered protocol. When `stop` is set while a delivery is being retried, the rest of the outbox stays saved
    and is delivered on the next start. Raises ConfigError for a bad configuration and AlertStateError when the
    incident table cannot be read or written.
    """
    config = config.validated()
    stop = stop or threading.Event()
    crash = Failpoints(settings.failpoint)  # tests only: inert unless armed
    sinks = build_sinks(config)
    path = state_path(settings)
    state = load_state(path)
    topic = settings.topics.alerts
    group = config.group_id or settings.group_id("alerts")
    stats = stats if stats is not None else AlertsStats()  # given: the caller serves it as metrics while it runs
    stats.open_incidents = len(state.incidents)
    pager = Pager(path, state, sinks, config, stats, crash)
    if state.outbox:
        for entry in state.outbox:
            gone = [name for name in entry.pending if name not in config.sinks]
            if gone:
                log.warning("alerts: %s of %s (%s) was not delivered to %s, which is no longer configured: dropped "
                            "for it", entry.action, entry.record.get("incident_key"), entry.source,
                            ", ".join(gone))
                entry.pending = [name for name in entry.pending if name in config.sinks]
        stats.recovered = sum(1 for entry in state.outbox if entry.pending)
        if stats.recovered:
            log.info("alerts: %d notifications decided by the last run are not delivered to every sink yet; "
                     "delivering them first", stats.recovered)
        if not pager.deliver(stop):
            log.warning("alerts: stopped while a delivery was failing; the rest of the outbox is saved and "
                        "delivered on the next start")
            return stats
        pager.save()
    if max_messages is not None and max_messages <= 0:
        return stats
    conf, client_errors = watched(settings.kafka, {
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": int(settings.session_timeout_s * 1000),
        "logger": logging.getLogger("tally.alerts.rdkafka"),
    })
    consumer = Consumer(conf)
    # Reach the brokers first: wrong credentials are a clear error within seconds, not a consumer polling forever.
    try:
        metadata(consumer, client_errors, settings.kafka, 30.0, topic)
    except BaseException:
        consumer.close()
        raise

    def on_assign(c: Consumer, partitions: list[TopicPartition]) -> None:
        # The stored position wins over Kafka's committed offset (a lag hint only); without one (a new table, or a
        # version 1 file) the committed offset applies, else the earliest retained alert.
        for tp in partitions:
            stored = state.positions.get((tp.topic, tp.partition))
            if stored is not None:
                tp.offset = stored
        c.assign(partitions)
        log.info("alerts: assigned %s", ", ".join(
            f"{tp.topic}[{tp.partition}]@" + (str(tp.offset) if tp.offset >= 0 else "committed")
            for tp in partitions) or "nothing")

    log.info("alerts: consuming %s as group %s; sinks %s; %d open incidents and %d stored positions in %s; "
             "renotify after %g s", topic, group, ", ".join(config.sinks), len(state.incidents),
             len(state.positions), path, config.renotify_s)
    try:
        consumer.subscribe([topic], on_assign=on_assign)
        while not stop.is_set() and (max_messages is None or stats.messages < max_messages):
            want = config.batch_messages if max_messages is None else min(config.batch_messages,
                                                                           max_messages - stats.messages)
            batch = consumer.consume(num_messages=want, timeout=config.poll_timeout_s)
            if not batch:
                continue
            # 2. Decide (step 1, the start, is above).
            offsets: dict[tuple[str, int], int] = {}
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise TallyError(f"alerts: the Kafka consumer failed: {err}")
                    log.warning("alerts: consumer: %s", err)
                    continue
                partition, offset = msg.partition(), msg.offset()
                if partition is not None and offset is not None:
                    tp_key = (msg.topic() or topic, partition)
                    if offset < state.positions.get(tp_key, 0) and tp_key not in offsets:
                        # Only when Kafka reset the offset (the stored one is past the log's end: the topic was
                        # recreated). These are new alerts: decided, never skipped.
                        log.warning("alerts: %s[%d] starts at offset %d, below the stored position %d: the topic "
                                    "was recreated or truncated; reading on from there", tp_key[0], partition,
                                    offset, state.positions[tp_key])
                    offsets[tp_key] = offset + 1
                stats.messages += 1
                state.outbox.extend(_decide_message(msg, state.incidents, config, stats, clock()))
            if not offsets:
                continue
            # 3. Save the decisions, the position and the outbox in one atomic write.
            state.positions.update(offsets)
            notes = bool(state.outbox)
            pager.save()
            if notes:
                crash.hit("alerts.after_save")
            # 4. Deliver, one recorded answer at a time, retrying for as long as it takes (or until stop).
            if not pager.deliver(stop):
                log.warning("alerts: stopped while a delivery was failing; the rest of the outbox is saved and "
                            "delivered on the next start")
                break
            if notes:
                crash.hit("alerts.after_delivery")
            # 5. Commit: a lag hint for the group's tools; the stored position is what a restart reads from.
            try:
                consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                asynchronous=False)
                stats.commits += 1
            except KafkaException as exc:
                log.warning("alerts: commit failed (%s); harmless: a restart reads from the stored position", exc)
    finally:
        consumer.close()
    saves = f"{stats.saves} table writes ({1000 * stats.save_seconds / stats.saves:.1f} ms each)" if stats.saves \
        else "no table write"
    log.info("alerts: stopped after %d messages, %d records (%d malformed, %d suppressed); delivered %s; "
             "%d open incidents; %s", stats.messages, stats.records, stats.malformed, stats.suppressed,
             stats.delivered or "nothing", stats.open_incidents, saves)
    return stats
